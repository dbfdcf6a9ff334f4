"""Fair share across tenants: does a customer with one adapter keep its latency while another floods?

Tenant A keeps --flood-streams requests in flight over --flood-adapters adapters (each stream sends
its next request as soon as the last ends); tenant B sends one request at a time on its one
adapter. B's time to first token and decode rate are measured three ways, on one engine:
B alone; A flooding with requests that carry no tenant (admission is round robin across the 17
adapters, what hotlora did before tenants, and what it does without a tenants file); and A
flooding with both tenants named (weighted round robin across tenants first). A's throughput
while B runs is reported beside it.

    python bench/tenant_bench.py                   # the built-in SmolLM2-135M-Instruct
    python bench/tenant_bench.py --preset small    # a random-weight preset (seconds to build)
    python bench/tenant_bench.py --record          # add the table to bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine_bench import machine, prompts_for  # noqa: E402
from bench.results import record  # noqa: E402
from server.engine.engine import Engine, EngineConfig, Request, SamplingParams  # noqa: E402
from server.model.factory import make_model  # noqa: E402
from tests.helpers import make_peft_adapter  # noqa: E402


@dataclass
class Probe:
    ttft_s: list[float]
    decode_tok_s: list[float]
    flood_tok_s: float  # tenant A's tokens per second while B's requests ran

    def row(self, name: str, alone: "Probe | None") -> str:
        p50, p90 = statistics.median(self.ttft_s), sorted(self.ttft_s)[int(0.9 * (len(self.ttft_s) - 1))]
        rate = statistics.median(self.decode_tok_s)
        vs = f"{p50 / statistics.median(alone.ttft_s):.2f}x" if alone else "1x"
        flood = f"{self.flood_tok_s:.1f}" if self.flood_tok_s else "-"  # 0: nobody flooded
        return f"| {name} | {p50 * 1000:.0f} | {p90 * 1000:.0f} | {vs} | {rate:.1f} | {flood} |"


async def flood(engine: Engine, streams: int, adapters: list[str], prompts, sampling, tenant: str | None,
                counter: list[int], stop: asyncio.Event) -> None:
    """Tenant A: `streams` streams, each sending its next request as soon as its last one ends.
    Every stream is a coroutine on one event loop, as the server's are (threads per stream would
    take the GIL from the engine thread at every token)."""
    loop = asyncio.get_running_loop()

    async def stream(i: int) -> None:
        while not stop.is_set():
            handle = engine.submit(Request(prompts[i], adapter=adapters[i % len(adapters)], sampling=sampling,
                                           tenant=tenant), loop)
            try:
                async for _ in handle:
                    counter[0] += 1
            finally:
                handle.cancel()

    await asyncio.gather(*(stream(i) for i in range(streams)))


async def probe(engine: Engine, requests: int, prompts, sampling, tenant: str | None, counter: list[int]) -> Probe:
    loop = asyncio.get_running_loop()
    ttft, rates = [], []
    started, flood_before = time.perf_counter(), counter[0]
    for i in range(requests):
        sent = time.perf_counter()
        first, count = None, 0
        async for _ in engine.submit(Request(prompts[i], adapter="b", sampling=sampling, tenant=tenant), loop):
            first = first or time.perf_counter()
            count += 1
        done = time.perf_counter()
        ttft.append(first - sent)
        rates.append((count - 1) / (done - first))
    elapsed = time.perf_counter() - started
    return Probe(ttft, rates, (counter[0] - flood_before) / elapsed)


async def case(engine: Engine, args, flood_adapters, flood_prompts, probe_prompts, sampling,
               tenants: tuple[str | None, str | None] | None) -> Probe:
    """B's probe requests, with A flooding as tenants[0] (None: B alone)."""
    counter, stop = [0], asyncio.Event()
    if tenants is None:
        return await probe(engine, args.probe_requests, probe_prompts, sampling, "b", counter)
    flooding = asyncio.ensure_future(flood(engine, args.flood_streams, flood_adapters, flood_prompts, sampling,
                                           tenants[0], counter, stop))
    await asyncio.sleep(2.0)  # the batch full and the queue deep before B arrives
    try:
        return await probe(engine, args.probe_requests, probe_prompts, sampling, tenants[1], counter)
    finally:
        stop.set()
        flooding.cancel()
        await asyncio.gather(flooding, return_exceptions=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", help="a random-weight preset instead of the built-in model")
    parser.add_argument("--flood-streams", type=int, default=64)
    parser.add_argument("--flood-adapters", type=int, default=16)
    parser.add_argument("--probe-requests", type=int, default=12, help="B's requests per case, one at a time")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    from server.model.quant import quiet_bitsandbytes

    quiet_bitsandbytes()
    work = Path(tempfile.mkdtemp(prefix="hotlora-tenant-bench-"))
    if args.preset:
        model_dir, label = make_model(work / "model", args.preset, seed=0), f"preset `{args.preset}`"
    else:
        from server.model.source import default_cache_dir, resolve

        source = resolve(None, default_cache_dir())
        model_dir, label = source.path, f"model `{source.name}`"
    names = [f"a{i}" for i in range(args.flood_adapters)] + ["b"]
    config = EngineConfig(max_batch_size=args.max_batch_size, max_seq_len=args.prompt_len + args.new_tokens + 8,
                          max_adapters=len(names), max_rank=args.rank, kernel_build_dir=str(work / "kernels"))
    engine = Engine.from_pretrained(model_dir, config)
    for i, name in enumerate(names):
        engine.load_adapter(name, make_peft_adapter(model_dir, work / name, seed=200 + i, r=args.rank,
                                                    lora_alpha=2 * args.rank, target_modules="all-linear"))
    sampling = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    flood_prompts = prompts_for(args.flood_streams, args.prompt_len, engine.spec.vocab_size, seed=1)
    # B's prompts are fresh each time (no prefix-cache hit flatters its first token)
    probe_prompts = prompts_for(4 * args.probe_requests, args.prompt_len, engine.spec.vocab_size, seed=2)
    flood_adapters = names[:-1]

    cases = {"B alone": None, "A floods, no tenants (round robin across adapters)": (None, None),
             "A floods, tenants (fair share across tenants)": ("a", "b")}
    asyncio.run(probe(engine, 2, probe_prompts[-2:], sampling, None, [0]))  # warm-up
    results = {}
    for i, (name, tenants) in enumerate(cases.items()):
        prompts = probe_prompts[i * args.probe_requests:]  # fresh prompts each case
        results[name] = asyncio.run(case(engine, args, flood_adapters, flood_prompts, prompts, sampling, tenants))
    engine.close()

    alone = results["B alone"]
    table = [
        f"### tenant_bench: {label}, A floods with {args.flood_streams} streams over {args.flood_adapters} adapters, "
        f"B one request at a time on 1 adapter; batch {args.max_batch_size}, prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens, r={args.rank}, {args.probe_requests} B requests per case",
        "",
        f"Machine: {machine()}; engine NF4 path `{engine.describe()['nf4_path']}`; "
        f"{engine.scheduler.fair_share_preemptions} fair-share preemptions (A's sequences recomputed to make room "
        "for B) in all.",
        "",
        "| case | B TTFT p50 ms | B TTFT p90 ms | B p50 TTFT / alone | B decode tok/s | A tok/s meanwhile |",
        "|---|---:|---:|---:|---:|---:|",
        *[r.row(name, None if r is alone else alone) for name, r in results.items()],
    ]
    print("\n".join(table))
    if args.record:
        record("tenant_bench", "\n".join(table))


if __name__ == "__main__":
    main()
