"""bench/peer_bench.py starts each turn only when no server is still busy from the last one."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

from bench.peer_bench import QUIET_WINDOW_S, Server, wait_until_quiet

SPIN_S = 0.8


class Running(Server):
    """A process standing in for a server: only its CPU time matters here."""

    def __init__(self, name: str, code: str):
        self.name = name
        self.process = subprocess.Popen([sys.executable, "-c", code])


def test_a_turn_waits_while_a_server_keeps_a_core_busy_and_not_once_it_is_idle():
    idle = Running("idle", "import time; time.sleep(60)")
    time.sleep(0.5)  # past its interpreter's start
    busy = Running("busy", f"import time\nend = time.monotonic() + {SPIN_S}\nwhile time.monotonic() < end: pass\n"
                           "time.sleep(60)")
    try:
        waited = asyncio.run(wait_until_quiet([idle, busy]))
        assert SPIN_S - QUIET_WINDOW_S <= waited < 10
        assert asyncio.run(wait_until_quiet([idle, busy])) < 10 * QUIET_WINDOW_S  # one window, with room for a loaded CI
    finally:
        for server in (idle, busy):
            server.stop()
