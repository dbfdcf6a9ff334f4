"""The adapter manager: "name" / "name@version" -> a registered engine adapter, across three tiers.

    store (disk)  --read + validate, off the engine thread-->  CPU (host weights, registered in
    the engine)  --copy into a slot between steps, by the engine-->  GPU slot

Each loaded version is registered in the engine under the key "name@version" and is identified
by the content hash of its files, so a new version under an old name is never confused with it.
`submit` resolves a name to its current version, loading it first when it is not in memory, and
submits under the manager's lock so the version cannot be dropped in between; the engine keeps
the weights a request started with until it finishes.

Names arrive parsed (server/adapters/versions.py's AdapterRef, made where a request comes in).

Current versions: a name's current version is the store's `current` when first used; after that
the watcher (server/adapters/watcher.py) follows changes of `<name>/current`, and LoadAdapter can
pin another version until the next change. Reading and validating is the reader's
(server/adapters/reader.py). A new version that fails validation is refused,
counted (hotlora_adapter_loads_total{result="rejected"}) and logged once, and the previous good
version stays current. A superseded version is retired from the engine: requests still running
on it finish there, and its slot is freed when the last one does.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Callable

from ..config import AdapterConfig
from ..engine.engine import Engine, Request, RequestHandle
from ..errors import AdapterNotFound, InvalidRequest, PermissionDenied, StoreNotWritable, StoreUnavailable
from ..lora.peft_files import AdapterWeights, largest_adapter_bytes
from ..metrics import Metrics
from .reader import AdapterReader
from .store import AdapterStore, ObjectStoreOptions, open_store
from .versions import AdapterRef, AdapterStatus, AdapterVersion, version_key
from .watcher import StoreWatcher

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _writing_store():
    try:
        yield
    except OSError as exc:
        raise StoreNotWritable(f"pins and unloads are written to the adapter store for every replica, and this "
                               f"server cannot write it ({exc.strerror or exc}); mount the store read-write") from None


class AdapterManager:
    """Which version of each name is current, the loads that bring versions into the engine (one
    per version however many ask), pins, unloads, and the listing. The engine's registry is the
    one record of what is in memory; the reader (server/adapters/reader.py) reads and validates,
    the watcher (server/adapters/watcher.py) follows the store."""

    def __init__(self, engine: Engine, config: AdapterConfig, metrics: Metrics, base_fingerprint: str | None):
        self.engine = engine
        self.config = config
        self.store = open_store(config.store, ObjectStoreOptions(
            config.s3_endpoint_url, config.cache_dir, config.cache_bytes,
            largest_adapter_bytes(engine.spec, engine.config.max_rank))) if config.store else None
        self.reader = AdapterReader(engine.spec, engine.config.max_rank, base_fingerprint, metrics)
        self.watcher = StoreWatcher(self.store, self, config.poll_interval_s) if self.store else None
        self._lock = threading.RLock()
        self._known: dict[str, AdapterVersion] = {}  # key -> version, read at least once
        self._current: dict[str, str] = {}  # name -> version new requests get
        self._loading: dict[str, Future] = {}
        self.waiting_for_load = 0  # requests (samples) in submit() waiting for their version to be read
        # submits that must load a cold version, and admin loads, run here (not on the threads that
        # serve everyone's requests)
        self.loader = ThreadPoolExecutor(max_workers=config.load_workers, thread_name_prefix="hotlora-adapter-load")

    # ------------------------------------------------------------------ requests

    def submit_if_ready(self, ref: AdapterRef | None, request: Request, loop=None,
                        n: int = 1) -> tuple[list[RequestHandle], AdapterVersion | None] | None:
        """submit() when nothing needs loading (the base model, a version in memory), without
        blocking: safe on the event loop. None when a load is needed: then submit() on `loader`."""
        if ref is None:
            return self.engine.submit_samples(request, n, loop), None
        with self._lock:
            key = self._key_in_memory(ref)
            if key is not None:
                return self.engine.submit_samples(replace(request, adapter=key), n, loop), self._known[key]
        return None

    def submit(self, ref: AdapterRef | None, request: Request, loop=None,
               n: int = 1) -> tuple[list[RequestHandle], AdapterVersion | None]:
        """Submit `request` on adapter `ref` (None: the base model), as n samples of its prompt
        (Engine.submit_samples). Blocks while a cold version is read and validated, so call it on
        `loader`, never the event loop."""
        if ref is None:
            return self.engine.submit_samples(request, n, loop), None
        with self._lock:  # counted as queued while its version is read, not once the engine queues it too
            waiting = n if self._key_in_memory(ref) is None else 0
            self.waiting_for_load += waiting

        def submit(key: str):  # under the lock
            nonlocal waiting
            self.waiting_for_load -= waiting
            waiting = 0
            return self.engine.submit_samples(replace(request, adapter=key), n, loop), self._known[key]

        try:
            return self._once_in_memory(ref, submit)
        finally:
            with self._lock:
                self.waiting_for_load -= waiting

    def resolve_if_ready(self, ref: AdapterRef) -> AdapterVersion | None:
        """resolve() when the version is in memory, without blocking; else None."""
        with self._lock:
            key = self._key_in_memory(ref)
            return self._known[key] if key is not None else None

    def resolve(self, ref: AdapterRef) -> AdapterVersion:
        """The version `ref` names now (for a bare name, its current one), brought into memory.
        Blocks while a cold version loads: call it on `loader`. A request pinned to the returned
        key runs on this version even if a newer one becomes current meanwhile."""
        return self._once_in_memory(ref, lambda key: self._known[key])

    def serves(self, name: str) -> bool:
        with self._lock:
            return name in self._current

    def current_version(self, name: str) -> str | None:
        with self._lock:
            return self._current.get(name)

    def _key_in_memory(self, ref: AdapterRef) -> str | None:  # holds self._lock
        version = ref.version or self._current.get(ref.name)
        if version is None:
            return None
        key = ref.at(version)
        return key if self.engine.has_adapter(key) else None

    def _once_in_memory(self, ref: AdapterRef, then: Callable[[str], object]):
        """then(key), under the lock, as soon as the version `ref` names is in memory (so it cannot
        be dropped in between), bringing it in first when it is not."""
        while True:
            with self._lock:
                key = self._key_in_memory(ref)
                if key is not None:
                    return then(key)
                wanted = ref.version or self._current.get(ref.name)
                known = self._known.get(ref.at(wanted)) if wanted else None
            if known is not None and not known.from_store:  # a path version dropped from memory
                self._load_once(known.key, lambda: self.reader.reread_path(known))
            else:
                self.load(AdapterRef(ref.name, wanted), make_current=False)  # None: the store's current

    # ------------------------------------------------------------------ loading

    def load(self, ref: AdapterRef, make_current: bool = True) -> AdapterVersion:
        """Bring a store version into memory (the name's store-current one for a bare name)."""
        store = self._require_store(ref.name)
        stored = store.get(ref.name, ref.version)
        store_current = store.current(ref.name)
        first_use = not self.serves(ref.name)
        if first_use:
            self.watcher.first_use(ref.name, store_current, store.unload_token(ref.name))
        loaded = self._load_once(version_key(stored.name, stored.version), lambda: self.reader.read_stored(stored))
        if make_current or (first_use and stored.version == store_current):
            self._make_current(loaded)
        return loaded

    def pin(self, ref: AdapterRef) -> AdapterVersion:
        """Serve `ref.version` as the name's current one on every server of the store: load it
        here, then move the store's `current` to it, which the others follow at their next poll.
        It stays until the next publish (or pin) moves `current` again."""
        if ref.version is None:
            raise InvalidRequest(f"pinning {ref.name!r} needs a version")
        loaded = self.load(ref, make_current=False)  # validated before anything changes
        store = self._require_store(ref.name)
        with self.watcher.acting:
            if store.current(ref.name) != ref.version:
                with _writing_store():
                    store.set_current(ref.name, ref.version)
            self.watcher.pinned(ref.name, ref.version)
            self._make_current(loaded)
        return loaded

    def load_path(self, ref: AdapterRef, path: str | Path) -> AdapterVersion:
        """Load a PEFT directory from an allowed path and make it the name's current version."""
        directory = Path(path).resolve()
        if not any(directory.is_relative_to(root.resolve()) for root in self.config.allowed_paths):
            raise PermissionDenied(f"{path} is outside the directories this server may load adapters from "
                                   "(--adapter-path-allow)")
        described, weights = self.reader.read_path(ref.name, directory)
        loaded = self._load_once(described.key, lambda: (described, weights))
        self._make_current(loaded)
        return loaded

    def unload(self, ref: AdapterRef) -> None:
        """Drop the name from memory here and, for a store adapter, on every server of the store
        (through `<name>/unload`); the next request that names it loads the current version."""
        in_store = self.store is not None and ref.name in self.store.names()
        with self.watcher.acting if self.watcher is not None else contextlib.nullcontext():
            if in_store:  # the store first: if it cannot be written, nothing changes anywhere
                with _writing_store():
                    token = self.store.request_unload(ref.name)
                self.watcher.unloaded(ref.name, token)
            try:
                self.unload_here(ref.name)
            except AdapterNotFound:
                if not in_store:
                    raise

    def unload_here(self, name: str) -> None:
        """Drop every version of `name` from this server's memory (the watcher calls this when
        another server unloaded it)."""
        with self._lock:
            keys = [k for k, v in self._known.items() if v.name == name and self.engine.has_adapter(k)]
            if not keys and name not in self._current:
                raise AdapterNotFound(f"adapter {name!r} is not loaded")
            for key in keys:
                self.engine.unload_adapter(key)
            self._current.pop(name, None)
        if self.watcher is not None:
            self.watcher.forget(name)

    def _load_once(self, key: str, read: Callable[[], tuple[AdapterVersion, AdapterWeights]]) -> AdapterVersion:
        """Read + validate + register one version; concurrent callers for it share one load."""
        with self._lock:
            if self.engine.has_adapter(key):
                return self._known[key]
            future = self._loading.get(key)
            owner = future is None
            if owner:
                future = self._loading[key] = Future()
        if not owner:
            return future.result()
        try:
            described, weights = read()
            loaded = replace(described, content_hash=weights.content_hash, rank=weights.rank,
                             target_modules=weights.target_modules)
            with self._lock:
                self._known[key] = loaded  # before it is in memory, so whoever finds it there finds this
            self.engine.install_adapter(key, weights)
            self._trim_host_tier(keep=key)
            future.set_result(loaded)
            return loaded
        except BaseException as exc:
            future.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._loading.pop(key, None)

    def _make_current(self, loaded: AdapterVersion) -> None:
        with self._lock:
            previous = self._current.get(loaded.name)
            self._current[loaded.name] = loaded.version
            superseded = version_key(loaded.name, previous) if previous not in (None, loaded.version) else None
            if superseded is not None and self.engine.has_adapter(superseded):
                self.engine.unload_adapter(superseded)  # running requests keep it until they finish
        if previous != loaded.version:
            log.info("adapter %s now serves version %s (%s)", loaded.name, loaded.version, loaded.content_hash[:12])

    def _trim_host_tier(self, keep: str) -> None:
        """Drop idle versions beyond host_cache_size (and host_cache_bytes), least recently used
        first (never `keep`, never one with requests on it)."""
        limit_bytes = self.config.host_cache_bytes
        with self._lock:
            info = {a.name: a for a in self.engine.adapters()}
            held = sum(a.host_bytes for a in info.values())
            count = len(info)
            if count <= self.config.host_cache_size and (limit_bytes is None or held <= limit_bytes):
                return
            idle = sorted((a.last_used, k) for k, a in info.items() if k != keep and a.in_flight == 0)
            for _, key in idle:
                if count <= self.config.host_cache_size and (limit_bytes is None or held <= limit_bytes):
                    break
                self.engine.unload_adapter(key)
                count -= 1
                held -= info[key].host_bytes

    def _require_store(self, name: str) -> AdapterStore:
        if self.store is None:
            raise self.missing(AdapterRef(name))
        return self.store

    def missing(self, ref: AdapterRef) -> AdapterNotFound:
        """What a request naming `ref` is told when nobody has it: also what a tenant is told of
        another tenant's adapter, word for word, so names do not leak."""
        if self.store is None:
            return AdapterNotFound(f"adapter {ref.name!r} is not loaded and this server has no adapter store")
        return self.store.missing(ref.name, ref.version)

    # ------------------------------------------------------------------ the watcher

    def start_watching(self) -> None:
        if self.watcher is not None:
            self.watcher.start()

    def poll_store(self) -> None:
        """One look at the store now (the watcher does this every poll_interval_s)."""
        if self.watcher is not None:
            self.watcher.poll()

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        self.loader.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ listing

    def get(self, ref: AdapterRef) -> AdapterStatus:
        version = ref.version or self.current_version(ref.name)
        if version is None and self.store is not None:
            version = self.store.current(ref.name)
        rows = [s for s in self.list() if s.version.name == ref.name and s.version.version == version]
        if not rows:
            raise AdapterNotFound(f"adapter {str(ref)!r} is neither loaded nor in the store")
        return rows[0]

    def list(self) -> list[AdapterStatus]:
        engine = {a.name: a for a in self.engine.adapters()}
        with self._lock:
            rows = {}
            for key, known in self._known.items():
                live = engine.get(key)
                tier = "store" if live is None else "device" if live.resident else "host"
                if live is None and not known.from_store:
                    continue  # a dropped path version is gone
                rows[key] = AdapterStatus(known, self._current.get(known.name) == known.version, tier,
                                          live.in_flight if live else 0, live.last_used if live else 0.0)
            current = dict(self._current)
        try:
            rows.update(self._store_rows(rows, current))
        except StoreUnavailable:  # said by the store, once; what is in memory is listed
            pass
        return [rows[k] for k in sorted(rows)]

    def _store_rows(self, known: dict, current: dict[str, str]) -> dict[str, AdapterStatus]:
        """The store's versions not in memory here; none while the store cannot be reached (the
        watcher finds out when it can again: a listing must not wait on retries)."""
        if self.store is None or self.store.unreachable is not None:
            return {}
        rows = {}
        for name in self.store.names():
            store_current = current.get(name) or self.store.current(name)
            for version in self.store.versions(name):
                key = version_key(name, version)
                if key not in known:
                    described = AdapterVersion(name, version, self.store.location_of(name, version), True)
                    rows[key] = AdapterStatus(described, version == store_current, "store", 0, 0.0)
        return rows

    def lora_activity(self) -> tuple[list[str], list[str]]:
        """The adapters this replica holds in memory (a device slot, or the host tier: either serves
        its next request without reading the store) and those requests wait for (a slot, or being
        read), named as requests name them: "name" for a name's current version, "name@version"
        for any other."""
        resident, waiting = self.engine.adapter_activity()
        with self._lock:
            return ([self._request_name(k) for k in resident],
                    sorted({self._request_name(k) for k in (*waiting, *self._loading)}))

    def _request_name(self, key: str) -> str:  # holds self._lock
        """A version's key as requests name it: its bare name while it is current (or, being read
        for a name with no current version yet, about to be)."""
        ref = AdapterRef.parse(key)
        current = self._current.get(ref.name)
        return ref.name if current == ref.version or current is None else key

    def tier_counts(self) -> dict[str, int]:
        counts = {"device": 0, "host": 0, "store": 0}
        for status in self.list():
            counts[status.tier] += 1
        return counts
