"""The transmit side of an offloaded stream (``_writer``)."""

from __future__ import annotations

import socket

import pytest
import trio

from trio_ktls import KTLSMode
from trio_ktls._writer import NOTSENT_LOWAT

from .helpers import MODES, ktls_pair_maker, receive_exactly

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
