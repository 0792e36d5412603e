"""Every exception trio_ktls raises, in one place.

Two families, kept apart on purpose (trio's rule: *broken means dead*):

- **The stream is dead.** The peer broke the protocol, the connection broke, or a key the
  connection needs cannot be installed. These are `trio.BrokenResourceError` subclasses;
  every later call on the stream raises one again, after any data that arrived before the
  failure has been delivered.

  - `TLSProtocolError`: a fatal alert, a malformed or unexpected record after the
    handshake, TLS 1.2 renegotiation.
  - `KTLSRekeyFailedError`: a key change was required (the peer sent KeyUpdate, or our key
    reached its confidentiality limit) and the kernel cannot take the next key.
  - `ConfidentialityLimitError`: our transmit key reached its record limit on a connection
    whose key cannot be replaced; the stream was closed cleanly with close_notify first.

- **This operation is not possible here; the stream is fine.**

  - `KTLSUnavailableError`: ``ktls="require"`` and the kernel cannot take the connection.
  - `KeyUpdateUnavailableError`: `KTLSStream.update_keys` on a connection that cannot
    update keys (TLS 1.2, a kernel before 6.14, a stream in user space). Nothing was sent.

`TLSDecodeError` belongs to the sans-IO layer: bytes that do not parse. The stream turns it
into a `TLSProtocolError` (with the original as ``__cause__``) and sends the alert it names.

Every class here says ``trio_ktls`` as its module, so tracebacks show the public name.
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


class KTLSRekeyFailedError(TLSProtocolError):
    """A TLS 1.3 key change was required but the kernel cannot install the next key.

    Raised when the peer sends KeyUpdate to a kernel that cannot replace a receive key
    (Linux added TLS 1.3 rekey in 6.14), or when the kernel refuses a key after our own
    KeyUpdate went out. The stream is broken: records under the new key cannot be read
    or must not be written under the old one.
    """


class ConfidentialityLimitError(TLSProtocolError):
    """Our transmit key reached its record limit (RFC 8446 §5.5) and cannot be replaced.

    Happens on TLS 1.2 and on kernels before 6.14 after about 2^24.5 full records under
    one AES-GCM key (less with a lowered ``rekey_after_records``). The stream sent
    close_notify and shut down its write side first, so the peer saw a clean end.
    """


class KTLSUnavailableError(Exception):
    """``ktls="require"`` was asked for but the kernel cannot take this connection.

    ``reason`` says why in words (module missing, cipher not supported, ...).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class KeyUpdateUnavailableError(Exception):
    """`KTLSStream.update_keys` cannot run on this connection; nothing was sent.

    TLS 1.2 has no KeyUpdate; kernels before 6.14 cannot replace a kTLS key; a stream in
    user space cannot ask the ``ssl`` module for one. The stream stays usable.
    """


def truncation_error() -> trio.BrokenResourceError:
    """The peer closed TCP without close_notify (RFC 8446 §6.1): a truncation attack
    cannot be told from a clean end, so the stream breaks unless https_compatible."""
    return trio.BrokenResourceError(
        "the peer closed the TCP connection without sending close_notify (truncated "
        "stream); pass https_compatible=True to accept that"
    )


for _cls in (
    TLSDecodeError,
    TLSProtocolError,
    KTLSRekeyFailedError,
    ConfidentialityLimitError,
    KTLSUnavailableError,
    KeyUpdateUnavailableError,
):
    _cls.__module__ = "trio_ktls"
