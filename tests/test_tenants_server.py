"""Tenants through a running server, HTTP and gRPC: each tenant sees and calls only its own
adapters (another's answers word for word as a missing one), tenant admin keys manage only their
own names, quotas answer 429 / RESOURCE_EXHAUSTED with when to retry, a file edited under load
changes who gets in without dropping a running request, and the usage log, the counters and the
clients' usage fields agree."""

from __future__ import annotations

import hashlib
import json
import os
import time

import urllib.error
import urllib.request

import grpc
import pytest

from protos.hotlora.v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc
from server.adapters.store import AdapterStore
from server.config import AdapterConfig, EngineConfig, ServerConfig
from tests.helpers import RunningServer, wait_until

BASE = "base-model"
ADMIN = "admin-global"


def sha(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


TENANTS = f"""\
tenants:
  acme:
    keys: ["{sha('key-acme')}"]
    adapters: ["chees*"]
    base: false
    admin_keys: ["{sha('admin-acme')}"]
  globex:
    keys: ["key-globex"]
    adapters: ["wine"]
    base: true
  metered:
    keys: ["key-metered"]
    adapters: ["*"]
    base: true
    limits: {{requests_per_minute: 2, tokens_per_minute: 100000, concurrent: 4}}
"""


def write(path, text: str) -> None:
    fresh = path.with_suffix(".new")
    fresh.write_text(text)
    os.replace(fresh, path)


@pytest.fixture(scope="module")
def store(peft_adapters, tmp_path_factory):
    store = AdapterStore(tmp_path_factory.mktemp("tenant-store"))
    for name in ("cheese", "wine"):
        store.publish(name, peft_adapters[name])
    return store


def start(llama_dir, store, tmp_path, **overrides) -> RunningServer:
    tenants = tmp_path / "tenants.yaml"
    if not tenants.exists():
        write(tenants, TENANTS)
    settings = dict(model_dir=llama_dir, engine=EngineConfig(max_batch_size=4, max_seq_len=64),
                    adapters=AdapterConfig(store=store.root), host="127.0.0.1", port=0, metrics_port=0, http_port=0,
                    admin_token=ADMIN, tenants_file=tenants, served_model_name=BASE, default_max_new_tokens=4)
    config = ServerConfig(**{**settings, **overrides})
    return RunningServer(config)


@pytest.fixture(scope="module")
def running(llama_dir, store, tmp_path_factory):
    with start(llama_dir, store, tmp_path_factory.mktemp("tenants")) as server:
        yield server


class Http:
    def __init__(self, server: RunningServer, key: str):
        self.base = f"http://127.0.0.1:{server.server.http_port}"
        self.key = key

    def send(self, method: str, path: str, body: dict | None = None, request_id: str | None = None):
        """(status, headers, text) of one call."""
        headers = {"Authorization": f"Bearer {self.key}", "content-type": "application/json"}
        if request_id is not None:
            headers["x-request-id"] = request_id
        request = urllib.request.Request(self.base + path, method=method, headers=headers,
                                         data=json.dumps(body).encode() if body is not None else None)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.headers, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers, exc.read().decode()

    def post(self, path: str, body: dict, request_id: str | None = None) -> tuple[int, dict]:
        """(status, body); a streamed answer's events collected, its status the response's."""
        status, _, text = self.send("POST", path, body, request_id)
        if status == 200 and body.get("stream"):
            return 200, {"events": [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]}
        return status, json.loads(text)

    def get(self, path: str) -> tuple[int, dict]:
        status, _, text = self.send("GET", path)
        return status, json.loads(text)


class Grpc:
    def __init__(self, server: RunningServer, key: str):
        self.channel = server.channel()
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)
        self.metadata = (("authorization", f"Bearer {key}"),)

    def call(self, method: str, **fields) -> tuple[grpc.StatusCode, str]:
        """(code, details) of one call: Generate, GenerateStream (read to its end) or ListModels."""
        try:
            if method == "ListModels":
                self.stub.ListModels(generation_pb2.ListModelsRequest(), metadata=self.metadata, timeout=60)
            elif method == "GenerateStream":
                list(self.stub.GenerateStream(generation_pb2.GenerateRequest(**fields), metadata=self.metadata,
                                              timeout=60))
            else:
                self.stub.Generate(generation_pb2.GenerateRequest(**fields), metadata=self.metadata, timeout=60)
        except grpc.RpcError as exc:
            return exc.code(), exc.details()
        return grpc.StatusCode.OK, ""


