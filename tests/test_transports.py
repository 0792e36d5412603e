"""KTLSStream over transports that are not TCP sockets: memory streams, TLS inside TLS.

The kernel can only take a TCP socket's records, so over anything else ``ktls="auto"``
runs in user space (saying why) and ``ktls="require"`` refuses; trio's own SSLStream test
ideas (memory-stream pairs, lockstep "clogged" pairs, TLS over TLS) then apply.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

import trio_ktls
from trio_ktls import KTLSStream, KTLSUnavailableError

from .helpers import (
    HOSTNAME,
    MODES,
    VERSIONS,
    assert_mode,
    client_context,
    ktls_pair_maker,
    receive_exactly,
    server_context,
)

TransportPair = Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]]


def _tls_over(
    nursery: trio.Nursery,
    make_transports: TransportPair,
    version: str = "TLSv1.3",
    *,
    tickets: bool = True,
) -> Callable[[], Awaitable[tuple[KTLSStream, KTLSStream]]]:
    """A maker of handshaken TLS pairs over ``make_transports``' pairs. Over lockstep
    ("clogged") pairs the server sends no TLS 1.3 tickets (``tickets=False``): they would
    block its last handshake send until the client reads, as with trio.SSLStream.
    """

    async def make() -> tuple[KTLSStream, KTLSStream]:
        left, right = make_transports()
        client = KTLSStream(
            left, client_context(version), nursery=nursery, server_hostname=HOSTNAME
        )
        server_ctx = server_context(version)
        if not tickets:
            server_ctx.num_tickets = 0
        server = KTLSStream(right, server_ctx, nursery=nursery, server_side=True)
        async with trio.open_nursery() as hs:
            hs.start_soon(client.do_handshake)
            hs.start_soon(server.do_handshake)
        return client, server

    return make


@pytest.mark.parametrize("version", VERSIONS)
async def test_two_way_conformance_over_memory_streams(version: str) -> None:
    async with trio.open_nursery() as nursery:
        await trio.testing.check_two_way_stream(
            _tls_over(nursery, trio.testing.memory_stream_pair, version),
            _tls_over(nursery, trio.testing.lockstep_stream_pair, version, tickets=False),
        )
        nursery.cancel_scope.cancel()


async def test_half_closeable_conformance_over_memory_streams() -> None:
    async with trio.open_nursery() as nursery:
        await trio.testing.check_half_closeable_stream(
            _tls_over(nursery, trio.testing.memory_stream_pair),
            _tls_over(nursery, trio.testing.lockstep_stream_pair, tickets=False),
        )
        nursery.cancel_scope.cancel()


async def test_auto_over_a_memory_stream_runs_in_user_space_and_says_why() -> None:
    async with trio.open_nursery() as nursery:
        client, server = await _tls_over(nursery, trio.testing.memory_stream_pair)()
        for stream in (client, server):
            info = stream.ktls_info
            assert info is not None
            assert not info.tx_offload and not info.rx_offload
            assert info.reason is not None
            assert "StapledStream, not a TCP socket" in info.reason
        await client.send_all(b"hello")
        assert await receive_exactly(server, 5) == b"hello"
        await client.aclose()
        await server.aclose()


async def test_require_over_a_memory_stream_is_refused() -> None:
    left, right = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        client = KTLSStream(
            left, client_context("TLSv1.3"), nursery=nursery, server_hostname=HOSTNAME,
            ktls="require",
        )  # fmt: skip
        with pytest.raises(KTLSUnavailableError, match="not a TCP socket") as excinfo:
            await client.do_handshake()
        assert "StapledStream" in excinfo.value.reason
        assert right.receive_stream.receive_some_hook is None  # nothing sent
        await client.aclose()


@pytest.mark.parametrize("mode", MODES)
async def test_tls_over_tls(mode: trio_ktls.KTLSMode) -> None:
    """An inner TLS connection over an outer one (kernel or user space, by ``mode``);
    the inner one is necessarily in user space. trio's conformance suite runs on it."""
    async with trio.open_nursery() as nursery:
        outer_make = ktls_pair_maker(nursery, "TLSv1.3", mode)

        async def make() -> tuple[KTLSStream, KTLSStream]:
            outer_client, outer_server = await outer_make()
            assert_mode(outer_client, mode)
            inner_client = KTLSStream(
                outer_client, client_context("TLSv1.2"), nursery=nursery,
                server_hostname=HOSTNAME,
            )  # fmt: skip
            inner_server = KTLSStream(
                outer_server, server_context("TLSv1.2"), nursery=nursery, server_side=True
            )
            async with trio.open_nursery() as hs:
                hs.start_soon(inner_client.do_handshake)
                hs.start_soon(inner_server.do_handshake)
            info = inner_client.ktls_info
            assert info is not None and info.version == "TLSv1.2"
            assert info.reason is not None and "KTLSStream, not a TCP socket" in info.reason
            return inner_client, inner_server

        await trio.testing.check_half_closeable_stream(make, None)
        nursery.cancel_scope.cancel()


async def test_over_trio_ssl_stream() -> None:
    """TLS inside trio.SSLStream, which cannot half-close: send_eof still works with
    close_notify alone, and with https_compatible (no close_notify to send) it is a
    TypeError before anything is sent."""
    async with trio.open_nursery() as nursery:
        left, right = trio.testing.memory_stream_pair()
        outer_client = trio.SSLStream(left, client_context("TLSv1.3"), server_hostname=HOSTNAME)
        outer_server = trio.SSLStream(right, server_context("TLSv1.3"), server_side=True)

        def outer() -> tuple[trio.abc.Stream, trio.abc.Stream]:
            return outer_client, outer_server

        client, server = await _tls_over(nursery, outer)()
        await client.send_all(b"inner")
        assert await receive_exactly(server, 5) == b"inner"
        await client.send_eof()  # close_notify
        assert await server.receive_some() == b""
        await server.send_all(b"reply")
        assert await receive_exactly(client, 5) == b"reply"

        https = KTLSStream(
            outer_client, client_context("TLSv1.3"), nursery=nursery, https_compatible=True
        )
        with pytest.raises(TypeError, match="half-close"):
            await https.send_eof()
        nursery.cancel_scope.cancel()
