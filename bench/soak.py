"""Soak: a real hotlora-server under steady mixed load for minutes, then checked for leaks.

For `--minutes` it keeps `--streams` concurrent streams over several adapters (and the base
model), publishes a new adapter version every `--publish-every` seconds, cancels a share of
streams after their first token, and sends a mix of bad requests. At the end it checks:
every stream finished or was cancelled on purpose, no unexpected status, running requests, queue
and KV blocks back to 0, the server's RSS flat over the second half, every adapter served at the
store's current version. Last, SIGTERM under load: the running streams finish, a new request
gets UNAVAILABLE, the server exits 0. It prints one table; `--record` adds it to RESULTS.md.

    python bench/soak.py [--minutes 10] [--streams 64] [--preset tiny] [--record]

Exit status 0 only if every check passed (tests/test_soak.py runs a one-minute version).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from protos.hotlora.v1 import generation_pb2 as pb  # noqa: E402
from protos.hotlora.v1 import generation_pb2_grpc  # noqa: E402

ADAPTERS = ["cheese", "wine", "bread"]
# (request, the status it must get): bad input is answered, never breaks anything
BAD = [
    (dict(prompt="hi", adapter="../etc", max_new_tokens=4), grpc.StatusCode.INVALID_ARGUMENT),
    (dict(prompt="hi", adapter="cheese\n", max_new_tokens=4), grpc.StatusCode.INVALID_ARGUMENT),
    (dict(prompt="hi", adapter="nonexistent", max_new_tokens=4), grpc.StatusCode.NOT_FOUND),
    (dict(prompt="hi", adapter="cheese@v999", max_new_tokens=4), grpc.StatusCode.NOT_FOUND),
    (dict(prompt="", max_new_tokens=4), grpc.StatusCode.INVALID_ARGUMENT),
    (dict(prompt="hi", max_new_tokens=0), grpc.StatusCode.INVALID_ARGUMENT),
    (dict(prompt="hi", max_new_tokens=4, sampling=pb.SamplingParameters(temperature=float("inf"))),
     grpc.StatusCode.INVALID_ARGUMENT),
    (dict(prompt="milk " * 2000, max_new_tokens=4), grpc.StatusCode.INVALID_ARGUMENT),
]


@dataclass
class Tally:
    requests: int = 0
    tokens: int = 0
    cancelled_on_purpose: int = 0
    codes: Counter = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)


async def stream_worker(stub, tally: Tally, stop: asyncio.Event, rng: random.Random, cancel_share: float) -> None:
    while not stop.is_set():
        adapter = rng.choice(["", *ADAPTERS])
        request = pb.GenerateRequest(prompt=rng.choice(["Cheese is", "Which wine with Comte?", "Bread and"]),
                                     adapter=adapter, max_new_tokens=rng.randint(8, 48), ignore_eos=True,
                                     sampling=pb.SamplingParameters(temperature=0.8, seed=rng.randint(0, 10**6)))
        cancel = rng.random() < cancel_share
        call = stub.GenerateStream(request, timeout=120)
        start = last = time.perf_counter()
        tally.requests += 1
        try:
            async for message in call:
                now = time.perf_counter()
                if last == start:
                    tally.ttft.append(now - start)
                else:
                    tally.gaps.append(now - last)
                last = now
                tally.tokens += len(message.token_ids)
                if cancel:
                    call.cancel()
                    tally.cancelled_on_purpose += 1
                    break
            else:
                tally.codes["OK"] += 1
        except grpc.aio.AioRpcError as exc:
            tally.codes[exc.code().name] += 1
            tally.unexpected.append(f"stream on {adapter or 'base'}: {exc.code().name}: {exc.details()}")
        except asyncio.CancelledError:
            if not cancel:
                raise


async def bad_worker(stub, tally: Tally, stop: asyncio.Event, rng: random.Random) -> None:
    while not stop.is_set():
        fields, expected = rng.choice(BAD)
        try:
            await stub.Generate(pb.GenerateRequest(**fields), timeout=30)
            tally.unexpected.append(f"bad request {fields} was served")
        except grpc.aio.AioRpcError as exc:
            tally.codes[exc.code().name] += 1
            if exc.code() != expected:
                tally.unexpected.append(f"bad request {str(fields)[:60]}: {exc.code().name}, expected {expected.name}")
        await asyncio.sleep(0.2)


async def publisher(store, adapter_dirs: list[Path], every_s: float, stop: asyncio.Event, published: list[str]) -> None:
    i = 0
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=every_s)
        except asyncio.TimeoutError:
            name = ADAPTERS[i % len(ADAPTERS)]
            stored = await asyncio.to_thread(store.publish, name, adapter_dirs[i % len(adapter_dirs)])
            published.append(f"{name}@{stored.version}")
            i += 1


def rss_mib(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


async def rss_sampler(pid: int, samples: list[tuple[float, float]], stop: asyncio.Event) -> None:
    start = time.monotonic()
    while not stop.is_set():
        samples.append((time.monotonic() - start, rss_mib(pid)))
        try:
            await asyncio.wait_for(stop.wait(), timeout=2.0)
        except asyncio.TimeoutError:
            pass


def slope_mib_per_min(samples: list[tuple[float, float]]) -> float:
    """Least-squares RSS growth over the second half of the run."""
    half = samples[len(samples) // 2:]
    if len(half) < 3:
        return 0.0
    xs, ys = [t for t, _ in half], [m for _, m in half]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return 60 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(sum((x - mx) ** 2 for x in xs), 1e-9)


def rss_limit(minutes: float) -> float:
    """MiB/min of RSS growth that fails the run. A leak of a few KiB per request (~9 MiB/min at
    this load) shows within minutes; the allocator's own swings (a few MiB) weigh more in a short
    window, so a short run allows more: 2 MiB/min from 5 minutes on, 10 for a one-minute run."""
    return 2.0 * max(1.0, 5.0 / minutes)


def scrape(metrics_port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {m[1]: float(m[2]) for m in re.finditer(r"^(hotlora_[a-z_]+) (\S+)$", text, re.MULTILINE)}


async def sigterm_phase(stub, server: subprocess.Popen, streams: int) -> list[str]:
    """Long streams running, then SIGTERM: they finish, a new request is refused, exit 0."""
    problems = []
    calls = [stub.GenerateStream(pb.GenerateRequest(prompt="Cheese is", max_new_tokens=40, ignore_eos=True), timeout=60)
             for _ in range(streams)]
    iterators = [call.__aiter__() for call in calls]
    firsts = await asyncio.gather(*(it.__anext__() for it in iterators))  # all running
    server.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.5)
    try:
        await stub.Generate(pb.GenerateRequest(prompt="late", max_new_tokens=2), timeout=10)
        problems.append("a request after SIGTERM was served")
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.UNAVAILABLE:
            problems.append(f"a request after SIGTERM got {exc.code().name}, expected UNAVAILABLE")

    async def rest(first, iterator) -> int:
        count = len(first.token_ids)
        async for message in iterator:
            count += len(message.token_ids)
        return count

    finished = await asyncio.gather(*(rest(f, it) for f, it in zip(firsts, iterators)), return_exceptions=True)
    short = [f for f in finished if f != 40]
    if short:
        problems.append(f"{len(short)} of {streams} streams did not finish after SIGTERM: {short[:3]}")
    code = await asyncio.to_thread(server.wait, 60)
    if code != 0:
        problems.append(f"the server exited with {code}")
    return problems


async def soak(args, work: Path) -> tuple[list[str], list[str]]:
    from server.model.factory import make_model
    from server.adapters.store import AdapterStore
    from tests.helpers import make_peft_adapter

    model = make_model(work / "model", args.preset, seed=0)
    adapter_dirs = [make_peft_adapter(model, work / f"adapter{i}", seed=200 + i, r=8, target_modules="all-linear")
                    for i in range(2)]
    store = AdapterStore(work / "store")
    for i, name in enumerate(ADAPTERS):
        store.publish(name, adapter_dirs[i % 2])
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "hotlora-server"), "--model", str(model), "--adapters", str(store.root),
         "--host", "127.0.0.1", "--port", "0", "--metrics-host", "127.0.0.1", "--metrics-port", "0",
         "--max-batch-size", "32", "--max-queue", "512", "--max-seq-len", "128", "--store-poll-interval", "0.5",
         "--grace-period", "20", "--log-level", "WARNING"], stdout=subprocess.PIPE, text=True)
    try:
        ready = re.search(r"grpc port (\d+), metrics port (\d+)", server.stdout.readline())
        if ready is None:
            raise RuntimeError("hotlora-server did not start")
        port, metrics_port = int(ready[1]), int(ready[2])
        tally, published, rss = Tally(), [], []
        rng = random.Random(0)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            stop = asyncio.Event()
            tasks = [asyncio.create_task(stream_worker(stub, tally, stop, random.Random(i), args.cancel_share))
                     for i in range(args.streams)]
            tasks += [asyncio.create_task(bad_worker(stub, tally, stop, rng)),
                      asyncio.create_task(publisher(store, adapter_dirs, args.publish_every, stop, published)),
                      asyncio.create_task(rss_sampler(server.pid, rss, stop))]
            started = time.perf_counter()
            await asyncio.sleep(args.minutes * 60)
            stop.set()
            await asyncio.gather(*tasks)
            elapsed = time.perf_counter() - started
            await asyncio.sleep(1.5)  # cancelled streams' rows free at the next step; the watcher catches up
            checks = check_after(scrape(metrics_port), tally, rss, args.minutes)
            for name in ADAPTERS:
                served = (await stub.Generate(pb.GenerateRequest(prompt="x", adapter=name, max_new_tokens=1),
                                              timeout=30)).adapter.version
                if served != store.current(name):
                    checks.append(f"{name} is served at {served}, the store's current is {store.current(name)}")
            checks += await sigterm_phase(stub, server, min(16, args.streams))
        table = report(args, tally, rss, published, elapsed, checks)
        return table, checks
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(30)


def check_after(metrics: dict[str, float], tally: Tally, rss: list[tuple[float, float]], minutes: float) -> list[str]:
    problems = list(tally.unexpected[:10])
    if len(tally.unexpected) > 10:
        problems.append(f"... and {len(tally.unexpected) - 10} more unexpected statuses")
    for gauge in ("hotlora_running_requests", "hotlora_queue_length", "hotlora_kv_cache_usage_ratio"):
        if metrics.get(gauge, -1) != 0:
            problems.append(f"{gauge} is {metrics.get(gauge)} after the load stopped (expected 0)")
    growth, limit = slope_mib_per_min(rss), rss_limit(minutes)
    if growth > limit:
        problems.append(f"RSS grew {growth:.1f} MiB/min over the second half (limit {limit:.0f})")
    return problems


def report(args, tally: Tally, rss, published: list[str], elapsed: float, checks: list[str]) -> list[str]:
    from bench.engine_bench import machine

    def pct(values, q):
        return 1000 * statistics.quantiles(values, n=100)[q - 1] if len(values) >= 2 else float("nan")

    codes = ", ".join(f"{k} {v}" for k, v in sorted(tally.codes.items()))
    return [
        f"### soak: {args.minutes:g} min, {args.streams} concurrent streams over {len(ADAPTERS)} adapters + base, "
        f"preset `{args.preset}`, a publish every {args.publish_every:g} s",
        "", f"Machine: {machine()}.", "",
        "| requests | tokens/s | cancelled on purpose | statuses | TTFT p50 / p99 ms | inter-token p50 / p99 ms | "
        "RSS start → end MiB (2nd-half growth) | versions published | checks |",
        "|---:|---:|---:|---|---|---|---|---:|---|",
        f"| {tally.requests} | {tally.tokens / elapsed:.0f} | {tally.cancelled_on_purpose} | {codes} | "
        f"{pct(tally.ttft, 50):.0f} / {pct(tally.ttft, 99):.0f} | {pct(tally.gaps, 50):.0f} / {pct(tally.gaps, 99):.0f} | "
        f"{rss[0][1]:.0f} → {rss[-1][1]:.0f} ({slope_mib_per_min(rss):+.1f}/min) | {len(published)} | "
        f"{'all passed' if not checks else f'{len(checks)} FAILED'} |",
        "", *[f"- FAILED: {c}" for c in checks], "",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--publish-every", type=float, default=5.0)
    parser.add_argument("--cancel-share", type=float, default=0.1, help="share of streams cancelled after one token")
    parser.add_argument("--record", action="store_true", help="add the table to bench/RESULTS.md")
    args = parser.parse_args()
    from server.model.quant import quiet_bitsandbytes

    quiet_bitsandbytes()
    with tempfile.TemporaryDirectory(prefix="hotlora-soak-") as tmp:
        table, checks = asyncio.run(soak(args, Path(tmp)))
    print("\n".join(table))
    if args.record:
        from bench.results import record

        record("soak.py", "\n".join(table))
    return 0 if not checks else 1


if __name__ == "__main__":
    sys.exit(main())
