"""The user-space handshake, one record at a time, so the kernel can take over after it.

Theory of operation
-------------------
The user's ``ssl.SSLContext`` drives an ``ssl.SSLObject`` over two ``MemoryBIO``\\s,
exactly like ``trio.SSLStream``, with two differences:

- The socket is read *one record at a time*: OpenSSL gets one whole record (the 5-byte
  header, RFC 8446 §5.1, and exactly the body it announces) per ``do_handshake()`` call.
  When OpenSSL says the handshake is done, no byte the peer sent after its last
  handshake record sits in user space, so the kernel, once it has the keys, reads the
  next record from its first byte. (Records the peer sends right after its Finished stay
  queued in the socket; the kernel decrypts them.)
- Over a socket, a flight costs two reads, not two per record: the handshake *peeks*
  at everything queued (``MSG_PEEK``), hands OpenSSL the whole records it finds one at a
  time, and then takes from the socket exactly the bytes of the records OpenSSL got. A
  TLS 1.3 server flight (ServerHello, ChangeCipherSpec, then four protected records from
  OpenSSL) is six records: twelve reads and scheduling rounds record by record, two here.
  A peek that holds no whole record falls back to reading one record outright, so a
  record that arrives in pieces never makes the loop spin on a readable socket.
- Every record both ways is shown to the `HandshakeObserver` (``_handoff``), which picks
  out the client and server randoms and counts the protected records of our last flush:
  the key log is matched by client_random, and a TLS 1.3 server's first transmit sequence
  number is the number of tickets it just sent.

A failed handshake sends OpenSSL's alert (best effort) before raising; the caller turns
the failure into a broken stream.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from typing import Final

import trio

from ._errors import TLSDecodeError
from ._handoff import HandshakeObserver
from ._messages import RECORD_HEADER_LENGTH, parse_record_header

#: The most a peek at the queued handshake records takes (a flight is usually far less).
_PEEK_SIZE: Final = 64 * 1024


def _whole_records(queued: bytes) -> list[bytes]:
    """The whole records at the start of ``queued``; a record header that cannot be
    right breaks the handshake, as in `Handshake._receive_record`."""
    records = []
    start = 0
    while len(queued) - start >= RECORD_HEADER_LENGTH:
        try:
            length = parse_record_header(queued[start : start + RECORD_HEADER_LENGTH]).length
        except TLSDecodeError as exc:
            raise trio.BrokenResourceError(f"TLS handshake failed: {exc}") from exc
        end = start + RECORD_HEADER_LENGTH + length
        if end > len(queued):
            break
        records.append(queued[start:end])
        start = end
    return records


class Handshake:
    """One connection's ``SSLObject``, its BIOs and the record-at-a-time loop."""

    def __init__(
        self,
        transport_stream: trio.abc.Stream,
        ssl_context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | bytes | None,
        session: ssl.SSLSession | None,
    ) -> None:
        self.transport_stream: Final = transport_stream
        self.incoming: Final = ssl.MemoryBIO()
        self.outgoing: Final = ssl.MemoryBIO()
        self.ssl_object: Final = ssl_context.wrap_bio(
            self.incoming,
            self.outgoing,
            server_side=server_side,
            server_hostname=server_hostname,
            session=session,
        )
        self.observer: Final = HandshakeObserver(server_side=server_side)
        #: Whether the peer ended the connection (a TCP FIN, not a reset) before the
        #: handshake was done: with ``https_compatible`` that is an end of stream.
        self.peer_closed = False

    async def run(self) -> None:
        """Handshake to the end; raises `ssl.SSLError` or `trio.BrokenResourceError`."""
        done = await self._step()
        while True:
            out = self.outgoing.read()
            self.observer.outgoing(out)
            if out:
                await self.transport_stream.send_all(out)
            if done:
                return
            if isinstance(self.transport_stream, trio.SocketStream):
                try:
                    done = await self._feed_queued_records(self.transport_stream.socket)
                except OSError as exc:  # as trio.SocketStream.receive_some reports it
                    raise trio.BrokenResourceError(f"receiving failed: {exc}") from exc
            else:
                done = await self._feed(await self._receive_record())

    async def _step(self) -> bool:
        """One ``do_handshake()``: whether the handshake is done."""
        try:
            return self._do_handshake()
        except ssl.SSLError:
            # OpenSSL queued an alert for the peer; send it before failing.
            await self._flush_best_effort()
            raise

    def _do_handshake(self) -> bool:
        try:
            self.ssl_object.do_handshake()
        except ssl.SSLWantReadError:
            return False
        return True

    def _give(self, record: bytes) -> None:
        """Show one whole record to the observer, then to OpenSSL."""
        self.observer.incoming(record)
        self.incoming.write(record)

    async def _feed(self, record: bytes) -> bool:
        self._give(record)
        return await self._step()

    async def _feed_queued_records(self, sock: trio.socket.SocketType) -> bool:
        """Give OpenSSL the whole records queued in the socket, one at a time, until the
        handshake is done or they run out; then take exactly those bytes from the socket.
        """
        records = _whole_records(await sock.recv(_PEEK_SIZE, socket.MSG_PEEK))
        if not records:  # no whole record yet, or end of stream: one record outright
            return await self._feed(await self._receive_record())
        fed = 0
        done = False
        try:
            for record in records:
                fed += len(record)
                self._give(record)
                if self._do_handshake():
                    done = True
                    break
        except ssl.SSLError:
            # OpenSSL queued an alert for the peer; send it before failing (the
            # connection is over, so what stays queued in the socket does not matter).
            await self._flush_best_effort()
            raise
        await self._discard(sock, fed)
        return done

    async def _discard(self, sock: trio.socket.SocketType, size: int) -> None:
        """Take ``size`` bytes that were peeked (so they are queued) from the socket."""
        while size:
            taken = await sock.recv(size)
            if not taken:
                raise trio.BrokenResourceError("the peer closed the connection mid-handshake")
            size -= len(taken)

    @property
    def holds_unread_bytes(self) -> bool:
        """Whether OpenSSL holds bytes after the handshake (the kernel would miss them)."""
        return bool(self.incoming.pending or self.ssl_object.pending())

    async def _receive_record(self) -> bytes:
        header = await self._receive_exactly(RECORD_HEADER_LENGTH)
        try:
            length = parse_record_header(header).length
        except TLSDecodeError as exc:
            raise trio.BrokenResourceError(f"TLS handshake failed: {exc}") from exc
        return header + await self._receive_exactly(length)

    async def _receive_exactly(self, size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            chunk = await self.transport_stream.receive_some(size - len(data))
            if not chunk:
                self.peer_closed = True
                raise trio.BrokenResourceError("the peer closed the connection mid-handshake")
            data += chunk
        return bytes(data)

    async def _flush_best_effort(self) -> None:
        out = self.outgoing.read()
        if out:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.transport_stream.send_all(out)
