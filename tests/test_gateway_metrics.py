"""The inference gateway's model-server protocol (gateway-api-inference-extension's proposal 003):
two real replicas on loopback share one adapter store, one serving adapter A (cheese) under load,
the other adapter B (wine). Each scrape of /metrics on the HTTP port — where the gateway's
Endpoint Picker reads them — gives what the protocol promises: queued and running counts equal to
the requests known to be queued and running, KV-cache utilization in [0, 1] rising with load and
back to 0 after, LoRA info naming the adapters held in memory and the one waiting for a slot. A small
picker applying the protocol's affinity rule to those scrapes picks the right replica."""

from __future__ import annotations

import threading
import urllib.request
from contextlib import contextmanager

import pytest

pytest.importorskip("fastapi")

from prometheus_client.parser import text_string_to_metric_families

from clients.client import Client
from server.adapters.store import AdapterStore, base_fingerprint
from server.config import AdapterConfig, EngineConfig, ServerConfig
from server.metrics import PROTOCOL_METRICS
from tests.helpers import RunningServer, wait_until

# two rows and one device slot: a third request queues for a row, a second adapter for the slot
ENGINE = EngineConfig(max_batch_size=2, max_seq_len=128, max_adapters=1, max_rank=16)
LONG = dict(max_new_tokens=100, temperature=0.0, ignore_eos=True)  # prompts of at most 28 tokens fit 128


@pytest.fixture(scope="module")
def replicas(llama_dir, peft_adapters, tmp_path_factory):
    store = AdapterStore(tmp_path_factory.mktemp("store"))
    for name in ("cheese", "wine"):
        store.publish(name, peft_adapters[name], manifest={"base_fingerprint": base_fingerprint(llama_dir)})
    config = ServerConfig(model_dir=llama_dir, engine=ENGINE, adapters=AdapterConfig(store=store.root), port=0,
                          metrics_port=0, host="127.0.0.1", metrics_host="127.0.0.1", http_host="127.0.0.1", http_port=0)
    with RunningServer(config) as one, RunningServer(config) as two:
        yield one, two


def scrape(replica: RunningServer, port: str = "http") -> dict:
    """The protocol's five readings, as the Endpoint Picker takes them from the metrics it is told."""
    port = replica.server.http_port if port == "http" else replica.server.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
        families = {f.name: f for f in text_string_to_metric_families(reply.read().decode())}

    def gauge(flag: str):
        samples = families[PROTOCOL_METRICS[flag]].samples
        assert len(samples) == 1, samples
        return samples[0]

    lora = gauge("lora-info-metric").labels
    split = lambda value: set(value.split(",")) - {""}  # noqa: E731  the picker splits on "," alone
    cache = families[PROTOCOL_METRICS["cache-info-metric"]].samples[0].labels
    return {"queued": gauge("total-queued-requests-metric").value, "running": gauge("total-running-requests-metric").value,
            "kv": gauge("kv-cache-usage-percentage-metric").value, "max_lora": int(lora["max_lora"]),
            "running_lora": split(lora["running_lora_adapters"]), "waiting_lora": split(lora["waiting_lora_adapters"]),
            "block_size": int(cache["block_size"]), "num_blocks": int(cache["num_gpu_blocks"])}


def pick(model: str, scrapes: dict[str, dict]) -> str:
    """The protocol's LoRA affinity rule: a replica running the adapter, then the shortest queue."""
    return min(scrapes, key=lambda r: (model not in scrapes[r]["running_lora"], scrapes[r]["queued"], scrapes[r]["running"]))


@contextmanager
def parked(engine):
    """The engine's loop held between two steps (a queued command that waits), so what is queued
    and running stays put while it is scraped."""
    gate, holding = threading.Event(), threading.Event()

    def hold():
        holding.set()
        gate.wait(120)

    threading.Thread(target=engine._call_on_engine_thread, args=(hold,), daemon=True).start()
    assert holding.wait(30)
    try:
        yield
    finally:
        gate.set()


