"""The transmit side of an offloaded stream (``_writer``)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import trio

from trio_ktls import KTLSMode
from trio_ktls._keys import RecordBudget, TrafficKeys
from trio_ktls._writer import NOTSENT_LOWAT, KernelWriter

from .helpers import MODES, ktls_pair_maker, receive_exactly, tcp_pair

#: What trio's SocketStream sets.
TRIO_LOWAT = 16 * 1024


@pytest.mark.parametrize("mode", MODES)
async def test_the_handoff_raises_trios_low_water_mark(mode: KTLSMode) -> None:
    """Offloaded, TCP_NOTSENT_LOWAT goes from trio's 16 KiB (one record) to 256 KiB, and
    a bulk send_all still arrives whole; user space keeps trio's."""
    async with trio.open_nursery() as nursery:
        client, server = await ktls_pair_maker(nursery, "TLSv1.3", mode)()
        expected = NOTSENT_LOWAT if mode == "require" else TRIO_LOWAT
        for stream in (client, server):
            transport = stream.transport_stream
            assert isinstance(transport, trio.SocketStream)
            lowat = transport.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)
            assert lowat == expected
        payload = bytes(range(256)) * 8192  # 2 MiB
        async with trio.open_nursery() as io:
            io.start_soon(client.send_all, payload)
            assert await receive_exactly(server, len(payload)) == payload
        await trio.aclose_forcefully(client)
        await trio.aclose_forcefully(server)


async def test_a_cancelled_send_file_turn_raises_plain_cancelled(tmp_path: Path) -> None:
    """The zero-copy loop's worker thread, on a plain TCP socket (sendfile needs no kTLS):
    cancelled while the thread waits for a peer that reads nothing, it returns, the
    caller sees `trio.Cancelled` itself (the stream's ``except trio.Cancelled`` marks a
    write cancelled midway; an exception group would slip past it), and trio's
    low-water mark is back."""
    path = tmp_path / "payload"
    path.write_bytes(os.urandom(32 * 1024 * 1024))  # more than loopback buffers hold
    client, server = await tcp_pair()
    sock = server.socket
    lowat = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)
    budget = RecordBudget(None, first_seq=0, read_exact=lambda: 0)
    writer = KernelWriter(sock, TrafficKeys.__new__(TrafficKeys), budget)  # keys unused
    caught: BaseException | None = None
    with path.open("rb") as f, trio.move_on_after(1):
        try:
            async with writer.lock:
                await writer.send_file(f.fileno(), 0, 32 * 1024 * 1024)
        except BaseException as exc:
            caught = exc
            raise
    assert isinstance(caught, trio.Cancelled)
    assert budget.bound > 0  # what the thread sent was counted
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == lowat
    await client.aclose()
    await server.aclose()
