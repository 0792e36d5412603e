"""An httpcore network backend whose TLS is a `KTLSStream`: HTTPS through the kernel.

Needs the ``httpx`` extra (``pip install trio_ktls[httpx]``). httpcore asks its network
backend for TCP connections (``connect_tcp``) and then for TLS on them (``start_tls``);
`KTLSBackend` answers the second with a `KTLSStream` where httpcore's own trio backend
makes a `trio.SSLStream`, with the same arguments (``https_compatible=True``), the same
timeouts and the same exceptions. ALPN works as with trio: httpcore sets the protocols
on the context, and reads the choice from ``get_extra_info("ssl_object")``.

Ownership
---------
A `KTLSStream` owns a task (the handshake, then the reader the kernel's control records
need), and a task lives in a nursery. The backend owns that nursery: use it as an async
context manager (``async with KTLSBackend() as backend:``), or give it one you have
(``KTLSBackend(nursery=nursery)``). Closing a connection (httpcore closes each one when
the pool or the client closes) stops its task; when the backend's block ends, any
connection still open is closed, so the nursery never waits for a forgotten one.
`trio_ktls.httpx.KTLSTransport` wraps all this for httpx.

``get_extra_info`` answers what httpcore's trio backend answers (``"ssl_object"``,
``"client_addr"``, ``"server_addr"``, ``"socket"``, ``"is_readable"``), and
``"ktls_info"``: the `KTLSInfo` of a TLS connection (None before TLS).
"""

from __future__ import annotations

import contextlib
import ssl
import sys
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any, Final, final

import httpcore
import trio

if sys.version_info >= (3, 11):
    from typing import Self, Unpack
else:
    from typing_extensions import Self, Unpack

from ._errors import KTLSUnavailableError
from ._options import KTLSOptions, StreamOptions
from ._stream import KTLSStream

__all__ = ["KTLSBackend", "KTLSNetworkStream"]

_Mapping = tuple[tuple[type[BaseException], type[Exception]], ...]

_CONNECT: Final[_Mapping] = (
    (trio.TooSlowError, httpcore.ConnectTimeout),
    (trio.BrokenResourceError, httpcore.ConnectError),
    (KTLSUnavailableError, httpcore.ConnectError),
    (OSError, httpcore.ConnectError),
)
_READ: Final[_Mapping] = (
    (trio.TooSlowError, httpcore.ReadTimeout),
    (trio.BrokenResourceError, httpcore.ReadError),
    (trio.ClosedResourceError, httpcore.ReadError),
)
_WRITE: Final[_Mapping] = (
    (trio.TooSlowError, httpcore.WriteTimeout),
    (trio.BrokenResourceError, httpcore.WriteError),
    (trio.ClosedResourceError, httpcore.WriteError),
)


@contextlib.contextmanager
def _mapped(mapping: _Mapping, timeout: float | None) -> Iterator[None]:
    """Run the block under ``timeout`` seconds (None: no limit), raising httpcore's
    exceptions for trio's (the failure stays the ``__cause__``)."""
    try:
        with trio.fail_after(float("inf") if timeout is None else timeout):
            yield
    except Exception as exc:
        for theirs, ours in mapping:
            if isinstance(exc, theirs):
                raise ours(str(exc) or type(exc).__name__) from exc
        raise


def _socket_stream(stream: trio.abc.Stream) -> trio.SocketStream | None:
    """The TCP (or Unix) socket stream under any layers of TLS."""
    while isinstance(stream, KTLSStream | trio.SSLStream):
        stream = stream.transport_stream
    return stream if isinstance(stream, trio.SocketStream) else None


