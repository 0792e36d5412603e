"""The kTLS options every way in shares, defined, documented and validated once.

`KTLSStream`, `wrap_stream`, `open_ktls_stream`, `KTLSListener` and
`serve_ktls_over_tcp` all take these as keyword arguments (``**options``) and pass them
here first, so a bad value is a `ValueError` or `TypeError` before any socket is opened.
Arguments that trio's own SSL API has (``server_side``, ``server_hostname``,
``https_compatible``, ``session``) keep trio's names and places instead.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Final, Literal, TypedDict

KTLSMode = Literal["auto", "require", "off"]

_MODES: Final = ("auto", "require", "off")

#: Default bound of received plaintext held for the application (see ``max_receive_buffer``).
DEFAULT_MAX_RECEIVE_BUFFER: Final = 256 * 1024

#: Seconds a client gets to finish its handshake before a server drops it (listeners only;
#: a stream you make yourself has no limit unless you give one).
DEFAULT_SERVER_HANDSHAKE_TIMEOUT: Final = 60.0


class KTLSOptions(TypedDict, total=False):
    """The keyword arguments of `StreamOptions`, for ``**options`` signatures."""

    ktls: KTLSMode
    handshake_timeout: float | None
    max_receive_buffer: int
    rekey_after_records: int | None
    request_peer_rekey_after_records: int | None


@dataclass(frozen=True)
class StreamOptions:
    """What the kernel may do for a stream, and its limits.

    ktls
        ``"auto"``: offload what the kernel can, otherwise stay in user space (like
        `trio.SSLStream`) and say why in ``ktls_info.reason``. ``"require"``: raise
        `KTLSUnavailableError` instead of falling back. ``"off"``: never offload.
    handshake_timeout
        Seconds the handshake may take (then `trio.TooSlowError`); None for no limit.
        Listeners default to 60 s, so a silent client cannot hold a connection open.
    max_receive_buffer
        Bytes of decrypted data the reader task keeps for ``receive_some``. When it is
        full the reader stops reading, so TCP flow control reaches the peer.
    rekey_after_records
        Records our transmit key may protect before it is replaced with a KeyUpdate
        (RFC 8446 §5.5). None: the cipher's limit (2^24.5 for AES-GCM, 2^23.5 for
        AES-CCM, none for ChaCha20). Where keys cannot be replaced, the stream closes
        cleanly at this limit instead (`ConfidentialityLimitError`).
    request_peer_rekey_after_records
        Records of the peer's after which we ask it for new keys (KeyUpdate with
        update_requested). None: half the cipher's limit.
    """

    ktls: KTLSMode = "auto"
    handshake_timeout: float | None = None
    max_receive_buffer: int = DEFAULT_MAX_RECEIVE_BUFFER
    rekey_after_records: int | None = None
    request_peer_rekey_after_records: int | None = None

    def __post_init__(self) -> None:
        if self.ktls not in _MODES:
            raise ValueError(f"ktls must be 'auto', 'require' or 'off', not {self.ktls!r}")
        timeout = self.handshake_timeout
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, int | float):
                raise TypeError(f"handshake_timeout must be a number or None, not {timeout!r}")
            if math.isnan(timeout) or timeout <= 0:
                raise ValueError(f"handshake_timeout must be positive, not {timeout!r}")
        _check_count("max_receive_buffer", self.max_receive_buffer, minimum=1)
        # At least 2: one record of data, and one kept in reserve for close_notify or our
        # KeyUpdate (see _writer).
        for name in ("rekey_after_records", "request_peer_rekey_after_records"):
            value = getattr(self, name)
            if value is not None:
                _check_count(name, value, minimum=2)


def _check_count(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, not {value!r}")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an integer, not {value!r}") from None
    if number < minimum:
        raise ValueError(f"{name} must be at least {minimum}, not {number}")
