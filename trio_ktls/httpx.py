"""An httpx transport for HTTPS through the kernel: httpcore's pool on `KTLSBackend`.

Needs the ``httpx`` extra (``pip install trio_ktls[httpx]``)::

    async with httpx.AsyncClient(transport=trio_ktls.httpx.KTLSTransport()) as client:
        response = await client.get("https://example.org/")
        info = response.extensions["network_stream"].get_extra_info("ktls_info")

httpx's own `httpx.AsyncHTTPTransport` builds an ``httpcore.AsyncConnectionPool`` with
httpcore's default network backend and has no argument to change it. `KTLSTransport`
is the same thing with `trio_ktls.httpcore.KTLSBackend` under the pool, built only from
public API on both sides (`httpx.AsyncBaseTransport`, ``httpcore.AsyncConnectionPool``):
it takes that transport's arguments (not ``proxy``, ``uds`` or the deprecated ``cert``),
turns httpx requests into httpcore requests and httpcore's exceptions into httpx's of
the same names, as httpx does.

The transport owns the backend, and through it the nursery of the connections' tasks:
enter the client (``async with httpx.AsyncClient(...)``), which enters the transport, or
pass a ``nursery``. Closing the client closes every connection and stops its task.
"""

from __future__ import annotations

import contextlib
import ssl
import sys
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from types import TracebackType
from typing import Final, final

import httpcore
import httpx
import trio

if sys.version_info >= (3, 11):
    from typing import Self, Unpack
else:
    from typing_extensions import Self, Unpack

from ._options import KTLSOptions
from .httpcore import KTLSBackend

__all__ = ["KTLSTransport"]

# httpcore's exceptions and httpx's of the same name, subclasses before their bases (the
# first match wins, so the most specific one is raised).
_EXCEPTIONS: Final[tuple[tuple[type[Exception], type[httpx.HTTPError]], ...]] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.ProxyError, httpx.ProxyError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
)


@contextlib.contextmanager
def _httpx_exceptions() -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        for theirs, ours in _EXCEPTIONS:
            if isinstance(exc, theirs):
                raise ours(str(exc)) from exc
        raise


@final
class _ResponseStream(httpx.AsyncByteStream):
    """httpcore's response body, with httpx's exceptions."""

    def __init__(self, stream: AsyncIterable[bytes]) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _httpx_exceptions():
            async for part in self._stream:
                yield part

    async def aclose(self) -> None:
        aclose = getattr(self._stream, "aclose", None)
        if aclose is not None:
            with _httpx_exceptions():
                await aclose()


@final
class KTLSTransport(httpx.AsyncBaseTransport):
    """`httpx.AsyncHTTPTransport` with its TLS in the kernel (see the module doc).

    ``verify`` (an `ssl.SSLContext`, True for httpx's default context, False for none),
    ``trust_env``, ``http1``, ``http2``, ``limits`` (default: httpx's), ``local_address``,
    ``retries`` and ``socket_options`` mean what they mean for httpx's transport.
    ``nursery`` runs the connections' tasks (default: one the transport opens when it
    is entered); ``**options`` are the kTLS options (`StreamOptions`).
    """

    def __init__(
        self,
        *,
        verify: ssl.SSLContext | bool = True,
        trust_env: bool = True,
        http1: bool = True,
        http2: bool = False,
        limits: httpx.Limits | None = None,
        local_address: str | None = None,
        retries: int = 0,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
        nursery: trio.Nursery | None = None,
        **options: Unpack[KTLSOptions],
    ) -> None:
        if not isinstance(verify, ssl.SSLContext | bool):
            raise TypeError(f"verify must be an ssl.SSLContext or a bool, not {verify!r}")
        if limits is None:
            limits = httpx.Limits(max_connections=100, max_keepalive_connections=20)
        #: The httpcore network backend under the pool.
        self.backend: Final = KTLSBackend(nursery=nursery, **options)
        self._pool: Final = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(verify=verify, trust_env=trust_env),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=http1,
            http2=http2,
            local_address=local_address,
            retries=retries,
            socket_options=socket_options,
            network_backend=self.backend,
        )

    async def __aenter__(self) -> Self:
        await self.backend.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        try:
            with _httpx_exceptions():
                await self._pool.__aexit__(exc_type, exc_value, traceback)
        finally:
            await self.backend.__aexit__(exc_type, exc_value, traceback)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through the pool (httpx calls this)."""
        assert isinstance(request.stream, httpx.AsyncByteStream)
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _httpx_exceptions():
            response = await self._pool.handle_async_request(core_request)
        assert isinstance(response.stream, AsyncIterable)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_ResponseStream(response.stream),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        """Close every connection of the pool (their tasks stop)."""
        with _httpx_exceptions():
            await self._pool.aclose()
