"""The exceptions trio_ktls raises.

Every failure a user can see is one of these or a plain trio/ssl exception:

- the peer broke the protocol, or the connection broke: a `trio.BrokenResourceError`
  subclass (the stream is unusable from then on, as with `trio.SSLStream`);
- bytes that do not parse (sans-IO layer): `TLSDecodeError`, an `ssl.SSLError`, which the
  stream layer re-raises as `TLSProtocolError` from the original;
- kTLS asked for but not there: `KTLSUnavailableError`, carrying the probe's reason.
"""

from __future__ import annotations

import ssl

import trio


class TLSDecodeError(ssl.SSLError):
    """Bytes from the peer that do not form a valid TLS record or message.

    Raised by the sans-IO layer (record, alert, handshake-message and key-log parsing).
    ``alert`` is the RFC 8446 §6.2 alert description the stream should send in reply
    (``decode_error`` = 50 unless a more specific one applies).
    """

    def __init__(self, message: str, *, alert: int = 50) -> None:
        super().__init__(message)
        self.alert = alert

    def __str__(self) -> str:
        return str(self.args[0])


class TLSProtocolError(trio.BrokenResourceError):
    """The TLS connection failed after the handshake: a fatal alert, a malformed record,
    or a message the library must refuse (for example TLS 1.2 renegotiation)."""


class KTLSUnavailableError(Exception):
    """``ktls="require"`` was asked for but the kernel cannot take this connection.

    ``reason`` says why in words (module missing, cipher not supported, ...).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class KTLSRekeyUnsupportedError(TLSProtocolError):
    """A TLS 1.3 key update was needed but this kernel cannot replace a kTLS key
    (Linux added TLS 1.3 rekey in 6.14)."""
