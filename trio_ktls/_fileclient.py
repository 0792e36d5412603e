"""``trio-ktls get``: an HTTPS/1.1 client on `open_ktls_stream` and h11.

One request per connection (``Connection: close``): connect, handshake, check a pinned
certificate if one was given (before a byte of the request is sent), send a GET, and
stream the body into a sink. Redirects are followed only when asked (``--location``),
only to https URLs, at most `MAX_REDIRECTS` times; a 3xx that is not followed, and every
4xx or 5xx, is an error (`FetchError`), and its body is not written.

The client context is ``https_compatible``, as trio recommends for HTTPS: many servers
close without close_notify, and HTTP's own framing (``Content-Length``, h11's checks)
tells a truncated body from a whole one; a body framed only by the end of the connection
(HTTP/1.0 servers such as ``openssl s_server -WWW``) is taken as complete when it ends.
"""

from __future__ import annotations

import hashlib
import hmac
import ssl
import sys
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Protocol, TextIO, final

import h11
import trio

from ._errors import KTLSUnavailableError
from ._highlevel import open_ktls_stream
from ._options import KTLSMode
from ._selfsigned import format_fingerprint
from ._stream import KTLSInfo, KTLSStream
from ._version import __version__

#: Redirects ``--location`` follows before giving up.
MAX_REDIRECTS: Final = 10
#: Bodies at least this large get a progress bar (on a terminal).
PROGRESS_THRESHOLD: Final = 1024 * 1024
#: Received bytes gathered before one write to the sink.
_WRITE_BATCH: Final = 1024 * 1024
_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})

Sink = Callable[[bytes], Awaitable[None]]


class FetchError(Exception):
    """Why a download failed, in one line for a person."""


@final
@dataclass(frozen=True)
class Target:
    """Where a URL points: ``https://host:port/target``."""

    host: str
    port: int
    target: str

    @property
    def authority(self) -> str:
        """The ``Host`` header's value."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == 443 else f"{host}:{self.port}"


def parse_url(url: str) -> Target:
    """Split an https URL; `FetchError` for any other kind of URL."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or 443
    except ValueError as exc:
        raise FetchError(f"not a valid URL: {url!r} ({exc})") from None
    if parts.scheme != "https":
        raise FetchError(f"only https URLs can be fetched, not {url!r}")
    if not parts.hostname:
        raise FetchError(f"the URL {url!r} names no host")
    path = urllib.parse.quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    return Target(parts.hostname, port, path + (f"?{parts.query}" if parts.query else ""))


