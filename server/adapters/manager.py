"""The adapter manager: "name" / "name@version" -> a registered engine adapter, across three tiers.

    store (disk)  --read + validate, off the engine thread-->  CPU (host weights, registered in
    the engine)  --copy into a slot between steps, by the engine-->  GPU slot

Each loaded version is registered in the engine under the key "name@version" and is identified
by the content hash of its files, so a new version under an old name is never confused with it.
`submit` resolves a name to its current version, loading it first when it is not in memory, and
submits under the manager's lock so the version cannot be dropped in between; the engine keeps
the weights a request started with until it finishes.

Current versions: a name's current version is the store's `current` when first used; after that
the watcher follows changes of `<name>/current` (polling every poll_interval_s), and LoadAdapter
can pin another version until the next change. A new version that fails validation is refused,
counted (hotlora_adapter_loads_total{result="rejected"}) and logged once, and the previous good
version stays current. A superseded version is retired from the engine: requests still running
on it finish there, and its slot is freed when the last one does.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from ..config import AdapterConfig
from ..engine.engine import Engine, Request, RequestHandle
from ..errors import (AdapterNotFound, HotloraError, IncompatibleAdapter, InvalidRequest, PermissionDenied,
                     StoreNotWritable)
from ..lora.peft_files import AdapterWeights, read_peft_adapter, validate_adapter_name
from ..metrics import Metrics
from .store import MANIFEST_SCHEMA_VERSION, AdapterStore, StoredVersion

log = logging.getLogger(__name__)


def version_key(name: str, version: str | None) -> str:
    """How a version is registered in the engine: "name@version"."""
    return f"{name}@{version}"


@dataclass(frozen=True)
class AdapterVersion:
    """One version the server knows about (in memory or only in the store)."""

    name: str
    version: str
    source: Path
    from_store: bool
    content_hash: str = ""
    rank: int = 0
    target_modules: tuple[str, ...] = ()
    # The chat template it was trained with, from its manifest; None: the base model's. A manifest
    # that records only the template's hash keeps it here, so chat is refused when it is not the base's.
    chat_template: str | None = None
    chat_template_sha256: str | None = None

    @property
    def key(self) -> str:
        return version_key(self.name, self.version)

    def chat_template_for(self, base_template: str | None) -> str | None:
        """The template its chat requests are rendered with: its own, else the base model's when
        that is the one it was trained with. InvalidRequest when that cannot be known (the
        manifest holds only the hash of another template): its prompts are still served."""
        if self.chat_template:
            return self.chat_template
        base_hash = hashlib.sha256((base_template or "").encode()).hexdigest()
        if self.chat_template_sha256 and self.chat_template_sha256 != base_hash:
            raise InvalidRequest(f"{self.key} was trained with a chat template other than the base model's, and its "
                                 "manifest does not hold it: send `prompt` text or `prompt_token_ids` instead")
        return base_template


@dataclass(frozen=True)
class AdapterStatus:
    """A row of ListAdapters."""

    version: AdapterVersion
    current: bool
    tier: str  # "device" (in a LoRA slot) | "host" (validated, in memory) | "store"
    in_flight: int
    last_used: float


def parse_adapter_ref(ref: str) -> tuple[str, str | None]:
    """'name' -> (name, None); 'name@version' -> (name, version). Both parts validated."""
    name, _, version = ref.partition("@")
    validate_adapter_name(name)
    if "@" in ref:
        validate_adapter_name(version)
    return name, version or None


@contextlib.contextmanager
def _writing_store():
    try:
        yield
    except OSError as exc:
        raise StoreNotWritable(f"pins and unloads are written to the adapter store for every replica, and this "
                               f"server cannot write it ({exc.strerror or exc}); mount the store read-write") from None


class AdapterManager:
    def __init__(self, engine: Engine, config: AdapterConfig, metrics: Metrics, base_fingerprint: str | None):
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.base_fingerprint = base_fingerprint
        self.store = AdapterStore(config.store) if config.store else None
        self._lock = threading.RLock()
        self._known: dict[str, AdapterVersion] = {}  # key -> version, loaded at least once
        self._in_memory: set[str] = set()  # keys registered in the engine
        self._current: dict[str, str] = {}  # name -> version new requests get
        self._store_current_seen: dict[str, str | None] = {}  # name -> store `current` last acted on
        self._unload_seen: dict[str, str | None] = {}  # name -> store `unload` token last acted on
        self._rejected: dict[str, tuple[float, HotloraError]] = {}  # key -> (manifest mtime, why)
        self._loading: dict[str, Future] = {}
        self._poll_failures: dict[str, str] = {}  # name -> store version last refused by the watcher
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        # submits that must load a cold version, and admin loads, run here (not on the threads that
        # serve everyone's requests)
        self.loader = ThreadPoolExecutor(max_workers=config.load_workers, thread_name_prefix="hotlora-adapter-load")

    # ------------------------------------------------------------------ requests

    def submit_if_ready(self, ref: str, request: Request,
                        loop=None) -> tuple[RequestHandle, AdapterVersion | None] | None:
        """submit() when nothing needs loading (the base model, a version in memory), without
        blocking: safe on the event loop. None when a load is needed: then submit() on `loader`."""
        if not ref:
            return self.engine.submit(request, loop), None
        name, version = parse_adapter_ref(ref)
        with self._lock:
            key = version_key(name, version or self._current.get(name))
            if key in self._in_memory:
                return self.engine.submit(replace(request, adapter=key), loop), self._known[key]
        return None

    def submit(self, ref: str, request: Request, loop=None) -> tuple[RequestHandle, AdapterVersion | None]:
        """Submit `request` on adapter `ref` ("" = base). Blocks while a cold version is read and
        validated, so call it on `loader`, never the event loop."""
        if not ref:
            return self.engine.submit(request, loop), None
        return self._once_in_memory(ref, lambda key: (self.engine.submit(replace(request, adapter=key), loop),
                                                      self._known[key]))

    def resolve_if_ready(self, ref: str) -> AdapterVersion | None:
        """resolve() when the version is in memory, without blocking; else None."""
        name, version = parse_adapter_ref(ref)
        with self._lock:
            key = version_key(name, version or self._current.get(name))
            return self._known[key] if key in self._in_memory else None

    def resolve(self, ref: str) -> AdapterVersion:
        """The version `ref` names now (for "name", its current one), brought into memory. Blocks
        while a cold version loads: call it on `loader`. A request pinned to the returned key
        runs on this version even if a newer one becomes current meanwhile."""
        return self._once_in_memory(ref, lambda key: self._known[key])

    def _once_in_memory(self, ref: str, then):
        """then(key), under the lock, as soon as the version `ref` names is in memory (so it cannot
        be dropped in between), bringing it in first when it is not."""
        name, version = parse_adapter_ref(ref)
        while True:
            with self._lock:
                wanted = version or self._current.get(name)
                key = version_key(name, wanted)
                if wanted is not None and key in self._in_memory:
                    return then(key)
                known = self._known.get(key)
            self._bring_in(name, wanted, known)

    def _bring_in(self, name: str, wanted: str | None, known: AdapterVersion | None) -> None:
        if wanted is None:
            self.load(name, None, make_current=False)  # first use: the store's current version
        elif known is not None and not known.from_store:
            self._load_once(name, wanted, lambda: self._reread_path(known))  # dropped from memory
        else:
            self.load(name, wanted, make_current=False)

    # ------------------------------------------------------------------ loading

    def load(self, name: str, version: str | None = None, make_current: bool = True) -> AdapterVersion:
        """Bring a store version into memory (the name's current one when version is None)."""
        validate_adapter_name(name)
        store = self._require_store(name)
        stored = store.get(name, version)
        store_current = store.current(name)
        unload_token = store.unload_token(name)
        with self._lock:
            first_use = name not in self._current
            if first_use:
                self._store_current_seen.setdefault(name, store_current)
                self._unload_seen.setdefault(name, unload_token)
        loaded = self._load_once(stored.name, stored.version, lambda: self._read_stored(stored))
        if make_current or (first_use and stored.version == store_current):
            self._make_current(loaded)
        return loaded

    def pin(self, name: str, version: str) -> AdapterVersion:
        """Serve `version` as the name's current one on every server of the store: load it here,
        then move the store's `current` to it, which the others follow at their next poll. It
        stays until the next publish (or pin) moves `current` again."""
        loaded = self.load(name, version, make_current=False)  # validated before anything changes
        store = self._require_store(name)
        if store.current(name) != version:
            with _writing_store():
                store.set_current(name, version)
        with self._lock:
            self._store_current_seen[name] = version
        self._make_current(loaded)
        return loaded

    def load_path(self, name: str, path: str | Path) -> AdapterVersion:
        """Load a PEFT directory from an allowed path and make it the name's current version."""
        validate_adapter_name(name)
        directory = Path(path).resolve()
        if not any(directory.is_relative_to(root.resolve()) for root in self.config.allowed_paths):
            raise PermissionDenied(f"{path} is outside the directories this server may load adapters from "
                                   "(--adapter-path-allow)")
        described, weights = self._read_path(name, directory)
        loaded = self._load_once(name, described.version, lambda: (described, weights))
        self._make_current(loaded)
        return loaded

    def _reread_path(self, known: AdapterVersion) -> tuple[AdapterVersion, AdapterWeights]:
        """A path version read again after it was dropped: its files must still be that version."""
        described, weights = self._read_path(known.name, known.source)
        if described.version != known.version:
            raise AdapterNotFound(f"{known.key} is gone: the files at {known.source} have changed since it was "
                                  f"loaded (they are now {described.version}); load the path again")
        return described, weights

    def _read_path(self, name: str, directory: Path) -> tuple[AdapterVersion, AdapterWeights]:
        weights = self._validated(lambda: read_peft_adapter(directory, self.engine.spec, self.engine.config.max_rank))
        return AdapterVersion(name, f"path-{weights.content_hash[:12]}", directory, False), weights

    def unload(self, name: str) -> None:
        """Drop the name from memory here and, for a store adapter, on every server of the store
        (through `<name>/unload`); the next request that names it loads the current version."""
        in_store = self.store is not None and validate_adapter_name(name) in self.store.names()
        if in_store:  # the store first: if it cannot be written, nothing changes anywhere
            with _writing_store():
                token = self.store.request_unload(name)
            with self._lock:
                self._unload_seen[name] = token
        try:
            self._unload_here(name)
        except AdapterNotFound:
            if not in_store:
                raise

    def _unload_here(self, name: str) -> None:
        validate_adapter_name(name)
        with self._lock:
            keys = [k for k, v in self._known.items() if v.name == name and k in self._in_memory]
            if not keys and name not in self._current:
                raise AdapterNotFound(f"adapter {name!r} is not loaded")
            for key in keys:
                self._drop(key)
            self._current.pop(name, None)
            self._store_current_seen.pop(name, None)
            self._unload_seen.pop(name, None)

    def _load_once(self, name: str, version: str, read) -> AdapterVersion:
        """Read + validate + register one version; concurrent callers for it share one load."""
        key = version_key(name, version)
        with self._lock:
            if key in self._in_memory:
                return self._known[key]
            future = self._loading.get(key)
            owner = future is None
            if owner:
                future = self._loading[key] = Future()
        if not owner:
            return future.result()
        try:
            described, weights = read()
            info = self.engine.install_adapter(key, weights)
            loaded = replace(described, content_hash=info.content_hash, rank=info.rank, target_modules=info.target_modules)
            with self._lock:
                self._known[key] = loaded
                self._in_memory.add(key)
                self._rejected.pop(key, None)
            self._trim_cpu_cache(keep=key)
            future.set_result(loaded)
            return loaded
        except BaseException as exc:
            future.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._loading.pop(key, None)

    def _read_stored(self, stored: StoredVersion) -> tuple[AdapterVersion, AdapterWeights]:
        key = version_key(stored.name, stored.version)
        stamp = _mtime(stored.path)
        with self._lock:
            rejected = self._rejected.get(key)
        if rejected and rejected[0] == stamp:
            raise rejected[1]
        try:
            weights = self._validated(lambda: self._check_and_read(stored))
        except IncompatibleAdapter as exc:
            with self._lock:
                self._rejected[key] = (stamp, exc)
            raise
        manifest = stored.manifest or {}
        return AdapterVersion(stored.name, stored.version, stored.path, True,
                              chat_template=manifest.get("chat_template") or None,
                              chat_template_sha256=manifest.get("chat_template_sha256") or None), weights

    def _check_and_read(self, stored: StoredVersion) -> AdapterWeights:
        manifest = stored.manifest
        if manifest is not None:
            schema = manifest.get("schema_version")
            if not isinstance(schema, int) or not 1 <= schema <= MANIFEST_SCHEMA_VERSION:
                raise IncompatibleAdapter(f"{stored.path}/manifest.json: schema_version {schema!r} is not one this "
                                          f"server reads (1..{MANIFEST_SCHEMA_VERSION}) or the file is unreadable")
            trained_on = manifest.get("base_fingerprint")
            if trained_on and self.base_fingerprint and trained_on != self.base_fingerprint:
                raise IncompatibleAdapter(f"{stored.name}@{stored.version} was trained on another base model "
                                          f"(fingerprint {trained_on[:12]}…, this server's is {self.base_fingerprint[:12]}…)")
            template, digest = manifest.get("chat_template"), manifest.get("chat_template_sha256")
            if template is not None and (not isinstance(template, str) or
                                         (digest and hashlib.sha256(template.encode()).hexdigest() != digest)):
                raise IncompatibleAdapter(f"{stored.path}/manifest.json: its chat_template does not match its "
                                          "chat_template_sha256")
        return read_peft_adapter(stored.path, self.engine.spec, self.engine.config.max_rank)

    def _validated(self, read) -> AdapterWeights:
        """Time and count one read+validate; refusals are logged once with the reason."""
        started = time.perf_counter()
        try:
            weights = read()
        except IncompatibleAdapter as exc:
            self.metrics.adapter_loads.labels("rejected").inc()
            log.warning("adapter refused: %s", exc)
            raise
        except HotloraError:
            raise
        except Exception:
            self.metrics.adapter_loads.labels("error").inc()
            log.exception("adapter load failed")
            raise
        self.metrics.adapter_loads.labels("ok").inc()
        self.metrics.adapter_load_duration.observe(time.perf_counter() - started)
        return weights

    def _make_current(self, loaded: AdapterVersion) -> None:
        with self._lock:
            previous = self._current.get(loaded.name)
            self._current[loaded.name] = loaded.version
            old_key = version_key(loaded.name, previous)
            if previous is not None and previous != loaded.version and old_key in self._in_memory:
                self._drop(old_key)  # running requests keep it until they finish
        if previous != loaded.version:
            log.info("adapter %s now serves version %s (%s)", loaded.name, loaded.version, loaded.content_hash[:12])

    def _drop(self, key: str) -> None:  # holds self._lock
        self._in_memory.discard(key)
        self.engine.unload_adapter(key)

    def _trim_cpu_cache(self, keep: str) -> None:
        """Drop idle versions beyond cpu_cache_size (and host_cache_bytes), least recently used
        first (never `keep`, never one with requests on it)."""
        limit_bytes = self.config.host_cache_bytes
        with self._lock:
            info = {a.name: a for a in self.engine.adapters() if a.name in self._in_memory}
            held = sum(a.host_bytes for a in info.values())
            if len(self._in_memory) <= self.config.cpu_cache_size and (limit_bytes is None or held <= limit_bytes):
                return
            idle = sorted((info[k].last_used, k) for k in self._in_memory
                          if k != keep and k in info and info[k].in_flight == 0)
            count = len(self._in_memory)
            for _, key in idle:
                if count <= self.config.cpu_cache_size and (limit_bytes is None or held <= limit_bytes):
                    break
                self._drop(key)
                count -= 1
                held -= info[key].host_bytes

    def _require_store(self, name: str) -> AdapterStore:
        if self.store is None:
            raise AdapterNotFound(f"adapter {name!r} is not loaded and this server has no adapter store")
        return self.store

    # ------------------------------------------------------------------ the store watcher

    def poll_store(self) -> None:
        """Follow the store for every name in use: a new `<name>/current` (a publish, or a pin on
        any server) is loaded and made current; a new `<name>/unload` token drops the name."""
        if self.store is None:
            return
        with self._lock:
            names = [n for n in self._current if n in self._store_current_seen]
        for name in names:
            try:
                now, unload_token = self.store.current(name), self.store.unload_token(name)
            except OSError:
                continue
            with self._lock:
                unloaded_elsewhere = unload_token != self._unload_seen.get(name, unload_token)
            if unloaded_elsewhere:  # another server's UnloadAdapter
                try:
                    self._unload_here(name)
                except AdapterNotFound:
                    pass
                continue
            with self._lock:
                changed = now is not None and now != self._store_current_seen.get(name)
            if not changed:
                continue
            try:
                self.load(name, now)
            except HotloraError as exc:
                if self._poll_failures.get(name) != now:  # once per bad version, not every poll
                    log.warning("store: %s@%s is not served (%s); %s stays current", name, now, exc,
                                self._current.get(name))
                    self._poll_failures[name] = now
                continue
            with self._lock:
                self._store_current_seen[name] = now

    def start_watching(self) -> None:
        def watch():
            while not self._stop.wait(self.config.poll_interval_s):
                try:
                    self.poll_store()
                except Exception:
                    log.exception("store watcher failed; retrying at the next interval")

        if self.store is not None and self._watcher is None:
            self._watcher = threading.Thread(target=watch, name="hotlora-store-watcher", daemon=True)
            self._watcher.start()

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()
        self.loader.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ listing

    def get(self, ref: str) -> AdapterStatus:
        name, version = parse_adapter_ref(ref)
        with self._lock:
            version = version or self._current.get(name)
        if version is None and self.store is not None:
            version = self.store.current(name)
        rows = [s for s in self.list() if s.version.name == name and s.version.version == version]
        if not rows:
            raise AdapterNotFound(f"adapter {ref!r} is neither loaded nor in the store")
        return rows[0]

    def list(self) -> list[AdapterStatus]:
        engine = {a.name: a for a in self.engine.adapters()}
        with self._lock:
            rows = {}
            for key, known in self._known.items():
                live = engine.get(key) if key in self._in_memory else None
                tier = "store" if live is None else "device" if live.resident else "host"
                if live is None and not known.from_store:
                    continue  # a dropped path version is gone
                rows[key] = AdapterStatus(known, self._current.get(known.name) == known.version, tier,
                                          live.in_flight if live else 0, live.last_used if live else 0.0)
            current = dict(self._current)
        for name in self.store.names() if self.store else []:
            store_current = current.get(name) or self.store.current(name)
            for version in self.store.versions(name):
                key = version_key(name, version)
                if key not in rows:
                    described = AdapterVersion(name, version, self.store.root / name / version, True)
                    rows[key] = AdapterStatus(described, version == store_current, "store", 0, 0.0)
        return [rows[k] for k in sorted(rows)]

    def tier_counts(self) -> dict[str, int]:
        counts = {"device": 0, "host": 0, "store": 0}
        for status in self.list():
            counts[status.tier] += 1
        return counts


def _mtime(path: Path) -> float:
    try:
        return max(p.stat().st_mtime for p in path.iterdir())
    except (OSError, ValueError):
        return 0.0
