"""trio_ktls: Linux kernel TLS for trio.

The TLS handshake runs in user space with the standard library's ``ssl`` module; the
record layer is then handed to the kernel (``TCP_ULP "tls"``), which encrypts and decrypts
every later record.
"""

from ._errors import (
    KTLSRekeyUnsupportedError as KTLSRekeyUnsupportedError,
    KTLSUnavailableError as KTLSUnavailableError,
    TLSDecodeError as TLSDecodeError,
    TLSProtocolError as TLSProtocolError,
)
from ._highlevel import (
    KTLSListener as KTLSListener,
    open_ktls_stream as open_ktls_stream,
    serve_ktls_over_tcp as serve_ktls_over_tcp,
    wrap_stream as wrap_stream,
)
from ._probe import (
    CipherSupport as CipherSupport,
    ProbeResult as ProbeResult,
    probe as probe,
)
from ._stream import KTLSInfo as KTLSInfo, KTLSMode as KTLSMode, KTLSStream as KTLSStream

__all__ = [
    "CipherSupport",
    "KTLSInfo",
    "KTLSListener",
    "KTLSMode",
    "KTLSStream",
    "KTLSRekeyUnsupportedError",
    "KTLSUnavailableError",
    "ProbeResult",
    "TLSDecodeError",
    "TLSProtocolError",
    "open_ktls_stream",
    "probe",
    "serve_ktls_over_tcp",
    "wrap_stream",
]