MESSAGES = [{"role": "user", "content": "Brie?"}]
# every generation surface, as (protocol, how to call it with a model / adapter name)
SURFACES = {
    "http chat": lambda h, g, m: h.post("/v1/chat/completions", {"model": m, "messages": MESSAGES, "max_tokens": 2}),
    "http chat stream": lambda h, g, m: h.post("/v1/chat/completions", {"model": m, "messages": MESSAGES,
                                                                        "max_tokens": 2, "stream": True}),
    "http completions n=2": lambda h, g, m: h.post("/v1/completions", {"model": m, "prompt": "Brie", "max_tokens": 2,
                                                                       "n": 2, "temperature": 1.0}),
    "http completions stream": lambda h, g, m: h.post("/v1/completions", {"model": m, "prompt": "Brie",
                                                                          "max_tokens": 2, "stream": True}),
    "http echo prompt logprobs": lambda h, g, m: h.post("/v1/completions", {"model": m, "prompt": "Brie is",
                                                                            "max_tokens": 0, "echo": True,
                                                                            "logprobs": 1}),
    "http model": lambda h, g, m: h.get(f"/v1/models/{m}"),
    "grpc Generate": lambda h, g, m: g.call("Generate", prompt="Brie", adapter=m, max_new_tokens=2),
    "grpc GenerateStream": lambda h, g, m: g.call("GenerateStream", prompt="Brie", adapter=m, max_new_tokens=2),
    "grpc chat": lambda h, g, m: g.call("Generate", messages=generation_pb2.ChatMessages(messages=[
        generation_pb2.ChatMessage(role="user", content="Brie?")]), adapter=m, max_new_tokens=2),
    "grpc score": lambda h, g, m: g.call("Generate", prompt="Brie is", adapter=m, max_new_tokens=0, prompt_logprobs=1),
}
HTTP_CODES = {200: grpc.StatusCode.OK, 404: grpc.StatusCode.NOT_FOUND, 403: grpc.StatusCode.PERMISSION_DENIED}


def outcome(result) -> tuple[grpc.StatusCode, str]:
    """(gRPC code, message) of either protocol's answer."""
    first, second = result
    if isinstance(first, int):
        return HTTP_CODES.get(first, first), second.get("error", {}).get("message", "")
    return first, second


@pytest.mark.parametrize("surface", sorted(SURFACES))
def test_a_tenant_calls_its_own_adapters_and_another_tenants_look_missing(running, surface):
    call = SURFACES[surface]
    http, rpc = Http(running, "key-acme"), Grpc(running, "key-acme")
    for own in ("cheese", "cheese@v1"):
        assert outcome(call(http, rpc, own))[0] == grpc.StatusCode.OK, own
    for other, missing in (("wine", "nothin"), ("wine@v1", "nothin@v1")):  # same lengths: the same message shape
        other_code, other_message = outcome(call(http, rpc, other))
        missing_code, missing_message = outcome(call(http, rpc, missing))
        assert missing_code == other_code == grpc.StatusCode.NOT_FOUND, (other, other_code)
        assert other_message.replace("wine", "nothin") == missing_message and "wine" in other_message
    base_name = "" if surface.startswith("grpc") else BASE
    code, message = outcome(call(http, rpc, base_name))
    if surface == "http model":  # a model it may not call is not in its list either
        assert code == grpc.StatusCode.NOT_FOUND
    else:
        assert code == grpc.StatusCode.PERMISSION_DENIED and "may not call the base model" in message
    # a tenant with base: true calls it, and its own adapter, and not acme's
    globex_http, globex_rpc = Http(running, "key-globex"), Grpc(running, "key-globex")
    assert outcome(call(globex_http, globex_rpc, base_name))[0] == grpc.StatusCode.OK
    assert outcome(call(globex_http, globex_rpc, "wine"))[0] == grpc.StatusCode.OK
    assert outcome(call(globex_http, globex_rpc, "cheese"))[0] == grpc.StatusCode.NOT_FOUND


def test_each_tenant_lists_only_what_it_may_call(running):
    for key, expected in (("key-acme", ["cheese", "cheese@v1"]), ("key-globex", [BASE, "wine", "wine@v1"]),
                          ("key-metered", [BASE, "cheese", "cheese@v1", "wine", "wine@v1"])):
        status, listed = Http(running, key).get("/v1/models")
        assert status == 200 and [m["id"] for m in listed["data"]] == expected, key
        rpc = Grpc(running, key)
        models = rpc.stub.ListModels(generation_pb2.ListModelsRequest(), metadata=rpc.metadata, timeout=30).models
        assert [m.id for m in models] == expected, key
    status, listed = Http(running, "key-acme").get("/v1/models")
    assert "wine" not in json.dumps(listed)  # no other tenant's name anywhere (the base model is its adapters' parent)
    assert Http(running, "key-nobody").get("/v1/models")[0] == 401


