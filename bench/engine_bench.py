"""Engine vs transformers + PEFT: decode throughput with one, several, or no adapters.

Same checkpoint (NF4, double quant), same PEFT adapters, same prompts, same number of generated
tokens (EOS ignored on both sides), measured in one run. PEFT serves a mixed batch through
`generate(..., adapter_names=[...])`, its own multi-adapter inference path.

    python bench/engine_bench.py                       # the built-in SmolLM2-135M-Instruct, 8 requests over 4 adapters
    python bench/engine_bench.py --preset small        # a random-weight preset instead (seconds to build)
    python bench/engine_bench.py --per-call-dequantize # also an engine on the NF4 path that keeps no dense copy
    python bench/engine_bench.py --preset 1b --requests 32 --adapters 8 --record   # on a GPU
    python bench/engine_bench.py --compile            # also an engine with its decode step torch.compile'd
    python bench/engine_bench.py --cpu-bf16-packed    # also an engine on bitsandbytes' AVX512-BF16 NF4 kernel
    python bench/engine_bench.py --torch-kernels      # also an engine on the torch path (EngineConfig(kernels="torch"))

--record adds the table, with the machine it ran on, to its section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import record  # noqa: E402
from server.engine.engine import Engine, EngineConfig, Request, SamplingParams  # noqa: E402
from server.model.factory import make_model  # noqa: E402
from tests.helpers import NF4_REFERENCE, make_peft_adapter  # noqa: E402


@dataclass
class Case:
    name: str
    requests: int
    adapter_names: list[str | None]  # one per request


def cases(requests: int, num_adapters: int) -> list[Case]:
    names = [f"adapter{i}" for i in range(num_adapters)]
    every = [
        Case("single request, base", 1, [None]),
        Case("single request, adapter", 1, [names[0]]),
        Case(f"{requests} requests, base only", requests, [None] * requests),
        Case(f"{requests} requests, one adapter", requests, [names[0]] * requests),
        Case(f"{requests} requests over {num_adapters} adapters", requests, [names[i % num_adapters] for i in range(requests)]),
    ]
    if num_adapters < requests:  # one request per adapter too (the "8 over 8")
        every.append(Case(f"{num_adapters} requests over {num_adapters} adapters", num_adapters, names))
    return every


@dataclass
class FirstToken:
    """Seconds to the first token of a `length`-token prompt with an adapter (medians)."""

    cold: float  # a prompt the engine has never seen: the whole prefill
    cached: float  # the same prompt again: prefix caching reuses all its full blocks
    peer: float | None  # transformers + PEFT's forward over the prompt (it caches nothing), when asked


def first_token_latency(engine: Engine, peft_model, length: int, repeats: int) -> FirstToken:
    """The engine's prefill + first sample, cold (a fresh prompt each time) and cached (one prompt
    again and again), and the peer's forward (peft_model None: not measured)."""
    prompts = prompts_for(repeats + 2, length, engine.spec.vocab_size, seed=1)  # seed 1: not the decode cases' prompts
    one = SamplingParams(max_new_tokens=1, temperature=0.0)

    def ours(prompt):
        return lambda: engine.generate([Request(prompt_ids=prompt, adapter="adapter0", sampling=one)])

    def theirs(prompt):
        ids = torch.tensor([prompt], device=next(peft_model.parameters()).device)

        def run():
            with torch.no_grad():
                peft_model(input_ids=ids, adapter_names=["adapter0"]).logits[:, -1].argmax(-1).tolist()
        return run

    def median(runs) -> float:
        seconds = []
        for run in runs:
            start = time.perf_counter()
            run()
            _sync()
            seconds.append(time.perf_counter() - start)
        return statistics.median(seconds)

    ours(prompts[-1])()  # warm-up, on a prompt no timed run uses
    cold = median([ours(p) for p in prompts[:repeats]])
    cached = median([ours(prompts[0])] * repeats)  # prompts[0] is in the cache since its cold run
    if peft_model is None:
        return FirstToken(cold, cached, None)
    theirs(prompts[-1])()
    return FirstToken(cold, cached, median([theirs(p) for p in prompts[:repeats]]))


def same_greedy_tokens(engines: dict, case: Case, args) -> str:
    """How many requests of `case` each other engine decodes to exactly the default engine's tokens."""
    prompts = prompts_for(case.requests, args.prompt_len, engines["engine"].spec.vocab_size)
    sampling = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    requests = [Request(prompt_ids=p, adapter=a, sampling=sampling) for p, a in zip(prompts, case.adapter_names)]
    want = [o.token_ids for o in engines["engine"].generate(requests)]
    results = []
    for name, e in engines.items():
        if name != "engine":
            same = sum(o.token_ids == w for o, w in zip(e.generate(requests), want))
            results.append(f"{name} {same}/{len(want)} requests identical")
    return "; ".join(results)


