"""The adapter store on S3 or an S3-compatible service (MinIO, Ceph, R2, GCS's XML API): the
directory store's layout and guarantees (server/adapters/store.py), as objects.

    s3://bucket/prefix/<name>/<version>/adapter_config.json, adapter_model.safetensors
    s3://bucket/prefix/<name>/<version>/manifest.json    written last: a version without it is incomplete
    s3://bucket/prefix/<name>/<version>/.claim           the publisher's claim on the version number
    s3://bucket/prefix/<name>/current                    the current version's name
    s3://bucket/prefix/<name>/unload                     the latest unload token

Publishing claims the next version number with a conditional create (`If-None-Match: *`), so two
publishers of one name never share a number; uploads each file with its SHA-256 (S3 checks it on
arrival); checks each object's size; writes the manifest, which records every file's size and
SHA-256; and only then writes `current`. A reader follows `current`, so it never reaches a
version that is missing a file. A publish killed halfway leaves a claimed version without a
manifest, which no reader lists and collect_garbage() removes after a grace period.

Reading downloads a version once into the local cache (server/adapters/cache.py), checked against
its manifest: a size bound before any byte is fetched (HEAD), the object pinned by its ETag while
it streams to disk in chunks (`If-Match`), never a whole file in memory. `current` and `unload`
are read with `If-None-Match` on the ETag last seen, so a poll of an unchanged name costs two
304s. When the bucket cannot be reached the store says so once (and `unreachable` holds why),
serves what its cache holds, and the callers keep the versions they have.

Credentials and endpoint come from boto3's standard chain (environment, config files, IRSA / web
identity, `AWS_ENDPOINT_URL`), or `endpoint_url`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdapterNotFound, InvalidRequest, StoreUnavailable
from ..lora.peft_files import validate_adapter_name
from .cache import CHUNK, CorruptObject, VersionCache, file_digest
from .store import (ADAPTER_FILES, MANIFEST_SCHEMA_VERSION, StoredVersion, adapter_source, next_version_after,
                    version_order, wanted_version)

log = logging.getLogger(__name__)

SMALL_OBJECT_BYTES = 1 << 20  # current, unload, manifest.json: read whole, and refused beyond this
LISTING_TTL_S = 5.0  # a listing is reused this long: a metrics scrape or a ListModels must not LIST the bucket each time
MAX_PUBLISH_ATTEMPTS = 20
GC_GRACE_S = 600.0  # a version without a manifest claimed less than this ago may be a publish still running
POINTERS = ("current", "unload")  # <name>/current and <name>/unload: never version names


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # no leading or trailing slash; "" for the bucket's root

    @classmethod
    def parse(cls, url: str) -> "S3Location":
        rest = url[len("s3://"):]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise InvalidRequest(f"{url}: an S3 store is s3://BUCKET or s3://BUCKET/PREFIX")
        return cls(bucket, prefix.strip("/"))

    def key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def url(self, *parts: str) -> str:
        return f"s3://{self.bucket}/{self.key(*parts)}"


class S3Store:
    def __init__(self, url: str, *, endpoint_url: str | None = None, cache_dir: Path | None = None,
                 cache_bytes: int | None = None, max_object_bytes: int | None = None, client=None):
        self.url = url.rstrip("/")
        self.location = S3Location.parse(self.url)
        # default: a directory per user and store in the temporary directory, so a restart finds what
        # it downloaded (a cache holds one store's versions: its paths do not name the bucket)
        store_id = hashlib.sha256(f"{endpoint_url or ''} {self.url}".encode()).hexdigest()[:16]
        default = Path(tempfile.gettempdir()) / f"hotlora-adapter-cache-{os.getuid()}" / store_id
        self.cache = VersionCache(cache_dir or default, cache_bytes)
        self.max_object_bytes = max_object_bytes
        self._client = client or _client(endpoint_url, attempts=3)
        # while the store cannot be reached, one attempt per call: a request for a cold adapter, a
        # listing or a poll fails at once instead of waiting out retries (the watcher backs off)
        self._failing_fast = client or _client(endpoint_url, attempts=1)
        self._lock = threading.Lock()
        self._small: dict[str, tuple[str, str]] = {}  # key -> (ETag, text) last read
        self._listings: dict[tuple, tuple[float, tuple]] = {}  # (prefix, delimiter) -> (when, result)
        # a version refused (a file missing or not what its manifest says), by its manifest's ETag:
        # refused again at once, without a download, until the manifest changes
        self._refused: dict[tuple[str, str], tuple[str, Exception]] = {}
        self._fetching: dict[tuple[str, str], threading.Lock] = {}  # one download of a version at a time
        self.unreachable: str | None = None  # why the last call failed; None while it works

    def __str__(self) -> str:
        return self.url

    # ------------------------------------------------------------------ reading

    def names(self) -> list[str]:
        prefixes = self._list(self.location.key("") + ("/" if self.location.prefix else ""), delimiter="/")[1]
        return sorted(n for n in prefixes if not n.startswith(".") and _valid(n))

    def versions(self, name: str, fresh: bool = False) -> list[str]:
        """Complete versions (those with a manifest), oldest first."""
        keys = self._list(self.location.key(validate_adapter_name(name)) + "/", fresh=fresh)[0]
        found = {k.split("/")[0] for k in keys if k.count("/") == 1 and k.endswith("/manifest.json")}
        return sorted((v for v in found if not v.startswith(".") and v not in POINTERS and _valid(v)),
                      key=version_order)

    def current(self, name: str) -> str | None:
        """The version `<name>/current` names; the one last read when the bucket cannot be reached
        and this replica has read it before (StoreUnavailable otherwise)."""
        return self._pointer(name, "current")

    def _pointer(self, name: str, pointer: str) -> str | None:
        """`<name>/<pointer>`'s text, remembered in the cache; what was remembered while the
        bucket cannot be reached, if anything was."""
        validate_adapter_name(name)
        try:
            text = self._read_small(self.location.key(name, pointer), once=True)
        except StoreUnavailable:
            if not self.cache.remembers(name, pointer):
                raise
            return self.cache.recall(name, pointer)
        value = (text or "").strip() or None
        self.cache.remember(name, pointer, value)
        return value

    def get(self, name: str, version: str | None = None) -> StoredVersion:
        """A version (the current one when version is None), in the local cache: downloaded and
        checked the first time, served from the cache after (versions never change)."""
        version = wanted_version(self, name, version)
        if version in POINTERS:
            raise self.missing(name, version)
        with self._lock:
            fetching = self._fetching.setdefault((name, version), threading.Lock())
        with fetching:  # concurrent loads of a cold version share one download
            cached = self._cached(name, version)
            if cached is not None:
                return cached
            manifest_key = self.location.key(name, version, "manifest.json")
            manifest_text = self._read_small(manifest_key)
            if manifest_text is None:
                raise self.missing(name, version)
            etag = self._small[manifest_key][0]
            refused = self._refused.get((name, version))
            if refused is not None and refused[0] == etag:
                raise refused[1]
            try:
                manifest, files = _manifest_files(manifest_text, self.location.url(name, version))
                path = self.cache.fill(name, version, files, manifest_text, lambda file, to: self._download(
                    self.location.key(name, version, file), to, files[file]["bytes"]))
            except CorruptObject as exc:
                self._refused[(name, version)] = (etag, exc)
                raise
        return StoredVersion(name, version, path, manifest)

    def location_of(self, name: str, version: str) -> str:
        return self.location.url(name, version)

    def check_writable(self) -> None:
        """StoreUnavailable unless these credentials may write the bucket (a probe object written
        and deleted): what a trainer asks before it spends minutes on training or an acceptance check."""
        key = self.location.key(f".hotlora-probe-{uuid.uuid4().hex}")
        self._put(key, b"probe")
        self._call(self._s3.delete_object, Bucket=self.location.bucket, Key=key)

    @staticmethod
    def missing(name: str, version: str | None = None) -> AdapterNotFound:
        from .store import AdapterStore

        return AdapterStore.missing(name, version)

    # ------------------------------------------------------------------ publishing

    def publish(self, name: str, source: str | Path, manifest: dict | None = None,
                version: str | None = None, make_current: bool = True) -> StoredVersion:
        """Upload a PEFT adapter directory as a new version (v1, v2, ... unless given) and make it
        current. Every file is uploaded and checked before the manifest, the manifest before `current`."""
        validate_adapter_name(name)
        source = adapter_source(source)
        files = {f: dict(zip(("bytes", "sha256"), file_digest(source / f))) for f in ADAPTER_FILES}
        version, token = self._claim(name, version)
        for file, expected in files.items():
            self._upload(source / file, self.location.key(name, version, file), expected)
        # still ours, every file still there (a gc or a rival may have acted while a long upload ran)
        if self._read_small(self.location.key(name, version, ".claim"), fresh=True) != token or any(
                self._size(self.location.key(name, version, f)) != e["bytes"] for f, e in files.items()):
            raise StoreUnavailable(f"{self.location.url(name, version)} changed while it was uploaded; nothing was "
                                   "made current (publish again)")
        record = {"schema_version": MANIFEST_SCHEMA_VERSION, "name": name, "version": version,
                  "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(manifest or {}), "files": files}
        body = json.dumps(record, indent=2, sort_keys=True)
        manifest_key = self.location.key(name, version, "manifest.json")
        # a 412 on a retried PUT may be this publish's own first attempt, committed: read it back
        if not self._put(manifest_key, body.encode(), if_none_match=True) and \
                self._read_small(manifest_key, fresh=True) != body:
            raise StoreUnavailable(f"{self.location.url(name, version)} already has another manifest; nothing was "
                                   "made current")
        if make_current:
            self._advance_current(name, version)
        try:  # this name's leftovers of killed publishes, past the grace period: best effort
            self.collect_garbage(GC_GRACE_S, names=[name])
        except StoreUnavailable:
            pass
        # its path is the source directory: the bytes the bucket now holds (nothing was downloaded)
        return StoredVersion(name, version, Path(source), record if manifest is not None else None)

    def _advance_current(self, name: str, version: str) -> None:
        """Point `current` at a just-published version unless it already names a later one (a
        slower publisher of an older number must not roll the fleet back): a conditional write on
        the ETag read, retried when another write came in between."""
        from botocore.exceptions import ClientError

        key = self.location.key(name, "current")
        for _ in range(MAX_PUBLISH_ATTEMPTS):
            now = self._read_small(key, fresh=True)
            if now and version_order(now.strip()) >= version_order(version):
                return
            condition = {"IfMatch": self._small[key][0]} if now is not None else {"IfNoneMatch": "*"}
            try:
                self._call(self._s3.put_object, Bucket=self.location.bucket, Key=key,
                           Body=(version + "\n").encode(), **condition)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412",
                                                                 "ConditionalRequestConflict"):
                    continue
                raise _unavailable(self, exc) from None
            with self._lock:
                self._listings.clear()
            return
        raise StoreUnavailable(f"{self.location.url(name, 'current')} kept changing; {version} was not made current")

    def set_current(self, name: str, version: str) -> None:
        if version not in self.versions(name, fresh=True):
            raise self.missing(name, version)
        self._put(self.location.key(name, "current"), (version + "\n").encode())

    def request_unload(self, name: str) -> str:
        if not self.versions(name, fresh=True):
            raise AdapterNotFound(f"adapter {name!r} is not in the store")
        token = f"{time.time_ns()}-{os.getpid()}"
        self._put(self.location.key(name, "unload"), (token + "\n").encode())
        return token

    def unload_token(self, name: str) -> str | None:
        return self._pointer(name, "unload")

    def collect_garbage(self, min_age_s: float = GC_GRACE_S, names: list[str] | None = None) -> list[str]:
        """Delete the objects of versions that never got a manifest (publishes killed halfway),
        once their claim (else their newest object) is older than min_age_s. Returns where each
        removed version was."""
        removed = []
        for name in self.names() if names is None else names:
            keys, _ = self._list(self.location.key(name) + "/", with_times=True, fresh=True)
            by_version: dict[str, list[tuple[str, float]]] = {}
            for key, modified in keys:
                if key.count("/") == 1:
                    by_version.setdefault(key.split("/")[0], []).append((key, modified))
            for version, objects in by_version.items():
                complete = any(k.endswith("/manifest.json") for k, _ in objects)
                claimed = [m for k, m in objects if k.endswith("/.claim")]  # a long upload is not yet listed
                if complete or time.time() - (claimed[0] if claimed else max(m for _, m in objects)) < min_age_s:
                    continue
                full = [self.location.key(name, k) for k, _ in objects]
                self._call(self._s3.delete_objects, Bucket=self.location.bucket,
                           Delete={"Objects": [{"Key": k} for k in full], "Quiet": True})
                removed.append(self.location.url(name, version))
        return removed

    # ------------------------------------------------------------------ the version number

    def _claim(self, name: str, version: str | None) -> tuple[str, str]:
        """Claim `version` (or the next free number) with a conditional create: (version, token).
        Whose claim it is is read back: a 412 on a retried PUT may be this claim's own first
        attempt, and a service that ignores If-None-Match lets a rival overwrite it."""
        token = f"{socket.gethostname()} {os.getpid()} {uuid.uuid4()}"
        for _ in range(MAX_PUBLISH_ATTEMPTS):
            wanted = validate_adapter_name(version) if version else self._next_version(name)
            if wanted in POINTERS:
                raise InvalidRequest(f"{wanted!r} names a pointer of the store layout; give another version name")
            key = self.location.key(name, wanted, ".claim")
            self._put(key, token.encode(), if_none_match=True)
            if self._read_small(key, fresh=True) == token:
                return wanted, token
            if version:
                raise InvalidRequest(f"adapter {name}@{version} already exists in the store; versions are immutable")
        raise StoreUnavailable(f"{self.location.url(name)}: no free version number after {MAX_PUBLISH_ATTEMPTS} tries")

    def _next_version(self, name: str) -> str:
        _, versions = self._list(self.location.key(name) + "/", delimiter="/", fresh=True)
        return next_version_after(versions)

    # ------------------------------------------------------------------ objects

    def _read_small(self, key: str, fresh: bool = False, once: bool = False) -> str | None:
        """A small object's text (None when there is none), re-read only when its ETag changed.
        once: a single attempt (a poll: the next poll is its retry)."""
        from botocore.exceptions import ClientError

        with self._lock:
            seen = None if fresh else self._small.get(key)
        client = self._failing_fast if once else self._s3
        try:
            reply = self._call(client.get_object, Bucket=self.location.bucket, Key=key,
                               **({"IfNoneMatch": seen[0]} if seen else {}))
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 304 and seen:
                return seen[1]
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                with self._lock:
                    self._small.pop(key, None)
                return None
            raise _unavailable(self, exc) from None
        if reply["ContentLength"] > SMALL_OBJECT_BYTES:
            reply["Body"].close()
            raise StoreUnavailable(f"{self.location.url(key)} is {reply['ContentLength']:,} bytes; not read")
        text = self._call(reply["Body"].read).decode()
        with self._lock:
            self._small[key] = (reply["ETag"], text)
        return text

    def _download(self, key: str, destination: Path, expected_bytes: int) -> None:
        """Stream one object to `destination`: its size checked first, its ETag pinned."""
        from botocore.exceptions import ClientError

        try:
            head = self._call(self._s3.head_object, Bucket=self.location.bucket, Key=key)
        except ClientError as exc:  # gone from a version whose manifest lists it
            raise CorruptObject(f"{self.location.url(key)} is missing ({exc.response.get('Error', {}).get('Code')})") \
                from None
        size = head["ContentLength"]
        limit = self.max_object_bytes
        if size != expected_bytes or (limit is not None and size > limit):
            raise CorruptObject(f"{self.location.url(key)} is {size:,} bytes; its manifest says {expected_bytes:,}"
                                + (f" and no adapter file of this model exceeds {limit:,}" if limit else ""))
        try:
            reply = self._call(self._s3.get_object, Bucket=self.location.bucket, Key=key, IfMatch=head["ETag"])
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412", "NoSuchKey"):
                raise CorruptObject(f"{self.location.url(key)} changed while it was read (its ETag is no longer "
                                    "the one its size was checked on)") from None
            raise _unavailable(self, exc) from None
        body = reply["Body"]
        try:
            with open(destination, "wb") as handle:
                while chunk := self._call(body.read, CHUNK):
                    handle.write(chunk)
        finally:
            body.close()

    def _upload(self, path: Path, key: str, expected: dict) -> None:
        checksum = base64.b64encode(bytes.fromhex(expected["sha256"])).decode()
        with open(path, "rb") as handle:
            self._call(self._s3.put_object, Bucket=self.location.bucket, Key=key, Body=handle,
                       ContentLength=expected["bytes"], ChecksumSHA256=checksum)
        size = self._size(key)
        if size != expected["bytes"]:
            raise StoreUnavailable(f"{self.location.url(key)}: {size:,} bytes arrived of {expected['bytes']:,}; "
                                   "nothing was published")

    def _size(self, key: str) -> int | None:
        """An object's bytes (HEAD); None when there is none."""
        from botocore.exceptions import ClientError

        try:
            return self._call(self._s3.head_object, Bucket=self.location.bucket, Key=key)["ContentLength"]
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return None
            raise _unavailable(self, exc) from None

    def _put(self, key: str, body: bytes, if_none_match: bool = False) -> bool:
        """Write a small object; with if_none_match, only if there is none (False if there was)."""
        from botocore.exceptions import ClientError

        with self._lock:
            self._listings.clear()  # what this store wrote, it lists at once
        try:
            self._call(self._s3.put_object, Bucket=self.location.bucket, Key=key, Body=body,
                       **({"IfNoneMatch": "*"} if if_none_match else {}))
        except ClientError as exc:
            if if_none_match and exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412",
                                                                               "ConditionalRequestConflict"):
                return False
            raise _unavailable(self, exc) from None
        return True

    def _list(self, prefix: str, delimiter: str | None = None, with_times: bool = False, fresh: bool = False):
        """(keys under prefix, relative to it; the next path parts when delimiter is given), from
        a listing at most LISTING_TTL_S old unless fresh."""
        memo = (prefix, delimiter, with_times)
        with self._lock:
            cached = self._listings.get(memo)
        if cached is not None and not fresh and time.monotonic() - cached[0] < LISTING_TTL_S:
            return cached[1]
        keys, parts = [], []
        paginator = self._s3.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.location.bucket, Prefix=prefix,
                                   **({"Delimiter": delimiter} if delimiter else {}))
        for page in self._call(lambda: list(pages)):
            for item in page.get("Contents", []):
                relative = item["Key"][len(prefix):]
                keys.append((relative, item["LastModified"].timestamp()) if with_times else relative)
            parts += [p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", [])]
        with self._lock:
            self._listings[memo] = (time.monotonic(), (keys, parts))
        return keys, parts

    @property
    def _s3(self):
        return self._client if self.unreachable is None else self._failing_fast

    def _call(self, fn, *args, **kwargs):
        """fn(...), turning what says the store cannot be reached into StoreUnavailable, and
        logging each change between reachable and not once."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            result = fn(*args, **kwargs)
        except ClientError as exc:
            if _is_unreachable(exc):
                raise _unavailable(self, exc) from None
            self._reachable()
            raise
        except BotoCoreError as exc:
            raise _unavailable(self, exc) from None
        self._reachable()
        return result

    def _reachable(self) -> None:
        if self.unreachable is not None:
            log.info("adapter store %s is reachable again", self.url)
            self.unreachable = None

    def _cached(self, name: str, version: str) -> StoredVersion | None:
        path = self.cache.path(name, version)
        try:
            manifest_text = (path / "manifest.json").read_text()
        except OSError:
            return None
        manifest, files = _manifest_files(manifest_text, str(path))
        if self.cache.verified(name, version, files) is None:
            return None
        return StoredVersion(name, version, path, manifest)


# reasons a call failing means "the store cannot be reached right now", not "this object is bad"
UNREACHABLE_CODES = {"NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                     "InvalidToken", "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                     "ServiceUnavailable", "InternalError", "AllAccessDisabled"}


def _is_unreachable(exc) -> bool:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
    return exc.response.get("Error", {}).get("Code") in UNREACHABLE_CODES or status in (403, 429) or status >= 500


def _unavailable(store: S3Store, exc: BaseException) -> StoreUnavailable:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        reason = f"{error.get('Code', '?')}: {error.get('Message', '')}".strip()
    else:
        reason = f"{type(exc).__name__}: {exc}"
    if store.unreachable is None:
        log.warning("adapter store %s cannot be reached (%s); serving what this replica has", store.url, reason)
    store.unreachable = reason
    return StoreUnavailable(f"the adapter store {store.url} cannot be reached ({reason})")


def _client(endpoint_url: str | None, attempts: int):
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": attempts, "mode": "standard"},
                    # checksums only where asked: not every S3-compatible service knows the newer headers
                    request_checksum_calculation="when_required", response_checksum_validation="when_required")
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


def _manifest_files(text: str, where: str) -> tuple[dict, dict[str, dict]]:
    """The manifest, and its "files" ({file: {"bytes", "sha256"}}) for each adapter file."""
    try:
        manifest = json.loads(text)
        files = {f: manifest["files"][f] for f in ADAPTER_FILES}
        for entry in files.values():
            if not (isinstance(entry["bytes"], int) and isinstance(entry["sha256"], str)):
                raise TypeError("bytes and sha256")
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptObject(f"{where}/manifest.json does not list the size and SHA-256 of {ADAPTER_FILES} ({exc})") from None
    return manifest, files


def _valid(part: str) -> bool:
    try:
        validate_adapter_name(part)
    except InvalidRequest:
        return False
    return True
