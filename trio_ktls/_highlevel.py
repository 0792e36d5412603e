"""Ways in: wrap a socket you have, connect to a host, or serve.

These mirror trio's own helpers (`trio.SSLListener`, `trio.serve_ssl_over_tcp`,
`trio.open_ssl_over_tcp_stream`), with one addition: a `KTLSStream` owns a task (its
reader), so whoever creates one supplies a nursery. The context managers here own that
nursery, so a caller never sees a half-built stream or an orphaned task.
"""

from __future__ import annotations

import logging
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Final, final

import trio

from ._errors import KTLSUnavailableError
from ._options import DEFAULT_SERVER_HANDSHAKE_TIMEOUT, KTLSOptions, StreamOptions
from ._stream import KTLSStream

if sys.version_info >= (3, 11):
    from typing import Unpack
else:
    from typing_extensions import Unpack

logger: Final = logging.getLogger("trio_ktls")

#: trio's default for ``happy_eyeballs_delay`` (RFC 8305's recommendation), in seconds.
DEFAULT_HAPPY_EYEBALLS_DELAY: Final = 0.25


def _client_context(ssl_context: ssl.SSLContext | None) -> ssl.SSLContext:
    """The caller's context, checked; or the default `trio.open_ssl_over_tcp_stream`
    makes: ``ssl.create_default_context()`` with ``OP_IGNORE_UNEXPECTED_EOF`` cleared,
    so a TCP close without close_notify is reported as a truncation (unless
    ``https_compatible``) rather than read as a clean end."""
    if ssl_context is not None:
        _check_context(ssl_context)
        return ssl_context
    context = ssl.create_default_context()
    if hasattr(ssl, "OP_IGNORE_UNEXPECTED_EOF"):
        context.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF
    return context


def _check_context(ssl_context: object) -> None:
    if not isinstance(ssl_context, ssl.SSLContext):
        raise TypeError(f"ssl_context must be an ssl.SSLContext, not {ssl_context!r}")


def _check_nursery(nursery: object) -> None:
    if not isinstance(nursery, trio.Nursery):
        raise TypeError(
            f"nursery must be a trio.Nursery (it runs the streams' tasks), not {nursery!r}"
        )


def _check_delay(happy_eyeballs_delay: object) -> None:
    if happy_eyeballs_delay is None:
        return
    if isinstance(happy_eyeballs_delay, bool) or not isinstance(happy_eyeballs_delay, int | float):
        raise TypeError(
            f"happy_eyeballs_delay must be a number or None, not {happy_eyeballs_delay!r}"
        )
    if not happy_eyeballs_delay >= 0:
        raise ValueError(f"happy_eyeballs_delay must be >= 0, not {happy_eyeballs_delay!r}")


async def open_ktls_over_tcp_stream(
    host: str | bytes,
    port: int,
    *,
    nursery: trio.Nursery,
    https_compatible: bool = False,
    ssl_context: ssl.SSLContext | None = None,
    happy_eyeballs_delay: float | None = DEFAULT_HAPPY_EYEBALLS_DELAY,
    **options: Unpack[KTLSOptions],
) -> KTLSStream:
    """Connect to ``host:port`` over TCP and return a client `KTLSStream`, like
    `trio.open_ssl_over_tcp_stream`: the handshake runs on first use (or on
    ``do_handshake()``), the certificate is checked against ``host``, and
    ``ssl_context`` defaults to trio's default (``ssl.create_default_context()`` with
    ``OP_IGNORE_UNEXPECTED_EOF`` cleared).

    The one deliberate difference: ``nursery``, required. A `KTLSStream` owns a task
    (the handshake, then the reader that handles the control records the kernel passes
    up: alerts, tickets, KeyUpdate), and in trio a task lives in a nursery its caller
    can see; `trio.SSLStream` has no task of its own, so trio's function needs none.
    `open_ktls_stream` is the context manager that owns its nursery instead.

    Every argument (``**options``: see `StreamOptions`) is checked before connecting.
    """
    StreamOptions(**options)
    _check_nursery(nursery)
    _check_delay(happy_eyeballs_delay)
    ssl_context = _client_context(ssl_context)
    tcp = await trio.open_tcp_stream(host, port, happy_eyeballs_delay=happy_eyeballs_delay)
    try:
        return KTLSStream(
            tcp,
            ssl_context,
            nursery=nursery,
            server_hostname=host,
            https_compatible=https_compatible,
            **options,
        )
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise


async def open_ktls_over_tcp_listeners(
    port: int,
    ssl_context: ssl.SSLContext,
    *,
    nursery: trio.Nursery,
    host: str | bytes | None = None,
    https_compatible: bool = False,
    backlog: int | None = None,
    **options: Unpack[KTLSOptions],
) -> list[KTLSListener]:
    """Listen for TLS connections on ``port``, like `trio.open_ssl_over_tcp_listeners`:
    one `KTLSListener` per address (`trio.open_tcp_listeners` picks them; ``host`` and
    ``backlog`` mean what they mean there). Accepted streams' tasks run in ``nursery``
    (see `open_ktls_over_tcp_stream` for why there is one). Every argument is checked
    before the port is opened.
    """
    _check_listener_arguments(ssl_context, nursery, options)
    tcp_listeners = await trio.open_tcp_listeners(port, host=host, backlog=backlog)
    return [
        KTLSListener(
            listener, ssl_context, nursery=nursery, https_compatible=https_compatible, **options
        )
        for listener in tcp_listeners
    ]


def _check_listener_arguments(
    ssl_context: object, nursery: object | None, options: KTLSOptions
) -> None:
    options.setdefault("handshake_timeout", DEFAULT_SERVER_HANDSHAKE_TIMEOUT)
    StreamOptions(**options)
    _check_context(ssl_context)
    if nursery is not None:
        _check_nursery(nursery)


@asynccontextmanager
async def wrap_stream(
    transport_stream: trio.abc.Stream,
    ssl_context: ssl.SSLContext,
    *,
    server_side: bool = False,
    server_hostname: str | bytes | None = None,
    https_compatible: bool = False,
    session: ssl.SSLSession | None = None,
    **options: Unpack[KTLSOptions],
) -> AsyncIterator[KTLSStream]:
    """Yield a handshaken `KTLSStream` over ``transport_stream``; close it on exit.

    Arguments are `KTLSStream`'s (``**options``: see `StreamOptions`). Errors from the
    body and from the handshake propagate as themselves, not wrapped in an exception
    group by the nursery this context manager keeps inside.
    """
    error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        stream = KTLSStream(
            transport_stream,
            ssl_context,
            nursery=nursery,
            server_side=server_side,
            server_hostname=server_hostname,
            https_compatible=https_compatible,
            session=session,
            **options,
        )
        try:
            await stream.do_handshake()
            yield stream
        except BaseException as exc:
            error = exc
        finally:
            await stream.aclose()  # close_notify (unless broken), as AsyncResource does
    if error is not None:
        raise error


@asynccontextmanager
async def open_ktls_stream(
    host: str | bytes,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | bytes | None = None,
    https_compatible: bool = False,
    session: ssl.SSLSession | None = None,
    happy_eyeballs_delay: float | None = DEFAULT_HAPPY_EYEBALLS_DELAY,
    **options: Unpack[KTLSOptions],
) -> AsyncIterator[KTLSStream]:
    """Connect to ``host:port`` and yield a handshaken client `KTLSStream`.

    ``ssl_context`` defaults to the context `trio.open_ssl_over_tcp_stream` makes
    (``ssl.create_default_context()`` with ``OP_IGNORE_UNEXPECTED_EOF`` cleared);
    ``server_hostname`` defaults to ``host`` (for SNI and certificate checks). Every
    argument is checked before connecting.
    """
    StreamOptions(**options)
    _check_delay(happy_eyeballs_delay)
    ssl_context = _client_context(ssl_context)
    if server_hostname is None:
        server_hostname = host
    tcp = await trio.open_tcp_stream(host, port, happy_eyeballs_delay=happy_eyeballs_delay)
    async with wrap_stream(
        tcp,
        ssl_context,
        server_hostname=server_hostname,
        https_compatible=https_compatible,
        session=session,
        **options,
    ) as stream:
        yield stream


