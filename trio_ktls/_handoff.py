"""Moving a finished user-space handshake into the kernel: secrets, keys, sequence numbers.

Theory of operation
-------------------
OpenSSL never hands out traffic keys, but it does write the NSS *key log* (the format
``SSLKEYLOGFILE`` uses) for every connection of an ``SSLContext`` whose
``keylog_filename`` is set. `KeyLogTap` points that file name at a memfd, an anonymous
in-memory file that never reaches disk, reads each connection's lines after every
``do_handshake()`` step, truncates the memfd (wiping what it held) and, if the user had
pointed ``keylog_filename`` at a file of their own for debugging, appends the same lines
there so their tools keep working. Lines are matched to a connection by its client_random,
taken from the ClientHello (`HandshakeObserver`). Draining is read-then-truncate: safe for
any number of trio tasks (one thread), but another *thread* handshaking on the same
context at that instant could lose a line, and its connection would then stay in user
space. Give such threads their own context.

From the secrets (`derive_handoff_keys`):

- TLS 1.3 (RFC 8446 §7.3): ``[sender]_write_key/iv = HKDF-Expand-Label(
  [sender]_application_traffic_secret_0, "key"/"iv", "", length)``. The secrets are kept
  (as wipeable bytearrays) because KeyUpdate derives the next ones from them (§7.2).
- TLS 1.2 (RFC 5246 §6.3): ``key_block = PRF(master_secret, "key expansion",
  server_random + client_random)``, cut into client key, server key, client IV, server IV.

Sequence numbers (RFC 8446 §5.3, RFC 5246 §6.1): each direction counts records from 0 at
every key change. The kernel must start at the number of the next record:

- TLS 1.3 client: TX 0 (its Finished went out under the handshake key), RX 0 (we stop
  reading at the server's Finished; the tickets that follow are still in the socket).
- TLS 1.3 server: RX 0; TX = the NewSessionTicket records OpenSSL wrote under the
  application key in the call that finished the handshake (``num_tickets``, usually 2).
  They are the type-23 records of that call's output.
- TLS 1.2: both directions 1, since each side's Finished was record 0 under the new key.

Reading the handshake one record at a time (``_handshake``) guarantees that no ciphertext
meant for the kernel was consumed by user space.

The handoff, step by step
-------------------------
1. Before the handshake, `prepare` attaches the TLS ULP (the socket is ESTABLISHED, and a
   refusal says at once why the kernel cannot help) and taps the context's key log.
2. After it, `hand_off` matches the key log to this connection, derives both directions'
   keys and installs ``TLS_TX`` first: once the kernel owns TX OpenSSL can no longer
   write, so if TX is refused nothing has changed and the stream stays in user space.
   ``TLS_RX`` follows; if the kernel took TX but refuses RX the connection cannot go on
   either way, and the stream breaks with a clear error rather than guess.
3. It returns the kernel record layer (``_recordlayer``), or the reason to stay in user
   space, in words, for ``ktls_info.reason`` (``ktls="require"`` raises it instead).
"""

from __future__ import annotations

import contextlib
import errno
import os
import ssl
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import trio

from . import _kernel
from ._errors import TLSProtocolError
from ._kernel import KERNEL_CIPHER_FOR_AEAD, CryptoInfo
from ._keylog import (
    KeyLogCollector,
    client_random_from_client_hello,
    server_random_from_server_hello,
)
from ._keys import RecordBudget, TrafficKeys
from ._keyschedule import (
    Aead,
    CipherSuite,
    lookup_suite,
    tls12_key_block,
    tls13_traffic_key_iv,
    tls_version_from_name,
    tls_version_name,
)
from ._messages import (
    RECORD_HEADER_LENGTH,
    ContentType,
    HandshakeType,
    parse_record_header,
)
from ._options import StreamOptions
from ._probe import ulp_error_reason
from ._reader import KernelReader
from ._recordlayer import KernelRecordLayer
from ._report import HandoffTrace
from ._state import StreamStatus
from ._ticket_relay import TicketRelay
from ._writer import KernelWriter

