"""Tenants: who a request's key belongs to, which adapters that customer may see and call, its
limits and its share of the batch. From `--tenants-file` (YAML), re-read when it changes:

    tenants:
      acme:
        keys: ["sha256:9f86d0...", "sk-plain-key-accepted-with-a-warning"]
        adapters: ["acme-*"]          # fnmatch patterns over adapter names (case-sensitive)
        base: false                   # may it call the base model? (default: false)
        limits: {requests_per_minute: 600, tokens_per_minute: 200000, concurrent: 32}
        weight: 1                     # its share of the batch against the others' (default: 1)
        admin_keys: ["sha256:..."]    # load / pin / unload / notify within its patterns

A key is `sha256:` and the hex SHA-256 of its UTF-8 bytes, so the file can sit in a ConfigMap; a
plain key works too, with a warning. A key is recognised by its digest only, so a prefix, an
extension or a case change of a key is another key. Without a tenants file every caller is the one
tenant EVERYONE (with --api-key-file, every holder of one of its keys is).
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import Unauthenticated
from .watched_file import WatchedFile

log = logging.getLogger(__name__)

TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
HASHED_KEY = re.compile(r"sha256:([0-9a-fA-F]{64})")
LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "concurrent")
TENANT_FIELDS = ("keys", "adapters", "base", "limits", "weight", "admin_keys")


@dataclass(frozen=True)
class Limits:
    """Per replica; None: no limit."""

    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None  # prompt + completion
    concurrent: int | None = None  # requests admitted and not finished


@dataclass(frozen=True)
class Tenant:
    name: str
    adapters: tuple[str, ...] = ()  # fnmatch patterns over adapter names
    base: bool = False
    limits: Limits = Limits()
    weight: float = 1.0

    def may_call(self, adapter: str | None) -> bool:
        """Whether this tenant may see and call `adapter` (None: the base model)."""
        if adapter is None:
            return self.base
        return any(fnmatch.fnmatchcase(adapter, pattern) for pattern in self.adapters)


EVERYONE = Tenant("default", adapters=("*",), base=True)  # no tenants file: every caller, everything


@dataclass(frozen=True)
class Caller:
    """Who sent a request: its tenant and the id of the key it used (never the key)."""

    tenant: Tenant = EVERYONE
    key_id: str = ""


ANONYMOUS = Caller()


@dataclass(frozen=True)
class TenantTable:
    tenants: dict[str, Tenant] = field(default_factory=dict)
    keys: dict[bytes, tuple[str, str]] = field(default_factory=dict)  # digest -> (tenant, key id)
    admin_keys: dict[bytes, tuple[str, str]] = field(default_factory=dict)


class Tenants:
    """The tenants file, current: identify() and identify_admin() map a bearer token to its tenant."""

    def __init__(self, path: Path):
        self.file = WatchedFile(path, parse_tenants, "--tenants-file")

    def identify(self, authorization: str | None) -> Caller:
        """The caller whose generation key `authorization` carries; Unauthenticated otherwise."""
        table = self.file.current()
        # a dict lookup by digest: its timing can tell at most about the digest, which reveals nothing of the key
        found = table.keys.get(bearer_digest(authorization))
        if found is None:
            raise Unauthenticated("the API key is not valid")
        return Caller(table.tenants[found[0]], found[1])

    def identify_admin(self, authorization: str | None) -> Tenant | None:
        """The tenant whose admin key `authorization` carries, or None."""
        table = self.file.current()
        try:
            found = table.admin_keys.get(bearer_digest(authorization))
        except Unauthenticated:
            return None
        return None if found is None else table.tenants[found[0]]

    def tenant(self, name: str) -> Tenant | None:
        return self.file.current().tenants.get(name)

    def names(self) -> list[str]:
        return sorted(self.file.current().tenants)


def bearer_digest(authorization: str | None) -> bytes:
    """SHA-256 of the token in "Bearer <token>"; Unauthenticated when there is none."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("this server needs an API key: send 'Authorization: Bearer <key>'")
    return hashlib.sha256(token.strip().encode()).digest()


def key_id(digest: bytes) -> str:
    """What logs and the usage log call a key: the first 12 hex digits of its SHA-256."""
    return digest.hex()[:12]


# ---------------------------------------------------------------- the file


class _Invalid(ValueError):
    def __init__(self, node: yaml.Node, message: str):
        super().__init__(f"line {node.start_mark.line + 1}: {message}")


