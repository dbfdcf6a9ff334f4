"""Two servers on one adapter store stay consistent: the store is the single source of truth for
what is served (publishes, admin pins, unloads), and a notify reaches every replica a name
resolves to (a Kubernetes headless Service), not one."""

from __future__ import annotations

import socket
import threading

import pytest

from protos.hotlora.v1 import adapters_pb2 as apb
from protos.hotlora.v1 import adapters_pb2_grpc
from protos.hotlora.v1 import generation_pb2 as pb
from protos.hotlora.v1 import generation_pb2_grpc
from server.config import AdapterConfig, EngineConfig, ServerConfig
from server.adapters.store import AdapterStore, ObjectStoreOptions, open_store
from server.adapters.versions import AdapterRef
from tests.helpers import RunningServer, make_peft_adapter, wait_until


def replica(llama_dir, store_root, host="127.0.0.1", port=0, poll_interval_s=0.05, **store_settings) -> RunningServer:
    return RunningServer(ServerConfig(
        model_dir=llama_dir, host=host, port=port, metrics_host="127.0.0.1", metrics_port=0,
        engine=EngineConfig(max_batch_size=2, max_seq_len=64, max_adapters=2, max_rank=16),
        adapters=AdapterConfig(store=store_root, poll_interval_s=poll_interval_s, **store_settings)))


class Client:
    def __init__(self, server: RunningServer):
        self.channel = server.channel()
        self.generation = generation_pb2_grpc.GenerationStub(self.channel)
        self.admin = adapters_pb2_grpc.AdaptersStub(self.channel)

    def served(self, adapter: str) -> str:
        request = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[5, 6, 7]), adapter=adapter, max_new_tokens=1)
        return self.generation.Generate(request, timeout=60).adapter.version

    def tier(self, ref: str) -> int:
        return self.admin.GetAdapter(apb.GetAdapterRequest(adapter=ref), timeout=30).tier


@pytest.fixture
def versions(llama_dir, tmp_path):
    return [make_peft_adapter(llama_dir, tmp_path / f"cheese-{i}", seed=40 + i, r=4, target_modules=["q_proj"])
            for i in range(3)]


@pytest.fixture(params=["directory", "s3"])
def shared_store(request, tmp_path):
    """(a store, its location, the replicas' settings for it): a directory, or a bucket on moto's S3 server."""
    if request.param == "directory":
        store = AdapterStore(tmp_path / "store")
        return store, store.root, {}
    s3 = request.getfixturevalue("s3")
    url = f"s3://{s3.bucket()}/adapters"
    return open_store(url, ObjectStoreOptions(endpoint_url=s3.endpoint)), url, {"s3_endpoint_url": s3.endpoint}


def test_publishes_pins_and_unloads_reach_every_replica(llama_dir, versions, shared_store):
    store, location, settings = shared_store
    store.publish("cheese", versions[0])
    with replica(llama_dir, location, **settings) as a_server, replica(llama_dir, location, **settings) as b_server:
        a, b = Client(a_server), Client(b_server)
        assert a.served("cheese") == b.served("cheese") == "v1"

        store.publish("cheese", versions[1])  # a publish: both follow `current`
        wait_until(lambda: a.served("cheese") == b.served("cheese") == "v2")

        a.admin.LoadAdapter(apb.LoadAdapterRequest(name="cheese", version="v1"), timeout=60)  # a pin, on A only
        assert a.served("cheese") == "v1"
        wait_until(lambda: b.served("cheese") == "v1")

        a.admin.UnloadAdapter(apb.UnloadAdapterRequest(name="cheese"), timeout=30)  # an unload, on A only
        assert a.tier("cheese@v1") == apb.TIER_STORE
        wait_until(lambda: b.tier("cheese@v1") == apb.TIER_STORE)
        assert a.served("cheese") == b.served("cheese") == "v1"  # loaded again on demand, still pinned

        store.publish("cheese", versions[2])  # the next publish ends the pin everywhere
        wait_until(lambda: a.served("cheese") == b.served("cheese") == "v3")


def test_a_poll_that_waited_on_an_unload_here_does_not_load_the_name_again(llama_dir, versions, tmp_path):
    """The poll lists the served names, then waits for `acting` while an UnloadAdapter here runs;
    the name it listed is no longer served when it gets there, so it must not load it back."""
    store = AdapterStore(tmp_path / "store")
    store.publish("cheese", versions[0])
    with replica(llama_dir, store.root, poll_interval_s=3600) as running:
        client, manager = Client(running), running.server.manager
        watcher = manager.watcher
        assert client.served("cheese") == "v1"
        listed, serves = threading.Event(), manager.serves
        manager.serves = lambda name: (serves(name), listed.set())[0]  # seen: the poll has listed its names
        with watcher.acting:
            poll = threading.Thread(target=watcher.poll)
            poll.start()
            assert listed.wait(30)
            manager.unload(AdapterRef("cheese", None))  # what UnloadAdapter runs; `acting` is reentrant
        poll.join(30)
        assert client.tier("cheese@v1") == apb.TIER_STORE


def test_notify_reaches_every_address_a_name_resolves_to(llama_dir, versions, tmp_path):
    """Two replicas on one port, on two loopback addresses, behind one name (as a headless
    Service's DNS name resolves to each pod). They poll the store once an hour here, so only the
    notify can make them serve the new version."""
    from trainer.publish import notify

    store = AdapterStore(tmp_path / "store")
    store.publish("cheese", versions[0])
    with replica(llama_dir, store.root, host="127.0.0.2", poll_interval_s=3600) as first:
        port = first.server.port
        with replica(llama_dir, store.root, host="127.0.0.3", port=port, poll_interval_s=3600) as second:
            servers = [Client(first), Client(second)]
            assert [s.served("cheese") for s in servers] == ["v1", "v1"]
            stored = store.publish("cheese", versions[1])

            def headless(host, port, type=0):  # "hotlora-replicas" -> both pods
                assert host == "hotlora-replicas"
                return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in ("127.0.0.2", "127.0.0.3")]

            assert notify((f"hotlora-replicas:{port}",), "cheese", stored.version, None, resolve=headless) == []
            assert [s.tier("cheese@v2") for s in servers] == [apb.TIER_DEVICE, apb.TIER_DEVICE]
            assert [s.served("cheese") for s in servers] == ["v2", "v2"]


def test_a_pin_or_unload_the_store_cannot_take_changes_nothing(llama_dir, versions, tmp_path, monkeypatch):
    """Pins and unloads are written to the store first: where the server cannot write it (a
    read-only volume), the call fails with FAILED_PRECONDITION and this replica keeps serving
    what every other replica serves."""
    import grpc

    store = AdapterStore(tmp_path / "store")
    store.publish("cheese", versions[0])
    store.publish("cheese", versions[1])
    with replica(llama_dir, store.root) as server:
        client = Client(server)
        assert client.served("cheese") == "v2"

        def read_only(*args, **kwargs):
            raise OSError(30, "Read-only file system")

        monkeypatch.setattr(server.server.manager.store, "set_current", read_only)
        monkeypatch.setattr(server.server.manager.store, "request_unload", read_only)
        for call in (lambda: client.admin.LoadAdapter(apb.LoadAdapterRequest(name="cheese", version="v1"), timeout=30),
                     lambda: client.admin.UnloadAdapter(apb.UnloadAdapterRequest(name="cheese"), timeout=30)):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "read-write" in info.value.details()
        assert client.served("cheese") == "v2" and store.current("cheese") == "v2"
        assert client.tier("cheese@v2") == apb.TIER_DEVICE
