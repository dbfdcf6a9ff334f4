"""Following the store for the names a server serves: a new `<name>/current` (a publish, or a pin
on any server) is loaded and made current here; a new `<name>/unload` token (an UnloadAdapter on
any server) drops the name here. Polled every poll_interval_s on its own thread.

The watcher remembers, per name, the store state it last acted on; the manager tells it what it
did itself (a first use, a pin, an unload), so a server does not act twice on its own changes.
`acting` is held from a poll's read of the store to what it does about it, and by the manager
across its own pins and unloads: a poll that read `current` just before a pin here would otherwise
load the old version and make it current again after the pin returned, and a poll that listed a
name just before an unload here would load it again (both seen in the replica test under a loaded
machine).
While an object store cannot be reached it keeps the versions it has and polls less often (the
interval doubles, up to MAX_BACKOFF_S or BACKOFF_POLLS intervals), back to every poll_interval_s
once it answers.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from ..errors import AdapterNotFound, HotloraError, StoreUnavailable
from .store import AdapterStore
from .versions import AdapterRef

if TYPE_CHECKING:
    from .manager import AdapterManager
    from .s3_store import S3Store

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0
BACKOFF_POLLS = 30  # nor longer than this many poll intervals: a store back up is noticed within it


class StoreWatcher:
    def __init__(self, store: "AdapterStore | S3Store", manager: "AdapterManager", poll_interval_s: float):
        self.store = store
        self.manager = manager
        self.poll_interval_s = poll_interval_s
        self._lock = threading.Lock()
        self.acting = threading.RLock()  # see the module docstring; taken before the manager's locks
        self._current_seen: dict[str, str | None] = {}  # name -> store `current` last acted on
        self._unload_seen: dict[str, str | None] = {}  # name -> store `unload` token last acted on
        self._refused: dict[str, str] = {}  # name -> store version last refused (logged once)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ what the manager did

    def first_use(self, name: str, current: str | None, unload_token: str | None) -> None:
        """The name is served from now on: changes after this store state are followed."""
        with self._lock:
            self._current_seen.setdefault(name, current)
            self._unload_seen.setdefault(name, unload_token)

    def pinned(self, name: str, version: str) -> None:
        with self._lock:
            self._current_seen[name] = version

    def unloaded(self, name: str, token: str | None) -> None:
        with self._lock:
            self._unload_seen[name] = token

    def forget(self, name: str) -> None:
        """The name is no longer served here."""
        with self._lock:
            self._current_seen.pop(name, None)
            self._unload_seen.pop(name, None)

    # ------------------------------------------------------------------ polling

    def poll(self) -> None:
        """One look at the store for every name served here."""
        with self._lock:
            watched = list(self._current_seen)
        for name in (n for n in watched if self.manager.serves(n)):
            try:
                self._poll_one(name)
            except Exception:  # one name's failure never stops the others being followed
                log.exception("store watcher: following %s failed; retrying at the next poll", name)

    def _poll_one(self, name: str) -> None:
        with self.acting:
            self._follow(name)

    def _follow(self, name: str) -> None:
        with self._lock:
            if name not in self._current_seen:  # unloaded here while this poll waited for `acting`
                return
        try:
            now, unload_token = self.store.current(name), self.store.unload_token(name)
        except (OSError, StoreUnavailable):  # said once by the store; the versions here keep serving
            return
        with self._lock:
            unloaded_elsewhere = unload_token != self._unload_seen.get(name, unload_token)
        if unloaded_elsewhere:
            try:
                self.manager.unload_here(name)
            except AdapterNotFound:
                pass
            return
        with self._lock:
            changed = now is not None and now != self._current_seen.get(name)
        if not changed:
            return
        try:
            self.manager.load(AdapterRef(name, now))
        except HotloraError as exc:
            if self._refused.get(name) != now:  # once per bad version, not every poll
                log.warning("store: %s@%s is not served (%s); %s stays current", name, now, exc,
                            self.manager.current_version(name))
                self._refused[name] = now
            return
        with self._lock:
            self._current_seen[name] = now

    def start(self) -> None:
        def watch():
            interval = self.poll_interval_s
            while not self._stop.wait(interval):
                try:
                    self.poll()
                except Exception:
                    log.exception("store watcher failed; retrying at the next interval")
                unreachable = getattr(self.store, "unreachable", None) is not None
                longest = min(MAX_BACKOFF_S, BACKOFF_POLLS * self.poll_interval_s)
                interval = min(longest, interval * 2) if unreachable else self.poll_interval_s

        if self._thread is None:
            self._thread = threading.Thread(target=watch, name="hotlora-store-watcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
