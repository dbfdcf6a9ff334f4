"""bench/soak.py for a quarter of a minute (make test's time budget; the script runs 10 by default,
and its RSS-growth limit widens for short runs): 64 concurrent streams over three adapters and
the base model, a publish every 5 s, cancellations and bad requests, then the leak checks and
SIGTERM under load (the script exits non-zero if any check fails; its table says which)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_a_quarter_minute_soak_passes_every_check():
    run = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "bench" / "soak.py"), "--minutes", "0.25"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "all passed" in run.stdout
