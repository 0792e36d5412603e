"""The record layer in user space: the handshake's ``SSLObject`` keeps doing everything.

Used where the kernel cannot help (``ktls="off"``, no kTLS, a cipher the kernel lacks, a
key log that did not give the secrets). It behaves like ``trio.SSLStream``: plaintext goes
through ``SSLObject.write``/``read`` and the two ``MemoryBIO``\\s, and ciphertext through
the transport stream.

Invariants
----------
- ``_write_lock`` is held from the moment OpenSSL's output is taken from the outgoing BIO
  until it has been sent, by ``send`` and by ``receive`` (which may have to send what
  OpenSSL wrote while reading: a KeyUpdate answer, an alert). OpenSSL writes the BIO in
  protocol order, so the wire sees that order too.
- A cancelled ``receive`` loses nothing: plaintext taken from OpenSSL is parked in
  ``_unread`` *before* anything that can raise ``Cancelled`` (the flush of OpenSSL's
  output) and is handed out by the next call, before any failure is raised.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterator
from typing import Final

import trio

from ._errors import KeyUpdateUnavailableError, TLSProtocolError, truncation_error
from ._handshake import Handshake
from ._recordlayer import send_file_in_chunks
from ._state import StreamStatus

#: Ciphertext asked of the transport per read.
_RECEIVE_SIZE: Final = 64 * 1024
#: Plaintext given to ``SSLObject.write`` at a time (bounds the BIO's memory).
_WRITE_CHUNK: Final = 256 * 1024


@contextlib.contextmanager
def _translate(status: StreamStatus) -> Iterator[None]:
    """The user-space layer's one error mapping: OpenSSL and transport failures break
    the stream (``ssl.SSLError`` becomes the cause of a `trio.BrokenResourceError`)."""
    try:
        yield
    except ssl.SSLError as exc:
        failure = TLSProtocolError(f"TLS failed: {exc}")
        failure.__cause__ = exc
        status.fail(failure)
        raise status.broken_error() from exc
    except trio.BrokenResourceError as exc:
        status.fail(exc)
        raise status.broken_error() from exc


class UserSpaceRecordLayer:
    """TLS records made and read by OpenSSL (see the module doc)."""

    offloaded = False
    zero_copy_send_file = False
    key_updates_sent = 0
    key_updates_received = 0
    tickets_received = 0

    def __init__(
        self, handshake: Handshake, status: StreamStatus, *, https_compatible: bool
    ) -> None:
        self._transport = handshake.transport_stream
        self._ssl = handshake.ssl_object
        self._incoming = handshake.incoming
        self._outgoing = handshake.outgoing
        self._status = status
        self._https_compatible = https_compatible
        self._write_lock = trio.StrictFIFOLock()
        self._unread = bytearray()

    async def run(self) -> None:
        """No task of its own: OpenSSL reads only when the application does."""

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        async with self._write_lock:
            self._status.check()
            with _translate(self._status):
                for start in range(0, len(view), _WRITE_CHUNK):
                    self._ssl.write(view[start : start + _WRITE_CHUNK])
                    await self._transport.send_all(self._outgoing.read())

    async def send_file(self, fd: int, offset: int, count: int) -> None:
        await send_file_in_chunks(fd, offset, count, self.send)

    async def receive(self, max_bytes: int) -> bytes | bytearray:
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._unread:
            self._status.check()
            with _translate(self._status):
                if await self._read_some(max_bytes):
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return b""
        data = self._unread[:max_bytes]
        del self._unread[:max_bytes]
        await trio.lowlevel.cancel_shielded_checkpoint()
        return data

    async def _read_some(self, max_bytes: int) -> bool:
        """Move plaintext into ``_unread``, reading the transport if OpenSSL needs more;
        True at end of stream."""
        try:
            data = self._ssl.read(max_bytes)
        except ssl.SSLWantReadError:
            await self._flush()
            chunk = await self._transport.receive_some(_RECEIVE_SIZE)
            if chunk:
                self._incoming.write(chunk)
            else:
                self._incoming.write_eof()
            return False
        except ssl.SSLZeroReturnError:
            return True  # close_notify
        except (ssl.SSLEOFError, ssl.SSLSyscallError) as exc:
            if self._https_compatible:
                return True  # a TCP close without close_notify is an end, there
            raise truncation_error() from exc
        except ssl.SSLError:
            # OpenSSL queued the fatal alert that tells the peer why (RFC 8446 §6.2).
            await self._send_alert_best_effort()
            raise
        if not data:
            return True  # close_notify (CPython returns b"" rather than raising)
        self._unread += data
        # Reading may have made OpenSSL write (a KeyUpdate answer): send it now. If that
        # is cancelled, what was read waits in _unread for the next call; if it fails,
        # the data goes out first and the failure with the next call.
        try:
            await self._flush()
        except trio.BrokenResourceError as exc:
            self._status.fail(exc)
        return False

    async def _flush(self) -> None:
        if not self._outgoing.pending:
            return
        async with self._write_lock:
            try:
                await self._transport.send_all(self._outgoing.read())
            except trio.Cancelled:
                self._status.fail(
                    trio.BrokenResourceError("sending TLS output was cancelled midway")
                )
                raise

    async def _send_alert_best_effort(self) -> None:
        if self._write_lock.locked() or not self._outgoing.pending:
            return
        async with self._write_lock:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._transport.send_all(self._outgoing.read())

    async def send_eof(self) -> None:
        async with self._write_lock:
            self._status.check()
            with _translate(self._status):
                if not self._https_compatible:
                    await self._send_close_notify()
                if isinstance(self._transport, trio.abc.HalfCloseableStream):
                    await self._transport.send_eof()

    async def _send_close_notify(self) -> None:
        # unwrap() queues our close_notify, then wants the peer's, which may come later.
        with contextlib.suppress(ssl.SSLWantReadError):
            self._ssl.unwrap()
        await self._transport.send_all(self._outgoing.read())

    async def close_notify_if_idle(self) -> None:
        if self._https_compatible or self._write_lock.locked():
            await trio.lowlevel.checkpoint()
            return
        async with self._write_lock:
            with contextlib.suppress(
                trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError
            ):
                await self._send_close_notify()

    async def update_keys(self, *, request_peer_update: bool) -> None:
        await trio.lowlevel.checkpoint()
        raise KeyUpdateUnavailableError(
            "cannot update keys: the stream runs in user space, and the ssl module has no "
            "way to send a KeyUpdate"
        )

    def record_sequence_numbers(self) -> None:
        """OpenSSL keeps its record counters to itself: there is nothing to read."""
        return None

    async def wait_send_all_might_not_block(self) -> None:
        await self._transport.wait_send_all_might_not_block()

    def stop(self) -> None:
        """Nothing runs and OpenSSL keeps its own keys."""