if TYPE_CHECKING:
    from ._handshake import Handshake

_READ_CHUNK: Final = 64 * 1024


class KeyLogTap:
    """The in-memory key log of one ``SSLContext`` (shared by all its connections)."""

    _taps: Final[weakref.WeakKeyDictionary[ssl.SSLContext, KeyLogTap]] = (
        weakref.WeakKeyDictionary()
    )

    @classmethod
    def for_context(cls, context: ssl.SSLContext) -> KeyLogTap:
        tap = cls._taps.get(context)
        if tap is None:
            tap = cls._taps[context] = cls(context)
        return tap

    def __init__(self, context: ssl.SSLContext) -> None:
        # The user's own key log file (SSLKEYLOGFILE or set by hand) keeps receiving lines.
        self._user_path: str | None = context.keylog_filename
        self._fd = os.memfd_create("trio_ktls-keylog", os.MFD_CLOEXEC)
        # Closing the memfd when the context goes away; OpenSSL holds its own descriptor.
        weakref.finalize(self, os.close, self._fd)
        context.keylog_filename = f"/proc/self/fd/{self._fd}"
        self._collector = KeyLogCollector()

    def drain(self) -> None:
        """Move every line OpenSSL has written so far into memory, then wipe the memfd.

        CPython flushes after each line, so after a ``do_handshake()`` call its lines are
        all there. The memfd was opened by OpenSSL in append mode, so truncating it makes
        the next line start at offset 0 again.
        """
        data = bytearray()
        while chunk := os.pread(self._fd, _READ_CHUNK, len(data)):
            data += chunk
        if not data:
            return
        os.ftruncate(self._fd, 0)
        if self._user_path:
            with contextlib.suppress(OSError), open(self._user_path, "ab") as f:
                f.write(data)
        try:
            self._collector.feed(bytes(data))
        finally:
            data[:] = bytes(len(data))

    def take(self, client_random: bytes) -> dict[str, bytearray]:
        return self._collector.take(client_random)

    def discard(self, client_random: bytes) -> None:
        self._collector.discard(client_random)


@dataclass
class HandshakeObserver:
    """Watches the plaintext handshake records both ways for what the handoff needs."""

    server_side: bool
    client_random: bytes | None = None
    server_random: bytes | None = None
    #: Type-23 records in the most recent batch of outgoing bytes.
    last_flush_protected_records: int = 0
    #: What the handshake and handoff did, for ``ktls_info.handoff``.
    trace: HandoffTrace = field(default_factory=HandoffTrace)
    #: Which sides (True: the client) have sent ChangeCipherSpec.
    _encrypting: set[bool] = field(default_factory=set)

    def outgoing(self, data: bytes) -> None:
        self.last_flush_protected_records = 0
        for content_type, body in split_records(data):
            self._look_at(content_type, body, ours=True)
            if content_type == ContentType.APPLICATION_DATA:
                self.last_flush_protected_records += 1

    def incoming(self, record: bytes) -> None:
        self._look_at(record[0], record[RECORD_HEADER_LENGTH:], ours=False)

    def _look_at(self, content_type: int, body: bytes, *, ours: bool) -> None:
        from_client = ours != self.server_side
        encrypted = content_type == ContentType.APPLICATION_DATA or from_client in self._encrypting
        self.trace.record(sent=ours, content_type=content_type, body=body, encrypted=encrypted)
        if content_type == ContentType.CHANGE_CIPHER_SPEC:
            # TLS 1.2: what this side sends from now on (its Finished) is encrypted, and
            # its first byte means nothing. (TLS 1.3 encrypts inside type-23 records.)
            self._encrypting.add(from_client)
            return
        if content_type != ContentType.HANDSHAKE or not body or from_client in self._encrypting:
            return
        if body[0] == HandshakeType.CLIENT_HELLO and from_client and self.client_random is None:
            self.client_random = client_random_from_client_hello(body)
        elif body[0] == HandshakeType.SERVER_HELLO and not from_client:
            # TLS 1.2 needs the ServerHello random; a TLS 1.3 HelloRetryRequest's
            # placeholder random is overwritten by the real ServerHello that follows.
            self.server_random = server_random_from_server_hello(body)