def test_tenant_admin_keys_manage_only_their_own_names(llama_dir, store, tmp_path):
    from trainer.publish import notify

    with start(llama_dir, store, tmp_path) as server:
        channel = server.channel()
        admin = adapters_pb2_grpc.AdaptersStub(channel)

        def call(method, token, **fields):
            request = getattr(adapters_pb2, f"{method}Request")(**fields)
            try:
                return getattr(admin, method)(request, metadata=(("authorization", f"Bearer {token}"),), timeout=60)
            except grpc.RpcError as exc:
                return exc.code()

        assert call("LoadAdapter", "admin-acme", name="cheese").adapter.name == "cheese"
        assert call("LoadAdapter", "admin-acme", name="cheese", version="v1").adapter.version == "v1"  # a pin
        assert [a.name for a in call("ListAdapters", "admin-acme").adapters] == ["cheese"]
        assert call("GetAdapter", "admin-acme", adapter="cheese").name == "cheese"
        for method, fields in (("LoadAdapter", {"name": "wine"}), ("UnloadAdapter", {"name": "wine"}),
                               ("GetAdapter", {"adapter": "wine"}), ("LoadAdapter", {"name": "nothing"}),
                               ("GetAdapter", {"adapter": "nothing@v9"})):
            assert call(method, "admin-acme", **fields) == grpc.StatusCode.PERMISSION_DENIED, (method, fields)
        assert call("LoadAdapter", "admin-acme", name="cheese-copy",  # paths are the server's to allow, not a tenant's
                    path=str(store.root / "wine" / "v1")) == grpc.StatusCode.PERMISSION_DENIED
        assert call("ListAdapters", "key-acme") == grpc.StatusCode.UNAUTHENTICATED  # a generation key is not an admin key
        assert {a.name for a in call("ListAdapters", ADMIN).adapters} == {"cheese", "wine"}  # the global token: all
        assert notify((server.target,), "cheese", "v1", "admin-acme") == []  # trainer publish --notify, scoped
        assert notify((server.target,), "wine", "v1", "admin-acme") == [server.target]
        assert isinstance(call("UnloadAdapter", "admin-acme", name="cheese"), adapters_pb2.UnloadAdapterResponse)


