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

Reading the handshake one record at a time (header, then exactly the body) guarantees that
no ciphertext meant for the kernel was consumed by user space.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import weakref
from dataclasses import dataclass, field
from typing import Final

from ._kernel import KERNEL_CIPHER_FOR_AEAD, CryptoInfo, TLSVersion
from ._keylog import (
    KeyLogCollector,
    client_random_from_client_hello,
    server_random_from_server_hello,
)
from ._keyschedule import CipherSuite, tls12_key_block, tls13_traffic_key_iv
from ._messages import (
    RECORD_HEADER_LENGTH,
    ContentType,
    HandshakeType,
    parse_record_header,
)

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


@dataclass
class HandoffKeys:
    """Both directions' kernel keys, plus what later key updates need."""

    version: TLSVersion
    tx: CryptoInfo
    rx: CryptoInfo
    #: TLS 1.3 only: the current application traffic secrets (for RFC 8446 §7.2 updates).
    tx_secret: bytearray | None = field(default=None, repr=False)
    rx_secret: bytearray | None = field(default=None, repr=False)

    def wipe(self) -> None:
        self.tx.wipe()
        self.rx.wipe()
        for secret in (self.tx_secret, self.rx_secret):
            if secret is not None:
                secret[:] = bytes(len(secret))


class MissingSecretError(Exception):
    """The key log did not contain what this connection needs."""


def initial_sequence_numbers(
    version: TLSVersion, *, server_side: bool, final_flush_protected_records: int
) -> tuple[int, int]:
    """(TX, RX) sequence numbers of the first records the kernel handles (see above)."""
    if version is TLSVersion.TLS1_2:
        return 1, 1
    return (final_flush_protected_records if server_side else 0), 0


def derive_handoff_keys(
    suite: CipherSuite,
    secrets: dict[str, bytearray],
    observer: HandshakeObserver,
    *,
    tx_seq: int,
    rx_seq: int,
) -> HandoffKeys:
    version = TLSVersion(suite.tls_version)
    cipher = KERNEL_CIPHER_FOR_AEAD[suite.aead]
    server_side = observer.server_side
    if version is TLSVersion.TLS1_3:
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
        return HandoffKeys(
            version,
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
    return HandoffKeys(
        version,
        tx=CryptoInfo(version, cipher, key=tx_key, write_iv=tx_iv, rec_seq=tx_seq),
        rx=CryptoInfo(version, cipher, key=rx_key, write_iv=rx_iv, rec_seq=rx_seq),
    )


def wipe_secrets(secrets: dict[str, bytearray]) -> None:
    for secret in secrets.values():
        secret[:] = bytes(len(secret))
    secrets.clear()
