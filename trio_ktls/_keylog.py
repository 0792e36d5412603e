"""Reading the secrets OpenSSL writes to its key log (sans-IO).

OpenSSL hands out its traffic secrets only through the key-log callback, which CPython
exposes as ``SSLContext.keylog_filename``. The stream points that at a memfd and feeds
what appears there to a ``KeyLogCollector``; this module only parses bytes.

The format (NSS's, standardised as RFC 9850 "The SSLKEYLOGFILE Format for TLS")
------------------------------------------------------------------------------------
One secret per line, three fields separated by single spaces::

    <label> <client_random: 64 hex digits> <secret: hex>

Lines starting with ``#`` are comments (CPython writes one header line when the file is
set). The labels this library uses:

- TLS 1.2: ``CLIENT_RANDOM``, the 48-byte master secret (RFC 5246 §8.1).
- TLS 1.3 (RFC 8446 §7.1; the secret is as long as the suite's hash, 32 or 48 bytes):
  ``CLIENT_HANDSHAKE_TRAFFIC_SECRET``, ``SERVER_HANDSHAKE_TRAFFIC_SECRET``,
  ``CLIENT_TRAFFIC_SECRET_0``, ``SERVER_TRAFFIC_SECRET_0``, ``EXPORTER_SECRET``, and with
  early data ``CLIENT_EARLY_TRAFFIC_SECRET``, ``EARLY_EXPORTER_SECRET``.

OpenSSL also writes ``RSA <8 bytes of encrypted premaster> <premaster>`` lines for TLS 1.2
RSA key exchange; they are not keyed by client random and the ``CLIENT_RANDOM`` line that
follows makes them redundant, so the parser skips them. Other labels (future ones, ECH's)
are kept as long as their fields are well-formed hex.

Matching lines to connections
-----------------------------
Every connection on a context writes to the same log, so lines are matched by
client_random: ``ClientHello.random`` (RFC 8446 §4.1.2, RFC 5246 §7.4.1.2), bytes 6..38 of
the ClientHello handshake message (after the 4-byte handshake header and the 2-byte
legacy_version). TLS 1.2's key block also needs ``ServerHello.random``, the same slice of
the ServerHello.

Secrets
-------
Secrets never appear in a ``repr``, ``str`` or exception message from this module.
``KeyLogCollector`` keeps them in ``bytearray``s so that the caller can zero them after
installing the keys, and ``wipe()`` zeroes whatever the collector still holds. This is
best effort: Python copies bytes in places no one can reach (the memfd read, hex decoding).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final

from ._errors import TLSDecodeError
from ._messages import HANDSHAKE_HEADER_LENGTH, AlertDescription, HandshakeType

CLIENT_RANDOM_LENGTH: Final = 32

#: RFC 8446 §4.1.3: the ServerHello.random of a HelloRetryRequest, SHA-256 of
#: "HelloRetryRequest". A ServerHello carrying it is not the real ServerHello.
HELLO_RETRY_REQUEST_RANDOM: Final = bytes.fromhex(
    "cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c"
)

#: Label -> the secret lengths it may have.
KNOWN_LABELS: Final[dict[str, frozenset[int]]] = {
    "CLIENT_RANDOM": frozenset({48}),
    "CLIENT_EARLY_TRAFFIC_SECRET": frozenset({32, 48}),
    "EARLY_EXPORTER_SECRET": frozenset({32, 48}),
    "CLIENT_HANDSHAKE_TRAFFIC_SECRET": frozenset({32, 48}),
    "SERVER_HANDSHAKE_TRAFFIC_SECRET": frozenset({32, 48}),
    "CLIENT_TRAFFIC_SECRET_0": frozenset({32, 48}),
    "SERVER_TRAFFIC_SECRET_0": frozenset({32, 48}),
    "EXPORTER_SECRET": frozenset({32, 48}),
}

#: Lines with these labels are skipped (see the module docs).
IGNORED_LABELS: Final = frozenset({"RSA"})

#: A line longer than this is not a key-log line (the longest real one is about 180 bytes).
MAX_LINE_LENGTH: Final = 1024

_LABEL_RE: Final = re.compile(rb"[A-Z][A-Z0-9_]*")
_HEX_RE: Final = re.compile(rb"(?:[0-9a-fA-F]{2})+")


@dataclass(frozen=True)
class KeyLogEntry:
    """One key-log line. ``secret`` is left out of ``repr``."""

    label: str
    client_random: bytes
    secret: bytes = field(repr=False)


def _parse_line(line: bytes) -> tuple[str, bytes, bytearray] | None:
    """Parse one line into (label, client_random, secret as a wipeable bytearray)."""
    line = line.rstrip(b"\r\n")
    if not line.strip() or line.startswith(b"#"):
        return None
    fields = line.split(b" ")
    label_field = fields[0]
    if not _LABEL_RE.fullmatch(label_field):
        raise TLSDecodeError("key log line does not start with a label of A-Z, 0-9 and _")
    label = label_field.decode("ascii")
    if label in IGNORED_LABELS:
        return None
    if len(fields) != 3:
        raise TLSDecodeError(
            f"key log line for {label} has {len(fields)} space-separated fields, expected 3"
        )
    random_field, secret_field = fields[1], fields[2]
    if not _HEX_RE.fullmatch(random_field):
        raise TLSDecodeError(f"key log line for {label}: client_random is not hex")
    if len(random_field) != 2 * CLIENT_RANDOM_LENGTH:
        raise TLSDecodeError(
            f"key log line for {label}: client_random is {len(random_field) // 2} bytes, "
            f"expected {CLIENT_RANDOM_LENGTH}"
        )
    if not _HEX_RE.fullmatch(secret_field):
        raise TLSDecodeError(f"key log line for {label}: secret is missing or not hex")
    secret_length = len(secret_field) // 2
    allowed = KNOWN_LABELS.get(label)
    if allowed is not None and secret_length not in allowed:
        expected = " or ".join(str(n) for n in sorted(allowed))
        raise TLSDecodeError(
            f"key log line for {label}: secret is {secret_length} bytes, expected {expected}"
        )
    return (
        label,
        bytes.fromhex(random_field.decode("ascii")),
        bytearray.fromhex(secret_field.decode("ascii")),
    )


def parse_keylog_line(line: bytes) -> KeyLogEntry | None:
    """Parse one key-log line (a trailing newline is allowed).

    Returns None for blank lines, comments and lines this library has no use for (``RSA``);
    raises `TLSDecodeError` for a malformed line, with a message that names the label and
    what is wrong but never the secret.
    """
    parsed = _parse_line(line)
    if parsed is None:
        return None
    label, client_random, secret = parsed
    return KeyLogEntry(label, client_random, bytes(secret))


class KeyLogCollector:
    """Collects key-log secrets per connection, from bytes fed in arbitrary chunks.

    ``feed`` keeps a partial last line until its newline arrives. Complete lines are parsed
    and stored under their client_random; ``take`` hands one connection's secrets over
    (label -> ``bytearray``) and forgets them, ``discard`` forgets and zeroes them, and
    ``wipe`` zeroes everything still held. A later line with the same label and client
    random replaces (and zeroes) the earlier one.
    """

    def __init__(self) -> None:
        self._partial = bytearray()
        self._secrets: dict[bytes, dict[str, bytearray]] = {}

    def __repr__(self) -> str:
        return (
            f"<KeyLogCollector: secrets for {len(self._secrets)} connection(s), "
            f"{len(self._partial)} bytes of partial line>"
        )

    def __len__(self) -> int:
        """The number of connections (client randoms) with secrets held."""
        return len(self._secrets)

    def feed(self, data: bytes) -> None:
        """Add key-log bytes. Good lines are stored even when a bad one raises.

        Raises `TLSDecodeError` (after storing every good line of ``data``) when a line is
        malformed, or when a partial line grows past ``MAX_LINE_LENGTH``.
        """
        self._partial += data
        errors: list[str] = []
        start = 0
        while (newline := self._partial.find(b"\n", start)) != -1:
            line = bytes(self._partial[start:newline])
            start = newline + 1
            try:
                parsed = _parse_line(line)
            except TLSDecodeError as exc:
                errors.append(str(exc))
                continue
            if parsed is not None:
                self._store(*parsed)
        _zero(self._partial, 0, start)
        del self._partial[:start]
        if len(self._partial) > MAX_LINE_LENGTH:
            _zero(self._partial, 0, len(self._partial))
            self._partial.clear()
            errors.append(f"key log line longer than {MAX_LINE_LENGTH} bytes (dropped)")
        if errors:
            more = f" (and {len(errors) - 1} more bad line(s))" if len(errors) > 1 else ""
            raise TLSDecodeError(errors[0] + more)

    def _store(self, label: str, client_random: bytes, secret: bytearray) -> None:
        secrets = self._secrets.setdefault(client_random, {})
        old = secrets.get(label)
        if old is not None:
            _zero(old, 0, len(old))
        secrets[label] = secret

    def labels(self, client_random: bytes) -> frozenset[str]:
        """The labels held for a connection (to check that all it needs has arrived)."""
        return frozenset(self._secrets.get(client_random, ()))

    def take(self, client_random: bytes) -> dict[str, bytearray]:
        """Remove and return one connection's secrets (empty when there are none).

        The caller owns the ``bytearray``s from now on and should zero them when done.
        """
        return self._secrets.pop(client_random, {})

    def discard(self, client_random: bytes) -> None:
        """Forget one connection's secrets, zeroing them."""
        for secret in self._secrets.pop(client_random, {}).values():
            _zero(secret, 0, len(secret))

    def wipe(self) -> None:
        """Zero and forget everything held, the partial line included."""
        for client_random in list(self._secrets):
            self.discard(client_random)
        _zero(self._partial, 0, len(self._partial))
        self._partial.clear()


