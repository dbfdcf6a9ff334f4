"""What operators rely on: health (SERVING once loaded, NOT_SERVING while draining), reflection,
Prometheus metrics that move as requests are served, the admin token, graceful drain."""

from __future__ import annotations

import re
import threading
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.hotlora.v1 import adapters_pb2 as apb
from protos.hotlora.v1 import adapters_pb2_grpc
from protos.hotlora.v1 import generation_pb2 as pb
from protos.hotlora.v1 import generation_pb2_grpc
from server.config import AdapterConfig, EngineConfig, ServerConfig
from tests.helpers import RunningServer, self_signed_certificate

TOKEN = "s3cret-admin-token"


def config(llama_dir, store_root, **overrides):
    return ServerConfig(model_dir=llama_dir, host="127.0.0.1", port=0, metrics_host="127.0.0.1", metrics_port=0,
                        engine=EngineConfig(max_batch_size=2, max_seq_len=256, max_adapters=2, max_rank=16),
                        adapters=AdapterConfig(store=store_root), **overrides)


@pytest.fixture(scope="module")
def server(llama_dir, cheese_and_wine_store):
    with RunningServer(config(llama_dir, cheese_and_wine_store.root, admin_token=TOKEN)) as running:
        yield running


def request(adapter="", n=4):
    return pb.GenerateRequest(prompt="Cheese is", adapter=adapter, max_new_tokens=n, ignore_eos=True,
                              sampling=pb.SamplingParameters(temperature=0.0))


def scrape(server) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10) as response:
        return response.read().decode()


def sample(text: str, name: str, **labels) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}{re.escape('{' + wanted + '}') if labels else ''} (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    return float(match[1]) if match else 0.0


def test_health_serves_every_service_once_loaded(server):
    with server.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "hotlora.v1.Generation", "hotlora.v1.Adapters", "liveness"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING, service


def test_reflection_lists_the_services_and_describes_them(server):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with server.channel() as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"hotlora.v1.Generation", "hotlora.v1.Adapters", "grpc.health.v1.Health"} <= services
        generate = DescriptorPool(database).FindServiceByName("hotlora.v1.Generation").FindMethodByName("GenerateStream")
        assert generate.output_type.full_name == "hotlora.v1.GenerateStreamResponse"


