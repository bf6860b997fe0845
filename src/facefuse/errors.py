"""One exception family, so servers and the CLI can map failures to status codes and exit codes.

Every error carries a message meant for a person: it names the file, key or input at fault and
what was expected. Servers map the classes to gRPC codes (see ``facefuse.rpc.status``); the CLI
prints the message and exits non-zero instead of showing a traceback.
"""

from __future__ import annotations


class FacefuseError(Exception):
    """Base of every error facefuse raises on purpose."""


class InvalidInputError(FacefuseError):
    """The caller's input is unusable: unreadable image, bad tensor, wrong argument (INVALID_ARGUMENT)."""


class LimitExceededError(FacefuseError):
    """An input is over a configured limit: pixels, bytes, batch size (RESOURCE_EXHAUSTED)."""


class AssetError(FacefuseError):
    """A model or data file is missing, corrupt or of the wrong kind (FAILED_PRECONDITION)."""


class CheckpointError(AssetError):
    """A checkpoint does not match the network: missing section, renamed key, wrong shape or dtype."""


class BackendUnavailableError(FacefuseError):
    """A downstream service cannot be reached or died mid-call (UNAVAILABLE)."""


class BackendError(FacefuseError):
    """A downstream service failed with its own bug (UNKNOWN or INTERNAL): not a fallback case."""


class AuthError(FacefuseError):
    """The caller sent no credentials or wrong ones: a missing or invalid bearer token (UNAUTHENTICATED)."""


class DeadlineError(FacefuseError, TimeoutError):
    """The caller's deadline passed before the work was done (DEADLINE_EXCEEDED)."""


class CancelledError(FacefuseError):
    """The caller went away (cancelled the call or disconnected); the work was stopped (CANCELLED)."""