def _zero(buffer: bytearray, start: int, end: int) -> None:
    buffer[start:end] = bytes(end - start)


# --- Randoms from the hello messages -------------------------------------------------

_RANDOM_START: Final = HANDSHAKE_HEADER_LENGTH + 2  # after the header and legacy_version
_RANDOM_END: Final = _RANDOM_START + CLIENT_RANDOM_LENGTH


def _hello_random(message: bytes, expected: HandshakeType) -> bytes:
    name = expected.name.replace("_", " ").title().replace(" ", "")
    if len(message) < _RANDOM_END:
        raise TLSDecodeError(
            f"{name} of {len(message)} bytes is too short to hold a random "
            f"(needs at least {_RANDOM_END})",
            alert=AlertDescription.DECODE_ERROR,
        )
    if message[0] != expected:
        raise TLSDecodeError(
            f"expected a {name} (handshake type {int(expected)}), got handshake type {message[0]}",
            alert=AlertDescription.UNEXPECTED_MESSAGE,
        )
    declared = int.from_bytes(message[1:HANDSHAKE_HEADER_LENGTH], "big")
    present = len(message) - HANDSHAKE_HEADER_LENGTH
    if declared > present:
        raise TLSDecodeError(
            f"{name} header says {declared} body bytes, only {present} present",
            alert=AlertDescription.DECODE_ERROR,
        )
    if declared < _RANDOM_END - HANDSHAKE_HEADER_LENGTH:
        raise TLSDecodeError(
            f"{name} body of {declared} bytes is too short to hold a random",
            alert=AlertDescription.DECODE_ERROR,
        )
    if message[HANDSHAKE_HEADER_LENGTH] != 3:
        raise TLSDecodeError(
            f"{name} legacy_version 0x{message[4]:02x}{message[5]:02x} is not TLS",
            alert=AlertDescription.PROTOCOL_VERSION,
        )
    return bytes(message[_RANDOM_START:_RANDOM_END])


def client_random_from_client_hello(handshake_message: bytes) -> bytes:
    """ClientHello.random from a complete ClientHello message (4-byte header included).

    Bytes after the message (the next messages of the same record) are allowed; a message
    whose header announces more bytes than are present is ``decode_error``.
    """
    return _hello_random(handshake_message, HandshakeType.CLIENT_HELLO)


def server_random_from_server_hello(handshake_message: bytes) -> bytes:
    """ServerHello.random from a complete ServerHello message (4-byte header included),
    possibly followed by more bytes (TLS 1.2 servers put Certificate etc. in the same record).

    In TLS 1.3 a HelloRetryRequest is a ServerHello whose random is
    ``HELLO_RETRY_REQUEST_RANDOM``; it is returned as is (TLS 1.2, the only user of the
    server random, has no HelloRetryRequest).
    """
    return _hello_random(handshake_message, HandshakeType.SERVER_HELLO)