def test_metrics_move_as_requests_are_served(server):
    before = scrape(server)
    with server.channel() as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        for adapter in ("cheese", "cheese", "", "wine"):
            stub.Generate(request(adapter, n=5), timeout=60)
        with pytest.raises(grpc.RpcError):
            stub.Generate(request("missing"), timeout=60)
    after = scrape(server)

    def delta(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("hotlora_requests_total", adapter="cheese", code="OK", protocol="grpc") == 2
    assert delta("hotlora_requests_total", adapter="base", code="OK", protocol="grpc") == 1
    assert delta("hotlora_requests_total", adapter="unresolved", code="NOT_FOUND", protocol="grpc") == 1
    assert delta("hotlora_generation_tokens_total", adapter="cheese") == 10
    assert delta("hotlora_prompt_tokens_total") > 0
    for histogram in ("request_duration", "time_to_first_token", "time_per_output_token"):  # by adapter
        name = f"hotlora_{histogram}_seconds_count"
        assert [delta(name, adapter=a) for a in ("cheese", "base", "wine", "unresolved")] == [2, 1, 1, 0], histogram
    assert delta("hotlora_adapter_loads_total", result="ok") >= 0
    for gauge in ("hotlora_queue_length", "hotlora_running_requests", "hotlora_kv_cache_usage_ratio",
                  'hotlora_kv_cache_blocks{state="used"}', 'hotlora_kv_cache_blocks{state="free"}', "hotlora_preemptions_total"):
        assert re.search(rf"^{re.escape(gauge)} ", after, re.MULTILINE), gauge
    assert sample(after, "hotlora_adapters_loaded", tier="device") >= 1
    assert sample(after, "hotlora_kv_cache_blocks", state="used") == 0  # every request has finished
    assert sample(after, "hotlora_kv_cache_blocks", state="free") == server.server.engine.cache.num_blocks
    assert sample(after, "hotlora_preemptions_total") == 0
    assert sample(after, "hotlora_adapter_load_duration_seconds_count") >= 1


def test_metrics_say_how_the_engine_computes(server):
    """The NF4 path is the engine's choice, the same on every CPU, and visible to Prometheus."""
    assert sample(scrape(server), "hotlora_engine_info", compiled="false", cuda_graphs="off", device="cpu", dtype="float32",
                  lora_kernels="torch", max_seq_len="256", max_seq_len_from="config", nf4_path="dequantize-once") == 1


def test_without_max_seq_len_the_server_serves_the_models_own_length_and_refuses_more(llama_dir, tmp_path):
    """A model with 256 positions: `hotlora-server --model DIR` serves it at 256 (the log and
    hotlora_engine_info say where the limit comes from); --max-seq-len 4096 is refused in one line
    before anything starts."""
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from server.serving.main import parse_args

    model = shutil.copytree(llama_dir, tmp_path / "short")
    settings = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**settings, "max_position_embeddings": 256}))
    config = parse_args(["--model", str(model), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"], environ={})
    assert config.engine.max_seq_len is None
    with RunningServer(config) as running:
        assert sample(scrape(running), "hotlora_engine_info", compiled="false", cuda_graphs="off", device="cpu",
                      dtype="float32", lora_kernels="torch", max_seq_len="256", max_seq_len_from="model",
                      nf4_path="dequantize-once") == 1
        with running.channel() as channel:
            reply = generation_pb2_grpc.GenerationStub(channel).Generate(request(n=3), timeout=60)
        assert reply.usage.completion_tokens == 3
    refused = subprocess.run([str(Path(sys.executable).parent / "hotlora-server"), "--model", str(model),
                              "--max-seq-len", "4096"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert refused.stderr.strip().splitlines()[-1].startswith(
        "hotlora-server: error: max_seq_len 4096 is beyond the positions this model was trained for (256")


def test_junk_adapter_names_never_become_metric_labels(server):
    """Invalid and unknown names count as "unresolved": a client cannot use up the label budget
    (which would push every adapter published later into "other")."""
    junk = [f"../junk{i}" for i in range(20)] + [f"unknown{i}" for i in range(20)] + ["/etc", "cheese\x00", "c" * 129,
                                                                                    "cheese\n", "cheese@v9", "cheese@../v1"]
    with server.channel() as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        for name in junk:
            with pytest.raises(grpc.RpcError):
                stub.Generate(request(name), timeout=60)
        stub.Generate(request("wine", n=2), timeout=60)
    labels = set(re.findall(r'^hotlora_requests_total\{adapter="([^"]*)"', scrape(server), re.MULTILINE))
    assert labels <= {"base", "cheese", "wine", "unresolved"} and {"wine", "unresolved"} <= labels


def test_adapter_label_cardinality_is_bounded():
    from server.metrics import Metrics

    metrics = Metrics(max_adapter_labels=2)
    assert [metrics.adapter_label(n) for n in ["a", "b", "c", "a", "", "d"]] == ["a", "b", "other", "a", "base", "other"]


def test_compile_is_off_unless_asked_for_by_flag_or_environment():
    from server.serving.main import parse_args

    assert parse_args(["--model", "m"], environ={}).engine.compile is False
    assert parse_args(["--model", "m", "--compile"], environ={}).engine.compile is True
    assert parse_args(["--model", "m"], environ={"HOTLORA_COMPILE": "true"}).engine.compile is True
    assert parse_args(["--model", "m"], environ={"HOTLORA_COMPILE": "0"}).engine.compile is False
    with pytest.raises(SystemExit):
        parse_args(["--model", "m"], environ={"HOTLORA_COMPILE": "maybe"})


def test_http_and_metrics_listen_where_grpc_does_unless_told_otherwise():
    from server.serving.main import parse_args

    local = parse_args(["--model", "m", "--host", "127.0.0.1"], environ={})
    assert (local.host, local.http_host, local.metrics_host) == ("127.0.0.1", "127.0.0.1", "127.0.0.1")
    split = parse_args(["--model", "m", "--host", "127.0.0.1", "--metrics-host", "0.0.0.0"],
                       environ={"HOTLORA_HTTP_HOST": "10.0.0.5"})
    assert (split.host, split.http_host, split.metrics_host) == ("127.0.0.1", "10.0.0.5", "0.0.0.0")
    assert parse_args(["--model", "m"], environ={}).http_host == "0.0.0.0"


def test_kv_cache_and_sample_flags_reach_the_config():
    from server.serving.main import parse_args

    default = parse_args(["--model", "m"], environ={})
    assert (default.engine.prefix_caching, default.engine.kv_block_size, default.limits.max_samples) == (True, 16, 16)
    given = parse_args(["--model", "m", "--no-prefix-caching", "--kv-block-size", "32", "--kv-cache-bytes", "1048576",
                        "--kv-cache-fraction", "0.5", "--max-samples", "4", "--cpu-cache-adapters", "3",
                        "--max-prompts", "8"], environ={})
    assert (given.engine.prefix_caching, given.engine.kv_block_size, given.engine.kv_cache_bytes,
            given.engine.kv_cache_fraction, given.limits.max_samples, given.adapters.host_cache_size,
            given.limits.max_prompts) == (False, 32, 1 << 20, 0.5, 4, 3, 8)
    from_env = parse_args(["--model", "m"], environ={"HOTLORA_NO_PREFIX_CACHING": "1", "HOTLORA_HOST_CACHE_ADAPTERS": "5"})
    assert (from_env.engine.prefix_caching, from_env.adapters.host_cache_size) == (False, 5)


def test_kernels_and_nf4_path_come_from_flag_or_environment_and_are_checked():
    from server.serving.main import parse_args

    assert parse_args(["--model", "m"], environ={}).engine.nf4_path == "auto"
    assert parse_args(["--model", "m", "--nf4-path", "cpu-bf16-packed"], environ={}).engine.nf4_path == "cpu-bf16-packed"
    assert parse_args(["--model", "m"], environ={"HOTLORA_NF4_PATH": "dequantize"}).engine.nf4_path == "dequantize"
    assert parse_args(["--model", "m"], environ={}).engine.kernels == "auto"
    assert parse_args(["--model", "m"], environ={"HOTLORA_KERNELS": "triton"}).engine.kernels == "triton"
    for argv, environ in ((["--nf4-path", "fast"], {}), ([], {"HOTLORA_NF4_PATH": "fast"}), ([], {"HOTLORA_KERNELS": "cuda"})):
        with pytest.raises(SystemExit):
            parse_args(["--model", "m", *argv], environ=environ)


def test_admin_token_guards_the_adapters_service_only(server):
    with server.channel() as channel:
        admin = adapters_pb2_grpc.AdaptersStub(channel)
        for metadata in [None, (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)]:
            with pytest.raises(grpc.RpcError) as info:
                admin.ListAdapters(apb.ListAdaptersRequest(), metadata=metadata, timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in info.value.details()
        listed = admin.ListAdapters(apb.ListAdaptersRequest(), metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=10)
        assert {a.name for a in listed.adapters} == {"cheese", "wine"}
        assert generation_pb2_grpc.GenerationStub(channel).Generate(request(), timeout=60).usage.completion_tokens == 4


def test_drain_finishes_running_requests_and_refuses_new_ones(llama_dir, cheese_and_wine_store):
    running = RunningServer(config(llama_dir, cheese_and_wine_store.root))
    channel = running.channel()
    stub = generation_pb2_grpc.GenerationStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    stream = stub.GenerateStream(request("cheese", n=200), timeout=120)
    first = next(stream)
    stopper = threading.Thread(target=running.stop, kwargs={"grace": 60})
    stopper.start()
    try:
        # Draining: health says NOT_SERVING and new work is refused, while the stream goes on.
        while health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING:
            pass
        liveness = health.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=10).status
        assert liveness == health_pb2.HealthCheckResponse.SERVING  # a liveness probe must not kill a draining pod
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(request(), timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        rest = list(stream)
    finally:
        stopper.join(60)
        channel.close()
    assert len(first.token_ids) + sum(len(m.token_ids) for m in rest) == 200
    assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH


def test_tls_serves_clients_that_trust_the_certificate(llama_dir, cheese_and_wine_store, tmp_path):
    from clients import Client

    cert, key = self_signed_certificate(tmp_path)
    with RunningServer(config(llama_dir, cheese_and_wine_store.root, tls_cert=cert, tls_key=key)) as running:
        target = f"localhost:{running.server.port}"
        with Client(target, tls=True, root_certificates=cert.read_bytes()) as client:
            assert client.generate("Brie", max_new_tokens=3, temperature=0.0, ignore_eos=True).usage.completion_tokens == 3
        with Client(target, timeout=10) as plaintext, pytest.raises(Exception):
            plaintext.generate("Brie", max_new_tokens=3)