def client_context(
    *,
    cafile: str | None = None,
    pin: bytes | None = None,
    insecure: bool = False,
    tls_version: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    """The client's context: the system's CAs (or ``cafile``'s); with ``pin`` or
    ``insecure`` no chain check at all (the pin is checked after the handshake)."""
    if sum((cafile is not None, pin is not None, insecure)) > 1:
        raise ValueError("cafile, pin and insecure exclude one another")
    try:
        context = ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise FetchError(f"cannot load CA file {cafile!r}: {exc}") from None
    if pin is not None or insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls_version is not None:
        context.minimum_version = context.maximum_version = tls_version
    return context


@final
@dataclass(frozen=True)
class FetchResult:
    """What one successful download did."""

    url: str
    status: int
    body_bytes: int
    seconds: float
    version: str
    cipher: str
    certificate_sha256: str
    ktls: KTLSInfo | None

    def describe(self) -> str:
        """The lines ``get -v`` prints."""
        rate = self.body_bytes / self.seconds / (1024 * 1024) if self.seconds > 0 else 0.0
        return "\n".join(
            [
                f"* {self.url}: HTTP {self.status}, {self.version} {self.cipher}",
                f"* server certificate SHA-256 {self.certificate_sha256}",
                f"* ktls_info: {self.ktls}",
                f"* {self.body_bytes} bytes in {self.seconds:.3f} s: {rate:.1f} MiB/s",
            ]
        )


async def fetch(
    url: str,
    sink: Sink,
    *,
    ssl_context: ssl.SSLContext,
    pin: bytes | None = None,
    ktls: KTLSMode = "auto",
    follow_redirects: bool = False,
    progress: TextIO | None = None,
) -> FetchResult:
    """GET ``url`` and pass its body to ``sink`` in pieces; `FetchError` on any
    failure (connection, TLS, pin, HTTP status, a truncated body)."""
    for _ in range(MAX_REDIRECTS + 1):
        try:
            result = await _fetch_once(url, sink, ssl_context, pin, ktls, progress)
        except (trio.BrokenResourceError, KTLSUnavailableError, OSError, h11.ProtocolError) as exc:
            raise FetchError(one_line(exc)) from exc
        if isinstance(result, FetchResult):
            return result
        if not follow_redirects:
            raise FetchError(f"{result[0]}: redirected to {result[1]} (--location follows it)")
        url = urllib.parse.urljoin(url, result[1])
    raise FetchError(f"more than {MAX_REDIRECTS} redirects")


async def _fetch_once(
    url: str,
    sink: Sink,
    context: ssl.SSLContext,
    pin: bytes | None,
    ktls: KTLSMode,
    progress: TextIO | None,
) -> FetchResult | tuple[str, str]:
    """The result, or (status line, location) for a redirect."""
    where = parse_url(url)
    async with open_ktls_stream(
        where.host, where.port, ssl_context=context, https_compatible=True, ktls=ktls
    ) as stream:
        certificate = stream.getpeercert(binary_form=True) or b""
        fingerprint = hashlib.sha256(certificate).digest()
        if pin is not None and not hmac.compare_digest(fingerprint, pin):
            raise FetchError(
                f"the server's certificate does not match the pin "
                f"(its SHA-256 is {format_fingerprint(fingerprint)})"
            )
        connection = h11.Connection(h11.CLIENT)
        request = h11.Request(
            method="GET",
            target=where.target,
            headers=[
                ("Host", where.authority),
                ("User-Agent", f"trio-ktls/{__version__}"),
                ("Accept-Encoding", "identity"),
                ("Connection", "close"),
            ],
        )
        started = time.monotonic()
        await stream.send_all(
            (connection.send(request) or b"") + (connection.send(h11.EndOfMessage()) or b"")
        )
        response = await _next_response(stream, connection)
        status_line = f"HTTP {response.status_code} {response.reason.decode('latin-1')}"
        if response.status_code in _REDIRECTS:
            location = dict(response.headers).get(b"location")
            if location is not None:
                return status_line, location.decode("latin-1")
        if not 200 <= response.status_code < 300:
            raise FetchError(f"{status_line} for {url}")
        length = dict(response.headers).get(b"content-length")
        total = int(length) if length is not None else None
        received = await _receive_body(stream, connection, sink, total, progress)
        return FetchResult(
            url,
            response.status_code,
            received,
            time.monotonic() - started,
            stream.version() or "?",
            (stream.cipher() or ("?",))[0],
            format_fingerprint(fingerprint),
            stream.ktls_info,
        )


async def _next_event(stream: KTLSStream, connection: h11.Connection) -> object:
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(bytes(await stream.receive_some()))
        else:
            return event


async def _next_response(stream: KTLSStream, connection: h11.Connection) -> h11.Response:
    while True:
        event = await _next_event(stream, connection)
        if isinstance(event, h11.Response):
            return event
        if isinstance(event, h11.ConnectionClosed):
            raise FetchError("the server closed the connection without answering")
        # InformationalResponse (1xx): wait for the real one.


async def _receive_body(
    stream: KTLSStream,
    connection: h11.Connection,
    sink: Sink,
    total: int | None,
    progress: TextIO | None,
) -> int:
    bar = _progress_bar(total, progress)
    received = 0
    batch = bytearray()
    try:
        while True:
            event = await _next_event(stream, connection)
            if isinstance(event, h11.EndOfMessage):
                break
            assert isinstance(event, h11.Data), event
            batch += event.data
            received += len(event.data)
            if bar is not None:
                bar.update(len(event.data))
            if len(batch) >= _WRITE_BATCH:
                await sink(bytes(batch))
                batch.clear()
        if batch:
            await sink(bytes(batch))
    finally:
        if bar is not None:
            bar.close()
    return received


class _Bar(Protocol):
    """The part of a tqdm bar this module uses."""

    def update(self, n: int = 1) -> bool | None: ...
    def close(self) -> None: ...


def _progress_bar(total: int | None, stream: TextIO | None) -> _Bar | None:
    """A tqdm bar on ``stream`` when it is a terminal and the body is large (or of unknown
    length); None without a terminal, or without tqdm (the ``cli`` extra)."""
    if stream is None or not stream.isatty():
        return None
    if total is not None and total < PROGRESS_THRESHOLD:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    bar: _Bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=stream)
    return bar


def one_line(exc: BaseException) -> str:
    """An exception and its cause as one line (for error messages)."""
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__
    if cause is None and not exc.__suppress_context__:
        cause = exc.__context__
    if cause is not None:
        # An exception group (trio's "all attempts to connect failed"): its members.
        members = getattr(cause, "exceptions", None)
        cause_text = "; ".join(map(str, members)) if members else str(cause)
        if cause_text and cause_text not in text:
            text = f"{text}: {cause_text}"
    return " ".join(text.split())


def stdout_sink() -> Sink:
    """A sink writing to standard output (in a worker thread: a pipe may block)."""
    out = sys.stdout.buffer

    async def write(data: bytes) -> None:
        await trio.to_thread.run_sync(out.write, data)

    return write
