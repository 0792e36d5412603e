"""What a connection's handoff did, for people: `HandoffReport` in ``ktls_info.handoff``.

A kTLS handoff is invisible when it works and hard to debug when it does not. The report
collects, as the handshake and handoff go by, what a person would want to see:

- every record of the handshake, both ways: its type, length, whether it was encrypted,
  and the handshake messages of the plaintext ones (RFC 8446 §4, RFC 5246 §7.4);
- the key-log secrets found for the connection, as labels and lengths;
- the lengths of the derived record key and IV, and the first sequence numbers the kernel
  was given (``_handoff`` says why they are what they are);
- every ``setsockopt`` made for the handoff, with its outcome.

Never a byte of key material: secrets and keys appear only as lengths. The collector,
`HandoffTrace`, is filled in by ``_handoff``'s observer and functions; the stream turns
it into a frozen `HandoffReport` once the handshake is done. It costs a dozen small
tuples per connection.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from typing import Final, final

from ._messages import ContentType, HandshakeType

_HANDSHAKE_MESSAGE_HEADER: Final = 4  # msg_type (1 byte), length (3 bytes)


@final
@dataclass(frozen=True)
class HandshakeRecord:
    """One TLS record of the handshake as it crossed the socket (its size, not its bytes)."""

    #: True for a record we sent, False for one the peer sent.
    sent: bool
    #: The record's content type as RFC 8446 §5.1 names it (``"handshake"``,
    #: ``"change_cipher_spec"``, ``"alert"``, ``"application_data"``), or its number.
    content_type: str
    #: Length of the record's body (without the 5-byte header).
    length: int
    #: Whether the body was encrypted (TLS 1.3 hides everything after the ServerHello in
    #: ``application_data`` records; TLS 1.2 encrypts each side's Finished).
    encrypted: bool
    #: The handshake messages a plaintext handshake record carries (``"client_hello"``,
    #: ``"server_hello"``...); empty for every other record.
    messages: tuple[str, ...] = ()


@final
@dataclass(frozen=True)
class HandoffReport:
    """How one connection was handed to the kernel (``KTLSInfo.handoff``).

    Holds no key material: secrets and keys appear as lengths only. On a connection that
    stayed in user space the handshake records and the ``setsockopt`` calls that were
    tried are still there; the key fields are None and ``secrets`` is empty.
    """

    #: Every record of the handshake, both ways, in the order they crossed the socket
    #: (a TLS 1.3 server's NewSessionTickets, sent with its last flight, included).
    records: tuple[HandshakeRecord, ...]
    #: ``(label, length in bytes)`` of each key-log secret found for this connection
    #: (``CLIENT_TRAFFIC_SECRET_0``..., or TLS 1.2's ``CLIENT_RANDOM`` master secret).
    secrets: tuple[tuple[str, int], ...]
    #: Bytes of the record key derived for each direction (16 or 32).
    key_length: int | None
    #: Bytes of the write IV derived for each direction (12; TLS 1.2 AES-GCM: 4, the
    #: implicit part of the nonce).
    iv_length: int | None
    #: Sequence number of the first record the kernel sends (``rec_seq`` of ``TLS_TX``).
    tx_rec_seq: int | None
    #: Sequence number of the first record the kernel receives (``rec_seq`` of ``TLS_RX``).
    rx_rec_seq: int | None
    #: The ``setsockopt`` calls of the handoff in order, each with its outcome
    #: (``"setsockopt(SOL_TLS, TLS_TX, ...): ok"``); crypto_info shown by size only.
    socket_options: tuple[str, ...]

    def format(self) -> str:
        """The report as lines of text, one record or call per line."""
        lines = ["handshake records:"]
        for record in self.records:
            arrow = "->" if record.sent else "<-"
            what = ", ".join(record.messages) if record.messages else ""
            if record.encrypted:
                what = "encrypted"
            lines.append(f"  {arrow} {record.content_type:18} {record.length:6} bytes  {what}")
        if self.secrets:
            lines.append("secrets from the key log (values never shown):")
            lines.extend(f"  {label:32} {length} bytes" for label, length in self.secrets)
        if self.key_length is not None:
            lines.append(
                f"derived per direction: key {self.key_length} bytes, IV {self.iv_length} bytes"
            )
            lines.append(f"first sequence numbers: TX {self.tx_rec_seq}, RX {self.rx_rec_seq}")
        if self.socket_options:
            lines.append("socket options:")
            lines.extend(f"  {call}" for call in self.socket_options)
        return "\n".join(lines)


@dataclass
class HandoffTrace:
    """The mutable collector behind a `HandoffReport` (one per connection)."""

    records: list[HandshakeRecord] = field(default_factory=list)
    secrets: list[tuple[str, int]] = field(default_factory=list)
    key_length: int | None = None
    iv_length: int | None = None
    tx_rec_seq: int | None = None
    rx_rec_seq: int | None = None
    socket_options: list[str] = field(default_factory=list)
    # Bytes still to come of a handshake message split across records, per direction
    # (True: ours); None once a direction's plaintext messages can no longer be followed.
    _message_rest: dict[bool, int | None] = field(default_factory=lambda: {True: 0, False: 0})

    def record(self, *, sent: bool, content_type: int, body: bytes, encrypted: bool) -> None:
        messages: tuple[str, ...] = ()
        if content_type == ContentType.HANDSHAKE and not encrypted:
            messages = self._handshake_messages(sent, body)
        self.records.append(
            HandshakeRecord(sent, _content_type_name(content_type), len(body), encrypted, messages)
        )

    def socket_option(self, call: str, error: OSError | None = None) -> None:
        outcome = "ok" if error is None else _error_text(error)
        self.socket_options.append(f"{call}: {outcome}")

    def report(self) -> HandoffReport:
        return HandoffReport(
            records=tuple(self.records),
            secrets=tuple(self.secrets),
            key_length=self.key_length,
            iv_length=self.iv_length,
            tx_rec_seq=self.tx_rec_seq,
            rx_rec_seq=self.rx_rec_seq,
            socket_options=tuple(self.socket_options),
        )

    def _handshake_messages(self, sent: bool, body: bytes) -> tuple[str, ...]:
        """The messages that start in ``body``: a record may hold several, and a message
        may span records (RFC 8446 §5.1), so the rest of a split one is skipped first."""
        rest = self._message_rest[sent]
        if rest is None:
            return ()
        names: list[str] = []
        position = min(rest, len(body))
        rest -= position
        while rest == 0 and position < len(body):
            if position + _HANDSHAKE_MESSAGE_HEADER > len(body):
                # A header split across records: rare enough not to follow.
                self._message_rest[sent] = None
                return tuple(names)
            names.append(_handshake_type_name(body[position]))
            length = int.from_bytes(body[position + 1 : position + 4], "big")
            end = position + _HANDSHAKE_MESSAGE_HEADER + length
            rest = max(end - len(body), 0)
            position = min(end, len(body))
        self._message_rest[sent] = rest
        return tuple(names)


def _content_type_name(value: int) -> str:
    try:
        return ContentType(value).name.lower()
    except ValueError:
        return str(value)


def _handshake_type_name(value: int) -> str:
    try:
        return HandshakeType(value).name.lower()
    except ValueError:
        return f"handshake_type_{value}"


def _error_text(error: OSError) -> str:
    if error.errno is None:
        return f"failed ({error})"
    name = errno.errorcode.get(error.errno, str(error.errno))
    return f"failed with {name} ({os.strerror(error.errno)})"
