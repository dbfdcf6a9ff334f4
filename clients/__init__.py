"""Client library for hotlora-server (see clients.client)."""

from .client import (AdapterInfo, AsyncClient, Client, DeadlineExceeded, FailedPrecondition, GenerationResult,
                     HotloraClientError, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted, StreamPiece,
                     Unauthenticated, Unavailable, Usage)

__all__ = ["AdapterInfo", "AsyncClient", "Client", "DeadlineExceeded", "FailedPrecondition", "GenerationResult",
           "HotloraClientError", "InvalidArgument", "NotFound", "PermissionDenied", "ResourceExhausted", "StreamPiece",
           "Unauthenticated", "Unavailable", "Usage"]
