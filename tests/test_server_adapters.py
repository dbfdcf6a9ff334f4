"""Adapters without restarts, through a real server: hot swap by publishing into the store, bad
versions refused without replacing the good one, loads that never stall running streams, cold
adapters that are not starved, and the Adapters admin RPCs."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time

import grpc
import pytest
from safetensors.torch import load_file, save_file

from protos.hotlora.v1 import adapters_pb2 as apb
from protos.hotlora.v1 import adapters_pb2_grpc
from protos.hotlora.v1 import generation_pb2 as pb
from protos.hotlora.v1 import generation_pb2_grpc
from server.config import AdapterConfig, EngineConfig, ServerConfig
from server.engine.engine import Engine, Request, SamplingParams
from server.adapters.store import AdapterStore, base_fingerprint
from tests.helpers import RunningServer, make_peft_adapter, wait_until

PROMPT = [5, 17, 42, 99, 7, 3]


def serve(llama_dir, store_root, tmp_path=None, host_cache_size=32, **engine):
    config = EngineConfig(**{"max_batch_size": 4, "max_seq_len": 160, "max_adapters": 2, "max_rank": 16, **engine})
    allowed = (tmp_path,) if tmp_path else ()
    adapters = AdapterConfig(store=store_root, poll_interval_s=0.05, allowed_paths=allowed, host_cache_size=host_cache_size)
    return RunningServer(ServerConfig(model_dir=llama_dir, engine=config, host="127.0.0.1", port=0, metrics_host="127.0.0.1",
                                      metrics_port=0, adapters=adapters))


def greedy(adapter, n):
    return pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=PROMPT), adapter=adapter, max_new_tokens=n,
                              ignore_eos=True, sampling=pb.SamplingParameters(temperature=0.0))


def alone(llama_dir, adapter_dir, n):
    engine = Engine.from_pretrained(llama_dir, EngineConfig(max_batch_size=1, max_seq_len=160, max_adapters=1, max_rank=16))
    try:
        engine.load_adapter("x", adapter_dir)
        return engine.generate([Request(PROMPT, "x", SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True))])[0].token_ids
    finally:
        engine.close()



@pytest.fixture
def cheese_v2(llama_dir, tmp_path):
    return make_peft_adapter(llama_dir, tmp_path / "cheese-v2", seed=99, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def test_hot_swap_running_stream_finishes_on_v1_new_requests_get_v2(llama_dir, peft_adapters, cheese_v2, tmp_path):
    store = AdapterStore(tmp_path / "store")
    store.publish("cheese", peft_adapters["cheese"], manifest={"base_fingerprint": base_fingerprint(llama_dir)})
    v1_tokens, v2_tokens = alone(llama_dir, peft_adapters["cheese"], 120), alone(llama_dir, cheese_v2, 120)
    assert v1_tokens != v2_tokens
    with serve(llama_dir, store.root) as server, server.channel() as channel:
        generation, admin = generation_pb2_grpc.GenerationStub(channel), adapters_pb2_grpc.AdaptersStub(channel)
        stream = generation.GenerateStream(greedy("cheese", 120), timeout=120)
        first = next(stream)
        assert first.adapter.version == "v1"

        store.publish("cheese", cheese_v2)  # no RPC: the server sees `current` change
        wait_until(lambda: admin.GetAdapter(apb.GetAdapterRequest(adapter="cheese")).version == "v2")
        swapped = generation.Generate(greedy("cheese", 120), timeout=120)
        rest = list(stream)

        assert [t for m in [first, *rest] for t in m.token_ids] == v1_tokens  # nothing dropped, all v1
        assert rest[-1].adapter.version == "v1" and rest[-1].usage.completion_tokens == 120
        assert list(swapped.token_ids) == v2_tokens and swapped.adapter.version == "v2"
        assert swapped.adapter.content_hash != rest[-1].adapter.content_hash
        pinned = generation.Generate(greedy("cheese@v1", 120), timeout=120)  # old versions stay addressable
        assert list(pinned.token_ids) == v1_tokens


LONG_PROMPT = [(9 + 5 * i) % 250 + 1 for i in range(40)]  # two full blocks of 16 can be shared


def test_a_store_hot_swap_under_load_never_serves_the_old_versions_cached_keys(llama_dir, peft_adapters, cheese_v2,
                                                                               tmp_path):
    """Prefix caching across a publish: while a v1 stream runs on a cached prompt, v2 becomes
    current; v2's first request on that prompt computes it afresh (cached_tokens 0) and gets v2's
    tokens, its second reuses v2's blocks, and a request pinned to v1 may reuse v1's (the same
    files, the same numbers)."""
    store = AdapterStore(tmp_path / "store")
    store.publish("cheese", peft_adapters["cheese"], manifest={"base_fingerprint": base_fingerprint(llama_dir)})

    def request(adapter, n):
        return pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=LONG_PROMPT), adapter=adapter, max_new_tokens=n,
                                  ignore_eos=True, sampling=pb.SamplingParameters(temperature=0.0))

    def tokens_alone(adapter_dir):
        engine = Engine.from_pretrained(llama_dir, EngineConfig(max_batch_size=1, max_seq_len=160, max_adapters=1,
                                                                max_rank=16, prefix_caching=False))
        try:
            engine.load_adapter("x", adapter_dir)
            return engine.generate([Request(LONG_PROMPT, "x", SamplingParams(max_new_tokens=8, temperature=0.0,
                                                                             ignore_eos=True))])[0].token_ids
        finally:
            engine.close()

    v1_tokens, v2_tokens = tokens_alone(peft_adapters["cheese"]), tokens_alone(cheese_v2)
    assert v1_tokens != v2_tokens
    with serve(llama_dir, store.root) as server, server.channel() as channel:
        generation, admin = generation_pb2_grpc.GenerationStub(channel), adapters_pb2_grpc.AdaptersStub(channel)
        assert generation.Generate(request("cheese", 8), timeout=60).usage.cached_tokens == 0
        stream = generation.GenerateStream(request("cheese", 100), timeout=120)
        first = next(stream)
        store.publish("cheese", cheese_v2)
        wait_until(lambda: admin.GetAdapter(apb.GetAdapterRequest(adapter="cheese")).version == "v2")
        fresh = generation.Generate(request("cheese", 8), timeout=60)
        again = generation.Generate(request("cheese", 8), timeout=60)
        rest = list(stream)
        assert first.adapter.version == "v1" and rest[-1].usage.cached_tokens == 32  # v1 reused v1's blocks
        assert fresh.adapter.version == "v2" and fresh.usage.cached_tokens == 0 and list(fresh.token_ids) == v2_tokens
        assert again.usage.cached_tokens == 32 and list(again.token_ids) == v2_tokens
        pinned = generation.Generate(request("cheese@v1", 8), timeout=60)
        assert list(pinned.token_ids) == v1_tokens


def corrupt_truncated(d):
    path = d / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def corrupt_nan(d):
    edit(d, lambda t: t[next(k for k in t if "lora_B" in k)].fill_(float("nan")))


def corrupt_shape(d):
    edit(d, lambda t: t.update({(k := next(k for k in t if "lora_A" in k)): t[k][:, :-1].contiguous()}))


def corrupt_rank(d):
    cfg = json.loads((d / "adapter_config.json").read_text())
    edit(d, lambda t: t.update({k: (v.repeat(5, 1) if "lora_A" in k else v.repeat(1, 5)) for k, v in t.items()}))
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "r": 20}))


def edit(d, fn):
    tensors = load_file(d / "adapter_model.safetensors")
    fn(tensors)
    save_file(tensors, d / "adapter_model.safetensors")


def corrupt_huge(d):
    edit(d, lambda t: [v.mul_(1e30) for k, v in t.items() if "lora_B" in k])  # finite in float32, absurd


def another_base(d):
    """Nothing wrong with the weights: the manifest says they were trained on another base model."""
    (d / "manifest.json").write_text(json.dumps({"base_fingerprint": "0" * 64}))


CORRUPTIONS = {"truncated": (corrupt_truncated, "safetensors"), "nan": (corrupt_nan, "NaN"),
               "wrong shapes": (corrupt_shape, "not fit"), "rank above max_rank": (corrupt_rank, "exceeds"),
               "huge but finite weights": (corrupt_huge, "too large"), "another base model": (another_base, "fingerprint")}


def test_corrupt_versions_in_the_store_are_refused_and_the_good_one_stays(llama_dir, peft_adapters, tmp_path, caplog):
    store = AdapterStore(tmp_path / "store")
    store.publish("cheese", peft_adapters["cheese"], manifest={"base_fingerprint": base_fingerprint(llama_dir)})
    good = alone(llama_dir, peft_adapters["cheese"], 10)
    caplog.set_level(logging.WARNING)
    with serve(llama_dir, store.root) as server, server.channel() as channel:
        generation, admin = generation_pb2_grpc.GenerationStub(channel), adapters_pb2_grpc.AdaptersStub(channel)
        assert list(generation.Generate(greedy("cheese", 10), timeout=60).token_ids) == good
        rejected = server.server.metrics.adapter_loads.labels("rejected")
        for i, (name, (corrupt, reason)) in enumerate(CORRUPTIONS.items()):
            bad = tmp_path / name
            shutil.copytree(peft_adapters["cheese"], bad)
            corrupt(bad)
            manifest = json.loads((bad / "manifest.json").read_text()) if (bad / "manifest.json").exists() else None
            (bad / "manifest.json").unlink(missing_ok=True)
            before = rejected._value.get()
            version = store.publish("cheese", bad, manifest=manifest).version  # now the store's `current`
            wait_until(lambda: rejected._value.get() == before + 1)
            time.sleep(0.2)  # several more polls: refused once, not retried into the log every time
            assert rejected._value.get() == before + 1, name
            assert any(reason in r.getMessage() and "refused" in r.getMessage() for r in caplog.records), name

            current = admin.GetAdapter(apb.GetAdapterRequest(adapter="cheese"))
            assert current.version == "v1" and current.current, name
            response = generation.Generate(greedy("cheese", 10), timeout=60)
            assert list(response.token_ids) == good and response.adapter.version == "v1", name
            with pytest.raises(grpc.RpcError) as info:
                generation.Generate(greedy(f"cheese@{version}", 10), timeout=60)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and reason in info.value.details(), name
        metrics_text = scrape(server)
        assert f'hotlora_adapter_loads_total{{result="rejected"}} {float(len(CORRUPTIONS))}' in metrics_text


def scrape(server) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10) as response:
        return response.read().decode()


def test_a_slow_adapter_load_does_not_stall_running_streams(llama_dir, peft_adapters, tmp_path):
    """The adapter file is a FIFO, so its read blocks until the test writes it: a load that takes
    as long as we like. Streams and warm requests keep going the whole time."""
    slow = tmp_path / "slow"
    slow.mkdir()
    shutil.copy(peft_adapters["wine"] / "adapter_config.json", slow)
    os.mkfifo(slow / "adapter_model.safetensors")
    store = AdapterStore(tmp_path / "store")
    store.publish("cheese", peft_adapters["cheese"])
    expected_wine = alone(llama_dir, peft_adapters["wine"], 8)
    with serve(llama_dir, store.root, tmp_path=tmp_path) as server, server.channel() as channel:
        generation, admin = generation_pb2_grpc.GenerationStub(channel), adapters_pb2_grpc.AdaptersStub(channel)
        stream = generation.GenerateStream(greedy("", 150), timeout=120)
        first = next(stream)
        load = admin.LoadAdapter.future(apb.LoadAdapterRequest(name="wine", path=str(slow)), timeout=120)
        try:
            time.sleep(0.1)
            assert not load.done()  # blocked reading the FIFO
            rest = list(stream)  # the running stream finishes while the load is still blocked
            warm = generation.Generate(greedy("cheese", 8), timeout=60)  # and other adapters are served
            assert not load.done()
            assert len(first.token_ids) + sum(len(m.token_ids) for m in rest) == 150 == rest[-1].usage.completion_tokens
            assert warm.usage.completion_tokens == 8
        finally:  # let the load finish whatever happened, or its reader thread blocks interpreter exit
            with open(slow / "adapter_model.safetensors", "wb") as fifo:
                fifo.write((peft_adapters["wine"] / "adapter_model.safetensors").read_bytes())
        loaded = load.result(timeout=60).adapter
        assert loaded.version.startswith("path-") and loaded.rank == 8 and loaded.current
        assert list(generation.Generate(greedy("wine", 8), timeout=60).token_ids) == expected_wine


def test_a_stream_cancelled_while_its_adapter_loads_leaves_no_orphan(llama_dir, peft_adapters, tmp_path):
    """The client goes away while the server is still reading a cold adapter (its file is a FIFO
    here, so the read waits for the test). Once the read completes, the request it was for must
    not run to max_new_tokens with nobody reading it."""
    import errno

    store = AdapterStore(tmp_path / "store")
    weights = store.publish("wine", peft_adapters["wine"]).path / "adapter_model.safetensors"
    content = weights.read_bytes()
    weights.unlink()
    os.mkfifo(weights)
    with serve(llama_dir, store.root) as server, server.channel() as channel:
        engine = server.server.engine
        stream = generation_pb2_grpc.GenerationStub(channel).GenerateStream(greedy("wine", 150), timeout=120)
        writer = None
        while writer is None:  # a writer can open the FIFO once the server is blocked reading it
            try:
                writer = os.open(weights, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                assert exc.errno == errno.ENXIO
                time.sleep(0.01)
        stream.cancel()
        time.sleep(0.2)  # the cancellation reaches the server while the load is still blocked
        os.set_blocking(writer, True)
        os.write(writer, content)
        os.close(writer)
        most = 0
        end = time.monotonic() + 3  # an orphan would be decoding its 150 tokens meanwhile
        while time.monotonic() < end:
            most = max([most, *(len(seq.generated) for seq in list(engine.scheduler.running))])
            time.sleep(0.002)
        assert most < 10, f"the orphaned request generated {most} tokens"
        wait_until(lambda: engine.stats()["running"] == 0 and engine.stats()["queue_length"] == 0)


def test_many_requests_waiting_on_a_cold_load_do_not_stall_other_requests(llama_dir, peft_adapters, tmp_path):
    """12 requests wait for a cold adapter whose read blocks (a FIFO): more than the threads that
    serve requests. A base-model request and a warm adapter's are still served meanwhile."""
    import errno

    store = AdapterStore(tmp_path / "store")
    store.publish("cheese", peft_adapters["cheese"])
    weights = store.publish("wine", peft_adapters["wine"]).path / "adapter_model.safetensors"
    content = weights.read_bytes()
    weights.unlink()
    os.mkfifo(weights)
    with serve(llama_dir, store.root) as server, server.channel() as channel:
        generation = generation_pb2_grpc.GenerationStub(channel)
        generation.Generate(greedy("cheese", 2), timeout=60)  # warm
        cold = [generation.Generate.future(greedy("wine", 4), timeout=120) for _ in range(12)]
        writer = None
        try:
            while writer is None:  # the load is blocked reading the FIFO
                try:
                    writer = os.open(weights, os.O_WRONLY | os.O_NONBLOCK)
                except OSError as exc:
                    assert exc.errno == errno.ENXIO
                    time.sleep(0.01)
            assert generation.Generate(pb.GenerateRequest(prompt="Cheese is", max_new_tokens=3), timeout=20).usage.completion_tokens
            assert generation.Generate(greedy("cheese", 3), timeout=20).usage.completion_tokens == 3
            assert not any(f.done() for f in cold)
        finally:
            if writer is None:
                writer = os.open(weights, os.O_WRONLY)
            os.set_blocking(writer, True)
            os.write(writer, content)
            os.close(writer)
        assert all(f.result(timeout=60).usage.completion_tokens == 4 for f in cold)


