"""A peer that ends the TCP connection without close_notify, compared with trio.SSLStream.

Each scenario runs against `trio.SSLStream` first and then against `KTLSStream` (user
space on any host, offloaded in the kernel matrix), and the outcomes must agree where
trio's are well defined:

- the peer closes (a FIN) during the handshake: ``receive_some`` returns ``b""`` with
  ``https_compatible``, raises `trio.BrokenResourceError` without it; ``do_handshake``
  and ``send_all`` raise either way;
- the peer resets during the handshake: an error even with ``https_compatible``;
- the peer closes after the handshake: data first, then ``b""`` with
  ``https_compatible``, an error without it.

One deliberate difference: trio's stream is broken once it has returned that ``b""``,
so its later calls raise; ours keeps returning ``b""`` (a stream's end is for good:
``trio.abc.ReceiveStream.receive_some`` returns ``b""`` if and only if the stream has
reached its end).
"""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from typing import Literal

import pytest
import trio

from trio_ktls import KTLSMode, KTLSStream

from .helpers import HOSTNAME, MODES, client_context, receive_exactly, server_context, tcp_pair

Side = Literal["client", "server"]
Make = Callable[[trio.SocketStream, ssl.SSLContext, dict[str, object]], trio.abc.Stream]
Outcome = bytes | type[BaseException]

# Half a ClientHello record: a header announcing 80 bytes, then 10 of them.
HALF_CLIENT_HELLO = b"\x16\x03\x01\x00\x50" + b"\x01" * 10


def _trio_maker(https_compatible: bool) -> Make:
    def make(
        tcp: trio.SocketStream, ctx: ssl.SSLContext, kw: dict[str, object]
    ) -> trio.abc.Stream:
        return trio.SSLStream(tcp, ctx, https_compatible=https_compatible, **kw)  # type: ignore[arg-type]

    return make


def _ktls_maker(nursery: trio.Nursery, https_compatible: bool, mode: KTLSMode) -> Make:
    def make(
        tcp: trio.SocketStream, ctx: ssl.SSLContext, kw: dict[str, object]
    ) -> trio.abc.Stream:
        return KTLSStream(
            tcp,
            ctx,
            nursery=nursery,
            https_compatible=https_compatible,
            ktls=mode,
            **kw,  # type: ignore[arg-type]
        )

    return make


def _context_and_args(side: Side) -> tuple[ssl.SSLContext, dict[str, object]]:
    if side == "client":
        return client_context("TLSv1.3"), {"server_hostname": HOSTNAME}
    return server_context("TLSv1.3"), {"server_side": True}


async def _outcome(operation: Callable[[], Awaitable[object]]) -> Outcome:
    """What one call did: the bytes it returned, or the class of what it raised."""
    try:
        result = await operation()
    except Exception as exc:
        return type(exc)
    return bytes(result) if isinstance(result, bytes | bytearray) else b"<none>"


def _reset(tcp: trio.SocketStream) -> None:
    """Make closing ``tcp`` send a reset (SO_LINGER with a zero timeout)."""
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def _closed_mid_handshake(
    make: Make, side: Side, how: Literal["fin", "reset"], first: str
) -> list[Outcome]:
    """The peer ends the connection before the handshake is done; then ``first``
    (``receive_some`` or ``do_handshake``), ``receive_some`` and ``send_all``."""
    ours, theirs = await tcp_pair()
    ctx, kw = _context_and_args(side)
    stream = make(ours, ctx, kw)
    if side == "server":  # a client that gives up halfway through its ClientHello
        await theirs.send_all(HALF_CLIENT_HELLO)
    if how == "reset":
        _reset(theirs)
    await theirs.aclose()
    operations: dict[str, Callable[[], Awaitable[object]]] = {
        "receive_some": stream.receive_some,
        "do_handshake": stream.do_handshake,  # type: ignore[attr-defined]
    }
    outcomes = [await _outcome(operations[first])]
    outcomes.append(await _outcome(stream.receive_some))
    outcomes.append(await _outcome(lambda: stream.send_all(b"x")))
    await stream.aclose()
    return outcomes


