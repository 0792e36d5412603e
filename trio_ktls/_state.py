"""A stream's life: OK, then BROKEN or CLOSED, never back (as in trio's ``_ssl.py``).

The stream owns one `StreamStatus`; its record layer gets the same object, so that a
failure found by the reader task, the writer or the application is one failure, raised
the same way by every later call. ``_check_status`` in trio is `StreamStatus.check` here.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import trio


class State(enum.Enum):
    OK = "ok"
    BROKEN = "broken"
    CLOSED = "closed"


class StreamStatus:
    """The state, the first failure, and who to tell when either changes."""

    def __init__(self) -> None:
        self.state = State.OK
        #: The first failure; kept (even after aclose) as the cause of later errors.
        self.failure: BaseException | None = None
        #: Called after every change (the record layer wakes its parked receivers).
        self.on_change: Callable[[], None] = lambda: None

    def fail(self, exc: BaseException) -> None:
        """OK -> BROKEN, keeping ``exc``; later failures are consequences, not news."""
        if self.state is State.OK:
            self.state = State.BROKEN
            self.failure = exc
        self.on_change()

    def close(self) -> None:
        self.state = State.CLOSED
        self.on_change()

    def check(self) -> None:
        """Raise if the stream cannot be used: closed, or broken."""
        self.check_not_closed()
        if self.state is State.BROKEN:
            raise self.broken_error()

    def check_not_closed(self) -> None:
        if self.state is State.CLOSED:
            raise trio.ClosedResourceError("this KTLSStream was closed")

    def broken_error(self) -> Exception:
        """A fresh exception for "this stream is broken", caused by the first failure.

        A `trio.BrokenResourceError` failure is re-raised as a new instance of its own
        class (so ``except TLSProtocolError`` keeps working on later calls); anything
        else becomes a plain `trio.BrokenResourceError`.
        """
        failure = self.failure
        fresh: Exception
        if isinstance(failure, trio.BrokenResourceError):
            fresh = type(failure)(*failure.args)
        else:
            fresh = trio.BrokenResourceError(f"the TLS stream is broken: {failure!r}")
        fresh.__cause__ = failure
        return fresh
