"""The user-space handshake, one record at a time, so the kernel can take over after it.

Theory of operation
-------------------
The user's ``ssl.SSLContext`` drives an ``ssl.SSLObject`` over two ``MemoryBIO``\\s,
exactly like ``trio.SSLStream``, with two differences:

- The socket is read *one record at a time*: the 5-byte header (RFC 8446 §5.1), then
  exactly the body it announces. When OpenSSL says the handshake is done, no byte the peer
  sent after its last handshake record sits in user space, so the kernel, once it has the
  keys, reads the next record from its first byte. (Records the peer sends right after
  its Finished stay queued in the socket; the kernel decrypts them.)
- Every record both ways is shown to the `HandshakeObserver` (``_handoff``), which picks
  out the client and server randoms and counts the protected records of our last flush:
  the key log is matched by client_random, and a TLS 1.3 server's first transmit sequence
  number is the number of tickets it just sent.

A failed handshake sends OpenSSL's alert (best effort) before raising; the caller turns
the failure into a broken stream.
"""

from __future__ import annotations

import contextlib
import ssl
from typing import Final

import trio

from ._errors import TLSDecodeError
from ._handoff import HandshakeObserver
from ._messages import RECORD_HEADER_LENGTH, parse_record_header


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
        while True:
            try:
                self.ssl_object.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            except ssl.SSLError:
                # OpenSSL queued an alert for the peer; send it before failing.
                await self._flush_best_effort()
                raise
            out = self.outgoing.read()
            self.observer.outgoing(out)
            if out:
                await self.transport_stream.send_all(out)
            if done:
                return
            record = await self._receive_record()
            self.observer.incoming(record)
            self.incoming.write(record)

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
