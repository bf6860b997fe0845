"""One deadline type, from the caller's context down to every call the work makes.

gRPC gives a handler its caller's time left as a relative number that keeps shrinking; downstream
calls want a timeout. :class:`Deadline` pins the caller's deadline to the monotonic clock once, so
every later step (a queue, a batch, a downstream call) asks the same question: how long is left, and
is the caller still there.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc

from facefuse.errors import CancelledError, DeadlineError

NO_DEADLINE_S = 1e7
"""grpc reports a call without a deadline as an enormous time remaining; anything above this is 'none'."""

REPLY_MARGIN_S = 0.05
"""Kept back from a downstream timeout so the reply still reaches our caller in time."""


@dataclass(frozen=True)
class Deadline:
    """An absolute point on ``time.monotonic()``'s clock (``at``), or none; plus the caller's liveness."""

    at: float | None = None
    cancelled: threading.Event = field(default_factory=threading.Event, compare=False)
    _on_cancel: list[Callable[[], object]] = field(default_factory=list, compare=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    @classmethod
    def none(cls) -> Deadline:
        return cls(None)

    @classmethod
    def after(cls, seconds: float | None) -> Deadline:
        return cls(None if seconds is None else time.monotonic() + seconds)

    @classmethod
    def from_context(cls, context: grpc.ServicerContext) -> Deadline:
        """The caller's deadline; the returned object also learns when the caller goes away."""
        left = context.time_remaining()
        deadline = cls(None if left is None or left > NO_DEADLINE_S else time.monotonic() + left)
        context.add_callback(deadline.cancel)
        return deadline

    def cancel(self) -> None:
        """The caller went away: mark it, and cancel what ``cancelling`` registered, at once."""
        with self._lock:
            self.cancelled.set()
            pending, self._on_cancel[:] = list(self._on_cancel), []
        for cancel in pending:
            cancel()

    @contextmanager
    def cancelling(self, call: grpc.Future) -> Iterator[None]:
        """While the block runs, the caller going away cancels the downstream ``call`` at once, so the
        service it reaches stops its work too."""
        with self._lock:
            registered = not self.cancelled.is_set()
            if registered:
                self._on_cancel.append(call.cancel)
        if not registered:
            call.cancel()
        try:
            yield
        finally:
            with self._lock:
                if call.cancel in self._on_cancel:
                    self._on_cancel.remove(call.cancel)

    def remaining(self) -> float | None:
        """Seconds left (may be negative), or None when there is no deadline."""
        return None if self.at is None else self.at - time.monotonic()

    @property
    def expired(self) -> bool:
        left = self.remaining()
        return left is not None and left <= 0

    @property
    def alive(self) -> bool:
        """The caller is still waiting: not cancelled and not past its deadline."""
        return not self.cancelled.is_set() and not self.expired

    def check(self, what: str = "the work") -> None:
        """Raise if the caller is gone: call between steps so abandoned work stops early."""
        if self.cancelled.is_set():
            raise CancelledError(f"the caller cancelled the call; {what} was stopped")
        if self.expired:
            raise DeadlineError(f"deadline exceeded during {what}")

    def timeout(self, default: float | None = None, margin: float = REPLY_MARGIN_S) -> float | None:
        """A timeout for a downstream call: the time left minus ``margin``, capped at ``default``."""
        self.check("the call")
        left = self.remaining()
        if left is None:
            return default
        left -= margin
        if left <= 0:
            raise DeadlineError("deadline exceeded before the call could be made")
        return left if default is None else min(left, default)
