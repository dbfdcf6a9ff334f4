"""The adapter store: a directory tree every server replica reads and the trainer publishes into
(or the same layout on S3: server/adapters/s3_store.py; open_store() picks by the location).

    <store>/<name>/<version>/adapter_config.json        PEFT format, unchanged
    <store>/<name>/<version>/adapter_model.safetensors  PEFT key names
    <store>/<name>/<version>/manifest.json              hotlora's contract (optional for other tools)
    <store>/<name>/current                              the current version's name

Publishing is atomic: files are written into a hidden temporary directory inside the store,
fsynced, renamed into place, and only then is `current` replaced (write a temporary file, fsync,
rename). A reader sees either the old state or the new one; a publish killed at any point leaves a
hidden `.tmp-*` directory at most, which readers ignore and `collect_garbage` removes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import struct
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdapterNotFound, InvalidRequest, StoreNotWritable
from ..lora.peft_files import validate_adapter_name

MANIFEST_SCHEMA_VERSION = 1
# A published version is readable by every user whatever the publisher's umask: on Kubernetes the
# trainer Job and the server pods may run as different UIDs on one shared volume. Only the
# publisher can write.
DIRECTORY_MODE, FILE_MODE = 0o755, 0o644
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_VERSION = re.compile(r"^v(\d+)$")
_FINGERPRINT_SAMPLE = 1 << 20


SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/")


@dataclass(frozen=True)
class ObjectStoreOptions:
    """For a store on S3: endpoint_url (None: boto3's chain, AWS_ENDPOINT_URL included), the local
    cache's directory and byte bound, and the largest object a version's file may be (checked
    before it is downloaded)."""

    endpoint_url: str | None = None
    cache_dir: Path | None = None
    cache_bytes: int | None = None
    max_object_bytes: int | None = None


def check_location(location: str | Path) -> str:
    """The location as text, when it names a store this build can open: a directory, or
    s3://bucket[/prefix]. Any other scheme is refused (it must never become a local path)."""
    text = str(location)
    scheme = SCHEME.match(text)
    if scheme is None:
        return text
    if scheme[1].lower() == "s3" and text[:5].lower() == "s3://" and len(text) > 5:
        return text
    raise InvalidRequest(f"{text}: not a store location this server can open; give a directory or "
                         "s3://BUCKET/PREFIX (S3 or an S3-compatible service)")


def open_store(location: str | Path, options: ObjectStoreOptions = ObjectStoreOptions()):
    """The store at `location`: AdapterStore for a directory, S3Store for s3://bucket/prefix."""
    text = check_location(location)
    if SCHEME.match(text):
        from .s3_store import S3Store

        return S3Store(text, endpoint_url=options.endpoint_url, cache_dir=options.cache_dir,
                       cache_bytes=options.cache_bytes, max_object_bytes=options.max_object_bytes)
    return AdapterStore(text)


@dataclass(frozen=True)
class StoredVersion:
    name: str
    version: str
    path: Path
    manifest: dict | None  # None for adapters published by other tools


class AdapterStore:
    unreachable: str | None = None  # a directory is there or it is not: only an object store goes unreachable

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __str__(self) -> str:
        return str(self.root)

    def location_of(self, name: str, version: str) -> str:
        return str(self.root / name / version)

    def check_writable(self) -> None:
        """StoreNotWritable unless this process could create (or write) the store directory: what a
        trainer asks before it spends minutes on training or an acceptance check. Creates nothing."""
        existing = self.root.absolute()
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise StoreNotWritable(f"the adapter store {self.root} cannot be written by this process "
                                   f"({existing} is not a writable directory)")

    # ------------------------------------------------------------------ reading

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def versions(self, name: str) -> list[str]:
        directory = self.root / validate_adapter_name(name)
        if not directory.is_dir():
            return []
        found = [p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")]
        return sorted(found, key=version_order)

    def current(self, name: str) -> str | None:
        """The version `<name>/current` names, or None when the name has none."""
        try:
            version = (self.root / validate_adapter_name(name) / "current").read_text().strip()
        except FileNotFoundError:
            return None
        return version or None

    def get(self, name: str, version: str | None = None) -> StoredVersion:
        """A stored version (the current one when version is None). Raises AdapterNotFound."""
        version = wanted_version(self, name, version)
        path = self.root / name / version
        if not path.is_dir():
            raise self.missing(name, version)
        return StoredVersion(name, version, path, read_manifest(path))

    @staticmethod
    def missing(name: str, version: str | None = None) -> AdapterNotFound:
        """What get() says of a name (or name@version) the store does not have."""
        if version is None:
            return AdapterNotFound(f"adapter {name!r} is not in the store (or has no current version)")
        return AdapterNotFound(f"adapter {name}@{version} is not in the store")

    # ------------------------------------------------------------------ publishing

    def publish(self, name: str, source: str | Path, manifest: dict | None = None,
                version: str | None = None, make_current: bool = True) -> StoredVersion:
        """Copy a PEFT adapter directory in as a new version (v1, v2, ... unless given) and make it
        current. Only the adapter files and the manifest are copied."""
        validate_adapter_name(name)
        source = adapter_source(source)
        directory = self.root / name
        if not directory.is_dir():
            directory.mkdir(parents=True, exist_ok=True)
            os.chmod(directory, DIRECTORY_MODE)
        with self._publish_lock(directory):
            version = validate_adapter_name(version) if version else self._next_version(name)
            if (directory / version).exists():
                raise InvalidRequest(f"adapter {name}@{version} already exists in the store; versions are immutable")
            staging = Path(_mkdtemp(directory))
            try:
                for file in ADAPTER_FILES:
                    shutil.copyfile(source / file, staging / file)
                if manifest is not None:
                    record = {"schema_version": MANIFEST_SCHEMA_VERSION, "name": name, "version": version,
                              "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **manifest}
                    (staging / "manifest.json").write_text(json.dumps(record, indent=2, sort_keys=True))
                for file in staging.iterdir():
                    os.chmod(file, FILE_MODE)
                    fsync_file(file)
                os.chmod(staging, DIRECTORY_MODE)  # mkdtemp made it 0700
                _fsync_dir(staging)
                os.rename(staging, directory / version)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            _fsync_dir(directory)
            if make_current:
                self._set_current(directory, version)
        return self.get(name, version)

    def set_current(self, name: str, version: str) -> None:
        """Point `<name>/current` at an existing version (serialised with publishes)."""
        directory = self.root / validate_adapter_name(name)
        if not (directory / validate_adapter_name(version)).is_dir():
            raise AdapterNotFound(f"adapter {name}@{version} is not in the store")
        with self._publish_lock(directory):
            self._set_current(directory, version)

    @staticmethod
    def _set_current(directory: Path, version: str) -> None:  # holds the publish lock
        _write_atomically(directory / "current", version + "\n")

    def request_unload(self, name: str) -> str:
        """Ask every server on this store to drop `name` from memory (each sees the new token in
        `<name>/unload` at its next poll; the next request loads the current version again).
        Returns the token written."""
        directory = self.root / validate_adapter_name(name)
        if not directory.is_dir():
            raise AdapterNotFound(f"adapter {name!r} is not in the store")
        token = f"{time.time_ns()}-{os.getpid()}"
        _write_atomically(directory / "unload", token + "\n")
        return token

    def unload_token(self, name: str) -> str | None:
        try:
            return (self.root / validate_adapter_name(name) / "unload").read_text().strip() or None
        except FileNotFoundError:
            return None

    def collect_garbage(self, min_age_s: float = 600.0) -> list[Path]:
        """Remove staging leftovers of killed publishes older than min_age_s (younger ones may
        belong to a publish still running). Returns what was removed."""
        removed = []
        for name in self.names():
            for leftover in (self.root / name).glob(".*tmp-*"):
                if time.time() - leftover.stat().st_mtime >= min_age_s:
                    shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
                    removed.append(leftover)
        return removed

    def _next_version(self, name: str) -> str:
        return next_version_after(self.versions(name))

    @contextmanager
    def _publish_lock(self, directory: Path):
        """Serialises publishers of one name (two trainers finishing together get v2 and v3)."""
        with open(directory / ".publish.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def wanted_version(store, name: str, version: str | None) -> str:
    """`version`, or the name's current one in `store`; AdapterNotFound, in the store's own words,
    when it has none."""
    validate_adapter_name(name)
    wanted = version or store.current(name)
    if wanted is None:
        raise store.missing(name, version)
    return validate_adapter_name(wanted)


def adapter_source(source: str | Path) -> Path:
    """A PEFT directory to publish: InvalidRequest unless it holds the adapter files (safetensors)."""
    source = Path(source)
    missing = [f for f in ADAPTER_FILES if not (source / f).is_file()]
    if missing:
        raise InvalidRequest(f"{source} lacks {missing}: not a PEFT adapter saved with safetensors")
    return source


def read_manifest(path: Path) -> dict | None:
    file = Path(path) / "manifest.json"
    if not file.exists():
        return None
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"schema_version": -1}  # unreadable: the manager refuses it with the reason
    return manifest if isinstance(manifest, dict) else {"schema_version": -1}


def base_fingerprint(model_dir: str | Path) -> str:
    """Identifies a base checkpoint without reading all of it: sha256 over config.json, each
    safetensors file's header (names, shapes, dtypes, offsets) and the first and last MiB of its
    data. Different weights of the same shape differ there with near certainty."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    for file in sorted(model_dir.glob("*.safetensors")):
        with open(file, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            digest.update(handle.read(header_len))
            data_start, size = 8 + header_len, file.stat().st_size
            digest.update(handle.read(_FINGERPRINT_SAMPLE))
            handle.seek(max(data_start, size - _FINGERPRINT_SAMPLE))
            digest.update(handle.read())
    return digest.hexdigest()


def version_order(version: str) -> tuple:
    """v1 < v2 < v10, then other names in text order."""
    match = _VERSION.match(version)
    return (0, int(match[1]), "") if match else (1, 0, version)


def next_version_after(versions) -> str:
    """The next vN after every vN among `versions`."""
    numbers = [int(m[1]) for v in versions if (m := _VERSION.match(v))]
    return f"v{max(numbers, default=0) + 1}"


def _mkdtemp(directory: Path) -> str:
    import tempfile

    return tempfile.mkdtemp(prefix=".tmp-", dir=directory)


def _write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text`: readers see the old content or the new, never a part."""
    temporary = path.parent / f".{path.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    with open(temporary, "w") as handle:
        os.fchmod(handle.fileno(), FILE_MODE)
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _fsync_dir(path.parent)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
