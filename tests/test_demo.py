"""`make demo` as a user meets it when a step fails: one line that says which step and why, never a
traceback. (The successful demo takes minutes and is run by `make demo` itself.)"""

from __future__ import annotations

import subprocess
import sys


def test_a_failing_demo_step_ends_in_one_clear_message(tmp_path):
    run = subprocess.run([sys.executable, "-m", "trainer.demo.run_demo", "--workdir", str(tmp_path / "demo"), "--epochs", "0"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == "make demo failed: `trainer fit` exited with code 2; its output is above"
    assert "invalid trainer settings: epochs=0.0" in run.stderr
    assert "Traceback" not in run.stderr + run.stdout
    assert "kernels-community" not in run.stderr  # bitsandbytes' import noise is filtered in every entry point
