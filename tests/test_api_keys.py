"""API keys and TLS on both protocols: with --api-key-file, generation over HTTP (the official
`openai` client, over HTTPS) and gRPC needs one of the file's keys, keys rotate by rewriting the
file, health and metrics stay open, admin calls keep the admin token; the `hotlora` CLI and
`trainer --notify` reach a TLS server."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

from clients import Client  # noqa: E402
from clients.client import Unauthenticated  # noqa: E402
from server.config import AdapterConfig, EngineConfig, ServerConfig  # noqa: E402
from tests.helpers import RunningServer, self_signed_certificate  # noqa: E402

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def secured(llama_dir, cheese_and_wine_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("secured")
    cert, key = self_signed_certificate(root)
    keys, admin = root / "keys", root / "admin"
    keys.write_text("# one key per line\nkey-alice\n\nkey-bob\n")
    admin.write_text("admin-secret\n")
    config = ServerConfig(model_dir=llama_dir, engine=EngineConfig(max_batch_size=2, max_seq_len=64),
                          adapters=AdapterConfig(store=cheese_and_wine_store.root), host="127.0.0.1", port=0,
                          metrics_port=0, http_port=0, tls_cert=cert, tls_key=key, admin_token="admin-secret",
                          api_key_file=keys)
    with RunningServer(config) as running:
        yield running, cert, keys, admin


def openai_client(running, cert: Path, api_key: str):
    return openai.OpenAI(base_url=f"https://localhost:{running.server.http_port}/v1", api_key=api_key, max_retries=0,
                         http_client=openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=str(cert))))


def grpc_client(running, cert: Path, **kwargs) -> Client:
    return Client(f"localhost:{running.server.port}", tls=True, root_certificates=cert.read_bytes(), timeout=30,
                  **kwargs)


def test_http_generation_needs_a_key_over_https_and_health_and_metrics_do_not(secured):
    running, cert, _, _ = secured
    reply = openai_client(running, cert, "key-bob").completions.create(model="cheese", prompt="Brie", max_tokens=3,
                                                                       extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 3
    for wrong in ("key-mallory", "key-alice key-bob", "KEY-ALICE"):
        with pytest.raises(openai.AuthenticationError) as info:
            openai_client(running, cert, wrong).completions.create(model="cheese", prompt="Brie", max_tokens=3)
        assert info.value.status_code == 401 and info.value.body["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai_client(running, cert, "nope").models.list()
    context = ssl.create_default_context(cafile=str(cert))
    for path in ("/health", "/metrics"):
        with urllib.request.urlopen(f"https://localhost:{running.server.http_port}{path}", context=context) as open_:
            assert open_.status == 200, path
    with pytest.raises(urllib.error.HTTPError) as info:  # plain POST without a key: OpenAI's shape, 401
        urllib.request.urlopen(urllib.request.Request(
            f"https://localhost:{running.server.http_port}/tokenize", data=json.dumps({"prompt": "x"}).encode(),
            headers={"content-type": "application/json"}), context=context)
    assert info.value.code == 401 and info.value.headers["WWW-Authenticate"] == "Bearer"
    assert json.loads(info.value.read())["error"]["type"] == "authentication_error"
    with pytest.raises(urllib.error.HTTPError) as info:  # the key is checked before the body is even read
        urllib.request.urlopen(urllib.request.Request(
            f"https://localhost:{running.server.http_port}/v1/completions", data=b"{not json",
            headers={"content-type": "application/json"}), context=context)
    assert info.value.code == 401


def test_grpc_generation_needs_a_key_and_admin_calls_keep_the_admin_token(secured):
    running, cert, _, _ = secured
    with grpc_client(running, cert, api_key="key-alice") as client:
        assert client.generate("Brie", "cheese", max_new_tokens=2, ignore_eos=True).usage.completion_tokens == 2
        assert client.models()[0].id
        assert client.health() == "SERVING"
        with pytest.raises(Unauthenticated):  # an API key is not the admin token
            client.list_adapters()
    with grpc_client(running, cert, admin_token="admin-secret") as admin:
        assert admin.health() == "SERVING"  # health needs nothing
        assert {a.name for a in admin.list_adapters()} >= {"cheese"}
        with pytest.raises(Unauthenticated, match="API key"):  # the admin token is not an API key
            admin.generate("Brie", "cheese", max_new_tokens=2)
        with pytest.raises(Unauthenticated):
            admin.models()


NEAR_MISSES = ["key-a", "key-alic", "key-", "k", "key-alicee", "key-alice-2", "xkey-alice", "KEY-ALICE", "Key-alice",
               "key-Alice", "key-bo", "key-bobb", "KEY-BOB"]


def test_keys_that_are_prefixes_extensions_or_case_changes_of_a_valid_key_are_refused(secured):
    """A key is the whole string, compared exactly: on HTTP 401, on gRPC UNAUTHENTICATED."""
    running, cert, _, _ = secured
    with grpc_client(running, cert, api_key="key-alice") as valid:
        assert valid.generate("Brie", "cheese", max_new_tokens=1, ignore_eos=True).usage.completion_tokens == 1
    for wrong in NEAR_MISSES:
        with pytest.raises(openai.AuthenticationError) as info:
            openai_client(running, cert, wrong).completions.create(model="cheese", prompt="Brie", max_tokens=1)
        assert info.value.status_code == 401, wrong
        with grpc_client(running, cert, api_key=wrong) as client:
            with pytest.raises(Unauthenticated, match="not valid"):
                client.generate("Brie", "cheese", max_new_tokens=1)


def test_keys_rotate_by_rewriting_the_file(secured):
    running, cert, keys, _ = secured
    original = keys.read_text()
    try:
        staged = keys.with_name("keys.new")
        staged.write_text("key-carol\n")
        os.replace(staged, keys)
        with grpc_client(running, cert, api_key="key-carol") as carol:
            assert carol.generate("Brie", max_new_tokens=1).usage.completion_tokens == 1
        with grpc_client(running, cert, api_key="key-alice") as alice, pytest.raises(Unauthenticated):
            alice.generate("Brie", max_new_tokens=1)
        with pytest.raises(openai.AuthenticationError):
            openai_client(running, cert, "key-alice").completions.create(model="cheese", prompt="Brie", max_tokens=1)
        keys.write_bytes(b"key-dave\n\xff\xfe")  # unreadable (not UTF-8): the keys last read still hold
        with grpc_client(running, cert, api_key="key-carol") as carol:
            assert carol.generate("Brie", max_new_tokens=1).usage.completion_tokens == 1
        keys.write_text("")  # emptied by mistake: nobody gets in, nobody is let in for free
        with grpc_client(running, cert, api_key="key-carol") as carol, pytest.raises(Unauthenticated):
            carol.generate("Brie", max_new_tokens=1)
    finally:
        keys.write_text(original)


def test_keys_without_an_admin_token_are_refused_at_start(tmp_path):
    from server.serving.main import parse_args

    keys = tmp_path / "keys"
    keys.write_text("k\n")
    with pytest.raises(SystemExit):  # generation behind keys, load/pin/unload open to anyone: refused
        parse_args(["--model", "m", "--api-key-file", str(keys)], environ={})
    token = tmp_path / "token"
    token.write_text("t\n")
    assert parse_args(["--model", "m", "--api-key-file", str(keys), "--admin-token-file", str(token)],
                      environ={}).api_key_file == keys


def test_cli_and_trainer_notify_reach_a_tls_server_with_their_credentials(secured, tmp_path):
    running, cert, keys, admin = secured
    target = ["--target", f"localhost:{running.server.port}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOTLORA_")}
    generated = subprocess.run([str(BIN / "hotlora"), *target, "generate", "--adapter", "cheese", "--max-new-tokens",
                                "3", "Brie", "--ca-cert", str(cert), "--api-key-file", str(keys)],
                               capture_output=True, text=True, timeout=120, env=env)
    assert generated.returncode == 0 and "3 generated tokens" in generated.stderr, generated.stderr
    keyless = subprocess.run([str(BIN / "hotlora"), *target, "--ca-cert", str(cert), "generate", "Brie"],
                             capture_output=True, text=True, timeout=120, env=env)
    assert keyless.returncode == 1 and "UNAUTHENTICATED" in keyless.stderr

    from trainer.publish import notify

    here = (f"localhost:{running.server.port}",)
    token = admin.read_text().strip()
    assert notify(here, "wine", "v1", token, ca_cert=cert.read_bytes()) == []
    assert notify(here, "wine", "v1", token) != []  # plaintext to a TLS server fails (a warning, not a crash)
    assert notify(here, "wine", "v1", "wrong", ca_cert=cert.read_bytes()) != []