def split_records(data: bytes) -> list[tuple[int, bytes]]:
    """(content type, body) of each whole record in ``data`` (our own output: well formed)."""
    records = []
    offset = 0
    while offset + RECORD_HEADER_LENGTH <= len(data):
        header = parse_record_header(data[offset : offset + RECORD_HEADER_LENGTH])
        start = offset + RECORD_HEADER_LENGTH
        records.append((int(header.content_type), data[start : start + header.length]))
        offset = start + header.length
    return records


class MissingSecretError(Exception):
    """The key log did not contain what this connection needs."""


def initial_sequence_numbers(
    version: ssl.TLSVersion, *, server_side: bool, final_flush_protected_records: int
) -> tuple[int, int]:
    """(TX, RX) sequence numbers of the first records the kernel handles (see above)."""
    if version is ssl.TLSVersion.TLSv1_2:
        return 1, 1
    return (final_flush_protected_records if server_side else 0), 0


def derive_handoff_keys(
    suite: CipherSuite,
    secrets: dict[str, bytearray],
    observer: HandshakeObserver,
    *,
    tx_seq: int,
    rx_seq: int,
) -> TrafficKeys:
    """Both directions' kernel keys from the key log's secrets (see the module doc)."""
    version = suite.tls_version
    cipher = KERNEL_CIPHER_FOR_AEAD[suite.aead]
    server_side = observer.server_side
    if version is ssl.TLSVersion.TLSv1_3:
        own, peer = "CLIENT_TRAFFIC_SECRET_0", "SERVER_TRAFFIC_SECRET_0"
        if server_side:
            own, peer = peer, own
        if own not in secrets or peer not in secrets:
            raise MissingSecretError(f"key log lacks {own} or {peer}")
        tx_key, tx_iv = tls13_traffic_key_iv(
            bytes(secrets[own]), suite.key_length, suite.hash_algorithm
        )
        rx_key, rx_iv = tls13_traffic_key_iv(
            bytes(secrets[peer]), suite.key_length, suite.hash_algorithm
        )
        return TrafficKeys(
            suite,
            tx=CryptoInfo(version, cipher, key=tx_key, write_iv=tx_iv, rec_seq=tx_seq),
            rx=CryptoInfo(version, cipher, key=rx_key, write_iv=rx_iv, rec_seq=rx_seq),
            tx_secret=bytearray(secrets[own]),
            rx_secret=bytearray(secrets[peer]),
        )
    master = secrets.get("CLIENT_RANDOM")
    if master is None:
        raise MissingSecretError("key log lacks the TLS 1.2 master secret (CLIENT_RANDOM)")
    if observer.client_random is None or observer.server_random is None:
        raise MissingSecretError("did not see both hello randoms")
    block = tls12_key_block(
        bytes(master),
        observer.client_random,
        observer.server_random,
        key_length=suite.key_length,
        iv_length=suite.fixed_iv_length,
        algorithm=suite.hash_algorithm,
    )
    client = (block.client_write_key, block.client_write_iv)
    server = (block.server_write_key, block.server_write_iv)
    (tx_key, tx_iv), (rx_key, rx_iv) = (server, client) if server_side else (client, server)
    return TrafficKeys(
        suite,
        tx=CryptoInfo(version, cipher, key=tx_key, write_iv=tx_iv, rec_seq=tx_seq),
        rx=CryptoInfo(version, cipher, key=rx_key, write_iv=rx_iv, rec_seq=rx_seq),
    )