def parse_tenants(text: str) -> TenantTable:
    """The file's tenants; ValueError naming the line at fault."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise ValueError(f"line {mark.line + 1}: {exc.problem}") from None
    if root is None:
        raise ValueError("the file is empty: it needs a `tenants:` mapping")
    top = _mapping(root, "the file", ("tenants",))
    if "tenants" not in top:
        raise _Invalid(root, "the file needs a `tenants:` mapping")
    table = TenantTable()
    for name_node, node in _mapping_items(top["tenants"], "tenants"):
        name = _value(name_node)
        if not isinstance(name, str) or not TENANT_NAME.fullmatch(name):
            raise _Invalid(name_node, f"tenant name {name!r}: use letters, digits, '.', '_', '-' (at most 64)")
        fields = _mapping(node, f"tenant {name!r}", TENANT_FIELDS)
        tenant = Tenant(name, adapters=tuple(_strings(fields, "adapters", name)),
                        base=_typed(fields, "base", bool, False, name), limits=_limits(fields.get("limits"), name),
                        weight=_positive(fields, "weight", name, default=1.0))
        keys = _keys(fields, "keys", name, table)
        table.keys.update(keys)
        admin = _keys(fields, "admin_keys", name, table)
        table.admin_keys.update(admin)
        if not keys and not admin:
            raise _Invalid(node, f"tenant {name!r} has no keys and no admin_keys")
        table.tenants[name] = tenant
    return table


def _value(node: yaml.Node):
    return yaml.constructor.SafeConstructor().construct_object(node, deep=True)


def _mapping(node: yaml.Node, what: str, allowed: tuple[str, ...]) -> dict[str, yaml.Node]:
    items = {}
    for key_node, value in _mapping_items(node, what):
        key = _value(key_node)
        if key not in allowed:
            raise _Invalid(key_node, f"{what}: unknown field {key!r} (known: {', '.join(allowed)})")
        items[key] = value
    return items


def _mapping_items(node: yaml.Node, what: str) -> list[tuple[yaml.Node, yaml.Node]]:
    if not isinstance(node, yaml.MappingNode):
        raise _Invalid(node, f"{what} must be a mapping")
    seen = set()
    for key_node, _ in node.value:
        key = _value(key_node)
        if key in seen:
            raise _Invalid(key_node, f"{what}: {key!r} appears twice")
        seen.add(key)
    return node.value


def _strings(fields: dict[str, yaml.Node], name: str, tenant: str) -> list[str]:
    node = fields.get(name)
    if node is None:
        return []
    if not isinstance(node, yaml.SequenceNode):
        raise _Invalid(node, f"tenant {tenant!r}: {name} must be a list of strings")
    for item in node.value:
        if not isinstance(_value(item), str) or not _value(item).strip():
            raise _Invalid(item, f"tenant {tenant!r}: {name} holds {_value(item)!r}; give non-empty strings")
    return [_value(item).strip() for item in node.value]


def _keys(fields: dict[str, yaml.Node], name: str, tenant: str, table: TenantTable) -> dict[bytes, tuple[str, str]]:
    keys = {}
    node = fields.get(name)
    for item, text in zip(node.value if node is not None else [], _strings(fields, name, tenant)):
        hashed = HASHED_KEY.fullmatch(text)
        if hashed:
            digest = bytes.fromhex(hashed.group(1))
        elif text.lower().startswith("sha256:"):
            raise _Invalid(item, f"tenant {tenant!r}: {text[:15]}... is not sha256: and 64 hex digits")
        else:
            log.warning("tenants file, line %d: tenant %r has a plain key; write it as sha256:<hex of its SHA-256> "
                        "so the file holds no secret", item.start_mark.line + 1, tenant)
            digest = hashlib.sha256(text.encode()).digest()
        if digest in keys or digest in table.keys or digest in table.admin_keys:
            raise _Invalid(item, f"tenant {tenant!r}: this key is listed twice; a key belongs to one tenant and one role")
        keys[digest] = (tenant, key_id(digest))
    return keys


def _typed(fields: dict[str, yaml.Node], name: str, kind: type, default, tenant: str):
    if name not in fields:
        return default
    value = _value(fields[name])
    if not isinstance(value, kind):
        raise _Invalid(fields[name], f"tenant {tenant!r}: {name} must be {kind.__name__}, got {value!r}")
    return value


def _positive(fields: dict[str, yaml.Node], name: str, tenant: str, default=None, integer: bool = False):
    if name not in fields or _value(fields[name]) is None:
        return default
    value = _value(fields[name])
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or not 0 < value < math.inf:
        raise _Invalid(fields[name], f"tenant {tenant!r}: {name} must be a positive {'integer' if integer else 'number'}"
                                     f", got {value!r}")
    return value if integer else float(value)


def _limits(node: yaml.Node | None, tenant: str) -> Limits:
    if node is None:
        return Limits()
    fields = _mapping(node, f"tenant {tenant!r} limits", LIMIT_FIELDS)
    return Limits(requests_per_minute=_positive(fields, "requests_per_minute", tenant),
                  tokens_per_minute=_positive(fields, "tokens_per_minute", tenant),
                  concurrent=_positive(fields, "concurrent", tenant, integer=True))
