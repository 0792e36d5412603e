"""KTLSStream: a TLS stream whose record layer runs in the kernel.

Theory of operation
-------------------
A `KTLSStream` lives through three phases, all driven by one task that runs in the
caller's nursery (trio's idiom for objects that own tasks):

1. **Handshake, in user space.** The user's ``ssl.SSLContext`` drives an ``ssl.SSLObject``
   over two ``MemoryBIO``\\s, exactly like ``trio.SSLStream``. Two differences: we read the
   socket *one record at a time* (the 5-byte header, then exactly the body), so that when
   the handshake ends no byte meant for the kernel sits in user space; and we watch the
   plaintext handshake records for the client and server randoms. See ``_handoff``.

2. **Handoff.** The traffic secrets come from OpenSSL's key log, captured in memory.
   Keys and IVs are derived, the TLS ULP (attached before the handshake, when the socket
   was already established) gets ``TLS_TX`` then ``TLS_RX``. TX goes first because once
   the kernel owns TX, OpenSSL can no longer write: if TX is refused nothing changed and
   the stream carries on in user space (``ktls="auto"``); if RX is refused after TX was
   accepted the stream breaks with a clear error rather than guess.

3. **Data.** With both directions offloaded:

   - ``send_all`` and ``send_file`` write plaintext straight to the socket; the kernel
     makes the records. Both go through the `KernelWriter`
     (``_writer``), which owns record accounting and transmit key rotation.
   - A *reader task* loops on ``recvmsg`` with room for the record-type control message
     (``Documentation/networking/tls.rst``, "Receiving TLS control messages"). Data records
     fill a bounded buffer that ``receive_some`` drains; when the buffer is full the
     reader stops reading, so TCP flow control reaches the peer. Control records are
     handled even while the application only sends: alerts (close_notify is end of
     stream, a fatal alert breaks the stream), TLS 1.3 NewSessionTicket (relayed to
     OpenSSL for resumption, see ``_ticket_relay``) and KeyUpdate (RFC 8446 §4.6.3: new
     receive key; answer ``update_requested``), TLS 1.2 renegotiation attempts (refused
     with an alert).
   - ``send_eof`` sends close_notify as a type-21 record, then shuts down the write side.

   Without offload (``ktls="off"``, a kernel without kTLS, a cipher the kernel lacks) the
   same stream keeps working through the ``SSLObject``, like ``trio.SSLStream``.

Invariants
----------
- ``_write_lock`` (a StrictFIFOLock) is held for every byte written to the socket after
  the handshake, by the application and by the reader task alike. A TX key change
  (KeyUpdate record, then ``TLS_TX``) happens under it, so no record is ever encrypted
  under a key the peer does not expect. The reader task never *waits* for it: it asks the
  writer for a KeyUpdate, which whoever holds the lock sends at the next chunk boundary.
- A stream that broke stays broken: ``_state`` goes OK -> BROKEN or OK/BROKEN -> CLOSED,
  never back. The first failure is kept in ``_failure`` and raised (as a
  ``trio.BrokenResourceError``) by every later call. Data received before the failure is
  still delivered first.
- The reader task never raises into the nursery: it records its failure in the stream.

Cancellation follows ``trio.SSLStream``: a cancelled ``do_handshake`` or ``send_all``
leaves the stream broken (we cannot know how much went out); a cancelled
``receive_some`` loses nothing.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import operator
import os
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, BinaryIO, Final, Literal, final

import trio

from . import _kernel
from ._errors import (
    KTLSRekeyUnsupportedError,
    KTLSUnavailableError,
    TLSDecodeError,
    TLSProtocolError,
)
from ._handoff import (
    HandoffKeys,
    HandshakeObserver,
    KeyLogTap,
    MissingSecretError,
    derive_handoff_keys,
    initial_sequence_numbers,
    wipe_secrets,
)
from ._kernel import CryptoInfo, TLSVersion
from ._keyschedule import (
    CipherSuite,
    lookup_suite,
    tls13_next_traffic_secret,
    tls13_traffic_key_iv,
)
from ._messages import (
    CLOSE_NOTIFY,
    RECORD_HEADER_LENGTH,
    Alert,
    AlertDescription,
    AlertLevel,
    ContentType,
    HandshakeReassembler,
    HandshakeType,
    encode_handshake,
    parse_key_update,
    parse_new_session_ticket,
    parse_record_header,
)
from ._probe import tls13_rekey_supported, ulp_error_reason
from ._ticket_relay import TicketRelay
from ._writer import ConfidentialityLimitError, KernelWriter, record_limits

logger: Final = logging.getLogger("trio_ktls")

KTLSMode = Literal["auto", "require", "off"]

_RECV_SIZE: Final = 64 * 1024
_DEFAULT_RECEIVE_SIZE: Final = 64 * 1024
_DEFAULT_MAX_BUFFER: Final = 256 * 1024
_USER_SPACE_WRITE_CHUNK: Final = 256 * 1024
_VERSIONS: Final = {"TLSv1.2": TLSVersion.TLS1_2, "TLSv1.3": TLSVersion.TLS1_3}

# Attributes of the SSLObject that the stream exposes, as trio.SSLStream does.
_FORWARDED: Final = frozenset(
    {
        "context",
        "server_side",
        "server_hostname",
        "session",
        "session_reused",
        "getpeercert",
        "selected_npn_protocol",
        "cipher",
        "shared_ciphers",
        "compression",
        "pending",
        "get_channel_binding",
        "selected_alpn_protocol",
        "version",
    }
)


@final
@dataclass(frozen=True)
class KTLSInfo:
    """What the kernel does for this connection (a snapshot; read ``ktls_info`` again)."""

    tx_offload: bool
    rx_offload: bool
    version: str
    cipher: str
    #: Why a direction is not offloaded, in words; None when both are.
    reason: str | None
    key_updates_sent: int = 0
    key_updates_received: int = 0


class _State(enum.Enum):
    OK = "ok"
    BROKEN = "broken"
    CLOSED = "closed"


class _ConflictDetector:
    """Raises BusyResourceError when two tasks use one direction at once."""

    def __init__(self, message: str) -> None:
        self._message = message
        self._held = False

    def __enter__(self) -> None:
        if self._held:
            raise trio.BusyResourceError(self._message)
        self._held = True

    def __exit__(self, *exc_info: object) -> None:
        self._held = False


class _Fallback(Exception):
    """Internal: stay in user space, for the reason given."""


@final
class KTLSStream(trio.abc.HalfCloseableStream):
    """A TLS stream over a TCP `trio.SocketStream`, with the record layer in the kernel.

    Arguments mean what they mean for `trio.SSLStream`; ``nursery`` runs the stream's own
    task (handshake, handoff, then the reader). ``ktls`` is ``"auto"`` (offload what the
    kernel can, otherwise user space), ``"require"`` (raise `KTLSUnavailableError`
    instead of falling back) or ``"off"``.
    """

    def __init__(
        self,
        transport_stream: trio.SocketStream,
        ssl_context: ssl.SSLContext,
        *,
        nursery: trio.Nursery,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        https_compatible: bool = False,
        ktls: KTLSMode = "auto",
        session: ssl.SSLSession | None = None,
        handshake_timeout: float | None = None,
        max_receive_buffer: int = _DEFAULT_MAX_BUFFER,
        rekey_after_records: int | None = None,
        request_peer_rekey_after_records: int | None = None,
    ) -> None:
        if ktls not in ("auto", "require", "off"):
            raise ValueError(f"ktls must be 'auto', 'require' or 'off', not {ktls!r}")
        if not isinstance(transport_stream, trio.SocketStream):
            raise TypeError("KTLSStream needs a trio.SocketStream: kTLS lives on a TCP socket")
        self.transport_stream: Final = transport_stream
        self._nursery = nursery
        self._https_compatible = https_compatible
        self._mode: KTLSMode = ktls
        self._handshake_timeout = handshake_timeout
        self._max_buffer = max_receive_buffer
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = ssl_context.wrap_bio(
            self._incoming,
            self._outgoing,
            server_side=server_side,
            server_hostname=server_hostname,
            session=session,
        )
        self._observer = HandshakeObserver(server_side=server_side)

        self._state = _State.OK
        self._failure: BaseException | None = None
        self._handshake_started = False
        self._handshake_done = trio.Event()
        self._info: KTLSInfo | None = None
        self._tx_kernel = False
        self._rx_kernel = False
        self._keys: HandoffKeys | None = None
        self._suite: CipherSuite | None = None
        self._key_updates_received = 0

        self._write_lock = trio.StrictFIFOLock()
        self._writer: KernelWriter | None = None
        self._rekey_after = rekey_after_records
        self._request_peer_rekey_after = request_peer_rekey_after_records
        # Receive-side record accounting (see _count_received).
        self._rx_records_at_check = 0
        self._rx_records_since_check = 0
        self._rx_update_requested = False
        self._send_conflict = _ConflictDetector("another task is sending on this stream")
        self._receive_conflict = _ConflictDetector("another task is receiving on this stream")
        self._eof_sent = False

        # Kernel receive path (see the reader task).
        self._rx_buffer = bytearray()
        self._rx_eof = False
        self._reader_running = False
        self._data_waiters = trio.lowlevel.ParkingLot()
        self._room_waiters = trio.lowlevel.ParkingLot()
        self._reader_scope = trio.CancelScope()
        self._reassembler = HandshakeReassembler()
        #: TLS 1.3 NewSessionTicket messages that arrived after the handoff.
        self.tickets_received = 0
        self._ticket_relay: TicketRelay | None = None

        # The ULP needs an ESTABLISHED socket, which a SocketStream is. Attaching it now
        # lets OpenSSL's key log be captured from the first handshake message on.
        self._offload_reason: str | None = None
        self._tap: KeyLogTap | None = None
        if ktls == "off":
            self._offload_reason = "kTLS is switched off for this stream (ktls='off')"
        else:
            try:
                _kernel.attach_ulp(transport_stream.socket)
            except OSError as exc:
                self._offload_reason = ulp_error_reason(exc)
            else:
                self._tap = KeyLogTap.for_context(ssl_context)

    # -- introspection ----------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        if name in _FORWARDED:
            return getattr(self._ssl, name)
        raise AttributeError(name)

    @property
    def ktls_info(self) -> KTLSInfo | None:
        """None until the handshake is done; then what the kernel took over, and why not."""
        if self._info is None:
            return None
        return KTLSInfo(
            tx_offload=self._tx_kernel,
            rx_offload=self._rx_kernel,
            version=self._info.version,
            cipher=self._info.cipher,
            reason=self._info.reason,
            key_updates_sent=self._writer.key_updates_sent if self._writer else 0,
            key_updates_received=self._key_updates_received,
        )

    # -- state ------------------------------------------------------------------------

    def _check_status(self) -> None:
        if self._state is _State.CLOSED:
            raise trio.ClosedResourceError("this KTLSStream was closed")
        if self._state is _State.BROKEN:
            raise self._broken_error()

    def _broken_error(self) -> trio.BrokenResourceError:
        failure = self._failure
        if isinstance(failure, trio.BrokenResourceError):
            fresh = type(failure)(*failure.args)
        else:
            fresh = trio.BrokenResourceError(f"the TLS stream is broken: {failure!r}")
        fresh.__cause__ = failure
        return fresh

    def _fail(self, exc: BaseException) -> None:
        if self._state is _State.OK:
            self._state = _State.BROKEN
            self._failure = exc
        self._wake_receivers()

    def _wake_receivers(self) -> None:
        self._data_waiters.unpark_all()

    # -- handshake and handoff --------------------------------------------------------

    async def do_handshake(self) -> None:
        """Run the handshake (and the handoff) if it has not run; wait for it if it is
        running. Raises `trio.BrokenResourceError` if it failed."""
        self._check_status()
        if self._handshake_done.is_set():
            await trio.lowlevel.checkpoint()
            return
        if self._handshake_started:
            await self._handshake_done.wait()
            self._check_status()
            return
        self._handshake_started = True
        try:
            await self._nursery.start(self._run)
        except KTLSUnavailableError as exc:
            self._fail(exc)
            raise
        except ssl.SSLError as exc:
            self._fail(exc)
            raise trio.BrokenResourceError(f"TLS handshake failed: {exc}") from exc
        except BaseException as exc:
            self._fail(exc)
            raise
        finally:
            self._handshake_done.set()
            if self._state is not _State.OK:
                self._forget_secrets()

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self._mode == "require" and self._tap is None:
            raise KTLSUnavailableError(self._offload_reason or "kTLS is unavailable")
        if self._handshake_timeout is None:
            await self._handshake()
        else:
            with trio.fail_after(self._handshake_timeout):
                await self._handshake()
        self._handoff()
        task_status.started()
        if self._rx_kernel:
            await self._supervised_reader()

    async def _handshake(self) -> None:
        while True:
            try:
                self._ssl.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            except ssl.SSLError:
                # OpenSSL queued an alert for the peer; send it before failing.
                await self._flush_outgoing_best_effort()
                raise
            out = self._outgoing.read()
            self._observer.outgoing(out)
            if out:
                await self.transport_stream.send_all(out)
            if done:
                return
            record = await self._receive_record()
            self._observer.incoming(record)
            self._incoming.write(record)

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
                raise trio.BrokenResourceError("the peer closed the connection mid-handshake")
            data += chunk
        return bytes(data)

    async def _flush_outgoing_best_effort(self) -> None:
        out = self._outgoing.read()
        if out:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.transport_stream.send_all(out)

    def _handoff(self) -> None:
        version_name = self._ssl.version() or "unknown"
        cipher = self._ssl.cipher()
        cipher_name = cipher[0] if cipher else "unknown"
        try:
            self._install_keys(version_name, cipher_name)
        except _Fallback as why:
            if self._mode == "require":
                raise KTLSUnavailableError(str(why)) from None
            self._offload_reason = str(why)
        self._info = KTLSInfo(
            tx_offload=self._tx_kernel,
            rx_offload=self._rx_kernel,
            version=version_name,
            cipher=cipher_name,
            reason=self._offload_reason,
        )

    def _install_keys(self, version_name: str, cipher_name: str) -> None:
        if self._tap is None:
            raise _Fallback(self._offload_reason or "kTLS is unavailable")
        version = _VERSIONS.get(version_name)
        suite = lookup_suite(cipher_name, version) if version else None
        client_random = self._observer.client_random
        self._tap.drain()
        if client_random is None:
            raise _Fallback("the ClientHello was not seen, so the key log cannot be matched")
        secrets = self._tap.take(client_random)
        try:
            if suite is None:
                raise _Fallback(f"the kernel cannot offload {version_name} {cipher_name}")
            if self._incoming.pending or self._ssl.pending():
                raise _Fallback("OpenSSL holds unread bytes after the handshake")
            tx_seq, rx_seq = initial_sequence_numbers(
                TLSVersion(suite.tls_version),
                server_side=self._observer.server_side,
                final_flush_protected_records=self._observer.last_flush_protected_records,
            )
            try:
                keys = derive_handoff_keys(
                    suite, secrets, self._observer, tx_seq=tx_seq, rx_seq=rx_seq
                )
            except MissingSecretError as exc:
                raise _Fallback(
                    f"the key log did not give this connection's secrets: {exc}"
                ) from None
        finally:
            wipe_secrets(secrets)
        sock = self.transport_stream.socket
        try:
            _kernel.install_key(sock, _kernel.TLS_TX, keys.tx)
        except OSError as exc:
            keys.wipe()
            raise _Fallback(
                f"the kernel refused the {cipher_name} transmit key: {os.strerror(exc.errno or 0)}"
            ) from None
        finally:
            keys.tx.wipe()
        self._tx_kernel = True
        try:
            _kernel.install_key(sock, _kernel.TLS_RX, keys.rx)
        except OSError as exc:
            keys.wipe()
            raise TLSProtocolError(
                "the kernel accepted the transmit key but refused the receive key "
                f"({os.strerror(exc.errno or 0)}); the connection cannot continue"
            ) from exc
        finally:
            keys.rx.wipe()
        self._rx_kernel = True
        self._keys = keys
        self._suite = suite
        if keys.rx_secret is not None and not self._observer.server_side:
            self._ticket_relay = TicketRelay(suite, bytes(keys.rx_secret))
        tx_limit, rx_limit = record_limits(suite)
        if self._rekey_after is not None:
            tx_limit = self._rekey_after
        if self._request_peer_rekey_after is not None:
            rx_limit = self._request_peer_rekey_after
        self._request_peer_rekey_after = rx_limit
        self._writer = KernelWriter(
            sock,
            self._write_lock,
            keys,
            suite,
            first_seq=tx_seq,
            rekey_after_records=tx_limit,
            rekey_supported=tls13_rekey_supported,
        )

    # -- the reader task (kernel receive path) -----------------------------------------

    async def _supervised_reader(self) -> None:
        self._reader_running = True
        try:
            with self._reader_scope:
                await self._reader_loop()
        except Exception as exc:  # surfaced by the stream's next call
            self._fail(exc)
        finally:
            self._reader_running = False
            self._wake_receivers()

    async def _reader_loop(self) -> None:
        sock = self.transport_stream.socket
        while True:
            while len(self._rx_buffer) >= self._max_buffer:
                await self._room_waiters.park()
            try:
                data, ancdata, flags, _ = await sock.recvmsg(
                    _RECV_SIZE, _kernel.RECORD_TYPE_CMSG_SPACE
                )
            except OSError as exc:
                await self._on_receive_error(exc)
                return
            record_type = _kernel.record_type_from_ancdata(ancdata)
            if record_type is None:
                if data:
                    raise TLSProtocolError("the kernel returned data without a record type")
                self._on_transport_eof()
                return
            await self._count_received(len(data))
            if record_type == ContentType.APPLICATION_DATA:
                self._rx_buffer += data
                self._wake_receivers()
                continue
            # A control record can come back in pieces when it is larger than our buffer;
            # MSG_EOR marks its last piece (tls.rst).
            record = bytearray(data)
            while not flags & _kernel.MSG_EOR and data:
                data, _, flags, _ = await sock.recvmsg(_RECV_SIZE, _kernel.RECORD_TYPE_CMSG_SPACE)
                record += data
            if record_type == ContentType.ALERT:
                if self._on_alert_record(bytes(record)):
                    return
            elif record_type == ContentType.HANDSHAKE:
                await self._on_handshake_record(bytes(record))
            else:
                await self._fatal_alert(
                    AlertDescription.UNEXPECTED_MESSAGE,
                    f"unexpected record type {record_type} after the handshake",
                )
                return

    async def _count_received(self, nbytes: int) -> None:
        """Ask the peer for new keys well before its records reach their limit.

        One ``recvmsg`` returns one or more records; each carried at least one byte,
        except empty ones, so ``bytes + 1`` per read bounds the count without a system
        call. When the bound reaches the threshold, the kernel's exact RX ``rec_seq``
        decides (RFC 8446 §5.5; the request is a KeyUpdate with update_requested).
        """
        limit = self._request_peer_rekey_after
        if limit is None or self._rx_update_requested or self._writer is None:
            return
        self._rx_records_since_check += nbytes + 1
        if self._rx_records_at_check + self._rx_records_since_check < limit:
            return
        assert self._keys is not None
        exact = _kernel.read_rec_seq(
            self.transport_stream.socket, _kernel.TLS_RX, self._keys.rx.cipher
        )
        self._rx_records_at_check, self._rx_records_since_check = exact, 0
        if exact >= limit and self._writer.can_rotate:
            self._rx_update_requested = True
            await self._schedule_tx_update(request_peer_update=True)

    def _on_transport_eof(self) -> None:
        if self._https_compatible:
            self._rx_eof = True
        else:
            self._fail(
                trio.BrokenResourceError(
                    "the peer closed the TCP connection without sending close_notify "
                    "(truncated stream); pass https_compatible=True to accept that"
                )
            )

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
            self._fail(TLSProtocolError("the kernel expected a new receive key that never came"))
        else:
            self._fail(trio.BrokenResourceError(f"receiving failed: {exc}"))

    def _on_alert_record(self, payload: bytes) -> bool:
        """Handle one alert record; True when reading must stop."""
        if len(payload) % 2 or not payload:
            self._fail(TLSProtocolError(f"malformed alert record of {len(payload)} bytes"))
            return True
        for i in range(0, len(payload), 2):
            try:
                alert = Alert.parse(payload[i : i + 2])
            except TLSDecodeError as exc:
                self._fail(TLSProtocolError(f"malformed alert: {exc}"))
                return True
            if alert.description == AlertDescription.CLOSE_NOTIFY:
                self._rx_eof = True
                self._wake_receivers()
                return True
            if alert.description == AlertDescription.USER_CANCELED:
                continue  # RFC 8446 §6.1: followed by close_notify
            if alert.level == AlertLevel.WARNING and self._info_version() is TLSVersion.TLS1_2:
                continue  # TLS 1.2 warnings (e.g. no_renegotiation) do not end the connection
            self._fail(TLSProtocolError(f"the peer sent a {alert}"))
            return True
        return False

    def _info_version(self) -> TLSVersion | None:
        return _VERSIONS.get(self._info.version) if self._info else None

    async def _on_handshake_record(self, payload: bytes) -> None:
        try:
            self._reassembler.feed(payload)
            while (message := self._reassembler.next_message()) is not None:
                await self._on_handshake_message(*message)
        except TLSDecodeError as exc:
            await self._fatal_alert(exc.alert, f"malformed handshake message: {exc}")

    async def _on_handshake_message(self, msg_type: int, body: bytes) -> None:
        version = self._info_version()
        if version is TLSVersion.TLS1_2:
            if msg_type == HandshakeType.HELLO_REQUEST:
                # RFC 5746 §4.2 lets a client decline renegotiation with a warning.
                await self._send_alert(
                    Alert(AlertLevel.WARNING, AlertDescription.NO_RENEGOTIATION), wait=True
                )
                return
            await self._fatal_alert(
                AlertDescription.UNEXPECTED_MESSAGE,
                f"TLS 1.2 renegotiation is not supported (peer sent handshake type {msg_type})",
            )
            return
        if msg_type == HandshakeType.NEW_SESSION_TICKET:
            parse_new_session_ticket(body)  # validates; raises TLSDecodeError
            self._relay_ticket(encode_handshake(msg_type, body))
        elif msg_type == HandshakeType.KEY_UPDATE:
            await self._on_peer_key_update(parse_key_update(body))
        else:
            await self._fatal_alert(
                AlertDescription.UNEXPECTED_MESSAGE,
                f"unexpected post-handshake message (type {msg_type})",
            )

    def _relay_ticket(self, message: bytes) -> None:
        """Hand a ticket to OpenSSL so that ``session`` can resume (see _ticket_relay)."""
        if self._ticket_relay is None:
            return  # a server never receives tickets; nothing else would use them
        self._incoming.write(self._ticket_relay.seal(message))
        try:
            self._ssl.read(1)
        except ssl.SSLWantReadError:
            pass  # the expected outcome: the ticket was consumed, no data followed
        except ssl.SSLError as exc:
            # Resumption will not work, but this connection is unharmed.
            logger.warning("OpenSSL refused a relayed session ticket: %s", exc)
            self._ticket_relay = None
        self._outgoing.read()  # OpenSSL writes nothing here; TX is the kernel's anyway
        self.tickets_received += 1

    async def _on_peer_key_update(self, update_requested: bool) -> None:
        """RFC 8446 §4.6.3: switch to the peer's next traffic secret; answer if asked.

        On 6.14+ the kernel stops decrypting after it hands over a KeyUpdate (reads give
        EKEYEXPIRED and poll shows nothing) until the next RX key is installed, so this
        must run before the reader waits for readability again.
        """
        keys, suite = self._keys, self._suite
        assert keys is not None and suite is not None and keys.rx_secret is not None
        if self._reassembler.pending:
            await self._fatal_alert(
                AlertDescription.UNEXPECTED_MESSAGE,
                "a handshake message spans the KeyUpdate's key change (RFC 8446 §5.1)",
            )
            return
        next_secret = bytearray(
            tls13_next_traffic_secret(bytes(keys.rx_secret), suite.hash_algorithm)
        )
        key, iv = tls13_traffic_key_iv(bytes(next_secret), suite.key_length, suite.hash_algorithm)
        info = CryptoInfo(keys.version, keys.rx.cipher, key=key, write_iv=iv, rec_seq=0)
        try:
            _kernel.install_key(self.transport_stream.socket, _kernel.TLS_RX, info)
        except OSError as exc:
            next_secret[:] = bytes(len(next_secret))
            failure = KTLSRekeyUnsupportedError(
                "the peer updated its TLS 1.3 keys, but this kernel cannot replace a kTLS "
                f"receive key ({os.strerror(exc.errno or 0)}); Linux 6.14 or newer is "
                f"needed (running {os.uname().release})"
            )
            await self._fatal_alert(AlertDescription.INTERNAL_ERROR, failure)
            return
        finally:
            info.wipe()
        keys.rx_secret[:] = next_secret
        next_secret[:] = bytes(len(next_secret))
        self._key_updates_received += 1
        self._rx_records_since_check = 0
        self._rx_records_at_check = 0
        self._rx_update_requested = False
        if update_requested:
            await self._schedule_tx_update(request_peer_update=False)

    async def _schedule_tx_update(self, *, request_peer_update: bool) -> None:
        """Have our KeyUpdate sent soon, without the reader ever waiting on a writer.

        If a task holds the writer lock, the writer sends it between two chunks (or before
        the lock is released); otherwise the reader sends it now.
        """
        writer = self._writer
        assert writer is not None
        writer.schedule_update(request_peer_update=request_peer_update)
        if writer.lock.locked():
            return
        async with writer.lock:
            try:
                await writer.service_pending()
            except KTLSRekeyUnsupportedError as exc:
                await self._fatal_alert(AlertDescription.INTERNAL_ERROR, exc, locked=True)

    async def _send_alert(self, alert: Alert, *, wait: bool) -> None:
        """Send an alert through the kernel. With ``wait=False`` give up rather than wait
        for a busy writer (the stream is failing anyway)."""
        writer = self._writer
        if writer is None or (not wait and writer.lock.locked()):
            return
        async with writer.lock:
            with contextlib.suppress(OSError):
                await writer.send_control(ContentType.ALERT, alert.encode())

    async def _fatal_alert(
        self, description: int, failure: str | BaseException, *, locked: bool = False
    ) -> None:
        """Fail the stream and tell the peer why (best effort, never waiting on a busy
        writer). ``locked``: the caller already holds the writer lock."""
        self._fail(TLSProtocolError(failure) if isinstance(failure, str) else failure)
        alert = Alert(AlertLevel.FATAL, description)
        if locked and self._writer is not None:
            with contextlib.suppress(OSError):
                await self._writer.send_control(ContentType.ALERT, alert.encode())
        else:
            await self._send_alert(alert, wait=False)

    # -- the public stream API --------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        async def write() -> None:
            if self._writer is not None:
                await self._writer.send_data(data)
            else:
                await self._user_space_send(data)

        await self._send(write)

    async def send_file(
        self, file: int | BinaryIO, *, offset: int = 0, count: int | None = None
    ) -> None:
        """Send ``count`` bytes (default: to the end) of a regular file from ``offset``.

        The file is read in chunks in a worker thread (its own position is neither used
        nor changed) and each chunk goes out like ``send_all``, under the writer lock.
        Raises `EOFError`, and breaks the stream, if the file is shorter than that.

        Not yet zero-copy: ``sendfile(2)`` into a non-blocking kTLS socket stalled in the
        6.1 guest (both ends waiting, the data held back at the sender), so it is not used
        until that is understood.
        """
        fd = file if isinstance(file, int) else file.fileno()
        if count is None:
            count = os.fstat(fd).st_size - offset
        if offset < 0 or count < 0:
            raise ValueError("offset and count must not be negative")
        total = count

        async def write() -> None:
            position, remaining = offset, total
            while remaining:
                chunk = await trio.to_thread.run_sync(
                    os.pread, fd, min(_USER_SPACE_WRITE_CHUNK, remaining), position
                )
                if not chunk:
                    raise EOFError(f"the file ended {remaining} bytes before the requested count")
                if self._writer is not None:
                    await self._writer.send_data(chunk)
                else:
                    await self._user_space_send(chunk)
                position += len(chunk)
                remaining -= len(chunk)

        await self._send(write)

    async def _send(self, write: Callable[[], Awaitable[None]]) -> None:
        """The common frame of every application write: misuse checks, the writer lock,
        and turning failures into a broken stream (cancellation included, as in
        trio.SSLStream: we cannot know how much went out)."""
        with self._send_conflict:
            await self.do_handshake()
            if self._eof_sent:
                raise trio.ClosedResourceError("can't send data after sending EOF")
            self._check_status()
            try:
                async with self._write_lock:
                    self._check_status()
                    await write()
                    if self._writer is not None:
                        await self._writer.service_pending()
            except ConfidentialityLimitError as exc:
                await self._close_at_limit(exc)
                raise self._broken_error() from exc
            except trio.Cancelled:
                self._fail(trio.BrokenResourceError("a write was cancelled midway"))
                raise
            except (trio.BrokenResourceError, KTLSRekeyUnsupportedError) as exc:
                self._fail(exc)
                raise self._broken_error() from exc
            except EOFError:
                self._fail(trio.BrokenResourceError("send_file stopped short: file too short"))
                raise
            except (ssl.SSLError, OSError) as exc:
                self._fail(exc)
                raise self._broken_error() from exc

    async def _close_at_limit(self, exc: ConfidentialityLimitError) -> None:
        """RFC 8446 §5.5: never exceed the limit; close cleanly instead. The writer kept
        one record in reserve for this close_notify. Called with the writer lock held."""
        assert self._writer is not None
        with contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            await self._writer.send_control(ContentType.ALERT, CLOSE_NOTIFY.encode())
            self._eof_sent = True
            await self.transport_stream.send_eof()
        self._fail(exc)

    async def update_keys(self, *, request_peer_update: bool = False) -> None:
        """Send a TLS 1.3 KeyUpdate and switch to the next transmit key (RFC 8446 §4.6.3).

        With ``request_peer_update`` the peer is asked to update its keys too. Waits for
        any ``send_all`` in progress to reach a chunk boundary: no application byte is
        ever encrypted under the wrong key. Raises `KTLSRekeyUnsupportedError` (and leaves
        the stream usable) where it cannot be done: TLS 1.2, no kernel TX offload, or a
        kernel without TLS 1.3 rekey (before 6.14).
        """
        await self.do_handshake()
        self._check_status()
        writer = self._writer
        if writer is None:
            raise KTLSRekeyUnsupportedError(
                "key updates need the transmit side in the kernel "
                f"({self._offload_reason or 'not offloaded'})"
            )
        if not writer.can_rotate:
            await trio.lowlevel.checkpoint()
            raise writer.cannot_rotate_error()
        async with writer.lock:
            self._check_status()
            try:
                await writer.rotate(request_peer_update=request_peer_update)
            except (KTLSRekeyUnsupportedError, OSError) as exc:
                self._fail(exc)
                raise self._broken_error() from exc

    async def _user_space_send(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        if not view:
            await trio.lowlevel.checkpoint()
            return
        for start in range(0, len(view), _USER_SPACE_WRITE_CHUNK):
            self._ssl.write(view[start : start + _USER_SPACE_WRITE_CHUNK])
            await self.transport_stream.send_all(self._outgoing.read())

    async def wait_send_all_might_not_block(self) -> None:
        with self._send_conflict:
            await self.do_handshake()
            self._check_status()
            await self.transport_stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)  # TypeError for 1.5, like a socket
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
        with self._receive_conflict:
            await self.do_handshake()
            if self._state is _State.CLOSED:
                raise trio.ClosedResourceError("this KTLSStream was closed")
            if self._rx_kernel:
                return await self._kernel_receive(max_bytes or _DEFAULT_RECEIVE_SIZE)
            self._check_status()
            return await self._user_space_receive(max_bytes or _DEFAULT_RECEIVE_SIZE)

    async def _kernel_receive(self, max_bytes: int) -> bytes:
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._rx_buffer:
            if self._state is _State.CLOSED:
                raise trio.ClosedResourceError("this KTLSStream was closed")
            if self._state is _State.BROKEN:
                raise self._broken_error()
            if self._rx_eof:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return b""
            if not self._reader_running:
                raise trio.BrokenResourceError("the stream's reader task is no longer running")
            await self._data_waiters.park()
        data = bytes(self._rx_buffer[:max_bytes])
        del self._rx_buffer[:max_bytes]
        self._room_waiters.unpark_all()
        await trio.lowlevel.cancel_shielded_checkpoint()
        return data

    async def _user_space_receive(self, max_bytes: int) -> bytes:
        while True:
            try:
                data = self._ssl.read(max_bytes)
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                await trio.lowlevel.checkpoint()
                return b""
            except (ssl.SSLEOFError, ssl.SSLSyscallError) as exc:
                if self._https_compatible:
                    await trio.lowlevel.checkpoint()
                    return b""
                self._fail(exc)
                raise self._broken_error() from exc
            except ssl.SSLError as exc:
                self._fail(exc)
                raise self._broken_error() from exc
            else:
                await self._flush_user_space_output()
                await trio.lowlevel.checkpoint()
                return data
            await self._flush_user_space_output()
            try:
                chunk = await self.transport_stream.receive_some(_RECV_SIZE)
            except trio.BrokenResourceError as exc:
                self._fail(exc)
                raise self._broken_error() from exc
            if chunk:
                self._incoming.write(chunk)
            else:
                self._incoming.write_eof()

    async def _flush_user_space_output(self) -> None:
        """Send what OpenSSL wrote while reading (a KeyUpdate answer, an alert)."""
        if self._outgoing.pending:
            async with self._write_lock:
                await self.transport_stream.send_all(self._outgoing.read())

    async def send_eof(self) -> None:
        with self._send_conflict:
            await self.do_handshake()
            self._check_status()
            if self._eof_sent:
                await trio.lowlevel.checkpoint()
                return
            async with self._write_lock:
                await self._send_close_notify_locked()
                self._eof_sent = True
                await self.transport_stream.send_eof()

    async def _send_close_notify_locked(self) -> None:
        if self._writer is not None:
            await self._writer.send_control(ContentType.ALERT, CLOSE_NOTIFY.encode())
            return
        # unwrap() queues our close_notify, then wants the peer's, which may come later.
        with contextlib.suppress(ssl.SSLWantReadError):
            self._ssl.unwrap()
        await self.transport_stream.send_all(self._outgoing.read())

    async def aclose(self) -> None:
        if self._state is _State.CLOSED:
            await trio.lowlevel.checkpoint()
            return
        was_ok = self._state is _State.OK
        self._state = _State.CLOSED
        self._reader_scope.cancel()
        self._wake_receivers()
        self._room_waiters.unpark_all()
        try:
            if (
                was_ok
                and self._handshake_done.is_set()
                and not self._eof_sent
                and not self._write_lock.locked()
            ):
                async with self._write_lock:
                    try:
                        await self._send_close_notify_locked()
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass
                    except ssl.SSLError:
                        pass
        except BaseException:
            await trio.aclose_forcefully(self.transport_stream)
            raise
        finally:
            self._wipe()
        await self.transport_stream.aclose()

    def _forget_secrets(self) -> None:
        """Drop this connection's key-log lines if the handshake never reached handoff."""
        client_random = self._observer.client_random
        if self._tap is not None and client_random is not None:
            self._tap.drain()
            self._tap.discard(client_random)

    def _wipe(self) -> None:
        if self._keys is not None:
            self._keys.wipe()
