"""API keys for the generation APIs, HTTP and gRPC alike: a file of keys, one per line (blank
lines and `#` comments skipped), re-read whenever it changes, so keys rotate without a restart.

A request carries `Authorization: Bearer KEY` (HTTP header or gRPC metadata). Health and metrics
stay open; the Adapters service keeps its own admin token. The file is checked (a stat) on each
request; a file that empties keeps nobody in, one that disappears keeps the keys last read (and
says so once), so a botched rotation never opens the server.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
from pathlib import Path

from ..errors import Unauthenticated

log = logging.getLogger(__name__)


class ApiKeys:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._seen: tuple[int, int, int] | None = None  # (mtime_ns, size, inode) of the file last read
        self._keys: tuple[bytes, ...] = ()  # SHA-256 digests: compared in constant time, whatever their lengths
        self._missing_reported = False
        self._refresh()
        if not self._keys:
            raise ValueError(f"--api-key-file {self.path} holds no keys")

    def check(self, authorization: str | None) -> None:
        """Unauthenticated unless `authorization` is "Bearer <one of the keys>"."""
        keys = self._refresh()
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("this server needs an API key: send 'Authorization: Bearer <key>'")
        given = hashlib.sha256(token.strip().encode()).digest()
        matched = False
        for key in keys:  # every key, whichever matches: the time taken says nothing about which
            matched |= hmac.compare_digest(given, key)
        if not matched:
            raise Unauthenticated("the API key is not valid")

    def _refresh(self) -> tuple[bytes, ...]:
        try:
            status = os.stat(self.path)
        except OSError as exc:
            if self._seen is None:
                raise ValueError(f"--api-key-file {self.path}: {exc.strerror}") from None
            if not self._missing_reported:
                self._missing_reported = True
                log.warning("API key file %s is gone (%s); keeping the %d keys last read", self.path, exc.strerror,
                            len(self._keys))
            return self._keys
        seen = (status.st_mtime_ns, status.st_size, status.st_ino)
        if seen != self._seen:
            with self._lock:
                if seen != self._seen:
                    try:
                        lines = self.path.read_text().splitlines()
                    except (OSError, UnicodeDecodeError) as exc:  # mid-rotation, unreadable: keep what works
                        if self._seen is None:
                            raise ValueError(f"--api-key-file {self.path}: {exc}") from None
                        log.warning("API key file %s could not be read (%s); keeping the %d keys last read",
                                    self.path, exc, len(self._keys))
                        return self._keys
                    self._keys = tuple(hashlib.sha256(line.strip().encode()).digest() for line in lines
                                       if line.strip() and not line.lstrip().startswith("#"))
                    if self._seen is not None:
                        log.info("API keys re-read from %s: %d keys", self.path, len(self._keys))
                    self._seen, self._missing_reported = seen, False
        return self._keys
