"""wrap_stream, open_ktls_stream, open_ktls_over_tcp_stream,
open_ktls_over_tcp_listeners, serve_ktls_over_tcp (trio's helpers' counterparts,
argument by argument); ALPN, SNI, client certificates,
handshake timeouts, and data that races the handoff."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import pytest
import trio

import trio_ktls
from trio_ktls import KTLSMode, KTLSStream

from .helpers import (
    CA,
    HOSTNAME,
    MODES,
    assert_mode,
    client_context,
    ktls_pair_maker,
    server_context,
    tcp_pair,
)


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
        with caplog.at_level(logging.INFO, logger="trio_ktls"):
            assert await silent.receive_some() == b""  # the server gave up on it
        [record] = [r for r in caplog.records if "timed out" in r.getMessage()]
        assert record.levelno == logging.INFO
        assert str(silent.socket.getsockname()) in record.getMessage()
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


# -- trio's helpers, one by one ---------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_open_ktls_over_tcp_stream_handshakes_on_first_use(mode: KTLSMode) -> None:
    """Like trio.open_ssl_over_tcp_stream: awaitable, returns the stream unhandshaken,
    checks the certificate against ``host``; the session idiom resumes."""
    client_ctx = client_context("TLSv1.3")

    async def handler(stream: KTLSStream) -> None:
        await stream.send_all(b"hi")
        await stream.receive_some()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio_ktls.serve_ktls_over_tcp, handler, 0, server_context("TLSv1.3"),
                    host="127.0.0.1", ktls=mode)
        )  # fmt: skip
        saved = None
        for attempt in range(2):
            stream = await trio_ktls.open_ktls_over_tcp_stream(
                "127.0.0.1", _port(listeners[0]), nursery=nursery, ssl_context=client_ctx,
                happy_eyeballs_delay=None, ktls=mode,
            )  # fmt: skip
            assert stream.ktls_info is None
            assert stream.server_hostname == "127.0.0.1"
            if saved is not None:
                stream.session = saved
            assert await stream.receive_some() == b"hi"
            assert_mode(stream, mode)
            assert stream.session_reused is (attempt == 1)
            saved = stream.session
            await stream.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("mode", MODES)
async def test_open_ktls_over_tcp_listeners(mode: KTLSMode) -> None:
    async with trio.open_nursery() as nursery:
        listeners = await trio_ktls.open_ktls_over_tcp_listeners(
            0, server_context("TLSv1.3"), nursery=nursery, host="127.0.0.1", backlog=5,
            ktls=mode,
        )  # fmt: skip
        [listener] = listeners
        assert isinstance(listener, trio_ktls.KTLSListener)
        client_tcp = await trio.open_tcp_stream("127.0.0.1", _port(listener))
        server = await listener.accept()
        assert server.ktls_info is None  # not handshaken: accept never waits for a client
        client = KTLSStream(
            client_tcp, client_context("TLSv1.3"), nursery=nursery, server_hostname=HOSTNAME,
            ktls=mode,
        )  # fmt: skip
        async with trio.open_nursery() as both:  # both ends handshake on first use
            both.start_soon(client.send_all, b"ping")
            assert await server.receive_some() == b"ping"
        assert_mode(server, mode)
        await client.aclose()
        await server.aclose()
        await listener.aclose()


async def test_serve_runs_handlers_in_handler_nursery() -> None:
    """trio's meaning: handlers run in ``handler_nursery``, so they outlive the server."""
    parents: list[trio.Nursery | None] = []
    release = trio.Event()

    async def handler(stream: KTLSStream) -> None:
        parents.append(trio.lowlevel.current_task().parent_nursery)
        await stream.send_all(b"x")
        await release.wait()
        await stream.send_all(b"still here")

    async with trio.open_nursery() as handler_nursery:
        async with trio.open_nursery() as server_nursery:
            listeners = await server_nursery.start(
                partial(trio_ktls.serve_ktls_over_tcp, handler, 0, server_context("TLSv1.3"),
                        host="127.0.0.1", handler_nursery=handler_nursery)
            )  # fmt: skip
            client = await trio_ktls.open_ktls_over_tcp_stream(
                "127.0.0.1", _port(listeners[0]), nursery=handler_nursery,
                ssl_context=client_context("TLSv1.3"),
            )  # fmt: skip
            assert await client.receive_some() == b"x"
            server_nursery.cancel_scope.cancel()  # the server stops; the handler goes on
        release.set()
        assert await client.receive_some() == b"still here"
        await client.aclose()
    assert parents == [handler_nursery]


def test_default_context_matches_trios() -> None:
    from trio_ktls._highlevel import _client_context

    ours = _client_context(None)
    theirs = ssl.create_default_context()
    if hasattr(ssl, "OP_IGNORE_UNEXPECTED_EOF"):
        assert not ours.options & ssl.OP_IGNORE_UNEXPECTED_EOF
        theirs.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF  # what trio's helper does
    assert ours.options == theirs.options
    assert ours.verify_mode == ssl.CERT_REQUIRED and ours.check_hostname


