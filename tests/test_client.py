"""The Python clients and the two CLIs, end to end: `hotlora-server` started from the command line,
`hotlora generate` and `hotlora adapters ...` against it, SIGTERM for a clean stop."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request

import pytest

from clients import AsyncClient, Client, InvalidArgument, NotFound, Unauthenticated
from server.config import AdapterConfig, EngineConfig, ServerConfig
from tests.helpers import RunningServer


@pytest.fixture(scope="module")
def server(llama_dir, cheese_and_wine_store):
    config = ServerConfig(model_dir=llama_dir, host="127.0.0.1", port=0, metrics_host="127.0.0.1", metrics_port=0,
                          engine=EngineConfig(max_batch_size=2, max_seq_len=128, max_adapters=2, max_rank=16),
                          adapters=AdapterConfig(store=cheese_and_wine_store.root), admin_token="tok")
    with RunningServer(config) as running:
        yield running


def test_client_generate_stream_and_adapters(server):
    with Client(server.target, admin_token="tok") as client:
        result = client.generate("Cheese is", adapter="cheese", max_new_tokens=6, temperature=0.0, ignore_eos=True)
        assert result.finish_reason == "length" and result.usage.completion_tokens == 6 == len(result.token_ids)
        assert (result.adapter, result.adapter_version) == ("cheese", "v1") and len(result.adapter_hash) == 64
        pieces = list(client.stream("Cheese is", adapter="cheese", max_new_tokens=6, temperature=0.0, ignore_eos=True))
        assert "".join(p.text for p in pieces) == result.text and pieces[-1].finish_reason == "length"
        chat = client.generate([{"role": "user", "content": "hi"}], max_new_tokens=3, temperature=0.0, ignore_eos=True)
        assert chat.usage.completion_tokens == 3
        assert {(a.name, a.version) for a in client.list_adapters()} == {("cheese", "v1"), ("wine", "v1")}
        assert client.load_adapter("wine").tier in ("device", "host")
        assert client.get_adapter("wine@v1").current
        client.unload_adapter("wine")
        with pytest.raises(NotFound) as info:
            client.generate("x", adapter="nope")
        assert "nope" in str(info.value)
        with pytest.raises(InvalidArgument, match="temperature"):
            client.generate("x", temperature=-1.0)
    with Client(server.target) as anonymous, pytest.raises(Unauthenticated):
        anonymous.list_adapters()


def test_async_client(server):
    async def run():
        async with AsyncClient(server.target, admin_token="tok") as client:
            results = await asyncio.gather(*[client.generate("Brie", adapter=a, max_new_tokens=4, temperature=0.0,
                                                             ignore_eos=True) for a in ("", "cheese", "wine")])
            pieces = [p async for p in client.stream("Brie", adapter="wine", max_new_tokens=4, temperature=0.0, ignore_eos=True)]
            return results, pieces, await client.list_adapters()

    results, pieces, listed = asyncio.run(run())
    assert [r.adapter for r in results] == ["", "cheese", "wine"]
    assert "".join(p.text for p in pieces) == results[2].text
    assert len(listed) == 2


def test_command_line_server_and_client_end_to_end(llama_dir, cheese_and_wine_store, tmp_path):
    bin_dir = os.path.dirname(sys.executable)
    token_file = tmp_path / "token"
    token_file.write_text("cli-token\n")
    server = subprocess.Popen(
        [f"{bin_dir}/hotlora-server", "--model", str(llama_dir), "--adapters", str(cheese_and_wine_store.root), "--host", "127.0.0.1",
         "--port", "0", "--metrics-port", "0", "--max-seq-len", "128", "--admin-token-file", str(token_file),
         "--grace-period", "5", "--http-port", "0"],  # HTTP and metrics bind --host's address
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in server.stdout:
            lines.append(line)
            if match := re.search(r"ready: grpc port (\d+), metrics port \d+, http port (\d+)", line):
                break
        assert match, "".join(lines)
        target = ["--target", f"127.0.0.1:{match[1]}"]

        def hotlora(*args, env=None):
            return subprocess.run([f"{bin_dir}/hotlora", *target, *args], capture_output=True, text=True, timeout=120,
                                  env=env)

        health = hotlora("health")
        assert health.returncode == 0 and health.stdout.strip().endswith(": SERVING"), health
        generated = hotlora("generate", "--adapter", "cheese", "--max-new-tokens", "5", "--temperature", "0", "Cheese is")
        assert generated.returncode == 0 and "5 generated tokens; adapter cheese@v1" in generated.stderr, generated
        models = hotlora("models")  # no token needed
        assert models.returncode == 0 and models.stdout.split()[:3] == [llama_dir.name, "cheese", "cheese@v1"], models
        shaped = hotlora("generate", "--adapter", "wine", "--regex", "[0-9]{3}", "--logprobs", "1", "Number:")
        assert shaped.returncode == 0 and re.fullmatch("[0-9]{3}", shaped.stdout.strip()), shaped
        generated_tokens = int(re.search(r"(\d+) generated tokens", shaped.stderr)[1])
        assert shaped.stderr.count("top: ") == generated_tokens > 0  # a logprob line per token
        with urllib.request.urlopen(f"http://127.0.0.1:{match[2]}/v1/models", timeout=30) as reply:
            assert json.loads(reply.read())["data"][0]["id"] == llama_dir.name
        listed = hotlora("adapters", "list", env={**os.environ, "HOTLORA_ADMIN_TOKEN_FILE": str(token_file)})
        assert listed.returncode == 0 and re.search(r"^cheese\s+v1\s", listed.stdout, re.MULTILINE), listed
        loaded = hotlora("--admin-token-file", str(token_file), "adapters", "load", "wine")
        assert loaded.returncode == 0 and loaded.stdout.startswith("loaded wine@v1 (rank 8"), loaded
        unloaded = hotlora("adapters", "unload", "wine", "--admin-token-file", str(token_file))  # global flags go anywhere
        assert unloaded.returncode == 0, unloaded
        refused = hotlora("adapters", "list")
        assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
        bad = hotlora("generate", "--adapter", "../x", "hi")
        assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr

        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        gone = hotlora("health")  # nothing answers any more: a clear status, exit 1
        assert gone.returncode == 1 and "UNAVAILABLE" in gone.stderr, gone
    finally:
        if server.poll() is None:
            server.kill()
        output = server.stdout.read()
    assert "draining" in output


def test_server_help_lists_the_documented_flags():
    out = subprocess.run([f"{os.path.dirname(sys.executable)}/hotlora-server", "--help"], capture_output=True, text=True).stdout
    for flag in ["--model", "--adapters", "--port", "--metrics-port", "--max-adapters", "--max-rank", "--max-batch-size",
                 "--max-seq-len", "--host", "--tls-cert", "--tls-key", "--admin-token-file", "--grace-period"]:
        assert flag in out, flag