@final
class KTLSNetworkStream(httpcore.AsyncNetworkStream):
    """One connection, plain TCP or TLS (`KTLSStream`), as httpcore sees it."""

    def __init__(self, stream: trio.abc.Stream, backend: KTLSBackend) -> None:
        #: The trio stream: a `trio.SocketStream`, or a `KTLSStream` after ``start_tls``.
        self.stream: Final = stream
        self._backend = backend

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        """Up to ``max_bytes`` bytes, ``b""`` at the end (`httpcore.ReadTimeout`,
        `httpcore.ReadError`)."""
        with _mapped(_READ, timeout):
            return bytes(await self.stream.receive_some(max_bytes))

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        """Send all of ``buffer`` (`httpcore.WriteTimeout`, `httpcore.WriteError`)."""
        if not buffer:
            return
        with _mapped(_WRITE, timeout):
            await self.stream.send_all(buffer)

    async def aclose(self) -> None:
        """Close the connection; a TLS one's task stops."""
        self._backend._forget(self)
        await self.stream.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> KTLSNetworkStream:
        """TLS over this connection, handshaken, as a new network stream (as httpcore's
        trio backend does: ``https_compatible=True``). A failed or timed-out handshake
        closes the connection and raises `httpcore.ConnectError` (also for
        ``ktls="require"`` where the kernel cannot take it) or
        `httpcore.ConnectTimeout`."""
        tls = KTLSStream(
            self.stream,
            ssl_context,
            nursery=self._backend._running_nursery(),
            server_hostname=server_hostname,
            https_compatible=True,
            **self._backend.options,
        )
        try:
            with _mapped(_CONNECT, timeout):
                await tls.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(tls)
            raise
        return self._backend._track(KTLSNetworkStream(tls, self._backend))

    def get_extra_info(self, info: str) -> Any:
        """``"ssl_object"`` (the handshake's `ssl.SSLObject`: certificates, ALPN; the
        kernel may own its records), ``"ktls_info"``, ``"client_addr"``,
        ``"server_addr"``, ``"socket"``, ``"is_readable"``; None for anything else."""
        tls = self.stream if isinstance(self.stream, KTLSStream) else None
        if info == "ssl_object":
            return tls._handshake.ssl_object if tls is not None else None
        if info == "ktls_info":
            return tls.ktls_info if tls is not None else None
        sock = _socket_stream(self.stream)
        if sock is None:
            return None
        if info == "client_addr":
            return sock.socket.getsockname()
        if info == "server_addr":
            return sock.socket.getpeername()
        if info == "socket":
            return sock.socket
        if info == "is_readable":
            return sock.socket.is_readable()
        return None


@final
class KTLSBackend(httpcore.AsyncNetworkBackend):
    """An httpcore network backend whose TLS runs in the kernel where it can.

    ``nursery`` runs the connections' tasks; without one, enter the backend
    (``async with KTLSBackend() as backend:``) and it opens its own. ``**options`` are
    the kTLS options of every connection (`StreamOptions`: ``ktls``,
    ``handshake_timeout``, ...), checked here. Pass the backend to
    ``httpcore.AsyncConnectionPool(network_backend=...)``, or use
    `trio_ktls.httpx.KTLSTransport`.
    """

    def __init__(
        self, *, nursery: trio.Nursery | None = None, **options: Unpack[KTLSOptions]
    ) -> None:
        StreamOptions(**options)
        if nursery is not None and not isinstance(nursery, trio.Nursery):
            raise TypeError(f"nursery must be a trio.Nursery or None, not {nursery!r}")
        #: The kTLS options every connection gets.
        self.options: Final = options
        self._given_nursery = nursery
        self._nursery = nursery
        self._exit_stack: contextlib.AsyncExitStack | None = None
        self._open: set[KTLSNetworkStream] = set()

    async def __aenter__(self) -> Self:
        if self._given_nursery is None:
            if self._exit_stack is not None:
                raise RuntimeError("this KTLSBackend is already entered")
            stack = contextlib.AsyncExitStack()
            self._nursery = await stack.enter_async_context(trio.open_nursery())
            self._exit_stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        # Close what is still open, so that no task is left to wait for. The block's
        # own exception (if any) goes on unchanged: it is not the nursery's to wrap, and
        # the connections' tasks never raise into it.
        try:
            while self._open:
                await trio.aclose_forcefully(self._open.pop().stream)
        finally:
            stack, self._exit_stack = self._exit_stack, None
            if stack is not None:
                self._nursery = None
                await stack.aclose()

    def _running_nursery(self) -> trio.Nursery:
        if self._nursery is None:
            raise RuntimeError(
                "KTLSBackend has no nursery for its connections' tasks: enter it "
                "(async with KTLSBackend() as backend:) or pass nursery="
            )
        return self._nursery

    def _track(self, stream: KTLSNetworkStream) -> KTLSNetworkStream:
        self._open.add(stream)
        return stream

    def _forget(self, stream: KTLSNetworkStream) -> None:
        self._open.discard(stream)

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> KTLSNetworkStream:
        """A TCP connection (`httpcore.ConnectTimeout`, `httpcore.ConnectError`)."""
        self._running_nursery()  # fail before connecting, not at start_tls
        with _mapped(_CONNECT, timeout):
            stream = await trio.open_tcp_stream(host, port, local_address=local_address)
            await _set_options(stream, socket_options)
        return KTLSNetworkStream(stream, self)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> KTLSNetworkStream:
        """A Unix socket connection; TLS over it stays in user space (``ktls="auto"``),
        as the kernel offloads TCP only."""
        self._running_nursery()
        with _mapped(_CONNECT, timeout):
            stream = await trio.open_unix_socket(path)
            await _set_options(stream, socket_options)
        return KTLSNetworkStream(stream, self)

    async def sleep(self, seconds: float) -> None:
        """`trio.sleep`."""
        await trio.sleep(seconds)


async def _set_options(
    stream: trio.SocketStream, socket_options: Iterable[httpcore.SOCKET_OPTION] | None
) -> None:
    """Apply httpcore's socket options; a refused one closes the new connection."""
    try:
        for option in socket_options or ():
            stream.setsockopt(*option)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
