"""httpx and httpcore over kTLS: `trio_ktls.httpcore.KTLSBackend` and
`trio_ktls.httpx.KTLSTransport`.

The server is `serve_ktls_over_tcp` speaking HTTP/1.1 with h11 (so in the kernel matrix
both ends of every connection are offloaded), or ``openssl s_server -WWW``. Each test
runs in user space on the host and offloaded in the kernel matrix (``MODES``).
"""

from __future__ import annotations

import gc
import os
import ssl
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import h11
import httpcore
import httpx
import pytest
import trio
import trio.testing

import trio_ktls
import trio_ktls.httpcore
import trio_ktls.httpx
from trio_ktls import KTLSMode, KTLSStream

from .helpers import (
    MODES,
    OPENSSL,
    assert_mode,
    client_context,
    connect_when_listening,
    free_port,
    kernel_probe,
    needs_openssl,
    server_context,
    server_pem_file,
)

#: The large response: several MiB, random, so a lost or repeated byte shows.
BODY = os.urandom(5 * 1024 * 1024 + 12345)


@dataclass
class HTTPServer:
    """What the test server saw: one stream per TLS connection."""

    port: int = 0
    connections: list[KTLSStream] = field(default_factory=list)


async def _next_event(conn: h11.Connection, stream: KTLSStream) -> object:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(bytes(await stream.receive_some()))


