"""The user-space handshake: whole records for OpenSSL, and a flight read in two calls."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.lowlevel

from trio_ktls import KTLSMode, KTLSStream
from trio_ktls._handshake import _whole_records

from .helpers import (
    HOSTNAME,
    MODES,
    assert_mode,
    client_context,
    receive_exactly,
    server_context,
    tcp_pair,
)


def _record(content_type: int, body: bytes) -> bytes:
    return bytes([content_type, 3, 3]) + len(body).to_bytes(2, "big") + body


def test_whole_records_stop_at_the_first_partial_one() -> None:
    first, second = _record(22, b"hello"), _record(20, b"\x01")
    assert _whole_records(first + second + first[:7]) == [first, second]
    assert _whole_records(first[:4]) == []
    assert _whole_records(b"") == []


def test_a_bad_record_header_breaks_the_handshake() -> None:
    with pytest.raises(trio.BrokenResourceError, match="unknown content type 99"):
        _whole_records(_record(22, b"x") + _record(99, b"y"))


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
@pytest.mark.parametrize("mode", MODES)
async def test_a_flight_is_peeked_not_read_record_by_record(
    monkeypatch: pytest.MonkeyPatch, version: str, mode: KTLSMode
) -> None:
    """Over a socket the handshake reads whole flights (a peek and one read), so the
    transport's ``receive_some`` (one record, in two calls, on the old path) is not used
    for whole records."""
    client_tcp, server_tcp = await tcp_pair()
    calls = {id(client_tcp): 0, id(server_tcp): 0}
    original: Callable[..., Awaitable[bytes]] = trio.SocketStream.receive_some

    async def counting(self: trio.SocketStream, *args: Any) -> bytes:
        if id(self) in calls:
            calls[id(self)] += 1
        return await original(self, *args)

    monkeypatch.setattr(trio.SocketStream, "receive_some", counting)
    async with trio.open_nursery() as nursery:
        client = KTLSStream(
            client_tcp,
            client_context(version),
            nursery=nursery,
            server_hostname=HOSTNAME,
            ktls=mode,
        )
        server = KTLSStream(
            server_tcp, server_context(version), nursery=nursery, server_side=True, ktls=mode
        )
        async with trio.open_nursery() as hs:
            hs.start_soon(client.do_handshake)
            hs.start_soon(server.do_handshake)
        for stream, tcp in ((client, client_tcp), (server, server_tcp)):
            assert stream.ktls_info is not None
            assert stream.ktls_info.handoff is not None
            received = [r for r in stream.ktls_info.handoff.records if not r.sent]
            # Record by record that was two calls per record; a flight that arrived in
            # pieces may still take one record outright, but never most of them.
            assert calls[id(tcp)] < len(received), (calls[id(tcp)], len(received))
            assert_mode(stream, mode)
        await client.send_all(b"ping")
        assert await receive_exactly(server, 4) == b"ping"
        for stream in (client, server):
            await trio.aclose_forcefully(stream)


class _Trickle(trio.abc.Stream):
    """Sends one byte per write, so every record reaches the peer in pieces."""

    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        for i in range(len(data)):
            await self.inner.send_all(bytes(data[i : i + 1]))
            await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
@pytest.mark.parametrize("mode", MODES)
async def test_records_arriving_in_pieces(version: str, mode: KTLSMode) -> None:
    """A peer whose records come a byte at a time: a peek never holds a whole record, so
    each is read outright, and the stream still offloads where it can."""
    client_tcp, server_tcp = await tcp_pair()
    client = trio.SSLStream(
        _Trickle(client_tcp), client_context(version), server_hostname=HOSTNAME
    )
    async with trio.open_nursery() as nursery:
        server = KTLSStream(
            server_tcp, server_context(version), nursery=nursery, server_side=True, ktls=mode
        )
        with trio.fail_after(120):
            async with trio.open_nursery() as hs:
                hs.start_soon(client.do_handshake)
                hs.start_soon(server.do_handshake)
            assert_mode(server, mode)
            await client.send_all(b"ping")
            assert await receive_exactly(server, 4) == b"ping"
            await server.send_all(b"pong")
            assert await receive_exactly(client, 4) == b"pong"
        await trio.aclose_forcefully(client)
        await trio.aclose_forcefully(server)
