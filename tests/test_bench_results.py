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


# What a GPU image may lack (bench/gpu_check.py's docstring): the HTTP, grammar and gRPC extras.
GPU_IMAGE_LACKS = ("fastapi", "uvicorn", "pydantic", "starlette", "openai", "llguidance", "jsonschema", "grpc_health",
                   "grpc_reflection", "grpc_tools")


def test_gpu_check_steps_need_nothing_a_bare_gpu_image_lacks(tmp_path):
    """Every test file and bench that `make gpu-check` runs imports (and collects) with the
    extras made unimportable, as on a GPU image that has torch but not them."""
    from bench.gpu_check import steps

    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import sys\n"
        f"LACKS = {GPU_IMAGE_LACKS!r}\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in LACKS:\n"
        "            raise ImportError(name + ' is not installed here')\n"
        "sys.meta_path.insert(0, Block())\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}
    root = BENCH.parent
    commands = [step.command for step in steps(False, True, tmp_path / "model")]
    test_files = sorted({arg for command in commands for arg in command if arg.startswith("tests/")})
    benches = sorted({arg for command in commands for arg in command if arg.startswith("bench/")})
    assert test_files and len(benches) == 5
    collect = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *test_files],
                             cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert collect.returncode == 0, collect.stdout[-2000:] + collect.stderr[-2000:]
    modules = ", ".join(f"bench.{Path(b).stem}" for b in benches)
    imports = subprocess.run([sys.executable, "-c", f"import fastapi as f\nimport {modules}"], cwd=root, env=env,
                             capture_output=True, text=True, timeout=300)
    assert "fastapi is not installed here" in imports.stderr  # the blocker works ...
    imports = subprocess.run([sys.executable, "-c", f"import {modules}"], cwd=root, env=env, capture_output=True,
                             text=True, timeout=300)
    assert imports.returncode == 0, imports.stderr[-2000:]  # ... and the benches need none of it
