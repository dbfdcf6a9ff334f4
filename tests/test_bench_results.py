"""bench/RESULTS.md keeps each benchmark's runs together, whatever order they are recorded in."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.results import record

BENCH = Path(__file__).parents[1] / "bench"


def test_a_recorded_run_lands_at_the_end_of_its_own_section(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## engine_bench.py\n\n### run 1\n\n## train_bench.py\n\n### train 1\n")
    record("engine_bench.py", "### run 3", path=results)
    record("train_bench.py", "### train 2", path=results)
    record("new_bench.py", "### new 1", path=results)
    headings = [line for line in results.read_text().splitlines() if line.startswith("#")]
    assert headings == ["# Benchmark results", "## engine_bench.py", "### run 1", "### run 3", "## train_bench.py",
                        "### train 1", "### train 2", "## new_bench.py", "### new 1"]


@pytest.mark.parametrize("script", ["kernel_bench.py", "gpu_check.py"])
def test_gpu_scripts_say_there_is_no_gpu_and_succeed_without_one(script):
    if torch.cuda.is_available():
        pytest.skip("with CUDA they measure (make gpu-check runs them)")
    run = subprocess.run([sys.executable, str(BENCH / script)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "no CUDA device" in run.stdout