def stream_in_background(replica: RunningServer, adapter: str, prompt: list[int]) -> threading.Thread:
    def run():
        with Client(replica.target) as client:
            for _ in client.stream(prompt, adapter, **LONG):
                pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_each_scrape_says_what_is_queued_running_and_resident_and_the_picker_routes_by_it(replicas):
    one, two = replicas
    engines = {"one": one.server.engine, "two": two.server.engine}
    with Client(one.target) as client:  # both adapters read on replica one; cheese takes its one slot last
        client.generate([1, 2], "wine", max_new_tokens=2)
        client.generate([1, 2], "cheese", max_new_tokens=2)
    with Client(two.target) as client:
        client.generate([1, 2], "wine", max_new_tokens=2)
    idle = {"one": scrape(one), "two": scrape(two)}
    assert idle["one"] == scrape(one, port="metrics")  # the metrics port serves the same registry
    for name, s in idle.items():
        assert (s["queued"], s["running"], s["kv"], s["waiting_lora"]) == (0, 0, 0.0, set()), name
        assert (s["max_lora"], s["block_size"], s["num_blocks"]) == (1, ENGINE.kv_block_size, engines[name].cache.num_blocks)
    assert idle["one"]["running_lora"] == {"cheese", "wine"} and idle["two"]["running_lora"] == {"wine"}  # held in memory

    # replica one: two cheese requests decoding; then, held between steps, a third cheese request
    # waits for a row and a wine request for the slot cheese holds. Replica two: one wine request.
    # the first prompt fills a KV block, which stays cached (and counts as free) once it is done
    threads = [stream_in_background(one, "cheese", list(range(3, 23))), stream_in_background(one, "cheese", [5, 6])]
    wait_until(lambda: engines["one"].stats()["running"] == 2)
    with parked(engines["one"]):
        assert engines["one"].stats()["running"] == 2, "the cheese requests finished before the engine was held"
        threads += [stream_in_background(one, "cheese", [7, 8]), stream_in_background(one, "wine", [9, 10])]
        wait_until(lambda: engines["one"].stats()["queue_length"] == 2)
        threads.append(stream_in_background(two, "wine", [11, 12]))
        wait_until(lambda: engines["two"].stats()["running"] == 1)
        with parked(engines["two"]):
            loaded = {"one": scrape(one), "two": scrape(two)}
            scheduler = engines["one"].scheduler
            assert (loaded["one"]["queued"], loaded["one"]["running"]) == (len(scheduler.waiting), len(scheduler.running)) == (2, 2)
            assert (loaded["two"]["queued"], loaded["two"]["running"]) == (0, 1)
            assert loaded["one"]["running_lora"] == {"cheese", "wine"} and loaded["one"]["waiting_lora"] == {"wine"}
            assert loaded["two"]["running_lora"] == {"wine"} and loaded["two"]["waiting_lora"] == set()
            assert 0 < loaded["two"]["kv"] < loaded["one"]["kv"] <= 1  # two sequences' blocks, then one's
            assert pick("cheese", loaded) == "one" and pick("wine", loaded) == "two"
            assert pick("bread", loaded) == pick("tiny", loaded) == "two"  # nobody runs it: the shorter queue

    for thread in threads:
        thread.join(120)
        assert not thread.is_alive()
    after = {"one": scrape(one), "two": scrape(two)}
    for s in after.values():
        assert (s["queued"], s["running"], s["kv"], s["waiting_lora"]) == (0, 0, 0.0, set())
    assert after["one"]["running_lora"] == {"cheese", "wine"} and after["two"]["running_lora"] == {"wine"}


def test_requests_waiting_for_their_adapter_to_be_read_are_queued_and_name_it(replicas, monkeypatch):
    """A cold version is read from the store before its request reaches the engine: meanwhile the
    request is queued on this replica, and its adapter is one requests wait for."""
    one, _ = replicas
    manager = one.server.manager
    reading, release = threading.Event(), threading.Event()
    read_stored = manager.reader.read_stored

    def slow_read(stored):
        reading.set()
        release.wait(60)
        return read_stored(stored)

    with Client(one.target) as client:
        client.generate([1, 2], "cheese", max_new_tokens=1)
    manager.unload_here("cheese")  # cold again on this replica
    monkeypatch.setattr(manager.reader, "read_stored", slow_read)
    thread = threading.Thread(target=lambda: Client(one.target).generate([1, 2], "cheese", max_new_tokens=2), daemon=True)
    thread.start()
    engine, still_waiting_when_queued = one.server.engine, []
    submit_samples = engine.submit_samples

    def queue(*args, **kwargs):  # once the engine's queue counts it, the wait for the read must not
        still_waiting_when_queued.append(manager.waiting_for_load)
        return submit_samples(*args, **kwargs)

    try:
        assert reading.wait(30)
        during = scrape(one)
        assert (during["queued"], during["running"]) == (1, 0) and during["waiting_lora"] == {"cheese"}
        monkeypatch.setattr(engine, "submit_samples", queue)
    finally:
        release.set()
        thread.join(60)
    assert still_waiting_when_queued == [0]  # counted once: not in both at the moment it is queued
    assert scrape(one)["queued"] == 0 and scrape(one)["waiting_lora"] == set()
