"""facefuse errors <-> gRPC status codes.

A service maps what it raises to a code with :func:`status_code_for`; a caller maps a downstream
``RpcError`` back with :func:`error_from_rpc`. The mapping is deliberately asymmetric for the codes
that mean "the other side has a bug" (UNKNOWN, INTERNAL): they come back as :class:`BackendError`,
never as :class:`BackendUnavailableError`, so that a broken backend is not mistaken for a dead one and
silently replaced by a fallback.
"""

from __future__ import annotations

import grpc

from facefuse.errors import (
    AssetError,
    AuthError,
    BackendError,
    BackendUnavailableError,
    CancelledError,
    DeadlineError,
    FacefuseError,
    InvalidInputError,
    LimitExceededError,
)


def status_code_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC code a facefuse error stands for; anything else is our bug (INTERNAL)."""
    if isinstance(exc, InvalidInputError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, LimitExceededError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, AssetError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, BackendUnavailableError):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, (DeadlineError, TimeoutError)):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(exc, CancelledError):
        return grpc.StatusCode.CANCELLED
    if isinstance(exc, AuthError):
        return grpc.StatusCode.UNAUTHENTICATED
    return grpc.StatusCode.INTERNAL


def error_from_rpc(exc: grpc.RpcError, peer: str) -> FacefuseError:
    """The facefuse error a downstream ``RpcError`` stands for, its message prefixed with ``peer``."""
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    message = f"{peer}: {detail}"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidInputError(message)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return LimitExceededError(message)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return AssetError(message)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineError(message)
    if code == grpc.StatusCode.UNAVAILABLE:
        return BackendUnavailableError(f"{peer} unavailable: {detail}")
    if code == grpc.StatusCode.CANCELLED:
        return CancelledError(message)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return AuthError(message)
    return BackendError(f"{peer} failed ({code.name}): {detail}")


def is_backend_down(exc: BaseException) -> bool:
    """True for the failures a documented fallback may cover: a dead or too slow backend, nothing else."""
    return isinstance(exc, (BackendUnavailableError, DeadlineError))
