"""Typed domain errors, and the one place that maps them to gRPC status codes.

Everything the engine, the adapter code or the service refuses is one of these; a user's mistake
is never reported as INTERNAL with a stack trace.
"""

from __future__ import annotations

import grpc


class HotloraError(Exception):
    """Base of every error hotlora raises on purpose."""

    grpc_code = grpc.StatusCode.INTERNAL


class InvalidRequest(HotloraError):
    """A malformed request: the message names the field."""

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class AdapterNotFound(HotloraError):
    """The named adapter is not loaded (or does not exist in the store)."""

    grpc_code = grpc.StatusCode.NOT_FOUND


class IncompatibleAdapter(HotloraError):
    """The adapter cannot be applied to this base model by this server (wrong shapes, rank too
    large, unsupported PEFT features, pickle files, non-finite values, ...)."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION


class UnsupportedModel(HotloraError):
    """The base checkpoint cannot be served (architecture, format or feature not supported)."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION


class StoreNotWritable(HotloraError):
    """A pin or unload must be written to the adapter store, and this server cannot write it."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(HotloraError):
    """A bounded resource is full: the request queue or the adapter slots."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Draining(HotloraError):
    """The server is shutting down and takes no new work."""

    grpc_code = grpc.StatusCode.UNAVAILABLE


class NotReady(HotloraError):
    """The server is still loading the model."""

    grpc_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(HotloraError):
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED


class PermissionDenied(HotloraError):
    """The caller may not do this (e.g. load an adapter from a path outside the allowed ones)."""

    grpc_code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(HotloraError):
    """An admin call without the right bearer token."""

    grpc_code = grpc.StatusCode.UNAUTHENTICATED


def grpc_status(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """(code, message) for any exception; unknown exceptions stay INTERNAL without their text."""
    if isinstance(error, HotloraError):
        return error.grpc_code, str(error)
    return grpc.StatusCode.INTERNAL, "internal error (see server log)"
