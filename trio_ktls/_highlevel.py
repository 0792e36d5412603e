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
    happy_eyeballs_delay: float = 0.25,
    **options: Unpack[KTLSOptions],
) -> AsyncIterator[KTLSStream]:
    """Connect to ``host:port`` and yield a handshaken client `KTLSStream`.

    ``ssl_context`` defaults to ``ssl.create_default_context()``; ``server_hostname``
    defaults to ``host`` (for SNI and certificate checks), as in
    `trio.open_ssl_over_tcp_stream`. The options are checked before connecting.
    """
    StreamOptions(**options)
    if ssl_context is None:
        ssl_context = ssl.create_default_context()
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
    """Wraps a listener of `trio.SocketStream`s; ``accept`` returns server `KTLSStream`s.

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
        options.setdefault("handshake_timeout", DEFAULT_SERVER_HANDSHAKE_TIMEOUT)
        StreamOptions(**options)
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
    task_status: trio.TaskStatus[list[KTLSListener]] = trio.TASK_STATUS_IGNORED,
    **options: Unpack[KTLSOptions],
) -> None:
    """Serve TLS over TCP with kTLS, forever; the counterpart of `trio.serve_ssl_over_tcp`.

    Each connection's handshake runs in its own handler task, bounded by
    ``handshake_timeout`` (60 s unless given); a failed or timed-out handshake is logged
    (logger ``trio_ktls``) and closes that connection only. ``handler`` gets a
    handshaken stream, which is closed when it returns. ``nursery.start(
    serve_ktls_over_tcp, ...)`` returns the `KTLSListener`\\s. The options are checked
    before the port is opened.
    """
    options.setdefault("handshake_timeout", DEFAULT_SERVER_HANDSHAKE_TIMEOUT)
    StreamOptions(**options)
    tcp_listeners = await trio.open_tcp_listeners(port, host=host, backlog=backlog)
    async with trio.open_nursery() as stream_nursery:
        listeners = [
            KTLSListener(
                listener,
                ssl_context,
                nursery=stream_nursery,
                https_compatible=https_compatible,
                **options,
            )
            for listener in tcp_listeners
        ]

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
                peer = _peer_name(stream)
                logger.warning("TLS handshake with %s failed: %s", peer, _describe(exc))
                await trio.aclose_forcefully(stream)
                return
            try:
                await handler(stream)
            finally:
                await stream.aclose()

        await trio.serve_listeners(handle, listeners, task_status=task_status)


def _peer_name(stream: KTLSStream) -> str:
    transport = stream.transport_stream
    if not isinstance(transport, trio.SocketStream):
        return repr(transport)
    try:
        return str(transport.socket.getpeername())
    except OSError:
        return "a disconnected peer"


def _describe(exc: BaseException) -> str:
    cause = exc.__cause__
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    return f"{exc} ({cause})" if cause is not None and str(cause) not in str(exc) else str(exc)