async def _handle(server: HTTPServer, stream: KTLSStream) -> None:
    """HTTP/1.1 with keep-alive: ``/big`` is BODY, ``/small`` two bytes, ``/slow`` never
    answers, ``/sink`` never reads the request."""
    server.connections.append(stream)
    conn = h11.Connection(h11.SERVER)
    while True:
        request = await _next_event(conn, stream)
        if not isinstance(request, h11.Request):
            return  # the client closed the connection
        if request.target == b"/sink":
            await trio.sleep_forever()
        while not isinstance(await _next_event(conn, stream), h11.EndOfMessage):
            pass
        if request.target == b"/slow":
            await trio.sleep_forever()
        body = BODY if request.target == b"/big" else b"ok"
        headers = [("content-length", str(len(body)))]
        await stream.send_all(conn.send(h11.Response(status_code=200, headers=headers)))
        await stream.send_all(conn.send(h11.Data(data=body)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
        if conn.our_state is h11.MUST_CLOSE:
            return
        conn.start_next_cycle()


@asynccontextmanager
async def _http_server(mode: KTLSMode) -> AsyncIterator[HTTPServer]:
    server = HTTPServer()
    context = server_context("TLSv1.3")
    context.set_alpn_protocols(["http/1.1"])  # and not h2, which h11 does not speak
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(
                trio_ktls.serve_ktls_over_tcp,
                partial(_handle, server),
                0,
                context,
                host="127.0.0.1",
                https_compatible=True,
                ktls=mode,
            )
        )
        server.port = listeners[0].transport_listener.socket.getsockname()[1]
        yield server
        nursery.cancel_scope.cancel()


def _client(
    mode: KTLSMode,
    *,
    nursery: trio.Nursery | None = None,
    verify: ssl.SSLContext | None = None,
    timeout: httpx.Timeout | None = None,
) -> httpx.AsyncClient:
    transport = trio_ktls.httpx.KTLSTransport(
        verify=verify or client_context("TLSv1.3"), nursery=nursery, ktls=mode
    )
    return httpx.AsyncClient(transport=transport, timeout=timeout or httpx.Timeout(120))


def _url(server: HTTPServer, path: str) -> str:
    # The certificate names HOSTNAME and 127.0.0.1; httpx checks the name it connects to.
    return f"https://127.0.0.1:{server.port}{path}"


def _assert_offload(info: object, mode: KTLSMode) -> None:
    assert isinstance(info, trio_ktls.KTLSInfo)
    offloaded = mode == "require"
    assert info.tx_offload is info.rx_offload is offloaded, info
    assert (info.reason is None) is offloaded, info


@pytest.mark.parametrize("mode", MODES)
async def test_get_a_large_body(mode: KTLSMode) -> None:
    async with _http_server(mode) as server, _client(mode) as client:
        response = await client.get(_url(server, "/big"))
        assert response.status_code == 200
        assert response.content == BODY
        network_stream = response.extensions["network_stream"]
        _assert_offload(network_stream.get_extra_info("ktls_info"), mode)
        ssl_object = network_stream.get_extra_info("ssl_object")
        assert isinstance(ssl_object, ssl.SSLObject)
        assert ssl_object.version() == "TLSv1.3"
        assert ssl_object.selected_alpn_protocol() == "http/1.1"  # ALPN, as httpcore asks
        assert network_stream.get_extra_info("server_addr") == ("127.0.0.1", server.port)
        sock = network_stream.get_extra_info("socket")
        assert network_stream.get_extra_info("client_addr") == sock.getsockname()
        assert network_stream.get_extra_info("is_readable") is False
        assert network_stream.get_extra_info("nonsense") is None
        (server_stream,) = server.connections
        assert_mode(server_stream, mode)


@pytest.mark.parametrize("mode", MODES)
async def test_keep_alive_reuses_the_connection(mode: KTLSMode) -> None:
    async with _http_server(mode) as server, _client(mode) as client:
        first = await client.get(_url(server, "/small"))
        second = await client.get(_url(server, "/big"))
        assert (first.content, second.content) == (b"ok", BODY)
        assert first.extensions["network_stream"] is second.extensions["network_stream"]
        assert len(server.connections) == 1


@pytest.mark.parametrize("mode", MODES)
async def test_closing_the_client_stops_the_connections_tasks(mode: KTLSMode) -> None:
    """Each offloaded connection has one task (its reader) in the transport's nursery;
    closing the client closes the connections, and their tasks end."""
    async with _http_server(mode) as server, trio.open_nursery() as nursery:
        async with _client(mode, nursery=nursery) as client:
            for _ in range(2):  # two connections at once
                async with client.stream("GET", _url(server, "/big")) as response:
                    async with client.stream("GET", _url(server, "/big")) as other:
                        assert await other.aread() == BODY
                    assert await response.aread() == BODY
            assert len(server.connections) == 2
            assert len(nursery.child_tasks) == (2 if mode == "require" else 0)
        # A stopped task ends at its next scheduling round; one still reading would stay.
        await trio.testing.wait_all_tasks_blocked()
        assert not nursery.child_tasks


@pytest.mark.parametrize("mode", MODES)
async def test_backend_closes_forgotten_connections(mode: KTLSMode) -> None:
    """httpcore on its own: the backend as a context manager owning its nursery. A pool
    that is never closed leaves its connection open; leaving the backend's block closes
    it, so the nursery does not wait for its task."""
    async with _http_server(mode) as server:
        async with trio_ktls.httpcore.KTLSBackend(ktls=mode) as backend:
            pool = httpcore.AsyncConnectionPool(
                ssl_context=client_context("TLSv1.3"), network_backend=backend
            )
            response = await pool.request("GET", _url(server, "/big"))
            assert response.content == BODY
            _assert_offload(
                response.extensions["network_stream"].get_extra_info("ktls_info"), mode
            )
        with pytest.raises(trio.ClosedResourceError):
            await response.extensions["network_stream"].stream.receive_some()


@pytest.mark.parametrize("mode", MODES)
async def test_read_timeout(mode: KTLSMode) -> None:
    timeout = httpx.Timeout(120, read=0.2)
    async with _http_server(mode) as server, _client(mode, timeout=timeout) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.get(_url(server, "/slow"))


# httpcore leaves httpx's request body generator unfinished when a write times out (with
# httpx's own transport too); it is collected below, inside the test, with its warning.
@pytest.mark.filterwarnings("ignore:Async generator 'httpx.*ByteStream:ResourceWarning")
@pytest.mark.parametrize("mode", MODES)
async def test_write_timeout(mode: KTLSMode) -> None:
    """The server never reads the request: sending it blocks once the buffers fill."""
    timeout = httpx.Timeout(120, write=0.2)
    async with _http_server(mode) as server, _client(mode, timeout=timeout) as client:
        with pytest.raises(httpx.WriteTimeout):
            await client.post(_url(server, "/sink"), content=bytes(64 * 1024 * 1024))
    gc.collect()


async def _never_answer(stream: trio.SocketStream) -> None:
    await trio.sleep_forever()


@pytest.mark.parametrize("mode", MODES)
async def test_connect_timeout(mode: KTLSMode) -> None:
    """A server that accepts TCP and never answers the ClientHello."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, _never_answer, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        async with _client(mode, timeout=httpx.Timeout(120, connect=0.2)) as client:
            with pytest.raises(httpx.ConnectTimeout):
                await client.get(f"https://127.0.0.1:{port}/")
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("mode", MODES)
async def test_certificate_failure_is_a_connect_error(mode: KTLSMode) -> None:
    untrusting = ssl.create_default_context()  # knows nothing of the test CA
    async with _http_server(mode) as server, _client(mode, verify=untrusting) as client:
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await client.get(_url(server, "/small"))


@pytest.mark.skipif(kernel_probe().available, reason="this kernel has kTLS")
async def test_require_without_ktls_is_a_connect_error() -> None:
    async with _http_server("off") as server, _client("require") as client:
        with pytest.raises(httpx.ConnectError, match="kTLS"):
            await client.get(_url(server, "/small"))


async def test_arguments_are_checked_before_any_io() -> None:
    with pytest.raises(ValueError, match="ktls must be"):
        trio_ktls.httpx.KTLSTransport(ktls="bogus")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="verify"):
        trio_ktls.httpx.KTLSTransport(verify="/etc/ssl/certs")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="nursery"):
        trio_ktls.httpcore.KTLSBackend(nursery=object())  # type: ignore[arg-type]
    backend = trio_ktls.httpcore.KTLSBackend()
    with pytest.raises(RuntimeError, match="no nursery"):
        await backend.connect_tcp("127.0.0.1", 9)  # not entered: refused before connecting
    async with backend:
        with pytest.raises(RuntimeError, match="already entered"):
            await backend.__aenter__()


@needs_openssl
@pytest.mark.parametrize("mode", MODES)
async def test_get_from_openssl_s_server(tmp_path: Path, mode: KTLSMode) -> None:
    """``openssl s_server -WWW`` serves a file (HTTP/1.0, to the end of the connection);
    httpx fetches it."""
    assert OPENSSL is not None
    pem = server_pem_file(tmp_path)
    (tmp_path / "body.bin").write_bytes(BODY)
    port = free_port()
    args = [OPENSSL, "s_server", "-accept", f"127.0.0.1:{port}", "-WWW",
            "-cert", str(pem), "-key", str(pem), "-quiet"]  # fmt: skip
    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(
                trio.run_process,
                args,
                cwd=tmp_path,
                check=False,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        await (await connect_when_listening(port)).aclose()  # it listens now
        async with _client(mode) as client:
            response = await client.get(f"https://127.0.0.1:{port}/body.bin")
            assert response.status_code == 200
            assert response.content == BODY
            _assert_offload(
                response.extensions["network_stream"].get_extra_info("ktls_info"), mode
            )
        nursery.cancel_scope.cancel()