def wipe_secrets(secrets: dict[str, bytearray]) -> None:
    for secret in secrets.values():
        secret[:] = bytes(len(secret))
    secrets.clear()


#: Why `prepare` failed when the TCP connection was already gone (reset or closed by the
#: peer between accept and the stream's construction): a broken connection, not a kernel
#: without kTLS.
CONNECTION_LOST: Final = "the TCP connection was lost before the TLS handshake began"


def prepare(
    transport_stream: trio.abc.Stream, context: ssl.SSLContext, trace: HandoffTrace
) -> KeyLogTap | str:
    """Step 1: attach the TLS ULP and tap ``context``'s key log, or say why not."""
    if not isinstance(transport_stream, trio.SocketStream):
        return (
            f"the transport is a {type(transport_stream).__name__}, not a TCP socket "
            "(trio.SocketStream), so the kernel cannot take its records"
        )
    try:
        _kernel.attach_ulp(transport_stream.socket)
    except OSError as exc:
        trace.socket_option(_ATTACH_ULP, exc)
        # A trio.SocketStream was connected once; ENOTCONN now means the peer reset it.
        return CONNECTION_LOST if exc.errno == errno.ENOTCONN else ulp_error_reason(exc)
    trace.socket_option(_ATTACH_ULP)
    return KeyLogTap.for_context(context)


_ATTACH_ULP: Final = "setsockopt(IPPROTO_TCP, TCP_ULP, b'tls')"


def _install_call(direction: str, keys: CryptoInfo, rec_seq: int) -> str:
    """How an install shows in the report: the struct by size and kind, never its bytes."""
    size = _kernel.crypto_info_size(keys.cipher)
    what = f"{size}-byte crypto_info: {tls_version_name(keys.version)} {keys.cipher.name}"
    return f"setsockopt(SOL_TLS, {direction}, <{what}, rec_seq {rec_seq}>)"


def hand_off(
    handshake: Handshake,
    tap: KeyLogTap,
    status: StreamStatus,
    options: StreamOptions,
    *,
    https_compatible: bool,
) -> KernelRecordLayer | str:
    """Steps 2 and 3: the kernel record layer, or the reason to stay in user space.

    Raises `TLSProtocolError` if the kernel took the transmit key and refused the
    receive key. The key log's lines for this connection are taken and wiped either way.
    """
    ssl_object, observer = handshake.ssl_object, handshake.observer
    trace = observer.trace
    transport = handshake.transport_stream
    assert isinstance(transport, trio.SocketStream)  # prepare() tapped only sockets
    version_name = ssl_object.version()
    cipher = ssl_object.cipher()
    cipher_name = cipher[0] if cipher else "unknown"
    suite = lookup_suite(cipher_name, tls_version_from_name(version_name))
    tap.drain()
    if observer.client_random is None:
        return "the ClientHello was not seen, so the key log cannot be matched"
    secrets = tap.take(observer.client_random)
    trace.secrets.extend((label, len(secret)) for label, secret in secrets.items())
    try:
        if suite is None:
            return f"the kernel cannot offload {version_name} {cipher_name}"
        if handshake.holds_unread_bytes:
            return "OpenSSL holds unread bytes after the handshake"
        tx_seq, rx_seq = initial_sequence_numbers(
            suite.tls_version,
            server_side=observer.server_side,
            final_flush_protected_records=observer.last_flush_protected_records,
        )
        try:
            keys = derive_handoff_keys(suite, secrets, observer, tx_seq=tx_seq, rx_seq=rx_seq)
        except MissingSecretError as exc:
            return f"the key log did not give this connection's secrets: {exc}"
    finally:
        wipe_secrets(secrets)
    trace.key_length = suite.key_length
    trace.iv_length = _kernel.write_iv_size(suite.tls_version, keys.tx.cipher)
    trace.tx_rec_seq, trace.rx_rec_seq = tx_seq, rx_seq
    sock = transport.socket
    tx_call = _install_call("TLS_TX", keys.tx, tx_seq)
    try:
        _kernel.install_key(sock, _kernel.TLS_TX, keys.tx)
    except OSError as exc:
        trace.socket_option(tx_call, exc)
        keys.wipe()
        why = os.strerror(exc.errno or 0)
        return f"the kernel refused the {cipher_name} transmit key: {why}"
    trace.socket_option(tx_call)
    rx_call = _install_call("TLS_RX", keys.rx, rx_seq)
    try:
        _kernel.install_key(sock, _kernel.TLS_RX, keys.rx)
    except OSError as exc:
        trace.socket_option(rx_call, exc)
        keys.wipe()
        raise TLSProtocolError(
            "the kernel accepted the transmit key but refused the receive key "
            f"({os.strerror(exc.errno or 0)}); the connection cannot continue"
        ) from exc
    trace.socket_option(rx_call)
    return _kernel_record_layer(
        handshake, transport, keys, status, options, (tx_seq, rx_seq), https_compatible
    )


