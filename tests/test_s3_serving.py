"""Servers on an S3 bucket (moto's S3 server on loopback): two replicas serve what `trainer
publish --notify`, run in its own process, puts in the bucket; a replica keeps serving while the
bucket is away and says so in /health and a metric; a replica restarted while the bucket is away
serves from its cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from protos.hotlora.v1 import adapters_pb2 as apb
from protos.hotlora.v1 import adapters_pb2_grpc
from protos.hotlora.v1 import generation_pb2 as pb
from protos.hotlora.v1 import generation_pb2_grpc
from server.adapters.store import ObjectStoreOptions, open_store
from server.config import AdapterConfig, EngineConfig, ServerConfig
from tests.helpers import RunningServer, make_peft_adapter, wait_until

BIN = Path(sys.executable).parent
ADMIN = "admin-secret"


def replica(llama_dir, url: str, endpoint: str, cache: Path, poll_interval_s: float = 0.05) -> RunningServer:
    return RunningServer(ServerConfig(
        model_dir=llama_dir, host="127.0.0.1", port=0, metrics_host="127.0.0.1", metrics_port=0, http_port=0,
        admin_token=ADMIN, engine=EngineConfig(max_batch_size=2, max_seq_len=64, max_adapters=2, max_rank=16),
        adapters=AdapterConfig(store=url, s3_endpoint_url=endpoint, cache_dir=cache, poll_interval_s=poll_interval_s)))


def served(server: RunningServer, adapter: str = "cheese") -> str:
    stub = generation_pb2_grpc.GenerationStub(server.channel())
    request = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[5, 6, 7]), adapter=adapter, max_new_tokens=1)
    return stub.Generate(request, timeout=60).adapter.version


def health(server: RunningServer) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.server.http_port}/health", timeout=10) as reply:
        return json.loads(reply.read())


@pytest.fixture
def versions(llama_dir, tmp_path):
    return [make_peft_adapter(llama_dir, tmp_path / f"cheese-{i}", seed=40 + i, r=4, target_modules=["q_proj"])
            for i in range(2)]


@pytest.mark.slow
def test_a_publish_with_notify_from_another_process_is_served_by_both_replicas(llama_dir, s3, versions, tmp_path):
    url = f"s3://{s3.bucket()}/adapters"
    open_store(url, ObjectStoreOptions(endpoint_url=s3.endpoint)).publish("cheese", versions[0])
    (tmp_path / "admin").write_text(ADMIN)
    # they poll once an hour: only the notify can make them serve the new version now
    with replica(llama_dir, url, s3.endpoint, tmp_path / "cache-a", 3600) as a, \
            replica(llama_dir, url, s3.endpoint, tmp_path / "cache-b", 3600) as b:
        assert served(a) == served(b) == "v1"
        run = subprocess.run([str(BIN / "trainer"), "publish", str(versions[1]), "--base", str(llama_dir),
                              "--name", "cheese", "--store", url, "--s3-endpoint-url", s3.endpoint, "--prompt", "Brie",
                              "--notify", a.target, "--notify", b.target,
                              "--admin-token-file", str(tmp_path / "admin")],
                             capture_output=True, text=True, timeout=300, env=dict(os.environ))
        assert run.returncode == 0, run.stderr
        assert f"published cheese@v2 to {url}" in run.stdout
        assert served(a) == served(b) == "v2"
        assert (tmp_path / "cache-a" / "cheese" / "v2" / "adapter_model.safetensors").is_file()


def test_a_replica_keeps_serving_while_the_bucket_is_away_says_so_and_restarts_from_its_cache(
        llama_dir, s3, versions, tmp_path):
    url = f"s3://{s3.bucket()}/adapters"
    store = open_store(url, ObjectStoreOptions(endpoint_url=s3.endpoint))
    store.publish("cheese", versions[0])
    server = replica(llama_dir, url, s3.endpoint, tmp_path / "cache")
    try:
        assert served(server) == "v1"
        assert health(server)["adapter_store"] == "reachable"
        metrics = server.server.metrics.registry
        assert metrics.get_sample_value("hotlora_adapter_store_reachable") == 1
        s3.stop()
        wait_until(lambda: metrics.get_sample_value("hotlora_adapter_store_reachable") == 0, timeout=60)
        assert served(server) == "v1"  # what it has keeps serving
        report = health(server)
        assert report["status"] == "ok" and report["adapter_store"] == "unreachable"
        assert "adapter_store_error" in report
    finally:
        server.stop()
    try:  # restarted while the bucket is still away: its cache serves
        with replica(llama_dir, url, s3.endpoint, tmp_path / "cache") as restarted:
            assert served(restarted) == "v1" and served(restarted, "cheese@v1") == "v1"
            assert health(restarted)["adapter_store"] == "unreachable"
            admin = adapters_pb2_grpc.AdaptersStub(restarted.channel())
            listed = admin.ListAdapters(apb.ListAdaptersRequest(), timeout=60,
                                        metadata=(("authorization", f"Bearer {ADMIN}"),))
            assert [(a.name, a.version) for a in listed.adapters] == [("cheese", "v1")]
            s3.start()
            store.publish("cheese", versions[1])
            wait_until(lambda: served(restarted) == "v2", timeout=120)  # back: it follows the bucket again
            assert health(restarted)["adapter_store"] == "reachable"
    finally:
        if not s3.running():
            s3.start()


def test_a_bucket_deleted_under_a_running_server_leaves_it_serving_and_saying_why(llama_dir, s3, versions, tmp_path):
    bucket = s3.bucket()
    url = f"s3://{bucket}/adapters"
    open_store(url, ObjectStoreOptions(endpoint_url=s3.endpoint)).publish("cheese", versions[0])
    with replica(llama_dir, url, s3.endpoint, tmp_path / "cache") as server:
        assert served(server) == "v1"
        client = s3.client()
        for item in client.list_objects_v2(Bucket=bucket)["Contents"]:
            client.delete_object(Bucket=bucket, Key=item["Key"])
        client.delete_bucket(Bucket=bucket)
        wait_until(lambda: health(server)["adapter_store"] == "unreachable", timeout=60)
        assert "NoSuchBucket" in health(server)["adapter_store_error"] and served(server) == "v1"
        assert server.server.metrics.registry.get_sample_value("hotlora_adapter_store_reachable") == 0
