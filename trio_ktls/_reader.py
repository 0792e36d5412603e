"""The receive side of an offloaded stream: the reader task and what it hands out.

Theory of operation
-------------------
Once the kernel owns RX, every record still needs a reader in user space: application data
for ``receive_some``, and the control records that TLS keeps in user space after the
handshake (``Documentation/networking/tls.rst``, "Receiving TLS control messages"). Those
arrive only through ``recvmsg`` with room for the one-byte ``TLS_GET_RECORD_TYPE``
control message, and they must be handled even while the application only sends: a
KeyUpdate left unread stops the kernel decrypting (6.14+), a close_notify is end of stream.
So one *reader task* per stream loops on ``recvmsg``:

- Data records fill a bounded buffer (``max_receive_buffer``) that `receive` drains. When
  it is full the reader stops reading, so TCP flow control reaches the peer. The buffer is
  a queue of the ``bytes`` objects ``recvmsg`` returned: `receive` hands one out as it is
  when it fits, so a received byte is copied once in user space (kernel to ``bytes``);
  a chunk larger than ``max_bytes`` is handed out in slices, each copied once.
- The lean path: a `receive` that finds the buffer empty while the reader task is idle
  (waiting for the socket, holding no record) calls ``recvmsg`` itself, on its own turn.
  Data goes straight to the caller, with no hop through the reader task and no second
  wake-up; anything else it reads (a control record, end of stream, an error) it leaves to
  the reader task (`_hand_over`). In a bulk transfer most data takes this path; the
  reader task still reads whenever the application does not (control records are handled
  while the application only sends, and data is read ahead up to the bound).
- Both read with the socket's own non-blocking ``recvmsg`` (a stdlib view of the
  descriptor, made in `run`), not trio's wrapper, whose every call is a scheduling
  round: the reader waits with ``wait_readable`` only when the kernel has nothing, and
  yields every ``_READS_PER_TURN`` reads so it never starves other tasks.
- Alerts: close_notify is end of stream; user_canceled and TLS 1.2 warnings are ignored;
  anything else is fatal (RFC 8446 §6.2).
- Handshake messages (reassembled across records, RFC 8446 §5.1): NewSessionTicket goes to
  OpenSSL through the ticket relay (``_ticket_relay``); KeyUpdate installs the peer's next
  key at once (on 6.14+ the socket is never readable again until it is installed) and, if
  the peer asked, has the writer send ours. TLS 1.2 renegotiation is refused.
- The peer's records are counted (``_keys.RecordBudget``); past
  ``request_peer_rekey_after_records`` the peer is asked once per key for new keys.

Invariants
----------
- The reader never raises into the nursery and never waits for the writer lock: it
  reports failures through ``fail`` (the stream's) and leaves KeyUpdates to
  `KernelWriter.update_soon`.
- Nothing received is lost: data that arrived before a failure or end of stream is still
  handed out by `receive` before the failure is raised or ``b""`` returned, and a
  cancelled `receive` takes nothing from the buffer.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import ssl
from collections import deque
from collections.abc import Iterator
from typing import Final

import trio

from . import _kernel
from ._errors import (
    KTLSRekeyFailedError,
    TLSDecodeError,
    TLSProtocolError,
    truncation_error,
)
from ._keys import RecordBudget, TrafficKeys
from ._messages import (
    Alert,
    AlertDescription,
    AlertLevel,
    ContentType,
    HandshakeReassembler,
    HandshakeType,
    encode_handshake,
    parse_key_update,
    parse_new_session_ticket,
)
from ._state import StreamStatus
from ._ticket_relay import TicketRelay
from ._writer import KernelWriter

#: Bytes the reader task asks of the kernel per ``recvmsg`` (sixteen full records: the
#: default buffer bound), within the room left in the buffer.
RECV_SIZE: Final = 256 * 1024
#: The least a data read asks for (one full record), even when the buffer is nearly full.
_MIN_READ: Final = 16 * 1024
_TLS13: Final = ssl.TLSVersion.TLSv1_3
#: Reads the reader task makes in a row before it lets other tasks run.
_READS_PER_TURN: Final = 16

#: What one ``recvmsg`` returned (data, ancillary data, flags, address), or its error.
_Received = tuple[bytes, list[tuple[int, int, bytes]], int, object]


class KernelReader:
    """The reader task of an offloaded stream and its receive buffer; see the module doc."""

    def __init__(
        self,
        sock: trio.socket.SocketType,
        writer: KernelWriter,
        keys: TrafficKeys,
        budget: RecordBudget,
        status: StreamStatus,
        *,
        https_compatible: bool,
        max_buffer: int,
        ticket_relay: TicketRelay | None,
    ) -> None:
        self._sock = sock
        self._writer = writer
        self._keys = keys
        self._budget = budget
        self._status = status
        self._https_compatible = https_compatible
        self._max_buffer = max_buffer
        self._ticket_relay = ticket_relay
        self._chunks: deque[bytes] = deque()
        self._offset = 0  # of the first chunk's bytes not yet handed out
        self._buffered = 0
        self._eof = False
        self._running = False
        self._scope = trio.CancelScope()
        self._data_waiters = trio.lowlevel.ParkingLot()
        self._room_waiters = trio.lowlevel.ParkingLot()
        self._reassembler = HandshakeReassembler()
        self._peer_update_requested = False
        self._peer_update_due = False
        self.key_updates_received = 0
        # The lean path (see the module doc): the socket view while `run` runs, whether the
        # reader task is idle, what a direct read left for it, and how to wake it.
        self._view: socket.socket | None = None
        self._idle = False
        self._handed_over: _Received | OSError | None = None
        self._wait_scope: trio.CancelScope | None = None

    @property
    def tickets_received(self) -> int:
        return self._ticket_relay.relayed if self._ticket_relay else 0

    # -- the application's side -------------------------------------------------------

    async def receive(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` of data; ``b""`` at end of stream; else the failure."""
        await trio.lowlevel.checkpoint_if_cancelled()
        parked = False
        while not self._chunks:
            self._status.check_not_closed()
            if self._status.failure is not None:
                raise self._status.broken_error()
            if self._eof:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return b""
            if not self._running:
                raise trio.BrokenResourceError("the stream's reader task is no longer running")
            if self._read_directly(max_bytes):
                break
            await self._data_waiters.park()
            parked = True
        # The first chunk is handed out from `_offset` on: a slice copies only what is
        # returned, never the rest of a large chunk.
        chunk, start = self._chunks[0], self._offset
        end = start + max_bytes
        if end < len(chunk):
            data = chunk[start:end]
            self._offset = end
        else:
            data = chunk[start:] if start else chunk
            self._chunks.popleft()
            self._offset = 0
        self._buffered -= len(data)
        self._room_waiters.unpark_all()
        if not parked:  # parking was this call's scheduling point; else it needs one
            await trio.lowlevel.cancel_shielded_checkpoint()
        return data

    def _read_directly(self, max_bytes: int) -> bool:
        """The lean path: read on the caller's turn while the reader task is idle; True
        when data was buffered. Synchronous, so a cancelled `receive` cannot lose what it
        read: the data is in the buffer before anything can be cancelled."""
        view = self._view
        if view is None or not self._idle or self._handed_over is not None:
            return False
        if self._sock.fileno() < 0:  # closed under us: the reader task reports it
            return False
        try:
            received = view.recvmsg(self._read_size(max_bytes), _kernel.RECORD_TYPE_CMSG_SPACE)
        except BlockingIOError:
            return False
        except OSError as exc:
            self._hand_over(exc)
            return False
        data = received[0]
        if (
            not data
            or _kernel.record_type_from_ancdata(received[1]) != ContentType.APPLICATION_DATA
        ):
            self._hand_over(received)  # end of stream, a control record: the reader's job
            return False
        self._take_data(data)
        return True

    def _hand_over(self, received: _Received | OSError) -> None:
        """Give the reader task what a direct read found and wake it."""
        self._handed_over = received
        self._idle = False
        if self._wait_scope is not None:
            self._wait_scope.cancel()

    def _read_size(self, wanted: int = RECV_SIZE) -> int:
        """How much one ``recvmsg`` asks for: what is wanted, within the buffer's bound,
        and never less than one full record. Large reads matter: the kernel decrypts as
        many queued records as fit in one call, and each call costs a scheduling round.
        """
        return max(min(wanted, self._max_buffer - self._buffered), _MIN_READ)

    def _take_data(self, data: bytes) -> None:
        """Buffer a data record's plaintext (already read) and count its records."""
        self._chunks.append(data)
        self._buffered += len(data)
        self._charge(len(data))
        self.wake()

    def wake(self) -> None:
        """Let parked receivers look at the stream's state again."""
        self._data_waiters.unpark_all()

    def stop(self) -> None:
        self._scope.cancel()
        self._room_waiters.unpark_all()
        self.wake()

    # -- the task ---------------------------------------------------------------------

    async def run(self) -> None:
        self._running = True
        # A view of the stream's descriptor for synchronous non-blocking reads. It does
        # not own the descriptor: it is detached, never closed, when the task ends, and
        # `_read_directly` checks that the trio socket is still open before each use.
        self._view = socket.socket(fileno=self._sock.fileno())
        try:
            with self._scope:
                await self._loop()
        except Exception as exc:  # surfaced by the stream's next call
            self._status.fail(exc)
        finally:
            self._view.detach()
            self._view = None
            self._idle = False
            self._running = False
            self.wake()

    async def _loop(self) -> None:
        assert self._view is not None
        view = self._view
        cmsg_space = _kernel.RECORD_TYPE_CMSG_SPACE
        reads = 0
        while True:
            if self._peer_update_due:
                self._peer_update_due = False
                await self._request_peer_update()
            received = self._handed_over
            self._handed_over = None
            if received is None:
                if self._buffered >= self._max_buffer:
                    with self._idling():
                        await self._room_waiters.park()
                    continue
                if reads >= _READS_PER_TURN:
                    reads = 0
                    with self._idling():
                        await trio.lowlevel.checkpoint()
                    continue
                try:
                    received = view.recvmsg(self._read_size(), cmsg_space)
                except BlockingIOError:
                    reads = 0
                    await self._wait_readable()
                    continue
                except OSError as exc:
                    received = exc
                reads += 1
            if isinstance(received, OSError):
                await self._on_receive_error(received)
                return
            data, ancdata, flags, _ = received
            received = None
            record_type = _kernel.record_type_from_ancdata(ancdata)
            if record_type is None:
                if data:
                    raise TLSProtocolError("the kernel returned data without a record type")
                self._on_transport_eof()
                return
            if record_type == ContentType.APPLICATION_DATA:
                if data:  # an empty data record is legal (RFC 8446 §5.1) and carries nothing
                    self._take_data(data)
            elif await self._on_control_record(record_type, data, flags, cmsg_space):
                return
            # The loop keeps no reference to what it read while it waits: an idle
            # stream would otherwise pin its last chunk (up to RECV_SIZE) or record.
            data = b""

    async def _on_control_record(
        self, record_type: int, data: bytes, flags: int, cmsg_space: int
    ) -> bool:
        """Handle a control record whose first piece is ``data``; True when reading
        must stop."""
        self._charge(len(data))
        # A control record can come back in pieces when it is larger than our buffer;
        # MSG_EOR marks its last piece (tls.rst).
        record = bytearray(data)
        while not flags & _kernel.MSG_EOR and data:
            try:
                data, _, flags, _ = await self._receive_more(cmsg_space)
            except OSError as exc:
                await self._on_receive_error(exc)
                return True
            record += data
        if record_type == ContentType.ALERT:
            if self._on_alert_record(bytes(record)):
                return True
        elif record_type == ContentType.HANDSHAKE:
            await self._on_handshake_record(bytes(record))
        else:
            await self._fatal_alert(
                AlertDescription.UNEXPECTED_MESSAGE,
                f"unexpected record type {record_type} after the handshake",
            )
        return self._status.failure is not None

    @contextlib.contextmanager
    def _idling(self) -> Iterator[None]:
        """The reader holds no record meanwhile, so `receive` may read directly."""
        self._idle = True
        try:
            yield
        finally:
            self._idle = False

    async def _wait_readable(self) -> None:
        """Wait for the kernel to have something, or for `_hand_over`."""
        with trio.CancelScope() as self._wait_scope, self._idling():
            await trio.lowlevel.wait_readable(self._sock)
        self._wait_scope = None

    async def _receive_more(self, cmsg_space: int) -> _Received:
        """The next piece of a control record (the reader is not idle meanwhile)."""
        assert self._view is not None
        while True:
            try:
                return self._view.recvmsg(RECV_SIZE, cmsg_space)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._sock)

    def _charge(self, nbytes: int) -> None:
        """Count the peer's records; past ``request_peer_rekey_after_records`` have the
        reader task ask the peer for new keys.

        Each record carried at least one byte, except empty ones, so ``nbytes + 1`` per
        read bounds the count (RFC 8446 §5.5; the request is a KeyUpdate with
        update_requested, sent once per peer key).
        """
        budget = self._budget
        if budget.limit is None or self._peer_update_requested:
            return
        budget.charge(nbytes + 1)
        if budget.reached(budget.limit) and not self._peer_update_due:
            self._peer_update_due = True
            if self._wait_scope is not None:
                self._wait_scope.cancel()

    async def _request_peer_update(self) -> None:
        if self._peer_update_requested:
            return
        # Asked once per peer key; where updates are impossible, never asked.
        self._peer_update_requested = True
        if await self._keys.can_update():
            await self._update_soon(request_peer_update=True)

    def _on_transport_eof(self) -> None:
        if self._https_compatible:
            self._eof = True
            self.wake()
        else:
            self._status.fail(truncation_error())

    async def _on_receive_error(self, exc: OSError) -> None:
        if exc.errno == errno.EBADMSG:
            await self._fatal_alert(
                AlertDescription.BAD_RECORD_MAC, "a record failed authentication (bad_record_mac)"
            )
        elif exc.errno == errno.EMSGSIZE:
            await self._fatal_alert(
                AlertDescription.RECORD_OVERFLOW, "the peer sent an oversized record"
            )
        elif exc.errno == errno.EKEYEXPIRED:
            self._status.fail(
                TLSProtocolError("the kernel expected a new receive key that never came")
            )
        else:
            self._status.fail(trio.BrokenResourceError(f"receiving failed: {exc}"))

    def _on_alert_record(self, payload: bytes) -> bool:
        """Handle one alert record (RFC 8446 §6); True when reading must stop."""
        if len(payload) % 2 or not payload:
            self._status.fail(TLSProtocolError(f"malformed alert record of {len(payload)} bytes"))
            return True
        tls12 = self._keys.version is not _TLS13
        for i in range(0, len(payload), 2):
            try:
                alert = Alert.parse(payload[i : i + 2])
            except TLSDecodeError as exc:
                self._status.fail(TLSProtocolError(f"malformed alert: {exc}"))
                return True
            if alert.description == AlertDescription.CLOSE_NOTIFY:
                self._eof = True
                self.wake()
                return True
            if alert.description == AlertDescription.USER_CANCELED:
                continue  # RFC 8446 §6.1: followed by close_notify
            if alert.level == AlertLevel.WARNING and tls12:
                continue  # TLS 1.2 warnings (e.g. no_renegotiation) do not end the connection
            self._status.fail(TLSProtocolError(f"the peer sent a {alert}"))
            return True
        return False

    async def _on_handshake_record(self, payload: bytes) -> None:
        try:
            self._reassembler.feed(payload)
            while (message := self._reassembler.next_message()) is not None:
                await self._on_handshake_message(*message)
        except TLSDecodeError as exc:
            await self._fatal_alert(exc.alert, f"malformed handshake message: {exc}")

    async def _on_handshake_message(self, msg_type: int, body: bytes) -> None:
        if self._keys.version is not _TLS13:
            if msg_type == HandshakeType.HELLO_REQUEST:
                # RFC 5746 §4.2 lets a client decline renegotiation with a warning.
                # Best effort: the reader never waits for a busy writer, and a client may
                # ignore HelloRequest altogether.
                await self._send_alert(
                    Alert(AlertLevel.WARNING, AlertDescription.NO_RENEGOTIATION)
                )
                return
            await self._fatal_alert(
                AlertDescription.UNEXPECTED_MESSAGE,
                f"TLS 1.2 renegotiation is not supported (peer sent handshake type {msg_type})",
            )
        elif msg_type == HandshakeType.NEW_SESSION_TICKET:
            parse_new_session_ticket(body)  # validates; raises TLSDecodeError
            if self._ticket_relay is not None:  # a server never receives tickets
                self._ticket_relay.relay(encode_handshake(msg_type, body))
        elif msg_type == HandshakeType.KEY_UPDATE:
            await self._on_peer_key_update(parse_key_update(body))
        else:
            await self._fatal_alert(
                AlertDescription.UNEXPECTED_MESSAGE,
                f"unexpected post-handshake message (type {msg_type})",
            )

    async def _on_peer_key_update(self, update_requested: bool) -> None:
        """RFC 8446 §4.6.3: switch to the peer's next traffic secret; answer if asked.

        On 6.14+ the kernel stops decrypting after it hands over a KeyUpdate (reads give
        EKEYEXPIRED and poll shows nothing) until the next RX key is installed, so this
        runs before the reader waits for data again.
        """
        if self._reassembler.pending:
            await self._fatal_alert(
                AlertDescription.UNEXPECTED_MESSAGE,
                "a handshake message spans the KeyUpdate's key change (RFC 8446 §5.1)",
            )
            return
        info = self._keys.update_rx_secret()
        try:
            _kernel.install_key(self._sock, _kernel.TLS_RX, info)
        except OSError as exc:
            failure = KTLSRekeyFailedError(
                "the peer updated its TLS 1.3 keys, but this kernel cannot replace a kTLS "
                f"receive key ({os.strerror(exc.errno or 0)}); Linux 6.14 or newer is "
                f"needed (running {os.uname().release})"
            )
            await self._fatal_alert(AlertDescription.INTERNAL_ERROR, failure)
            return
        finally:
            info.wipe()
        self.key_updates_received += 1
        self._budget.restart()
        self._peer_update_requested = False
        if update_requested:
            await self._update_soon(request_peer_update=False)

    async def _update_soon(self, *, request_peer_update: bool) -> None:
        try:
            await self._writer.update_soon(request_peer_update=request_peer_update)
        except (KTLSRekeyFailedError, OSError) as exc:
            failure = exc if isinstance(exc, trio.BrokenResourceError) else None
            await self._fatal_alert(
                AlertDescription.INTERNAL_ERROR,
                failure or KTLSRekeyFailedError(f"sending our KeyUpdate failed: {exc}"),
            )

    async def _send_alert(self, alert: Alert) -> None:
        """Send an alert through the writer if it is free (best effort: the reader never
        waits for a busy writer)."""
        if self._writer.lock.locked():
            return
        async with self._writer.lock:
            with contextlib.suppress(OSError):
                await self._writer.send_control(ContentType.ALERT, alert.encode())

    async def _fatal_alert(self, description: int, failure: str | BaseException) -> None:
        """Fail the stream and tell the peer why (best effort, never waiting)."""
        self._status.fail(TLSProtocolError(failure) if isinstance(failure, str) else failure)
        await self._send_alert(Alert(AlertLevel.FATAL, description))
