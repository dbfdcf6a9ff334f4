"""Reading an adapter version from disk, validated against this server's base model, before
anything is registered: a store version (its manifest checked first) or a PEFT directory on an
allowed path. Every read is timed and counted (hotlora_adapter_loads_total{result}); a refusal is
logged once with its reason, and a store version refused as incompatible is not read again until
its files change."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from pathlib import Path
from typing import Callable

from ..errors import AdapterNotFound, HotloraError, IncompatibleAdapter
from ..lora.peft_files import AdapterWeights, ModelShape, read_peft_adapter
from ..metrics import Metrics
from .store import MANIFEST_SCHEMA_VERSION, StoredVersion
from .versions import AdapterVersion, version_key

log = logging.getLogger(__name__)


class AdapterReader:
    def __init__(self, shape: ModelShape, max_rank: int, base_fingerprint: str | None, metrics: Metrics):
        self.shape = shape
        self.max_rank = max_rank
        self.base_fingerprint = base_fingerprint
        self.metrics = metrics
        self._lock = threading.Lock()
        self._rejected: dict[str, tuple[float, HotloraError]] = {}  # key -> (files' mtime, why)

    def read_stored(self, stored: StoredVersion) -> tuple[AdapterVersion, AdapterWeights]:
        key = version_key(stored.name, stored.version)
        stamp = _mtime(stored.path)
        with self._lock:
            rejected = self._rejected.get(key)
        if rejected and rejected[0] == stamp:
            raise rejected[1]
        try:
            weights = self._counted(lambda: self._check_and_read(stored))
        except IncompatibleAdapter as exc:
            with self._lock:
                self._rejected[key] = (stamp, exc)
            raise
        with self._lock:
            self._rejected.pop(key, None)
        manifest = stored.manifest or {}
        described = AdapterVersion(stored.name, stored.version, stored.path, True,
                                   chat_template=manifest.get("chat_template") or None,
                                   chat_template_sha256=manifest.get("chat_template_sha256") or None)
        return described, weights

    def read_path(self, name: str, directory: Path) -> tuple[AdapterVersion, AdapterWeights]:
        """A PEFT directory, as version "path-<its content hash>" of `name`."""
        weights = self._counted(lambda: read_peft_adapter(directory, self.shape, self.max_rank))
        return AdapterVersion(name, f"path-{weights.content_hash[:12]}", directory, False), weights

    def reread_path(self, known: AdapterVersion) -> tuple[AdapterVersion, AdapterWeights]:
        """A path version read again after it was dropped: its files must still be that version."""
        described, weights = self.read_path(known.name, known.source)
        if described.version != known.version:
            raise AdapterNotFound(f"{known.key} is gone: the files at {known.source} have changed since it was "
                                  f"loaded (they are now {described.version}); load the path again")
        return described, weights

    def _check_and_read(self, stored: StoredVersion) -> AdapterWeights:
        manifest = stored.manifest
        if manifest is not None:
            schema = manifest.get("schema_version")
            if not isinstance(schema, int) or not 1 <= schema <= MANIFEST_SCHEMA_VERSION:
                raise IncompatibleAdapter(f"{stored.path}/manifest.json: schema_version {schema!r} is not one this "
                                          f"server reads (1..{MANIFEST_SCHEMA_VERSION}) or the file is unreadable")
            trained_on = manifest.get("base_fingerprint")
            if trained_on and self.base_fingerprint and trained_on != self.base_fingerprint:
                raise IncompatibleAdapter(f"{version_key(stored.name, stored.version)} was trained on another base "
                                          f"model (fingerprint {trained_on[:12]}…, this server's is "
                                          f"{self.base_fingerprint[:12]}…)")
            template, digest = manifest.get("chat_template"), manifest.get("chat_template_sha256")
            if template is not None and (not isinstance(template, str) or
                                         (digest and hashlib.sha256(template.encode()).hexdigest() != digest)):
                raise IncompatibleAdapter(f"{stored.path}/manifest.json: its chat_template does not match its "
                                          "chat_template_sha256")
        return read_peft_adapter(stored.path, self.shape, self.max_rank)

    def _counted(self, read: Callable[[], AdapterWeights]) -> AdapterWeights:
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


def _mtime(path: Path) -> float:
    try:
        return max(p.stat().st_mtime for p in path.iterdir())
    except (OSError, ValueError):
        return 0.0
