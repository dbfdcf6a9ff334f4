"""API keys for the generation APIs, HTTP and gRPC alike: a file of keys, one per line (blank
lines and `#` comments skipped), re-read whenever it changes (server/serving/watched_file.py), so
keys rotate without a restart. Every key is the one tenant EVERYONE, which may call everything;
a tenants file (server/serving/tenants.py) is the way to give customers keys of their own.

A request carries `Authorization: Bearer KEY` (HTTP header or gRPC metadata). Health and metrics
stay open; the Adapters service keeps its own admin token. A file that empties keeps nobody in,
one that disappears keeps the keys last read, so a botched rotation never opens the server.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from ..errors import Unauthenticated
from .tenants import ANONYMOUS, EVERYONE, Caller, bearer_digest, key_id
from .watched_file import WatchedFile


def _parse(text: str) -> tuple[bytes, ...]:
    return tuple(hashlib.sha256(line.strip().encode()).digest() for line in text.splitlines()
                 if line.strip() and not line.lstrip().startswith("#"))


class ApiKeys:
    def __init__(self, path: Path):
        self.file = WatchedFile(path, _parse, "--api-key-file")
        if not self.file.current():
            raise ValueError(f"--api-key-file {path} holds no keys")

    def identify(self, authorization: str | None) -> Caller:
        """The caller, when `authorization` is "Bearer <one of the keys>"; Unauthenticated otherwise."""
        given = bearer_digest(authorization)
        matched = False
        for key in self.file.current():  # every key, whichever matches: the time taken says nothing about which
            matched |= hmac.compare_digest(given, key)
        if not matched:
            raise Unauthenticated("the API key is not valid")
        return Caller(EVERYONE, key_id(given))


class OpenAccess:
    """No keys: every caller is the one tenant, anonymous."""

    def identify(self, authorization: str | None) -> Caller:
        return ANONYMOUS