def test_quotas_refuse_with_when_to_retry_on_both_protocols(llama_dir, store, tmp_path):
    with start(llama_dir, store, tmp_path) as server:
        http, rpc = Http(server, "key-metered"), Grpc(server, "key-metered")
        assert http.post("/v1/completions", {"model": "cheese", "prompt": "Brie", "max_tokens": 2})[0] == 200
        assert rpc.call("Generate", prompt="Brie", adapter="cheese", max_new_tokens=2)[0] == grpc.StatusCode.OK
        status, headers, text = http.send("POST", "/v1/completions", {"model": "cheese", "prompt": "Brie", "max_tokens": 2})
        assert status == 429 and int(headers["Retry-After"]) in range(25, 31)
        assert json.loads(text)["error"]["type"] == "rate_limit_error" and "requests_per_minute" in text
        with pytest.raises(grpc.RpcError) as info:
            rpc.stub.Generate(generation_pb2.GenerateRequest(prompt="Brie", adapter="cheese"), metadata=rpc.metadata,
                              timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert int(dict(info.value.trailing_metadata())["retry-after"]) in range(25, 31)
        # another tenant is not held back by it
        assert Http(server, "key-globex").post("/v1/completions", {"model": "wine", "prompt": "x", "max_tokens": 1})[0] == 200
        metrics = server.server.metrics.registry
        assert metrics.get_sample_value("hotlora_tenant_rejections_total",
                                        {"tenant": "metered", "reason": "requests_per_minute"}) == 2
        assert metrics.get_sample_value("hotlora_tenant_requests_total",
                                        {"tenant": "metered", "code": "RESOURCE_EXHAUSTED"}) == 2


def test_an_edited_tenants_file_changes_who_gets_in_without_dropping_a_running_request(llama_dir, store, tmp_path):
    with start(llama_dir, store, tmp_path, engine=EngineConfig(max_batch_size=4, max_seq_len=512)) as server:
        path = tmp_path / "tenants.yaml"
        rpc = Grpc(server, "key-globex")
        stream = rpc.stub.GenerateStream(generation_pb2.GenerateRequest(prompt="Wine", adapter="wine", max_new_tokens=300,
                                                                        ignore_eos=True), metadata=rpc.metadata, timeout=120)
        first = next(stream)  # running
        write(path, TENANTS.replace('"key-globex"', '"key-globex-2"'))
        wait_until(lambda: rpc.call("Generate", prompt="x", adapter="wine", max_new_tokens=1)[0]
                   == grpc.StatusCode.UNAUTHENTICATED, timeout=10)
        assert Grpc(server, "key-globex-2").call("Generate", prompt="x", adapter="wine", max_new_tokens=1)[0] == grpc.StatusCode.OK
        write(path, "tenants: [broken\n")  # a broken edit: the last good file stays
        time.sleep(0.05)
        assert Grpc(server, "key-globex-2").call("Generate", prompt="x", adapter="wine", max_new_tokens=1)[0] == grpc.StatusCode.OK
        rest = list(stream)
        assert rest[-1].usage.completion_tokens == 300 and len(first.token_ids) + sum(len(p.token_ids) for p in rest) == 300


def test_the_usage_log_the_counters_and_the_clients_usage_agree(llama_dir, store, tmp_path):
    usage_dir = tmp_path / "usage"
    server = start(llama_dir, store, tmp_path, usage_log=usage_dir,
                   engine=EngineConfig(max_batch_size=4, max_seq_len=256))
    received: dict[str, tuple[int, int, int]] = {}  # request id -> (prompt, completion, cached) as the client saw them
    try:
        http = Http(server, "key-metered")  # rpm 2 per minute: its third request is refused
        status, body = http.post("/v1/completions", {"model": "cheese", "prompt": "Brie and Camembert are soft. " * 6,
                                                     "max_tokens": 3, "n": 2, "temperature": 1.0, "ignore_eos": True},
                                 request_id="m0")  # sample 1 takes sample 0's prompt blocks from the cache
        usage = body["usage"]
        received["m0"] = (usage["prompt_tokens"], usage["completion_tokens"],
                          (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0))
        globex_http, globex = Http(server, "key-globex"), Grpc(server, "key-globex")
        for i in range(3):  # the same prompt again: the prefix cache serves part of it
            reply = globex.stub.Generate(generation_pb2.GenerateRequest(
                prompt="Wine from Bordeaux is " * 3, adapter="wine", max_new_tokens=4, request_id=f"g{i}"),
                metadata=globex.metadata, timeout=60)
            received[reply.request_id] = (reply.usage.prompt_tokens, reply.usage.completion_tokens,
                                          reply.usage.cached_tokens)
        events = globex_http.post("/v1/chat/completions", {"model": "wine", "messages": MESSAGES, "max_tokens": 5,
                                                           "stream": True, "stream_options": {"include_usage": True}},
                                  request_id="c0")[1]
        usage = events["events"][-1]["usage"]
        received["c0"] = (usage["prompt_tokens"], usage["completion_tokens"],
                                               usage.get("prompt_tokens_details", {}).get("cached_tokens", 0) or 0)
        # a stream cancelled after its first piece
        stream = globex.stub.GenerateStream(generation_pb2.GenerateRequest(
            prompt="Wine", adapter="wine", max_new_tokens=200, ignore_eos=True, request_id="cancelled"),
            metadata=globex.metadata, timeout=60)
        next(stream)
        stream.cancel()
        # errors: another tenant's adapter, a bad body, the base model refused, over the rate limit
        assert Grpc(server, "key-acme").call("Generate", prompt="x", adapter="wine")[0] == grpc.StatusCode.NOT_FOUND
        assert Http(server, "key-acme").post("/v1/completions", {"model": "cheese", "prompt": "x", "max_tokens": -1})[0] == 400
        assert Http(server, "key-acme").post("/v1/completions", {"model": BASE, "prompt": "x"})[0] == 403
        assert http.post("/v1/completions", {"model": "cheese", "prompt": "Brie"})[0] == 200
        assert http.post("/v1/completions", {"model": "cheese", "prompt": "Brie"})[0] == 429
        wait_until(lambda: server.server.metrics.registry.get_sample_value(
            "hotlora_tenant_requests_total", {"tenant": "globex", "code": "CANCELLED"}) == 1, timeout=10)
    finally:
        server.stop()
    lines = [json.loads(line) for f in sorted(usage_dir.iterdir()) for line in f.read_text().splitlines()]
    metrics = server.server.metrics.registry
    for tenant in ("acme", "globex", "metered"):
        mine = [line for line in lines if line["tenant"] == tenant]
        for field in ("prompt_tokens", "cached_tokens", "completion_tokens"):
            counted = metrics.get_sample_value(f"hotlora_tenant_{field}_total", {"tenant": tenant}) or 0
            assert sum(line[field] for line in mine) == counted, (tenant, field)
        for code in {line["status"] for line in mine}:
            assert metrics.get_sample_value("hotlora_tenant_requests_total", {"tenant": tenant, "code": code}) == \
                sum(1 for line in mine if line["status"] == code), (tenant, code)
    by_id = {line["request_id"]: line for line in lines}
    for request_id, (prompt, completion, cached) in received.items():
        line = by_id[request_id]
        assert (line["status"], line["prompt_tokens"], line["completion_tokens"]) == ("OK", prompt, completion), request_id
        if request_id != "c0":  # the chat stream's usage chunk leaves cached tokens out
            assert line["cached_tokens"] == cached, request_id
    assert by_id["g2"]["cached_tokens"] > 0  # the cache did serve: the field is not all zeros
    assert by_id["cancelled"]["status"] == "CANCELLED" and by_id["cancelled"]["completion_tokens"] >= 1
    assert {line["status"] for line in lines if line["tenant"] == "acme"} == {"NOT_FOUND", "INVALID_ARGUMENT",
                                                                              "PERMISSION_DENIED"}
    assert [line["status"] for line in lines if line["tenant"] == "metered"] == ["OK", "OK", "RESOURCE_EXHAUSTED"]
    keys = {line["key_id"] for line in lines if line["tenant"] == "globex"}
    assert keys == {hashlib.sha256(b"key-globex").hexdigest()[:12]}  # the key's id, never the key
    assert "key-globex" not in "".join(f.read_text() for f in usage_dir.iterdir())
    assert by_id["g0"]["adapter"] == "wine@v1" and by_id["g0"]["latency_s"] > 0


def test_a_full_queue_is_counted_against_the_tenant_that_met_it(llama_dir, store, tmp_path):
    with start(llama_dir, store, tmp_path, engine=EngineConfig(max_batch_size=1, max_queue=1, max_seq_len=512)) as server:
        rpc = Grpc(server, "key-globex")
        long = generation_pb2.GenerateRequest(prompt="Wine", adapter="wine", max_new_tokens=400, ignore_eos=True)
        running = rpc.stub.GenerateStream(long, metadata=rpc.metadata, timeout=120)
        next(running)
        waiting = rpc.stub.GenerateStream(long, metadata=rpc.metadata, timeout=120)  # sent now, read never
        wait_until(lambda: server.server.engine.stats()["queue_length"] == 1, timeout=30)
        code, message = rpc.call("Generate", prompt="x", adapter="wine", max_new_tokens=1)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in message
        running.cancel(), waiting.cancel()
        metrics = server.server.metrics.registry
        assert metrics.get_sample_value("hotlora_tenant_rejections_total", {"tenant": "globex", "reason": "queue"}) == 1


def test_a_bad_tenants_file_stops_the_server_before_it_starts(tmp_path, capsys):
    from server.serving.main import parse_args

    bad, token, keys = tmp_path / "tenants.yaml", tmp_path / "admin", tmp_path / "keys"
    bad.write_text("tenants:\n  acme:\n    keys: [k]\n    weight: 0\n")
    token.write_text("secret\n")
    keys.write_text("k2\n")
    for argv, words in ((["--tenants-file", str(bad), "--admin-token-file", str(token)], "line 4: tenant 'acme': weight"),
                        (["--tenants-file", str(bad)], "needs --admin-token-file"),
                        (["--tenants-file", str(bad), "--api-key-file", str(keys), "--admin-token-file", str(token)],
                         "not both")):
        with pytest.raises(SystemExit) as info:
            parse_args(argv, environ={})
        assert info.value.code == 2 and words in capsys.readouterr().err, argv


def test_the_prefix_cache_is_not_shared_between_tenants(llama_dir, store, tmp_path):
    with start(llama_dir, store, tmp_path, engine=EngineConfig(max_batch_size=4, max_seq_len=256)) as server:
        prompt = "Wine from Bordeaux is red and dry. " * 4
        cached = {}
        for i, key in enumerate(("key-globex", "key-globex", "key-metered")):
            rpc = Grpc(server, key)
            reply = rpc.stub.Generate(generation_pb2.GenerateRequest(prompt=prompt, max_new_tokens=1),
                                      metadata=rpc.metadata, timeout=60)
            cached[i] = reply.usage.cached_tokens
        assert cached[0] == 0 and cached[1] > 0  # a tenant's own prompt again: from the cache
        assert cached[2] == 0  # another tenant's identical prompt: computed, so a hit tells it nothing
