"""The one place that maps domain errors (server/errors.py) to what each protocol says:
a gRPC status code, and an HTTP status with OpenAI's error `type`.

Both services report a request's outcome in metrics by the gRPC code's name, whichever protocol
carried it, so one counter compares them.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from .. import errors


@dataclass(frozen=True)
class Status:
    grpc_code: grpc.StatusCode
    http_status: int
    openai_type: str  # the `type` of OpenAI's error object


INTERNAL = Status(grpc.StatusCode.INTERNAL, 500, "internal_server_error")

_STATUS: dict[type[errors.HotloraError], Status] = {
    errors.InvalidRequest: Status(grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
    errors.AdapterNotFound: Status(grpc.StatusCode.NOT_FOUND, 404, "not_found_error"),
    errors.IncompatibleAdapter: Status(grpc.StatusCode.FAILED_PRECONDITION, 422, "invalid_request_error"),
    errors.UnsupportedModel: Status(grpc.StatusCode.FAILED_PRECONDITION, 500, "internal_server_error"),
    errors.StoreNotWritable: Status(grpc.StatusCode.FAILED_PRECONDITION, 409, "conflict_error"),
    errors.Unsupported: Status(grpc.StatusCode.UNIMPLEMENTED, 501, "not_implemented_error"),
    errors.ResourceExhausted: Status(grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
    errors.Draining: Status(grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable_error"),
    errors.StoreUnavailable: Status(grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable_error"),
    errors.NotReady: Status(grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable_error"),
    errors.DeadlineExceeded: Status(grpc.StatusCode.DEADLINE_EXCEEDED, 504, "timeout_error"),
    errors.PermissionDenied: Status(grpc.StatusCode.PERMISSION_DENIED, 403, "permission_error"),
    errors.Unauthenticated: Status(grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error"),
}


def status_of(error: BaseException) -> Status:
    for cls in type(error).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return INTERNAL


def public_message(error: BaseException) -> str:
    """What the caller is told: the domain error's own words; never an unexpected error's text."""
    if isinstance(error, errors.HotloraError):
        return str(error)
    return "internal error (see server log)"


def retry_after_s(error: BaseException) -> float | None:
    """When a refused caller may try again (a tenant's quota says), for HTTP's Retry-After and
    gRPC's retry-after trailing metadata; None when the error says nothing of it."""
    return getattr(error, "retry_after_s", None) if isinstance(error, errors.RateLimited) else None


def grpc_status(error: BaseException) -> tuple[grpc.StatusCode, str]:
    return status_of(error).grpc_code, public_message(error)


def openai_error(error: BaseException) -> tuple[int, dict]:
    """(HTTP status, body) in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    status = status_of(error)
    return status.http_status, {"error": {"message": public_message(error), "type": status.openai_type,
                                          "param": None, "code": status.grpc_code.name.lower()}}
