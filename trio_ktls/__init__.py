"""trio_ktls: Linux kernel TLS for trio.

The TLS handshake runs in user space with the standard library's ``ssl`` module; the
record layer is then handed to the kernel (``TCP_ULP "tls"``), which encrypts and decrypts
every later record.
"""

from ._errors import ConfidentialityLimitError as ConfidentialityLimitError
from ._errors import KeyUpdateUnavailableError as KeyUpdateUnavailableError
from ._errors import KTLSRekeyFailedError as KTLSRekeyFailedError
from ._errors import KTLSUnavailableError as KTLSUnavailableError
from ._errors import TLSDecodeError as TLSDecodeError
from ._errors import TLSProtocolError as TLSProtocolError
from ._highlevel import KTLSListener as KTLSListener
from ._highlevel import open_ktls_over_tcp_listeners as open_ktls_over_tcp_listeners
from ._highlevel import open_ktls_over_tcp_stream as open_ktls_over_tcp_stream
from ._highlevel import open_ktls_stream as open_ktls_stream
from ._highlevel import serve_ktls_over_tcp as serve_ktls_over_tcp
from ._highlevel import wrap_stream as wrap_stream
from ._options import KTLSMode as KTLSMode
from ._options import KTLSOptions as KTLSOptions
from ._options import StreamOptions as StreamOptions
from ._probe import CipherSupport as CipherSupport
from ._probe import ProbeResult as ProbeResult
from ._probe import probe as probe
from ._report import HandoffReport as HandoffReport
from ._report import HandshakeRecord as HandshakeRecord
from ._stream import KTLSInfo as KTLSInfo
from ._stream import KTLSStream as KTLSStream
from ._version import __version__ as __version__

__all__ = [
    "CipherSupport",
    "ConfidentialityLimitError",
    "HandoffReport",
    "HandshakeRecord",
    "KTLSInfo",
    "KTLSListener",
    "KTLSMode",
    "KTLSOptions",
    "KTLSRekeyFailedError",
    "KTLSStream",
    "KTLSUnavailableError",
    "KeyUpdateUnavailableError",
    "ProbeResult",
    "StreamOptions",
    "TLSDecodeError",
    "TLSProtocolError",
    "__version__",
    "open_ktls_over_tcp_listeners",
    "open_ktls_over_tcp_stream",
    "open_ktls_stream",
    "probe",
    "serve_ktls_over_tcp",
    "wrap_stream",
]
