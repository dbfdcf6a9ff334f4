"""The local read-through cache of an object-store adapter store (server/adapters/s3_store.py).

    <cache>/<name>/<version>/{adapter_config.json, adapter_model.safetensors, manifest.json}
    <cache>/<name>/.pointers/current   the `current` last read from the store (served while it is unreachable)
    <cache>/<name>/.pointers/unload    the unload token last read, likewise

A version is immutable once published, so a cached copy is as good as the store's: it is written
whole into a hidden staging directory, each file checked against the size and SHA-256 its manifest
records, then renamed into place, and checked again before each use. The cache is bounded in
bytes: the versions used least recently are removed first (never the one being returned).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from ..errors import IncompatibleAdapter
from .store import fsync_file

log = logging.getLogger(__name__)

CHUNK = 1 << 20


class CorruptObject(IncompatibleAdapter):
    """A stored file is not what its version's manifest records (size or SHA-256): the version is
    refused, as any adapter that fails validation is."""


def file_digest(path: Path) -> tuple[int, str]:
    """(bytes, hex SHA-256) of a file, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


class VersionCache:
    def __init__(self, root: Path, max_bytes: int | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._trimming = threading.Lock()

    def path(self, name: str, version: str) -> Path:
        return self.root / name / version

    def verified(self, name: str, version: str, files: dict[str, dict]) -> Path | None:
        """The cached copy of name@version if it is there and every file matches `files`
        ({file: {"bytes", "sha256"}}); a copy that does not is removed."""
        directory = self.path(name, version)
        if not directory.is_dir():
            return None
        try:
            for file, expected in files.items():
                if file_digest(directory / file) != (expected["bytes"], expected["sha256"]):
                    raise CorruptObject(f"{directory / file} does not match its manifest")
        except (OSError, CorruptObject) as exc:
            log.warning("adapter cache: %s@%s removed (%s); it will be downloaded again", name, version, exc)
            shutil.rmtree(directory, ignore_errors=True)
            return None
        try:
            os.utime(directory)  # most recently used
        except OSError:
            return None  # trimmed meanwhile
        return directory

    def fill(self, name: str, version: str, files: dict[str, dict], manifest_text: str,
             download: Callable[[str, Path], None]) -> Path:
        """Download every file of name@version (download(file, destination)), check each against
        `files`, and move the whole version into place; nothing partial is ever visible."""
        (self.root / name).mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root / name))
        try:
            for file, expected in files.items():
                download(file, staging / file)
                found = file_digest(staging / file)
                if found != (expected["bytes"], expected["sha256"]):
                    raise CorruptObject(f"{name}/{version}/{file}: {found[0]:,} bytes with SHA-256 {found[1][:12]}…, "
                                        f"the manifest says {expected['bytes']:,} bytes with {expected['sha256'][:12]}…")
            (staging / "manifest.json").write_text(manifest_text)
            for file in staging.iterdir():
                fsync_file(file)
            target = self.path(name, version)
            try:
                os.rename(staging, target)
            except OSError:
                if not target.is_dir():
                    raise
                shutil.rmtree(staging)  # another process got it first: the same immutable bytes
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.trim(keep=target)
        return target

    def remember(self, name: str, pointer: str, value: str | None) -> None:
        """Keep what the store's `<name>/<pointer>` (current, unload) said last."""
        if value == self.recall(name, pointer) and self.remembers(name, pointer):
            return
        directory = self.root / name / ".pointers"
        directory.mkdir(parents=True, exist_ok=True)
        temporary = directory / f".{pointer}.tmp-{os.getpid()}-{time.monotonic_ns()}"
        temporary.write_text((value or "") + "\n")
        os.replace(temporary, directory / pointer)

    def remembers(self, name: str, pointer: str) -> bool:
        return (self.root / name / ".pointers" / pointer).is_file()

    def recall(self, name: str, pointer: str) -> str | None:
        try:
            return (self.root / name / ".pointers" / pointer).read_text().strip() or None
        except OSError:
            return None

    def size(self) -> int:
        return sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file())

    def trim(self, keep: Path | None = None) -> list[Path]:
        """Remove the least recently used versions until the cache fits max_bytes (one trim at a
        time; a version another thread removes meanwhile is skipped)."""
        if self.max_bytes is None:
            return []
        with self._trimming:
            sizes, used = {}, {}
            for directory in (d for n in self.root.iterdir() if n.is_dir() for d in n.iterdir()
                              if d.is_dir() and not d.name.startswith(".")):
                try:
                    sizes[directory] = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
                    used[directory] = directory.stat().st_mtime
                except OSError:
                    continue
            total, removed = sum(sizes.values()), []
            for directory in sorted(sizes, key=used.get):
                if total <= self.max_bytes:
                    break
                if directory == keep:
                    continue
                shutil.rmtree(directory, ignore_errors=True)
                total -= sizes[directory]
                removed.append(directory)
        return removed
