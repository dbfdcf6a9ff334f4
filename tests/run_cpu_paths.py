"""`make test-cpu-paths`: the numerics-sensitive tests once per CPU code path this machine can run.

Libraries switch kernels by CPU: torch's ATen by ATEN_CPU_CAPABILITY (default, avx2, avx512),
oneDNN (torch's bfloat16 matmuls) by ONEDNN_MAX_CPU_ISA, and hotlora's C kernels follow torch's
capability (server/kernels/cpu_kernels.py builds them without AVX-512 below it). A tolerance tuned
on one path fails on another: a fresh Intel AVX-512 clone failed three tests that passed on AMD.
Each path runs in a process of its own, since both settings are read once at start-up. A path the
CPU cannot run is said and left out; any failing path fails the whole run.

    python tests/run_cpu_paths.py [PATH ...]    # names from PATHS; default: all
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# engine against transformers + PEFT (float32 and bfloat16), the C and Triton kernels' tolerances,
# prefix caching and chunked prefill (the same sums in other shapes), the acceptance check's
# calibrated rules, and the distributed runs compared with one process
SUBSET = [
    "tests/test_engine_vs_transformers.py", "tests/test_builtin_model.py", "tests/test_cpu_kernels.py",
    "tests/test_engine_triton.py", "tests/test_nf4_paths.py", "tests/test_lora.py", "tests/test_continuous_batching.py",
    "tests/test_prefix_cache.py", "tests/test_chunked_prefill.py", "tests/test_prompt_logprobs.py",
    "tests/test_acceptance.py",
    "tests/test_trainer_distributed.py::test_two_ranks_of_batch_4_train_what_one_process_of_batch_8_does_and_only_rank_0_publishes",
    "tests/test_trainer_distributed.py::test_fsdp_two_ranks_train_what_one_unsharded_process_does_and_resume_exactly",
]

# name -> (environment, the torch capability it must give, or None when torch's is not capped)
PATHS = {
    "aten-default": ({"ATEN_CPU_CAPABILITY": "default"}, "DEFAULT"),
    "aten-avx2": ({"ATEN_CPU_CAPABILITY": "avx2"}, "AVX2"),
    "aten-avx512": ({"ATEN_CPU_CAPABILITY": "avx512"}, "AVX512"),
    "onednn-avx2": ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, None),
}


def capability(environment: dict[str, str]) -> str:
    """The capability torch dispatches to under `environment`."""
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    return subprocess.run([sys.executable, "-c", probe], env=environment, capture_output=True, text=True,
                          check=True).stdout.strip()


RANKS = ("DEFAULT", "AVX2", "AVX512")


def runs_here(wanted: str) -> str | None:
    """Why a path asking for capability `wanted` cannot run on this CPU, or None. torch 2.13 takes
    ATEN_CPU_CAPABILITY=avx512 at its word on a CPU without AVX-512 and dies of an illegal
    instruction in its first AVX-512 kernel (seen on an AMD EPYC): compare with what torch picks
    uncapped instead."""
    native = capability({k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"})
    if native in RANKS and RANKS.index(wanted) > RANKS.index(native):
        return f"not run: this CPU cannot ({native} at most)"
    return None


def main(names: list[str]) -> int:
    unknown = [n for n in names if n not in PATHS]
    if unknown:
        print(f"unknown path(s) {', '.join(unknown)}; choose from {', '.join(PATHS)}", file=sys.stderr)
        return 2
    rows = []
    for name in names or list(PATHS):
        settings, wanted = PATHS[name]
        environment = {**os.environ, **settings}
        if wanted is not None and (why := runs_here(wanted)) is not None:
            rows.append((name, why, 0.0))
            continue
        got = capability(environment)
        if wanted is not None and got != wanted:
            rows.append((name, f"not run: this CPU cannot ({got} at most)", 0.0))
            continue
        print(f"\n=== {name}: {' '.join(f'{k}={v}' for k, v in settings.items())} (torch capability {got})", flush=True)
        started = time.perf_counter()
        code = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "auto",
                               "--maxprocesses", "2", "--dist", "loadfile", *SUBSET], cwd=ROOT,
                              env=environment).returncode
        rows.append((name, "passed" if code == 0 else f"FAILED (pytest exit {code})", time.perf_counter() - started))
    print("\n| CPU path | result | seconds |\n|---|---|---:|")
    for name, result, seconds in rows:
        print(f"| {name} | {result} | {seconds:.0f} |")
    return 1 if any(result.startswith("FAILED") for _, result, _ in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