def _kernel_record_layer(
    handshake: Handshake,
    transport: trio.SocketStream,
    keys: TrafficKeys,
    status: StreamStatus,
    options: StreamOptions,
    first_seqs: tuple[int, int],
    https_compatible: bool,
) -> KernelRecordLayer:
    sock, cipher = transport.socket, keys.tx.cipher
    keys.tx.wipe()  # installed; the kernel has them now
    keys.rx.wipe()
    tx_limit, rx_limit = record_limits(keys.suite)
    if options.rekey_after_records is not None:
        tx_limit = options.rekey_after_records
    if options.request_peer_rekey_after_records is not None:
        rx_limit = options.request_peer_rekey_after_records
    tx_budget = RecordBudget(
        tx_limit,
        first_seq=first_seqs[0],
        read_exact=lambda: _kernel.read_rec_seq(sock, _kernel.TLS_TX, cipher),
    )
    rx_budget = RecordBudget(
        rx_limit,
        first_seq=first_seqs[1],
        read_exact=lambda: _kernel.read_rec_seq(sock, _kernel.TLS_RX, cipher),
    )
    relay = None
    rx_secret = keys.rx_secret
    if rx_secret is not None and not handshake.observer.server_side:
        relay = TicketRelay(
            keys.suite, rx_secret, handshake.ssl_object, handshake.incoming, handshake.outgoing
        )
    writer = KernelWriter(sock, keys, tx_budget)
    writer.raise_low_water_mark()
    reader = KernelReader(
        sock,
        writer,
        keys,
        rx_budget,
        status,
        https_compatible=https_compatible,
        max_buffer=options.max_receive_buffer,
        ticket_relay=relay,
    )
    return KernelRecordLayer(
        transport, keys, writer, reader, status, https_compatible=https_compatible
    )


# RFC 8446 §5.5: AES-GCM keys must be rotated before 2**24.5 full-size records. The AEAD
# limits analysis (draft-irtf-cfrg-aead-limits) gives AES-CCM a lower bound, 2**23.5;
# ChaCha20-Poly1305's (2**62 and more) is out of reach, so there is no limit to enforce.
_RECORD_LIMITS: Final[dict[Aead, int | None]] = {
    Aead.AES_128_GCM: int(2**24.5),
    Aead.AES_256_GCM: int(2**24.5),
    Aead.AES_128_CCM: int(2**23.5),
    Aead.CHACHA20_POLY1305: None,
}


def record_limits(suite: CipherSuite) -> tuple[int | None, int | None]:
    """(rekey our key after, ask the peer to rekey after) records, by default.

    We rotate our own key at the limit; we ask the peer at half of it, so that a peer
    that does not track the limit itself is still well inside it.
    """
    limit = _RECORD_LIMITS[suite.aead]
    return limit, (None if limit is None else limit // 2)
