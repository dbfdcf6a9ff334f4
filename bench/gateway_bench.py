"""Routing across replicas by the inference gateway's metrics: round robin vs LoRA affinity.

    python bench/gateway_bench.py            # 4 replicas x 8 device slots, 64 adapters, 1,000 requests
    python bench/gateway_bench.py --record   # add the table to bench/RESULTS.md

Real hotlora servers (the `tiny` random-weight preset, so the model's own compute is small and
what is measured is adapter traffic) run in this process on loopback, sharing one adapter store of
`--adapters` adapters. Clients send `--requests` requests, `--concurrency` at a time, each for an
adapter drawn from a Zipf distribution (exponent `--zipf`; the same draws for every routing). A
router picks each request's replica either round robin (a plain Kubernetes Service) or from the
replicas' /metrics, scraped every 50 ms as the Endpoint Picker does, by the protocol's LoRA
affinity rule: a replica holding the adapter (running_lora_adapters), else one with it waited
for (waiting_lora_adapters), else the shortest queue and fewest running. A third routing applies
the rule only among replicas whose queue is at most `--queue-threshold` (all, if none is): the
picker's queue scorer in one line, so the replica holding the most popular adapters does not
take their whole load.

Each routing starts from cold replicas, serves `--warmup` requests, then the measured
`--requests`. Reported per 1,000 measured requests, summed over replicas: adapter loads (versions
read from the store and validated, hotlora_adapter_loads_total) and slot writes (host tier ->
device slot copies, hotlora_adapter_slot_write_seconds_count); time to first token p50/p95 as the
clients saw it. Goal: >= 5x fewer adapter loads with affinity.
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.engine_bench import machine  # noqa: E402
from bench.results import record  # noqa: E402
from clients.client import Client  # noqa: E402
from server.adapters.store import AdapterStore, base_fingerprint  # noqa: E402
from server.config import AdapterConfig, EngineConfig, ServerConfig  # noqa: E402
from server.metrics import PROTOCOL_METRICS  # noqa: E402
from server.model.factory import make_model  # noqa: E402
from tests.helpers import RunningServer, make_peft_adapter  # noqa: E402

SCRAPE_INTERVAL_S = 0.05  # the Endpoint Picker's default --refresh-metrics-interval


def parse(text: str) -> dict:
    """The protocol's readings from one /metrics page, plus the load counters."""
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(text)}
    value = lambda flag: families[PROTOCOL_METRICS[flag]].samples[0].value  # noqa: E731
    lora = families[PROTOCOL_METRICS["lora-info-metric"]].samples[0].labels
    slot_writes = next(s.value for s in families["hotlora_adapter_slot_write_seconds"].samples if s.name.endswith("_count"))
    reads = next(s.value for s in families["hotlora_adapter_loads"].samples
                 if s.name.endswith("_total") and s.labels["result"] == "ok")
    return {"queued": value("total-queued-requests-metric"), "running": value("total-running-requests-metric"),
            "running_lora": set(lora["running_lora_adapters"].split(",")) - {""},
            "waiting_lora": set(lora["waiting_lora_adapters"].split(",")) - {""},
            "store_reads": reads, "slot_writes": slot_writes}


class Scraper:
    """Each replica's latest readings, refreshed every SCRAPE_INTERVAL_S on a thread."""

    def __init__(self, ports: list[int]):
        self.ports = ports
        self.latest = [self._scrape(p) for p in ports]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _scrape(port: int) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
            return parse(reply.read().decode())

    def _run(self) -> None:
        while not self._stop.wait(SCRAPE_INTERVAL_S):
            self.latest = [self._scrape(p) for p in self.ports]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def affinity(model: str, readings: list[dict], queue_threshold: float) -> int:
    candidates = [i for i, r in enumerate(readings) if r["queued"] <= queue_threshold] or range(len(readings))
    return min(candidates, key=lambda i: (model not in readings[i]["running_lora"], model not in readings[i]["waiting_lora"],
                                          readings[i]["queued"], readings[i]["running"]))


