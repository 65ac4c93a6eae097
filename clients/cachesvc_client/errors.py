"""Typed exceptions of the SDK, mapped one to one from gRPC status codes."""

from __future__ import annotations

import grpc


class CacheServiceError(Exception):
    """Base of every error the service returns. ``code`` is the gRPC status code."""

    retryable = False

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class InvalidArgumentError(CacheServiceError):
    """The request is malformed (bad shape, dtype, hash, layer...)."""


class NotFoundError(CacheServiceError):
    """Unknown family, model, reservation or lease."""


class FailedPreconditionError(CacheServiceError):
    """Valid request, wrong state (model of another family, incomplete commit...)."""


class ResourceExhaustedError(CacheServiceError):
    """No room in the tier, or a message over the size limit."""


class UnavailableError(CacheServiceError):
    """The server is unreachable or shutting down. Safe to retry idempotent calls."""

    retryable = True


class DeadlineExceededError(CacheServiceError):
    """The call's timeout passed."""

    retryable = True


class UnauthenticatedError(CacheServiceError):
    """No valid API token for a node that requires one (ClientOptions.token)."""


class PermissionDeniedError(CacheServiceError):
    """The token's role or tenant does not allow the request."""


_BY_CODE = {
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def from_rpc_error(exc: grpc.RpcError) -> CacheServiceError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    cls = _BY_CODE.get(code, CacheServiceError)
    return cls(f"{code.name if code else 'UNKNOWN'}: {details}", code)


def error_for_status(status: str, message: str) -> CacheServiceError:
    """The typed error for a gRPC status *name* (as the socket data plane reports it)."""
    code = getattr(grpc.StatusCode, status, None)
    cls = _BY_CODE.get(code, CacheServiceError)
    return cls(f"{status}: {message}", code)
