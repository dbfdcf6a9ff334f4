"""Typed domain errors. Everything the engine, the adapter code or a service refuses is one of
these; a user's mistake is never reported as an internal error with a stack trace.

They know nothing of transports: server/serving/status.py maps each to its gRPC code and HTTP status.
"""

from __future__ import annotations


class HotloraError(Exception):
    """Base of every error hotlora raises on purpose."""


class InvalidRequest(HotloraError):
    """A malformed request: the message names the field."""


class AdapterNotFound(HotloraError):
    """The named adapter is not loaded (or does not exist in the store)."""


class IncompatibleAdapter(HotloraError):
    """The adapter cannot be applied to this base model by this server (wrong shapes, rank too
    large, unsupported PEFT features, pickle files, non-finite values, ...)."""


class UnsupportedModel(HotloraError):
    """The base checkpoint cannot be served (architecture, format or feature not supported)."""


class StoreUnavailable(HotloraError):
    """The adapter store cannot be reached (network, credentials, a missing bucket, throttling):
    what is in memory keeps serving; what would need the store waits for it."""


class StoreNotWritable(HotloraError):
    """A pin or unload must be written to the adapter store, and this server cannot write it."""


class ResourceExhausted(HotloraError):
    """A bounded resource is full: the request queue or the adapter slots."""


class RateLimited(ResourceExhausted):
    """A tenant's limit (server/serving/quotas.py) refuses the request for now: retry after
    retry_after_s seconds. `limit` names it: concurrent, requests_per_minute or tokens_per_minute."""

    def __init__(self, message: str, limit: str, retry_after_s: float):
        super().__init__(message)
        self.limit, self.retry_after_s = limit, retry_after_s


class Draining(HotloraError):
    """The server is shutting down and takes no new work."""


class NotReady(HotloraError):
    """The server is still loading the model."""


class DeadlineExceeded(HotloraError):
    """The request's deadline passed before it finished."""


class Unsupported(HotloraError):
    """A feature this server cannot provide as installed or configured (e.g. structured output
    without its grammar library)."""


class PermissionDenied(HotloraError):
    """The caller may not do this (e.g. load an adapter from a path outside the allowed ones)."""


class Unauthenticated(HotloraError):
    """An admin call without the right bearer token."""
