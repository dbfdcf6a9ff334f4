"""A configuration file re-read whenever it changes, so keys and tenants rotate without a restart.

The file is checked with a stat on each use (mtime, size and inode: a Kubernetes Secret swaps a
symlink, which changes the inode). A file that cannot be read or parsed at start is refused; later,
a bad version is logged once and the last good one kept, and a file that disappears keeps what was
last read (said once), so a botched rotation never opens the server nor locks everyone out.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Callable, Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class WatchedFile(Generic[T]):
    """parse(text) -> T, applied to the file now and again after each change. `what` names the
    file in messages ("--tenants-file"). Raises ValueError when the first read or parse fails."""

    def __init__(self, path: Path, parse: Callable[[str], T], what: str):
        self.path, self._parse, self._what = Path(path), parse, what
        self._lock = threading.Lock()
        self._seen: tuple[int, int, int] | None = None  # (mtime_ns, size, inode) of the version last looked at
        self._missing_reported = False
        try:
            status = os.stat(self.path)
            self._value = parse(self.path.read_text())
        except OSError as exc:
            raise ValueError(f"{what} {self.path}: {exc.strerror}") from None
        except (UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"{what} {self.path}: {exc}") from None
        self._seen = _identity(status)

    def current(self) -> T:
        """The file's value as it is now, or the last good one."""
        try:
            seen = _identity(os.stat(self.path))
        except OSError as exc:
            if not self._missing_reported:
                self._missing_reported = True
                log.warning("%s %s is gone (%s); keeping what was last read", self._what, self.path, exc.strerror)
            return self._value
        if seen != self._seen:
            with self._lock:
                if seen != self._seen:
                    self._reread(seen)
        return self._value

    def _reread(self, seen: tuple[int, int, int]) -> None:  # holds the lock
        self._seen, self._missing_reported = seen, False  # a bad version is reported once, not per request
        try:
            value = self._parse(self.path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:  # mid-rotation, unreadable, invalid
            log.warning("%s %s changed but cannot be used (%s); keeping the last good version", self._what,
                        self.path, exc)
            return
        self._value = value
        log.info("%s re-read from %s", self._what, self.path)


def _identity(status: os.stat_result) -> tuple[int, int, int]:
    return status.st_mtime_ns, status.st_size, status.st_ino