def run(routing: str, threshold: float, config: ServerConfig, replicas: int, draws: list[str], args) -> dict:
    servers = [RunningServer(config) for _ in range(replicas)]
    scraper = Scraper([s.server.http_port for s in servers])
    turn = itertools.count()
    ttfts: list[float] = []

    def serve(work, lock, measured: bool) -> None:
        clients = [Client(s.target) for s in servers]
        try:
            while True:
                with lock:
                    item = next(work, None)
                if item is None:
                    return
                i, adapter = item
                which = next(turn) % replicas if routing == "round robin" else \
                    affinity(adapter, scraper.latest, threshold)
                started = time.perf_counter()
                first = None
                for _ in clients[which].stream([1 + i % 200, 2, 3, 4], adapter, max_new_tokens=args.new_tokens,
                                               temperature=0.0, ignore_eos=True):
                    first = first or time.perf_counter() - started
                if measured:
                    ttfts.append(first)
        finally:
            for client in clients:
                client.close()

    def phase(requests: list[str], measured: bool) -> float:
        work, lock = iter(enumerate(requests)), threading.Lock()
        started = time.perf_counter()
        workers = [threading.Thread(target=serve, args=(work, lock, measured)) for _ in range(args.concurrency)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return time.perf_counter() - started

    phase(draws[:args.warmup], measured=False)
    before = [Scraper._scrape(s.server.http_port) for s in servers]
    measured = draws[args.warmup:]
    elapsed = phase(measured, measured=True)
    scraper.stop()
    after = [Scraper._scrape(s.server.http_port) for s in servers]
    for server in servers:
        server.stop()
    per_k = 1000 / len(measured)
    delta = lambda key: sum(a[key] - b[key] for a, b in zip(after, before)) * per_k  # noqa: E731
    ttfts.sort()
    return {"routing": routing, "store_reads": delta("store_reads"), "slot_writes": delta("slot_writes"),
            "p50": statistics.median(ttfts), "p95": ttfts[int(0.95 * (len(ttfts) - 1))],
            "throughput": len(measured) / elapsed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--slots", type=int, default=8, help="device slots per replica (--max-adapters)")
    p.add_argument("--adapters", type=int, default=64)
    p.add_argument("--requests", type=int, default=1000, help="measured, after --warmup")
    p.add_argument("--warmup", type=int, default=1000)
    p.add_argument("--queue-threshold", type=float, default=2)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--record", action="store_true")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = make_model(root / "model", args.preset, seed=1)
        store = AdapterStore(root / "store")
        print(f"making {args.adapters} adapters ...", flush=True)
        for a in range(args.adapters):
            path = make_peft_adapter(model, root / "adapters" / f"a{a}", seed=100 + a, r=8, lora_alpha=16,
                                     target_modules=["q_proj", "v_proj"])
            store.publish(f"a{a}", path, manifest={"base_fingerprint": base_fingerprint(model)})
        rng = random.Random(args.seed)
        weights = [1 / (k + 1) ** args.zipf for k in range(args.adapters)]
        names = [f"a{a}" for a in range(args.adapters)]
        rng.shuffle(names)  # popularity is not alphabetical
        draws = rng.choices(names, weights=weights, k=args.warmup + args.requests)
        config = ServerConfig(model_dir=model, engine=EngineConfig(max_batch_size=8, max_seq_len=64, max_adapters=args.slots,
                                                                   max_rank=8),
                              adapters=AdapterConfig(store=store.root), port=0, metrics_port=0, host="127.0.0.1",
                              metrics_host="127.0.0.1", http_host="127.0.0.1", http_port=0)
        rows = []
        routings = [("round robin", 0), ("affinity", float("inf")),
                    (f"affinity, queue <= {args.queue_threshold:g}", args.queue_threshold)]
        for routing, threshold in routings:
            print(f"{routing} ...", flush=True)
            rows.append(run(routing, threshold, config, args.replicas, draws, args))

    rr, aff, balanced = rows
    table = "\n".join([
        f"### gateway_bench: {args.replicas} replicas x {args.slots} device slots, {args.adapters} adapters (Zipf "
        f"{args.zipf}), {args.requests} requests after {args.warmup} ({args.concurrency} at a time) of 4 + "
        f"{args.new_tokens} tokens, preset `{args.preset}`",
        "",
        f"Machine: {machine()}. Replicas in one process on loopback, sharing one store; /metrics scraped every "
        f"{SCRAPE_INTERVAL_S * 1000:.0f} ms; host tier {AdapterConfig.host_cache_size} adapters per replica.",
        "",
        "| routing | adapter loads / 1k req | slot writes / 1k req | TTFT p50 (ms) | TTFT p95 (ms) | req/s |",
        "|---|---:|---:|---:|---:|---:|",
        *(f"| {r['routing']} | {r['store_reads']:.0f} | {r['slot_writes']:.0f} | {r['p50'] * 1000:.0f} | "
          f"{r['p95'] * 1000:.0f} | {r['throughput']:.1f} |" for r in rows),
        "",
        f"Affinity: {rr['store_reads'] / max(aff['store_reads'], 1e-9):.1f}x fewer adapter loads from the store "
        f"(goal >= 5x), {rr['slot_writes'] / max(aff['slot_writes'], 1e-9):.1f}x fewer slot writes; TTFT (round robin's "
        f"/ affinity's) p50 {rr['p50'] / aff['p50']:.2f}x, p95 {rr['p95'] / aff['p95']:.2f}x. With the queue threshold: "
        f"{rr['store_reads'] / max(balanced['store_reads'], 1e-9):.1f}x fewer adapter loads, "
        f"{rr['slot_writes'] / max(balanced['slot_writes'], 1e-9):.1f}x fewer slot writes, TTFT p95 "
        f"{rr['p95'] / balanced['p95']:.2f}x.",
    ])
    print(table)
    if args.record:
        record("gateway_bench.py", table)


if __name__ == "__main__":
    main()
