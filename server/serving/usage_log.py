"""The usage log (`--usage-log DIR`): one JSON line per finished request, for billing and audits.

    {"time": "2026-12-07T10:00:00.123Z", "tenant": "acme", "key_id": "9f86d081884c",
     "adapter": "acme-support@v3", "protocol": "http", "status": "OK", "request_id": "...",
     "prompt_tokens": 412, "cached_tokens": 384, "completion_tokens": 57, "latency_s": 1.204}

Lines are appended by one writer thread, flushed and fsynced in batches (every `batch_lines`
lines or `batch_s` seconds, whichever comes first): a crash loses at most the lines of the batch
being written. Files are never rewritten: when one reaches `max_bytes` the next line starts a
new file, named by host, process and start time, so replicas can share the directory.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Usage:
    """One finished request (a sample set of one prompt), as metered."""

    tenant: str
    key_id: str
    adapter: str  # "name@version", or "" for the base model, or what was asked for when it never resolved
    protocol: str
    status: str  # the gRPC status code's name, whichever protocol carried it
    request_id: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    latency_s: float


_CLOSE = object()


class UsageLog:
    def __init__(self, directory: Path, max_bytes: int = 64 << 20, batch_lines: int = 256, batch_s: float = 1.0):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.batch_lines, self.batch_s = max_bytes, batch_lines, batch_s
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._file = None
        self._files = 0
        self._thread = threading.Thread(target=self._write_forever, name="hotlora-usage-log", daemon=True)
        self._thread.start()

    def write(self, usage: Usage) -> None:
        """Queue one line (never blocks the caller on the disk)."""
        record = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                  **asdict(usage), "latency_s": round(usage.latency_s, 6)}
        self._queue.put(json.dumps(record, separators=(",", ":")) + "\n")

    def close(self) -> None:
        """Write and fsync what is queued, then stop."""
        self._queue.put(_CLOSE)
        self._thread.join()

    def _write_forever(self) -> None:
        closing = False
        while not closing:
            batch = [self._queue.get()]
            deadline = time.monotonic() + self.batch_s
            while len(batch) < self.batch_lines and batch[-1] is not _CLOSE:
                try:
                    batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            closing = batch[-1] is _CLOSE
            lines = [line for line in batch if line is not _CLOSE]
            try:
                self._append(lines)
            except Exception:  # a full disk: these lines are lost, said; the next batch tries a new file
                log.exception("the usage log could not write %d lines to %s", len(lines), self.directory)
                self._close_file()
        self._close_file()

    def _close_file(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None

    def _append(self, lines: list[str]) -> None:
        for line in lines:
            data = line.encode()
            if self._file is None or (self._file.tell() and self._file.tell() + len(data) > self.max_bytes):
                self._rotate()
            self._file.write(data)
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def _rotate(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._close_file()
        self._files += 1
        started = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        name = f"usage-{socket.gethostname()}-{os.getpid()}-{started}-{self._files:04d}.jsonl"
        self._file = open(self.directory / name, "ab")