def prompts_for(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab - 1, (n, length), generator=g).tolist()


def engine_run(engine: Engine, case: Case, prompts, new_tokens: int):
    sampling = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    requests = [Request(prompt_ids=p, adapter=a, sampling=sampling) for p, a in zip(prompts, case.adapter_names)]

    def run():
        outputs = engine.generate(requests)
        assert all(len(o.token_ids) == new_tokens for o in outputs)

    return run


def peft_run(model, case: Case, prompts, new_tokens: int):
    device = next(model.parameters()).device
    input_ids = torch.tensor(prompts, device=device)
    names = [a or "__base__" for a in case.adapter_names]
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    def run():
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, adapter_names=names, **kwargs)
        assert out.shape[1] == input_ids.shape[1] + new_tokens

    return run


def median_tokens_per_second(runs: dict, tokens: dict, repeats: int) -> dict:
    """Every repeat runs each (case, contender) once, round robin, so a machine that speeds up or
    slows down over minutes shifts all of them alike — the ratios between contenders and between
    cases (the mixed-adapter overhead) stay fair. Median of each."""
    for run in runs.values():
        run()  # warm-up
    seconds = {key: [] for key in runs}
    for _ in range(repeats):
        for key, run in runs.items():
            start = time.perf_counter()
            run()
            _sync()
            seconds[key].append(time.perf_counter() - start)
    return {key: tokens[key] / statistics.median(s) for key, s in seconds.items()}


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def load_peft(model_dir: Path, adapters: dict[str, Path], dtype: torch.dtype, device: str, pinned: bool = True):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from server.model.quant import keep_linear4bit_on_dequantize

    quant = dict(NF4_REFERENCE, bnb_4bit_compute_dtype=dtype)
    base = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=BitsAndBytesConfig(**quant),
                                                dtype=dtype, device_map=device)
    if pinned:  # the same NF4 arithmetic as the engine's default path, on every CPU
        keep_linear4bit_on_dequantize(base)
    names = list(adapters)
    model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    return model.eval()


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from server.model.quant import import_bitsandbytes

    avx = "yes" if import_bitsandbytes().functional.has_avx512bf16() else "no"
    return f"CPU {cpu} (AVX512_BF16 {avx}), {torch.get_num_threads()} threads, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", help="build this random-weight preset (small, 1b, ...) instead of the built-in model")
    parser.add_argument("--model", type=Path, help="an existing checkpoint directory or .gguf file (default: the built-in "
                        "SmolLM2-135M-Instruct)")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefill-len", type=int, default=512, help="prompt length of the time-to-first-token case")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case and contender (median)")
    parser.add_argument("--compile", action="store_true",
                        help="also run an EngineConfig(compile=True) engine (torch.compile'd decode step)")
    parser.add_argument("--cpu-bf16-packed", action="store_true",
                        help="also run an EngineConfig(nf4_path='cpu-bf16-packed') engine (CPUs with AVX512-BF16)")
    parser.add_argument("--per-call-dequantize", action="store_true",
                        help="also run an EngineConfig(nf4_path='dequantize') engine: the same numbers, dequantizing "
                             "on every call instead of keeping a dense copy")
    parser.add_argument("--torch-kernels", action="store_true",
                        help="also run an EngineConfig(kernels='torch') engine: the reference path (on a CPU the "
                             "default engine runs the C kernels of server/kernels/cpu_kernels.c)")
    parser.add_argument("--record", action="store_true", help="add the table to its section of bench/RESULTS.md")
    args = parser.parse_args()
    from server.model.quant import quiet_bitsandbytes

    quiet_bitsandbytes()

    work = Path(tempfile.mkdtemp(prefix="hotlora-bench-"))
    if args.preset:
        model_dir, model_label = make_model(work / "model", args.preset, seed=0), f"preset `{args.preset}`"
    else:
        from server.model.source import default_cache_dir, resolve

        source = resolve(args.model, default_cache_dir())
        model_dir, model_label = source.path, f"model `{source.name}`"
    adapters = {f"adapter{i}": make_peft_adapter(model_dir, work / f"adapter{i}", seed=100 + i, r=args.rank,
                                                 lora_alpha=2 * args.rank, target_modules="all-linear")
                for i in range(args.adapters)}

    config = EngineConfig(max_batch_size=max(args.requests, 1),
                          max_seq_len=max(args.prompt_len + args.new_tokens, args.prefill_len + 1) + 8,
                          max_adapters=args.adapters, max_rank=args.rank, kernel_build_dir=str(work / "kernels"))
    engines = {"engine": config} | ({"engine, compiled": dataclasses.replace(config, compile=True)} if args.compile else {})
    if args.cpu_bf16_packed:
        engines["engine, cpu-bf16-packed"] = dataclasses.replace(config, nf4_path="cpu-bf16-packed")
    if args.per_call_dequantize:
        engines["engine, dequantize per call"] = dataclasses.replace(config, nf4_path="dequantize")
    if args.torch_kernels:
        engines["engine, kernels=torch"] = dataclasses.replace(config, kernels="torch")
    engines = {name: Engine.from_pretrained(model_dir, c) for name, c in engines.items()}
    for engine in engines.values():
        for name, path in adapters.items():
            engine.load_adapter(name, path)
    engine = engines["engine"]
    peer = "transformers+PEFT"
    peers = {peer: load_peft(model_dir, adapters, engine.dtype, str(engine.device))}
    if args.cpu_bf16_packed:  # what transformers does by itself on such a CPU: bitsandbytes' packed bf16 kernel
        peers["transformers+PEFT, bnb CPU path"] = load_peft(model_dir, adapters, engine.dtype, str(engine.device), pinned=False)

    runs, tokens = {}, {}
    for case in cases(args.requests, args.adapters):
        prompts = prompts_for(case.requests, args.prompt_len, engine.spec.vocab_size)
        for name, e in engines.items():
            runs[case.name, name] = engine_run(e, case, prompts, args.new_tokens)
        for name, model in peers.items():
            runs[case.name, name] = peft_run(model, case, prompts, args.new_tokens)
        tokens.update({(case.name, name): case.requests * args.new_tokens for name in [*engines, *peers]})
    measured = median_tokens_per_second(runs, tokens, args.repeats)
    first = {n: first_token_latency(e, peers[peer] if e is engine else None, args.prefill_len, args.repeats)
             for n, e in engines.items()}
    mixed_case = next(c for c in cases(args.requests, args.adapters) if c.name.endswith(f"over {args.adapters} adapters")
                      and c.requests == args.requests)
    agreement = same_greedy_tokens(engines, mixed_case, args)
    for e in engines.values():
        e.close()

    by_case: dict[str, dict[str, float]] = {}
    for (case_name, contender), rate in measured.items():
        by_case.setdefault(case_name, {})[contender] = rate
    rows = list(by_case.items())
    base_only = by_case[f"{args.requests} requests, base only"]
    mixed = by_case[f"{args.requests} requests over {args.adapters} adapters"]
    memory = "; ".join(f"{n}: NF4 projections {w['projections'] / 2**20:.1f} MiB + their dequantized copies "
                       f"{w['dequantized_copies'] / 2**20:.1f} MiB + repacked copies {w['repacked_copies'] / 2**20:.1f} MiB, "
                       f"other weights {w['dense'] / 2**20:.1f} MiB, "
                       f"LoRA slots {w['lora_pools'] / 2**20:.1f} MiB"
                       for n, w in ((n, e.model.weight_bytes()) for n, e in engines.items()))
    table = [
        f"### engine_bench: {model_label}, {args.requests} requests, {args.adapters} adapters (r={args.rank}, all-linear), "
        f"prompt {args.prompt_len}, {args.new_tokens} new tokens, median of {args.repeats} round-robin runs",
        "",
        f"Machine: {machine()}; compute dtype {engine.dtype}; engine NF4 path `{engine.describe()['nf4_path']}`; "
        f"`{peer}` on bitsandbytes' dequantize-per-call path (the same bits). Resident memory: {memory}.",
        "",
        "| case | " + " | ".join(f"{n} tok/s" for n in [*engines, *peers]) + " | " + " | ".join(f"{n} / PEFT" for n in engines) + " |",
        "|---|" + "---:|" * (2 * len(engines) + len(peers)),
        *[f"| {name} | " + " | ".join(f"{rates[n]:.1f}" for n in [*engines, *peers]) + " | "
          + " | ".join(f"{rates[n] / rates[peer]:.2f}x" for n in engines) + " |" for name, rates in rows],
        "",
        *[f"Mixed-adapter overhead over base-only ({n}): {100 * (base_only[n] / mixed[n] - 1):.1f}% "
          f"(base-only {base_only[n]:.1f} tok/s vs mixed {mixed[n]:.1f} tok/s)." for n in engines],
        "",
        f"Time to first token, a {args.prefill_len}-token prompt with an adapter, cold (a prompt never seen): "
        + "; ".join(f"{n} {1000 * t.cold:.1f} ms" for n, t in first.items())
        + f"; {peer} forward {1000 * first['engine'].peer:.1f} ms ({first['engine'].peer / first['engine'].cold:.2f}x "
        f"the engine's). The same prompt again, from the prefix cache: "
        + "; ".join(f"{n} {1000 * t.cached:.1f} ms" for n, t in first.items())
        + f". Decode step: {engine.describe()['cuda_graphs']} CUDA graphs.",
        "",
        *([f"Greedy tokens of the mixed case ({args.new_tokens} per request) against `engine`: {agreement}.", ""]
          if agreement else []),
    ]
    print("\n".join(table))
    if args.record:
        record("engine_bench.py", "\n".join(table))


if __name__ == "__main__":
    main()