@final
class KTLSListener(trio.abc.Listener[KTLSStream]):
    """Wraps a listener of `trio.SocketStream` objects; ``accept`` returns server streams.

    Like `trio.SSLListener`, accepted streams have not handshaken yet (so one slow client
    cannot hold up ``accept``); their handshake runs on first use or on an explicit
    ``do_handshake()``. ``handshake_timeout`` defaults to 60 s here, after which the
    handshake fails with `trio.TooSlowError`. The streams' tasks run in ``nursery``.
    """

    def __init__(
        self,
        transport_listener: trio.abc.Listener[trio.SocketStream],
        ssl_context: ssl.SSLContext,
        *,
        nursery: trio.Nursery,
        https_compatible: bool = False,
        **options: Unpack[KTLSOptions],
    ) -> None:
        _check_listener_arguments(ssl_context, nursery, options)
        #: The listener whose connections are wrapped.
        self.transport_listener: Final = transport_listener
        self._ssl_context = ssl_context
        self._nursery = nursery
        self._https_compatible = https_compatible
        self._options = options

    async def accept(self) -> KTLSStream:
        """Accept a connection and wrap it (the handshake has not run yet)."""
        transport = await self.transport_listener.accept()
        return KTLSStream(
            transport,
            self._ssl_context,
            nursery=self._nursery,
            server_side=True,
            https_compatible=self._https_compatible,
            **self._options,
        )

    async def aclose(self) -> None:
        """Close the underlying listener."""
        await self.transport_listener.aclose()


async def serve_ktls_over_tcp(
    handler: Callable[[KTLSStream], Awaitable[object]],
    port: int,
    ssl_context: ssl.SSLContext,
    *,
    host: str | bytes | None = None,
    https_compatible: bool = False,
    backlog: int | None = None,
    handler_nursery: trio.Nursery | None = None,
    task_status: trio.TaskStatus[list[KTLSListener]] = trio.TASK_STATUS_IGNORED,
    **options: Unpack[KTLSOptions],
) -> None:
    """Serve TLS over TCP with kTLS, forever; the counterpart of `trio.serve_ssl_over_tcp`.

    ``host``, ``backlog`` and ``handler_nursery`` mean what they mean there: handlers
    (and, here, the streams' own tasks) run in ``handler_nursery`` if given, else in a
    nursery inside this function. ``nursery.start(serve_ktls_over_tcp, ...)`` returns
    the list of `KTLSListener` objects. Every argument is checked before the port is opened.

    Unlike trio's, each connection's handshake runs in its handler task before
    ``handler`` is called, bounded by ``handshake_timeout`` (60 s unless given): a
    failed or timed-out handshake is logged (logger ``trio_ktls``: DEBUG when the peer
    just went away, as port scanners and health checks do; INFO otherwise; with the
    peer's address taken at accept time) and closes that connection only. ``handler``
    gets a handshaken stream, which is closed when it returns.
    """
    _check_listener_arguments(ssl_context, handler_nursery, options)
    async with trio.open_nursery() as own_nursery:
        stream_nursery = handler_nursery or own_nursery
        listeners = await open_ktls_over_tcp_listeners(
            port,
            ssl_context,
            nursery=stream_nursery,
            host=host,
            https_compatible=https_compatible,
            backlog=backlog,
            **options,
        )

        handle = handshake_then(handler)

        await trio.serve_listeners(
            handle, listeners, handler_nursery=stream_nursery, task_status=task_status
        )


def handshake_then(
    handler: Callable[[KTLSStream], Awaitable[object]],
) -> Callable[[KTLSStream], Awaitable[None]]:
    """A connection handler for `trio.serve_listeners` over `KTLSListener` objects: the
    handshake first, in the connection's own task; a failure (or a timeout) is logged and
    closes that connection only; then ``handler`` gets the stream, which is closed when it
    returns."""

    async def handle(stream: KTLSStream) -> None:
        try:
            await stream.do_handshake()
        except (
            trio.BrokenResourceError,
            trio.TooSlowError,
            KTLSUnavailableError,
            OSError,
        ) as exc:
            # One client's failure (KTLSUnavailableError: a cipher the kernel lacks,
            # with ktls="require") never stops the server.
            level = logging.DEBUG if _peer_went_away(exc) else logging.INFO
            logger.log(level, "TLS handshake with %s failed: %s", stream._peer, _describe(exc))
            await trio.aclose_forcefully(stream)
            return
        try:
            await handler(stream)
        finally:
            await stream.aclose()

    return handle


def _peer_went_away(exc: BaseException) -> bool:
    """A connection closed or reset mid-handshake: what a port scanner does."""
    cause = exc.__cause__ or exc
    if isinstance(cause, ConnectionError | EOFError):
        return True
    text = str(exc)
    return "closed the connection" in text or "lost" in text or "reset" in text


def _describe(exc: BaseException) -> str:
    cause = exc.__cause__
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    return f"{exc} ({cause})" if cause is not None and str(cause) not in str(exc) else str(exc)