async def _open_and_close(**kwargs: Any) -> None:
    async with trio_ktls.open_ktls_stream("127.0.0.1", 1, **kwargs):
        raise AssertionError("unreachable: nothing listens on port 1")


async def _in_a_nursery(call: Callable[[trio.Nursery], Awaitable[object]]) -> None:
    """Run ``call`` with a nursery to give it; its error comes out as itself (the
    nursery would wrap it in a group: that would be the test's doing, not the API's)."""
    error: Exception | None = None
    async with trio.open_nursery() as nursery:
        try:
            await call(nursery)
        except Exception as exc:
            error = exc
    if error is not None:
        raise error


async def _open_over_tcp(**kwargs: Any) -> None:
    async def call(nursery: trio.Nursery) -> None:
        kwargs.setdefault("nursery", nursery)
        await trio_ktls.open_ktls_over_tcp_stream("127.0.0.1", 1, **kwargs)

    await _in_a_nursery(call)


async def _listen(**kwargs: Any) -> None:
    async def call(nursery: trio.Nursery) -> None:
        kwargs.setdefault("nursery", nursery)
        kwargs.setdefault("ssl_context", server_context("TLSv1.3"))
        await trio_ktls.open_ktls_over_tcp_listeners(0, host="127.0.0.1", **kwargs)

    await _in_a_nursery(call)


async def _serve(**kwargs: Any) -> None:
    context = kwargs.pop("ssl_context", server_context("TLSv1.3"))

    async def handler(stream: KTLSStream) -> None:
        raise AssertionError("unreachable")

    await trio_ktls.serve_ktls_over_tcp(handler, 0, context, host="127.0.0.1", **kwargs)


BAD_ARGUMENTS = [
    pytest.param({"ktls": "bogus"}, ValueError, id="ktls"),
    pytest.param({"handshake_timeout": -1}, ValueError, id="handshake_timeout"),
    pytest.param({"ssl_context": object()}, TypeError, id="ssl_context"),
]


@pytest.mark.parametrize(("kwargs", "error"), BAD_ARGUMENTS)
@pytest.mark.parametrize("way_in", [_open_and_close, _open_over_tcp, _listen, _serve])
async def test_bad_arguments_raise_before_any_io(
    way_in: Callable[..., Awaitable[None]], kwargs: dict[str, Any], error: type[Exception]
) -> None:
    """A plain ValueError/TypeError (not an ExceptionGroup, not a connection error from
    port 1), with nothing leaked (filterwarnings=error turns a ResourceWarning into a
    failure)."""
    with pytest.raises(error):
        await way_in(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"happy_eyeballs_delay": -1}, ValueError),
        ({"happy_eyeballs_delay": "soon"}, TypeError),
        ({"nursery": object()}, TypeError),
    ],
)
async def test_bad_connect_arguments_raise_before_any_io(
    kwargs: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        await _open_over_tcp(**kwargs)
    if "happy_eyeballs_delay" in kwargs:
        with pytest.raises(error):
            await _open_and_close(**kwargs)


async def test_listener_nursery_is_checked() -> None:
    with pytest.raises(TypeError, match="nursery"):
        await _listen(nursery=object())


# -- logs -------------------------------------------------------------------------------


async def test_a_port_scanner_is_logged_at_debug_with_its_address(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Connect and close without a byte: one DEBUG line naming the peer as it was at
    accept time, and nothing at WARNING."""

    async def handler(stream: KTLSStream) -> None:
        raise AssertionError("unreachable")

    with caplog.at_level(logging.DEBUG, logger="trio_ktls"):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                partial(trio_ktls.serve_ktls_over_tcp, handler, 0, server_context("TLSv1.3"),
                        host="127.0.0.1")
            )  # fmt: skip
            scanner = await trio.open_tcp_stream("127.0.0.1", _port(listeners[0]))
            address = str(scanner.socket.getsockname())
            await scanner.aclose()
            with trio.fail_after(10):
                # The line comes from the server's task, seen only through caplog.
                while not any("handshake" in r.getMessage() for r in caplog.records):  # noqa: ASYNC110
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    [record] = [r for r in caplog.records if "handshake" in r.getMessage()]
    assert record.levelno == logging.DEBUG
    assert address in record.getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("mode", MODES)
async def test_the_offload_decision_is_logged_at_debug(
    mode: KTLSMode, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="trio_ktls"):
        async with trio.open_nursery() as nursery:
            client, server = await ktls_pair_maker(nursery, "TLSv1.3", mode)()
            transport = client.transport_stream
            assert isinstance(transport, trio.SocketStream)
            address = str(transport.socket.getsockname())
            await client.aclose()
            await server.aclose()
    lines = [r for r in caplog.records if "TLSv1.3" in r.getMessage()]
    assert len(lines) == 2
    assert all(r.levelno == logging.DEBUG for r in lines)
    if mode == "require":
        assert all("offloaded to the kernel" in r.getMessage() for r in lines)
    else:
        assert all("stays in user space: kTLS is switched off" in r.getMessage() for r in lines)
    assert any(address in r.getMessage() for r in lines)  # the server's line names us
