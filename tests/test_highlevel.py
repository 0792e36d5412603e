"""wrap_stream, open_ktls_stream, serve_ktls_over_tcp; ALPN, SNI, client certificates,
handshake timeouts, and data that races the handoff."""

from __future__ import annotations

import logging
import ssl

import pytest
import trio

import trio_ktls
from trio_ktls import KTLSMode, KTLSStream

from .helpers import CA, HOSTNAME, MODES, assert_mode, client_context, server_context, tcp_pair


@pytest.mark.parametrize("mode", MODES)
async def test_serve_and_open_with_alpn_sni_and_client_certificate(mode: KTLSMode) -> None:
    server_ctx = server_context("TLSv1.3")
    server_ctx.set_alpn_protocols(["h2", "http/1.1"])
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    CA.configure_trust(server_ctx)
    seen_sni: list[str | None] = []
    server_ctx.sni_callback = lambda obj, name, ctx: seen_sni.append(name)
    client_ctx = client_context("TLSv1.3")
    client_ctx.set_alpn_protocols(["http/1.1"])
    CA.issue_cert("client@trio-ktls.example").configure_cert(client_ctx)
    server_views: list[tuple[str | None, object]] = []

    async def handler(stream: KTLSStream) -> None:
        assert_mode(stream, mode)
        server_views.append((stream.selected_alpn_protocol(), stream.getpeercert()))
        await stream.send_all(b"hello " + await stream.receive_some())

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio_ktls.serve_ktls_over_tcp, handler, 0, server_ctx)
        assert isinstance(listeners[0], trio_ktls.KTLSListener)
        port = _port(listeners[0])
        async with trio_ktls.open_ktls_stream(
            "127.0.0.1", port, ssl_context=client_ctx, server_hostname=HOSTNAME, ktls=mode
        ) as client:
            assert_mode(client, mode)
            assert client.selected_alpn_protocol() == "http/1.1"
            await client.send_all(b"world")
            assert await client.receive_some() == b"hello world"
            assert await client.receive_some() == b""  # handler returned: close_notify
        nursery.cancel_scope.cancel()
    assert seen_sni == [HOSTNAME]
    [(alpn, peercert)] = server_views
    assert alpn == "http/1.1"
    assert isinstance(peercert, dict)
    assert peercert["subjectAltName"] == (("email", "client@trio-ktls.example"),)


@pytest.mark.parametrize("mode", MODES)
async def test_handshake_timeout_drops_only_that_connection(
    mode: KTLSMode, caplog: pytest.LogCaptureFixture
) -> None:
    async def handler(stream: KTLSStream) -> None:
        await stream.send_all(b"served")

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            lambda task_status: trio_ktls.serve_ktls_over_tcp(
                handler, 0, server_context("TLSv1.3"), host="127.0.0.1",
                handshake_timeout=10, ktls=mode, task_status=task_status,
            )
        )  # fmt: skip
        port = _port(listeners[0])
        silent = await trio.open_tcp_stream("127.0.0.1", port)  # never says hello
        with caplog.at_level(logging.WARNING, logger="trio_ktls"):
            assert await silent.receive_some() == b""  # the server gave up on it
        assert "timed out" in caplog.text
        async with trio_ktls.open_ktls_stream(
            "127.0.0.1", port, ssl_context=client_context("TLSv1.3"),
            server_hostname=HOSTNAME, ktls=mode,
        ) as client:  # fmt: skip
            assert await client.receive_some() == b"served"
        await silent.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
@pytest.mark.parametrize("mode", MODES)
async def test_peer_writes_right_after_its_handshake(version: str, mode: KTLSMode) -> None:
    """A trio.SSLStream server writes data as soon as its handshake ends, so the data
    travels with (TLS 1.3) the session tickets; a client that writes at once likewise
    races our server's handoff. Nothing is lost or reordered."""
    client_tcp, server_tcp = await tcp_pair()
    peer_server = trio.SSLStream(server_tcp, server_context(version), server_side=True)
    async with trio.open_nursery() as nursery:

        async def eager_server() -> None:
            await peer_server.do_handshake()
            await peer_server.send_all(b"first" * 1000)
            await peer_server.send_all(b"second")
            assert await peer_server.receive_some() == b"ack"
            await peer_server.aclose()

        nursery.start_soon(eager_server)
        async with trio_ktls.wrap_stream(
            client_tcp, client_context(version), server_hostname=HOSTNAME, ktls=mode
        ) as client:
            assert_mode(client, mode)
            received = bytearray()
            while len(received) < 5006:
                received += await client.receive_some()
            assert received == b"first" * 1000 + b"second"
            await client.send_all(b"ack")
            assert await client.receive_some() == b""

    client_tcp, server_tcp = await tcp_pair()
    peer_client = trio.SSLStream(client_tcp, client_context(version), server_hostname=HOSTNAME)
    async with trio.open_nursery() as nursery:

        async def eager_client() -> None:
            await peer_client.do_handshake()
            await peer_client.send_all(b"hurry")
            assert await peer_client.receive_some() == b"ok"
            await peer_client.aclose()

        nursery.start_soon(eager_client)
        async with trio_ktls.wrap_stream(
            server_tcp, server_context(version), server_side=True, ktls=mode
        ) as server:
            assert_mode(server, mode)
            assert await server.receive_some() == b"hurry"
            await server.send_all(b"ok")


async def test_wrap_stream_propagates_body_errors_unwrapped() -> None:
    client_tcp, server_tcp = await tcp_pair()
    peer = trio.SSLStream(server_tcp, server_context("TLSv1.3"), server_side=True)

    async def serve_then_close() -> None:
        async with peer:
            await peer.do_handshake()
            assert await peer.receive_some() == b""

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_then_close)
        with pytest.raises(KeyError, match="boom"):
            async with trio_ktls.wrap_stream(
                client_tcp, client_context("TLSv1.3"), server_hostname=HOSTNAME
            ):
                raise KeyError("boom")


def _port(listener: trio_ktls.KTLSListener) -> int:
    transport = listener.transport_listener
    assert isinstance(transport, trio.SocketListener)
    port: int = transport.socket.getsockname()[1]
    return port