def test_cold_adapter_is_served_despite_steady_warm_traffic(llama_dir, peft_adapters, tmp_path):
    store = AdapterStore(tmp_path / "store")
    for name in ("cheese", "wine"):
        store.publish(name, peft_adapters[name])
    expected = alone(llama_dir, peft_adapters["wine"], 12)
    with serve(llama_dir, store.root, max_adapters=1) as server, server.channel() as channel:
        generation = generation_pb2_grpc.GenerationStub(channel)
        stop, slots = threading.Event(), threading.Semaphore(8)
        warm_done = []

        def feeder():
            while not stop.is_set():
                if slots.acquire(timeout=0.1):
                    future = generation.Generate.future(greedy("cheese", 12), timeout=120)
                    future.add_done_callback(lambda f: (warm_done.append(f.code()), slots.release()))

        thread = threading.Thread(target=feeder)
        thread.start()
        try:
            wait_until(lambda: len(warm_done) >= 8)
            cold = generation.Generate(greedy("wine", 12), timeout=120)
        finally:
            stop.set()
            thread.join()
        assert list(cold.token_ids) == expected
        assert all(code == grpc.StatusCode.OK for code in warm_done)


def test_admin_rpcs_load_list_get_unload(llama_dir, peft_adapters, cheese_v2, tmp_path):
    store = AdapterStore(tmp_path / "store")
    store.publish("cheese", peft_adapters["cheese"])
    store.publish("cheese", cheese_v2)
    store.publish("wine", peft_adapters["wine"])
    with serve(llama_dir, store.root, tmp_path=tmp_path / "allowed") as server, server.channel() as channel:
        generation, admin = generation_pb2_grpc.GenerationStub(channel), adapters_pb2_grpc.AdaptersStub(channel)
        listed = {(a.name, a.version): a for a in admin.ListAdapters(apb.ListAdaptersRequest()).adapters}
        assert set(listed) == {("cheese", "v1"), ("cheese", "v2"), ("wine", "v1")}
        assert all(a.tier == apb.TIER_STORE for a in listed.values())
        assert listed["cheese", "v2"].current and not listed["cheese", "v1"].current

        loaded = admin.LoadAdapter(apb.LoadAdapterRequest(name="cheese", version="v1")).adapter  # pin v1
        assert (loaded.version, loaded.current, loaded.rank, loaded.tier) == ("v1", True, 4, apb.TIER_DEVICE)
        assert list(loaded.target_modules) == ["q_proj", "v_proj"] and len(loaded.content_hash) == 64
        assert generation.Generate(greedy("cheese", 4), timeout=60).adapter.version == "v1"
        got = admin.GetAdapter(apb.GetAdapterRequest(adapter="cheese"))
        assert got.version == "v1" and got.last_used_unix > 0 and got.in_flight == 0

        assert store.current("cheese") == "v1"  # a pin is the store's: every replica serves v1

        admin.UnloadAdapter(apb.UnloadAdapterRequest(name="cheese"))
        assert admin.GetAdapter(apb.GetAdapterRequest(adapter="cheese@v1")).tier == apb.TIER_STORE
        assert generation.Generate(greedy("cheese", 4), timeout=60).adapter.version == "v1"  # loaded again, still pinned

        for bad, code in [(apb.LoadAdapterRequest(name="nope"), grpc.StatusCode.NOT_FOUND),
                          (apb.LoadAdapterRequest(name="a/b"), grpc.StatusCode.INVALID_ARGUMENT),
                          (apb.LoadAdapterRequest(name="evil\n"), grpc.StatusCode.INVALID_ARGUMENT),
                          (apb.LoadAdapterRequest(name="cheese", version="v1\n"), grpc.StatusCode.INVALID_ARGUMENT),
                          (apb.LoadAdapterRequest(name="x", path=str(peft_adapters["wine"])), grpc.StatusCode.PERMISSION_DENIED),
                          (apb.LoadAdapterRequest(name="x", path=str(tmp_path / "allowed" / ".." / "store" / "wine" / "v1")),
                           grpc.StatusCode.PERMISSION_DENIED)]:
            with pytest.raises(grpc.RpcError) as info:
                admin.LoadAdapter(bad)
            assert info.value.code() == code, bad
        with pytest.raises(grpc.RpcError) as info:
            admin.UnloadAdapter(apb.UnloadAdapterRequest(name="never-loaded"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_first_request_pinned_to_an_old_version_does_not_make_it_current(llama_dir, peft_adapters, cheese_v2, tmp_path):
    store = AdapterStore(tmp_path / "store")
    store.publish("cheese", peft_adapters["cheese"])
    store.publish("cheese", cheese_v2)
    with serve(llama_dir, store.root) as server, server.channel() as channel:
        generation = generation_pb2_grpc.GenerationStub(channel)
        assert generation.Generate(greedy("cheese@v1", 4), timeout=60).adapter.version == "v1"
        assert generation.Generate(greedy("cheese", 4), timeout=60).adapter.version == "v2"


def test_a_path_version_dropped_from_memory_is_not_reloaded_from_changed_files(llama_dir, peft_adapters, tmp_path):
    """With room for one version in host memory, loading a second drops the first; when the first
    is asked for again, its directory must still hold the same weights (same content hash)."""
    allowed = tmp_path / "allowed"
    shutil.copytree(peft_adapters["wine"], allowed / "wine")
    shutil.copytree(peft_adapters["bread"], allowed / "bread")
    store = AdapterStore(tmp_path / "store")
    with serve(llama_dir, store.root, tmp_path=allowed, host_cache_size=1) as server, server.channel() as channel:
        generation, admin = generation_pb2_grpc.GenerationStub(channel), adapters_pb2_grpc.AdaptersStub(channel)
        wine = admin.LoadAdapter(apb.LoadAdapterRequest(name="wine", path=str(allowed / "wine"))).adapter
        admin.LoadAdapter(apb.LoadAdapterRequest(name="bread", path=str(allowed / "bread")))  # drops wine from memory
        assert generation.Generate(greedy("wine", 4), timeout=60).adapter.version == wine.version  # read again
        admin.LoadAdapter(apb.LoadAdapterRequest(name="bread", path=str(allowed / "bread")))  # a no-op: still cached
        generation.Generate(greedy("bread", 4), timeout=60)  # bread back in memory, wine dropped again
        edit(allowed / "wine", lambda t: t[next(k for k in t if "lora_B" in k)].mul_(2))
        with pytest.raises(grpc.RpcError) as info:
            generation.Generate(greedy("wine", 4), timeout=60)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and "changed" in info.value.details()
