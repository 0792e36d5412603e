"""TLS record headers, alerts and the post-handshake handshake messages, as bytes.

Sans-IO: every function here takes bytes and returns values (or bytes); no sockets. Bytes
that do not parse raise ``TLSDecodeError`` carrying the alert the stream should answer
with.

Records (RFC 8446 §5.1, RFC 5246 §6.2.1)
----------------------------------------
Every record starts with a 5-byte header::

    struct {
        ContentType type;                  /* 20 ccs, 21 alert, 22 handshake, 23 data */
        ProtocolVersion legacy_record_version;  /* 0x0301..0x0303, major always 3 */
        uint16 length;
    } TLSPlaintext / TLSCiphertext header;

``length`` is at most 2^14 for plaintext, 2^14 + 256 for TLS 1.3 ciphertext (§5.2) and
2^14 + 2048 for TLS 1.2 ciphertext (RFC 5246 §6.2.3); more is a ``record_overflow``
alert. A record type we do not know is an ``unexpected_message`` alert (RFC 8446 §5).

Alerts (RFC 8446 §6, RFC 5246 §7.2)
-----------------------------------
Two bytes: level (1 warning, 2 fatal) and description. Unknown descriptions are kept as
plain ints: RFC 8446 §6 says to treat unknown alerts as errors, which is the caller's
decision, not a decoding failure.

Handshake messages (RFC 8446 §4)
--------------------------------
Each handshake message is ``msg_type`` (1 byte), a 24-bit length and the body. Messages
may be split across records and several may share one record (§5.1), so
``HandshakeReassembler`` rebuilds them from record payloads. §5.1 also says handshake
messages MUST NOT span a key change: ``HandshakeReassembler.pending`` lets the stream check
that nothing is buffered before it installs a new key.

After the handshake a TLS 1.3 peer sends NewSessionTicket (§4.6.1) and KeyUpdate (§4.6.3);
this module decodes both and encodes KeyUpdate.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import Final, TypeVar

from ._errors import TLSDecodeError

RECORD_HEADER_LENGTH: Final = 5
HANDSHAKE_HEADER_LENGTH: Final = 4

#: RFC 8446 §5.1 / RFC 5246 §6.2.1: the largest plaintext fragment.
MAX_PLAINTEXT: Final = 2**14
#: RFC 8446 §5.2: TLSCiphertext.length MUST NOT exceed 2^14 + 256.
MAX_CIPHERTEXT_TLS13: Final = MAX_PLAINTEXT + 256
#: RFC 5246 §6.2.3: TLSCiphertext.length MUST NOT exceed 2^14 + 2048 (the TLS 1.2 bound,
#: and the largest record any version allows).
MAX_CIPHERTEXT: Final = MAX_PLAINTEXT + 2048

#: Larger than any post-handshake message we expect (a NewSessionTicket is a few hundred
#: bytes; a certificate chain during the handshake is OpenSSL's business, not ours).
DEFAULT_MAX_HANDSHAKE_MESSAGE: Final = 64 * 1024

#: RFC 8446 §4.6.1: "Servers MUST NOT use any value greater than 604800 seconds (7 days)."
MAX_TICKET_LIFETIME: Final = 604800

_MAX_UINT24: Final = 2**24 - 1


class ContentType(enum.IntEnum):
    """RFC 8446 §5.1 record content types."""

    CHANGE_CIPHER_SPEC = 20
    ALERT = 21
    HANDSHAKE = 22
    APPLICATION_DATA = 23


class AlertLevel(enum.IntEnum):
    """RFC 5246 §7.2 (kept by RFC 8446 §6, where the level is implied by the description)."""

    WARNING = 1
    FATAL = 2


class AlertDescription(enum.IntEnum):
    """RFC 8446 §6 alert descriptions, with TLS 1.2 names for those TLS 1.3 reserves."""

    CLOSE_NOTIFY = 0
    UNEXPECTED_MESSAGE = 10
    BAD_RECORD_MAC = 20
    DECRYPTION_FAILED = 21  # TLS 1.0 only; reserved
    RECORD_OVERFLOW = 22
    DECOMPRESSION_FAILURE = 30  # reserved in TLS 1.3
    HANDSHAKE_FAILURE = 40
    NO_CERTIFICATE = 41  # SSL 3.0 only; reserved
    BAD_CERTIFICATE = 42
    UNSUPPORTED_CERTIFICATE = 43
    CERTIFICATE_REVOKED = 44
    CERTIFICATE_EXPIRED = 45
    CERTIFICATE_UNKNOWN = 46
    ILLEGAL_PARAMETER = 47
    UNKNOWN_CA = 48
    ACCESS_DENIED = 49
    DECODE_ERROR = 50
    DECRYPT_ERROR = 51
    EXPORT_RESTRICTION = 60  # TLS 1.0 only; reserved
    PROTOCOL_VERSION = 70
    INSUFFICIENT_SECURITY = 71
    INTERNAL_ERROR = 80
    INAPPROPRIATE_FALLBACK = 86
    USER_CANCELED = 90
    NO_RENEGOTIATION = 100  # TLS 1.2 (a warning there); reserved in TLS 1.3
    MISSING_EXTENSION = 109
    UNSUPPORTED_EXTENSION = 110
    CERTIFICATE_UNOBTAINABLE = 111  # RFC 6066; reserved in TLS 1.3
    UNRECOGNIZED_NAME = 112
    BAD_CERTIFICATE_STATUS_RESPONSE = 113
    BAD_CERTIFICATE_HASH_VALUE = 114  # RFC 6066; reserved in TLS 1.3
    UNKNOWN_PSK_IDENTITY = 115
    CERTIFICATE_REQUIRED = 116
    NO_APPLICATION_PROTOCOL = 120


class HandshakeType(enum.IntEnum):
    """RFC 8446 §4 handshake message types, plus the TLS 1.2 ones (RFC 5246 §7.4)."""

    HELLO_REQUEST = 0  # TLS 1.2: the server asks for renegotiation
    CLIENT_HELLO = 1
    SERVER_HELLO = 2
    NEW_SESSION_TICKET = 4
    END_OF_EARLY_DATA = 5
    ENCRYPTED_EXTENSIONS = 8
    CERTIFICATE = 11
    SERVER_KEY_EXCHANGE = 12  # TLS 1.2
    CERTIFICATE_REQUEST = 13
    SERVER_HELLO_DONE = 14  # TLS 1.2
    CERTIFICATE_VERIFY = 15
    CLIENT_KEY_EXCHANGE = 16  # TLS 1.2
    FINISHED = 20
    CERTIFICATE_STATUS = 22  # TLS 1.2, RFC 6066
    KEY_UPDATE = 24
    MESSAGE_HASH = 254


_E = TypeVar("_E", bound=enum.IntEnum)


def _enum_or_int(enum_type: type[_E], value: int) -> _E | int:
    try:
        return enum_type(value)
    except ValueError:
        return value


# --- Records ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordHeader:
    """The 5-byte header in front of every TLS record."""

    content_type: ContentType
    legacy_version: int
    length: int

    def encode(self) -> bytes:
        return (
            bytes((self.content_type,))
            + self.legacy_version.to_bytes(2, "big")
            + self.length.to_bytes(2, "big")
        )


def parse_record_header(data: bytes, *, max_length: int = MAX_CIPHERTEXT) -> RecordHeader:
    """Decode a record header (exactly 5 bytes).

    ``max_length`` is the largest ``length`` accepted: ``MAX_CIPHERTEXT`` (the default,
    RFC 5246's 2^14 + 2048), ``MAX_CIPHERTEXT_TLS13`` or ``MAX_PLAINTEXT`` where the caller
    knows better. Larger is ``record_overflow``; an unknown content type is
    ``unexpected_message``; a version whose major byte is not 3 is not TLS
    (``decode_error``).
    """
    if len(data) != RECORD_HEADER_LENGTH:
        raise TLSDecodeError(
            f"record header must be {RECORD_HEADER_LENGTH} bytes, got {len(data)}",
            alert=AlertDescription.DECODE_ERROR,
        )
    type_byte = data[0]
    version = int.from_bytes(data[1:3], "big")
    length = int.from_bytes(data[3:5], "big")
    try:
        content_type = ContentType(type_byte)
    except ValueError:
        raise TLSDecodeError(
            f"record has unknown content type {type_byte}",
            alert=AlertDescription.UNEXPECTED_MESSAGE,
        ) from None
    if version >> 8 != 3:
        raise TLSDecodeError(
            f"record version 0x{version:04x} is not TLS (major version must be 3)",
            alert=AlertDescription.DECODE_ERROR,
        )
    if length > max_length:
        raise TLSDecodeError(
            f"{content_type.name.lower()} record of {length} bytes exceeds the limit of "
            f"{max_length}",
            alert=AlertDescription.RECORD_OVERFLOW,
        )
    return RecordHeader(content_type, version, length)


# --- Alerts ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Alert:
    """An alert message (RFC 8446 §6). Unknown descriptions stay plain ints."""

    level: AlertLevel
    description: AlertDescription | int

    @classmethod
    def parse(cls, data: bytes) -> Alert:
        """Decode an alert record's payload (exactly 2 bytes)."""
        if len(data) != 2:
            raise TLSDecodeError(
                f"alert must be 2 bytes, got {len(data)}", alert=AlertDescription.DECODE_ERROR
            )
        try:
            level = AlertLevel(data[0])
        except ValueError:
            raise TLSDecodeError(
                f"alert has unknown level {data[0]} (must be 1 warning or 2 fatal)",
                alert=AlertDescription.ILLEGAL_PARAMETER,
            ) from None
        return cls(level, _enum_or_int(AlertDescription, data[1]))

    def encode(self) -> bytes:
        return bytes((self.level, self.description))

    def __str__(self) -> str:
        if isinstance(self.description, AlertDescription):
            name = self.description.name.lower()
        else:
            name = "unknown"
        return f"{self.level.name.lower()} alert {name} ({int(self.description)})"


#: RFC 8446 §6.1: the closure alert each side sends before closing its write side.
CLOSE_NOTIFY: Final = Alert(AlertLevel.WARNING, AlertDescription.CLOSE_NOTIFY)


# --- Handshake messages ----------------------------------------------------------------


def encode_handshake(msg_type: HandshakeType | int, body: bytes) -> bytes:
    """A complete handshake message: type, 24-bit length, body (RFC 8446 §4)."""
    if not 0 <= msg_type <= 255:
        raise ValueError(f"handshake type must be 0..255, got {msg_type}")
    if len(body) > _MAX_UINT24:
        raise ValueError(f"handshake body of {len(body)} bytes does not fit 24 bits")
    return bytes((msg_type,)) + len(body).to_bytes(3, "big") + body


class HandshakeReassembler:
    """Rebuilds handshake messages from the payloads of handshake records.

    Feed each handshake record's payload, in order, to ``feed``; take complete messages
    with ``next_message`` until it returns None. A message may span records and a record
    may hold several messages (RFC 8446 §5.1).

    ``pending`` counts every byte fed and not yet returned by ``next_message``: complete
    messages not yet taken plus the start of an incomplete one. RFC 8446 §5.1 forbids a
    handshake message to span a key change, and a record that carried a KeyUpdate must end
    with it; so before installing a new receive key, take the messages and require
    ``pending == 0`` (else ``unexpected_message``).

    A message longer than ``max_message_size`` is refused as soon as its header arrives,
    so a peer cannot make us buffer 16 MiB.
    """

    def __init__(self, *, max_message_size: int = DEFAULT_MAX_HANDSHAKE_MESSAGE) -> None:
        if not 0 <= max_message_size <= _MAX_UINT24:
            raise ValueError(f"max_message_size must be 0..2**24-1, got {max_message_size}")
        self.max_message_size: Final = max_message_size
        self._partial = bytearray()
        self._complete: deque[tuple[HandshakeType | int, bytes]] = deque()
        self._complete_bytes = 0

    @property
    def pending(self) -> int:
        """Bytes fed but not yet returned as part of a message (see the class docs)."""
        return len(self._partial) + self._complete_bytes

    def feed(self, payload: bytes) -> None:
        """Add one handshake record's payload.

        An empty payload is ``unexpected_message``: RFC 8446 §5.1 and RFC 5246 §6.2.1 forbid
        zero-length handshake fragments.
        """
        if not payload:
            raise TLSDecodeError(
                "empty handshake record (zero-length handshake fragments are forbidden)",
                alert=AlertDescription.UNEXPECTED_MESSAGE,
            )
        self._partial += payload
        while len(self._partial) >= HANDSHAKE_HEADER_LENGTH:
            msg_type = self._partial[0]
            length = int.from_bytes(self._partial[1:4], "big")
            if length > self.max_message_size:
                name = _handshake_name(msg_type)
                raise TLSDecodeError(
                    f"handshake message {name} of {length} bytes exceeds the limit of "
                    f"{self.max_message_size}",
                    alert=AlertDescription.DECODE_ERROR,
                )
            end = HANDSHAKE_HEADER_LENGTH + length
            if len(self._partial) < end:
                break
            body = bytes(self._partial[HANDSHAKE_HEADER_LENGTH:end])
            del self._partial[:end]
            self._complete.append((_enum_or_int(HandshakeType, msg_type), body))
            self._complete_bytes += end

    def next_message(self) -> tuple[HandshakeType | int, bytes] | None:
        """The next complete message as (type, body), or None when none is complete.

        Unknown types come back as plain ints: which messages are acceptable at this point
        is the caller's decision.
        """
        if not self._complete:
            return None
        msg_type, body = self._complete.popleft()
        self._complete_bytes -= HANDSHAKE_HEADER_LENGTH + len(body)
        return msg_type, body


def _handshake_name(msg_type: int) -> str:
    try:
        return HandshakeType(msg_type).name.lower()
    except ValueError:
        return f"type {msg_type}"


# --- KeyUpdate (RFC 8446 §4.6.3) -------------------------------------------------------


class KeyUpdateRequest(enum.IntEnum):
    UPDATE_NOT_REQUESTED = 0
    UPDATE_REQUESTED = 1


def parse_key_update(body: bytes) -> bool:
    """Decode a KeyUpdate body; True when the peer set ``update_requested``.

    The body is one byte (``decode_error`` otherwise); a value other than 0 or 1 is
    ``illegal_parameter`` (RFC 8446 §4.6.3).
    """
    if len(body) != 1:
        raise TLSDecodeError(
            f"KeyUpdate body must be 1 byte, got {len(body)}",
            alert=AlertDescription.DECODE_ERROR,
        )
    try:
        request = KeyUpdateRequest(body[0])
    except ValueError:
        raise TLSDecodeError(
            f"KeyUpdate request_update is {body[0]}, must be 0 or 1",
            alert=AlertDescription.ILLEGAL_PARAMETER,
        ) from None
    return request is KeyUpdateRequest.UPDATE_REQUESTED


def encode_key_update(update_requested: bool) -> bytes:
    """A complete KeyUpdate handshake message (header included)."""
    request = (
        KeyUpdateRequest.UPDATE_REQUESTED
        if update_requested
        else KeyUpdateRequest.UPDATE_NOT_REQUESTED
    )
    return encode_handshake(HandshakeType.KEY_UPDATE, bytes((request,)))


# --- NewSessionTicket (RFC 8446 §4.6.1) ------------------------------------------------


@dataclass(frozen=True)
class NewSessionTicket:
    """A TLS 1.3 NewSessionTicket::

        struct {
            uint32 ticket_lifetime;
            uint32 ticket_age_add;
            opaque ticket_nonce<0..255>;
            opaque ticket<1..2^16-1>;
            Extension extensions<0..2^16-2>;
        } NewSessionTicket;

    ``extensions`` is the raw extension list (without its length prefix).
    """

    lifetime: int
    age_add: int
    nonce: bytes
    ticket: bytes
    extensions: bytes


class _Reader:
    """Reads a message body front to back; every shortfall is a ``decode_error``."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._offset = 0
        self._what = what

    def take(self, n: int, field: str) -> bytes:
        end = self._offset + n
        if end > len(self._data):
            raise TLSDecodeError(
                f"{self._what} truncated in {field}: needs {n} bytes at offset "
                f"{self._offset}, {len(self._data) - self._offset} left",
                alert=AlertDescription.DECODE_ERROR,
            )
        chunk = self._data[self._offset : end]
        self._offset = end
        return chunk

    def uint(self, size: int, field: str) -> int:
        return int.from_bytes(self.take(size, field), "big")

    def vector(self, length_size: int, field: str) -> bytes:
        return self.take(self.uint(length_size, f"{field} length"), field)

    def finish(self) -> None:
        left = len(self._data) - self._offset
        if left:
            raise TLSDecodeError(
                f"{self._what} has {left} trailing bytes", alert=AlertDescription.DECODE_ERROR
            )


def parse_new_session_ticket(body: bytes) -> NewSessionTicket:
    """Decode a TLS 1.3 NewSessionTicket body (RFC 8446 §4.6.1).

    Lengths that overrun or underrun the body, an empty ticket, or an extensions block of
    2^16-1 bytes are ``decode_error``; a lifetime over 7 days is ``illegal_parameter``.
    """
    reader = _Reader(body, "NewSessionTicket")
    lifetime = reader.uint(4, "ticket_lifetime")
    age_add = reader.uint(4, "ticket_age_add")
    nonce = reader.vector(1, "ticket_nonce")
    ticket = reader.vector(2, "ticket")
    extensions = reader.vector(2, "extensions")
    reader.finish()
    if not ticket:
        raise TLSDecodeError(
            "NewSessionTicket has an empty ticket (must be 1..65535 bytes)",
            alert=AlertDescription.DECODE_ERROR,
        )
    if len(extensions) > 2**16 - 2:
        raise TLSDecodeError(
            f"NewSessionTicket extensions are {len(extensions)} bytes (at most 65534)",
            alert=AlertDescription.DECODE_ERROR,
        )
    if lifetime > MAX_TICKET_LIFETIME:
        raise TLSDecodeError(
            f"NewSessionTicket lifetime {lifetime} s exceeds 7 days ({MAX_TICKET_LIFETIME} s)",
            alert=AlertDescription.ILLEGAL_PARAMETER,
        )
    return NewSessionTicket(lifetime, age_add, nonce, ticket, extensions)