@pytest.mark.parametrize("side", ["client", "server"])
@pytest.mark.parametrize("https_compatible", [False, True])
@pytest.mark.parametrize("mode", MODES)
async def test_fin_during_the_handshake(
    mode: KTLSMode, https_compatible: bool, side: Side
) -> None:
    async with trio.open_nursery() as nursery:
        with trio.fail_after(60):
            trio_first = (
                await _closed_mid_handshake(
                    _trio_maker(https_compatible), side, "fin", "receive_some"
                )
            )[0]
            ours = await _closed_mid_handshake(
                _ktls_maker(nursery, https_compatible, mode), side, "fin", "receive_some"
            )
    assert ours[0] == trio_first
    if https_compatible:
        # The end of stream, and it stays the end (trio's second call raises).
        assert ours == [b"", b"", trio.BrokenResourceError]
    else:
        assert ours == [trio.BrokenResourceError] * 3


@pytest.mark.parametrize("https_compatible", [False, True])
@pytest.mark.parametrize("mode", MODES)
async def test_do_handshake_raises_at_a_fin_during_the_handshake(
    mode: KTLSMode, https_compatible: bool
) -> None:
    """do_handshake raises even with https_compatible, as trio's does; receive_some is
    then the end of stream there (trio's raises: its stream is broken by then)."""
    async with trio.open_nursery() as nursery:
        with trio.fail_after(60):
            theirs = await _closed_mid_handshake(
                _trio_maker(https_compatible), "client", "fin", "do_handshake"
            )
            ours = await _closed_mid_handshake(
                _ktls_maker(nursery, https_compatible, mode), "client", "fin", "do_handshake"
            )
    assert ours[0] == theirs[0] == trio.BrokenResourceError
    assert ours[1] == (b"" if https_compatible else trio.BrokenResourceError)
    assert ours[2] == theirs[2] == trio.BrokenResourceError


@pytest.mark.parametrize("side", ["client", "server"])
@pytest.mark.parametrize("mode", MODES)
async def test_reset_during_the_handshake_is_an_error_even_https_compatible(
    mode: KTLSMode, side: Side
) -> None:
    async with trio.open_nursery() as nursery:
        with trio.fail_after(60):
            theirs = await _closed_mid_handshake(_trio_maker(True), side, "reset", "receive_some")
            ours = await _closed_mid_handshake(
                _ktls_maker(nursery, True, mode), side, "reset", "receive_some"
            )
    assert ours[0] == theirs[0] == trio.BrokenResourceError
    assert ours == [trio.BrokenResourceError] * 3


async def _closed_after_the_handshake(make: Make, side: Side) -> list[Outcome]:
    """The peer (trio.SSLStream) sends data, then a FIN without close_notify."""
    ours, theirs = await tcp_pair()
    ctx, kw = _context_and_args(side)
    stream = make(ours, ctx, kw)
    peer_side: Side = "server" if side == "client" else "client"
    peer_ctx, peer_kw = _context_and_args(peer_side)
    peer = _trio_maker(True)(theirs, peer_ctx, peer_kw)
    assert isinstance(peer, trio.SSLStream)
    async with trio.open_nursery() as handshakes:
        handshakes.start_soon(stream.do_handshake)  # type: ignore[attr-defined]
        handshakes.start_soon(peer.do_handshake)
    await peer.send_all(b"data")
    # A FIN, and the socket kept open: closing it with our session tickets unread (a
    # KTLSStream server sends them at once) would be a reset.
    await theirs.send_eof()
    outcomes: list[Outcome] = [await receive_exactly(stream, 4)]
    outcomes.append(await _outcome(stream.receive_some))
    outcomes.append(await _outcome(stream.receive_some))
    await stream.aclose()
    await theirs.aclose()
    return outcomes


@pytest.mark.parametrize("side", ["client", "server"])
@pytest.mark.parametrize("https_compatible", [False, True])
@pytest.mark.parametrize("mode", MODES)
async def test_fin_after_the_handshake(mode: KTLSMode, https_compatible: bool, side: Side) -> None:
    async with trio.open_nursery() as nursery:
        with trio.fail_after(60):
            theirs = await _closed_after_the_handshake(_trio_maker(https_compatible), side)
            ours = await _closed_after_the_handshake(
                _ktls_maker(nursery, https_compatible, mode), side
            )
    assert ours[:2] == theirs[:2]
    if https_compatible:
        assert ours == [b"data", b"", b""]  # trio's third call raises
    else:
        assert ours == [b"data", trio.BrokenResourceError, trio.BrokenResourceError]
