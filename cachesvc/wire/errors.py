"""Domain errors of the service. The domain layer raises these; only the servicer maps
them to gRPC status codes (cachesvc.node.servicer), so nothing below it imports grpc."""

from __future__ import annotations


class CacheError(Exception):
    """Base of every error a caller can cause. ``status`` is the gRPC status name the
    transports report it as (the servicer and the data plane map it the same way)."""

    status = "INVALID_ARGUMENT"


class InvalidArgument(CacheError):
    """The request is malformed: it can never succeed as sent."""


class NotFound(CacheError):
    """A named family, model, reservation or lease does not exist."""

    status = "NOT_FOUND"


class FailedPrecondition(CacheError):
    """The request is well formed but the state does not allow it."""

    status = "FAILED_PRECONDITION"


class ResourceExhausted(CacheError):
    """No room: a reservation larger than the tier, or a tier full of pinned entries."""

    status = "RESOURCE_EXHAUSTED"


class Unavailable(CacheError):
    """A dependency the request needs is down (the cluster's Redis): retry, or elsewhere."""

    status = "UNAVAILABLE"


class Unauthenticated(CacheError):
    """No valid API token (a node started with --auth-tokens)."""

    status = "UNAUTHENTICATED"


class PermissionDenied(CacheError):
    """The token's role or tenant does not allow this request."""

    status = "PERMISSION_DENIED"
