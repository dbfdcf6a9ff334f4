"""The paged KV cache at work: prefix caching's time to first token, and how many requests one
KV budget holds.

    python bench/kv_bench.py                 # the built-in SmolLM2-135M-Instruct
    python bench/kv_bench.py --preset small  # a random-weight preset (fast); --model DIR for a checkpoint
    python bench/kv_bench.py --record        # add the tables to bench/RESULTS.md

1. Prefix caching. A burst of `--requests` requests over `--adapters` adapters, all sharing one
   `--system-tokens` system prompt, each with its own `--question-tokens` question, after one
   request per adapter has been served (the steady state of a deployment whose system prompt is
   in use): time to first token p50/p95 with prefix caching and without, in the same run. The peer (transformers +
   PEFT) has no cache and serves one request at a time: its TTFTs are those of a queue served in
   order, from the median of `--peer-samples` measured prefills (one per adapter).
2. Capacity. `--kv-cache-bytes` set to what a contiguous cache needs for 8 rows of 2,048 tokens;
   `--capacity-requests` requests of 64 prompt + 64 new tokens submitted at once: the most that
   ran at the same time (the contiguous cache ran 8).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.engine_bench import load_peft, machine, prompts_for  # noqa: E402
from bench.results import record  # noqa: E402
from server.engine.engine import Engine, EngineConfig, Request, SamplingParams  # noqa: E402
from server.model.factory import make_model  # noqa: E402
from tests.helpers import make_peft_adapter  # noqa: E402


def burst_ttfts(engine: Engine, requests: list[Request]) -> list[float]:
    """Submit every request at once; seconds from the burst to each one's first token."""
    started = time.perf_counter()
    handles = [engine.submit(r) for r in requests]
    firsts = [0.0] * len(handles)

    def wait(i: int) -> None:
        next(iter(handles[i]))
        firsts[i] = time.perf_counter() - started
        handles[i].result()

    threads = [threading.Thread(target=wait, args=(i,)) for i in range(len(handles))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return firsts


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def prefix_case(model_dir: Path, adapters: dict[str, Path], vocab: int, args) -> tuple[dict, int]:
    vocab_ids = prompts_for(1 + args.requests, max(args.system_tokens, args.question_tokens), vocab)
    system = vocab_ids[0][: args.system_tokens]
    names = list(adapters)
    sampling = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    requests = [Request(system + vocab_ids[1 + i][: args.question_tokens], names[i % len(names)], sampling)
                for i in range(args.requests)]
    config = EngineConfig(max_batch_size=args.batch, max_seq_len=args.system_tokens + args.question_tokens + args.new_tokens + 8,
                          max_adapters=len(adapters), max_rank=args.rank)
    results = {}
    for label, caching in (("engine, prefix caching", True), ("engine, no prefix caching", False)):
        engine = Engine.from_pretrained(model_dir, dataclasses.replace(config, prefix_caching=caching))
        for name, path in adapters.items():
            engine.load_adapter(name, path)
        # steady state: the system prompt has been seen once per adapter before the burst
        engine.generate([Request(system + [7] * args.question_tokens, name, sampling) for name in names])
        hit_before = engine.stats()["prefix_cache_hit_tokens"]
        firsts = burst_ttfts(engine, requests)
        hit = engine.stats()["prefix_cache_hit_tokens"] - hit_before
        results[label] = (firsts, hit)
        engine.close()
    peer = load_peft(model_dir, adapters, torch.float32 if not torch.cuda.is_available() else torch.bfloat16,
                     "cuda" if torch.cuda.is_available() else "cpu")
    device = next(peer.parameters()).device
    seconds = []
    for request in requests[: args.peer_samples]:
        ids = torch.tensor([request.prompt_ids], device=device)
        start = time.perf_counter()
        with torch.no_grad():
            peer(input_ids=ids, adapter_names=[request.adapter]).logits[:, -1].argmax(-1).tolist()
        seconds.append(time.perf_counter() - start)
    one = statistics.median(seconds)
    results["transformers+PEFT (a queue, one at a time)"] = ([one * (i + 1) for i in range(args.requests)], 0)
    return results, sum(len(r.prompt_ids) for r in requests)


def capacity_case(model_dir: Path, spec, dtype: torch.dtype, args) -> tuple[int, int, int]:
    contiguous_rows, row_tokens = 8, 2048
    budget = contiguous_rows * 2 * spec.num_layers * spec.num_kv_heads * row_tokens * spec.head_dim * dtype.itemsize
    config = EngineConfig(max_batch_size=args.capacity_requests, max_seq_len=row_tokens, kv_cache_bytes=budget,
                          max_prefill_tokens=8192)
    engine = Engine.from_pretrained(model_dir, config)
    blocks = engine.cache.num_blocks
    sampling = SamplingParams(max_new_tokens=64, temperature=0.0, ignore_eos=True)
    prompts = prompts_for(args.capacity_requests, 64, spec.vocab_size)
    most, done = 0, threading.Event()

    def watch():
        nonlocal most
        while not done.is_set():
            most = max(most, engine.stats()["running"])
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    engine.generate([Request(p, None, sampling) for p in prompts])
    done.set()
    watcher.join()
    preempted = engine.stats()["preemptions"]
    engine.close()
    return most, blocks, preempted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", help="a random-weight preset instead of the built-in model")
    parser.add_argument("--model", type=Path, help="an existing checkpoint directory or .gguf file (default: the built-in model)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--question-tokens", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16, help="the engine's max_batch_size in the prefix case")
    parser.add_argument("--peer-samples", type=int, default=8)
    parser.add_argument("--capacity-requests", type=int, default=128)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    from server.model.quant import quiet_bitsandbytes

    quiet_bitsandbytes()
    work = Path(tempfile.mkdtemp(prefix="hotlora-kv-bench-"))
    if args.preset:
        model_dir, label = make_model(work / "model", args.preset, seed=0), f"preset `{args.preset}`"
    else:
        from server.model.source import default_cache_dir, resolve

        source = resolve(args.model, default_cache_dir())
        model_dir, label = source.path, f"model `{source.name}`"
    adapters = {f"adapter{i}": make_peft_adapter(model_dir, work / f"adapter{i}", seed=100 + i, r=args.rank,
                                                 lora_alpha=2 * args.rank, target_modules="all-linear")
                for i in range(args.adapters)}

    probe = Engine.from_pretrained(model_dir, EngineConfig(max_batch_size=1, max_seq_len=16))
    spec, dtype = probe.spec, probe.dtype
    probe.close()
    results, prompt_tokens = prefix_case(model_dir, adapters, spec.vocab_size, args)
    cached = results["engine, prefix caching"]
    plain = results["engine, no prefix caching"]
    rows = [f"| {name} | {percentile(f, 0.5):.2f} | {percentile(f, 0.95):.2f} | {hit / prompt_tokens:.0%} |"
            for name, (f, hit) in results.items()]
    most, blocks, preempted = capacity_case(model_dir, spec, dtype, args)
    table = [
        f"### kv_bench: {label}, {args.requests} requests over {args.adapters} adapters (r={args.rank}), "
        f"a shared {args.system_tokens}-token system prompt + {args.question_tokens}-token questions, "
        f"{args.new_tokens} new tokens",
        "",
        f"Machine: {machine()}. One request per adapter served first, then all {args.requests} submitted at once "
        f"(TTFT includes waiting); engine max_batch_size {args.batch}, blocks of 16 tokens.",
        "",
        "| contender | TTFT p50 (s) | TTFT p95 (s) | prompt tokens from the cache |",
        "|---|---:|---:|---:|",
        *rows,
        "",
        f"Prefix caching: p50 TTFT {percentile(plain[0], 0.5) / percentile(cached[0], 0.5):.1f}x lower than without "
        f"(goal >= 5x), p95 {percentile(plain[0], 0.95) / percentile(cached[0], 0.95):.1f}x.",
        "",
        f"Capacity: a KV budget of 8 contiguous rows of 2,048 tokens ({blocks} blocks of 16) ran {most} requests of "
        f"64 + 64 tokens at once out of {args.capacity_requests} submitted ({most / 8:.1f}x the contiguous cache's 8; "
        f"goal >= 8x); {preempted} preemptions.",
    ]
    print("\n".join(table))
    if args.record:
        record("kv_bench.py", "\n".join(table))


if __name__ == "__main__":
    main()
