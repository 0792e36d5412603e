"""``trio-ktls serve``'s HTTP side: a static HTTPS/1.1 file server on kTLS streams.

`FileServer.handle` is an ordinary `serve_ktls_over_tcp` handler: it gets a handshaken
`KTLSStream` and speaks HTTP/1.1 over it with h11 (no hand-written parsing), so it is also
the example of writing a handler with this library's public API. Bodies go out with
``stream.send_file`` (zero-copy ``sendfile(2)`` where the kernel encrypts), through h11's
data passthrough: h11 frames the response and counts the bytes, the kernel moves them.

Theory of operation, per connection: read one request (its headers and any body) under
``header_timeout``; answer it; start the next cycle while h11 says the connection may be
kept alive. Every failure is this connection's alone: a peer that breaks the protocol gets
the status h11 suggests (400, or 431 for an oversized header block) and a close; a peer
that goes away is logged at DEBUG; anything else is logged with its traceback and closes
this connection only.

What a request may reach (the invariant the safety tests check): only regular files and
directories beneath ``root``. The target is percent-decoded once, split on ``/``, and any
``..`` segment is refused (403); the joined path is resolved with ``os.path.realpath`` and
refused (403) unless it stays beneath ``root`` (so symlinks may point anywhere inside the
tree, nowhere outside it); then the *resolved* path is opened one component at a time from
a descriptor of ``root`` with ``O_NOFOLLOW``, so a component swapped for a symlink after the
check fails (404) instead of being followed. Nothing outside ``root`` is ever opened.
Devices, FIFOs and sockets inside the tree are 404 and never opened either. All of this
runs in a worker thread (``trio.to_thread``), never on the event loop.

Directories get a generated HTML listing (names sorted, subdirectories with a trailing
``/``); there is no ``index.html`` magic. Ranges (RFC 9110 §14): one ``bytes=`` range per
request on GET; several ranges, or a syntactically invalid one, are ignored (a full 200,
as §14.2 allows); an unsatisfiable one is 416 with ``Content-Range: bytes */size``.
"""

from __future__ import annotations

import email.utils
import errno
import html
import logging
import mimetypes
import os
import stat
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final, Literal, final

import h11
import trio

from ._highlevel import KTLSListener, handshake_then
from ._stream import KTLSInfo, KTLSStream
from ._version import __version__

#: Logger of the access log (one INFO line per request) and connection failures.
logger: Final = logging.getLogger("trio_ktls.serve")

SERVER_NAME: Final = f"trio-ktls/{__version__}"

_OPEN_DIR: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: even a file that became a FIFO between the lstat and the open cannot block.
_OPEN_FILE: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK


@final
@dataclass(frozen=True)
class ServerLimits:
    """How much a client may send, and for how long, before it is cut off."""

    #: Seconds from the start of a request (or of an idle keep-alive wait) until its
    #: headers and body are in: then 408 and close (an idle connection just closes).
    header_timeout: float = 15.0
    #: Bytes of request line and headers (then 431). h11 counts the buffered bytes; the
    #: reads are sized so that it never holds more than this plus one.
    max_header_bytes: int = 32 * 1024
    #: Bytes of request target (then 414).
    max_target_length: int = 8 * 1024
    #: Bytes of request body a GET or HEAD may carry; it is read and dropped (then 413).
    max_request_body: int = 64 * 1024

    def __post_init__(self) -> None:
        if not self.header_timeout > 0:
            raise ValueError(f"header_timeout must be positive, not {self.header_timeout!r}")
        for name in ("max_header_bytes", "max_target_length", "max_request_body"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)!r}")


@final
@dataclass(frozen=True)
class AccessRecord:
    """One request as the access log reports it (also attached to the log record as
    ``record.access``)."""

    peer: str
    method: str
    target: str
    status: int
    #: Body bytes sent (0 for HEAD and bodiless answers).
    body_bytes: int
    seconds: float
    #: The stream's `KTLSInfo` when the response was sent.
    ktls: KTLSInfo | None

    def format(self) -> str:
        """``peer "METHOD target" status bytes seconds kTLS=...``."""
        return (
            f'{self.peer} "{self.method} {self.target}" {self.status} {self.body_bytes} '
            f"{self.seconds:.3f}s {describe_ktls(self.ktls)}"
        )


def describe_ktls(info: KTLSInfo | None) -> str:
    """What the kernel did for a connection, in a few words for a log line."""
    if info is None:
        return "kTLS=? (no handshake)"
    directions = "+".join(d for d, on in (("TX", info.tx_offload), ("RX", info.rx_offload)) if on)
    text = f"kTLS={directions or 'no'} {info.version} {info.cipher}"
    if info.zero_copy_send_file:
        text += " sendfile=zero-copy"
    if info.reason:
        text += f" ({info.reason})"
    return text


class _RequestError(Exception):
    """A request answered with an error status, after which the connection closes."""

    def __init__(self, status: int, message: str, headers: Sequence[tuple[str, str]] = ()):
        super().__init__(message)
        self.status = status
        self.headers = list(headers)
        #: The request it answers, when one was received.
        self.request: h11.Request | None = None


@dataclass(frozen=True)
class _File:
    fd: int
    size: int
    mtime: float


@dataclass(frozen=True)
class _Listing:
    names: list[tuple[str, bool]]  # (name, is a directory)
    mtime: float


@dataclass(frozen=True)
class _FileRange:
    """What h11 passes through for ``send_file`` (it only needs ``len()``)."""

    fd: int
    offset: int
    count: int

    def __len__(self) -> int:
        return self.count


# -- the target and the file system (sans-IO, then blocking in a worker thread) -------


def request_path(target: bytes) -> list[str]:
    """The path segments an origin-form request target names (query dropped, percent
    decoded once, empty and ``.`` segments dropped). Raises `_RequestError` 400 for a
    target that is not an absolute path or holds a NUL, 403 for a ``..`` segment."""
    if not target.startswith(b"/"):
        raise _RequestError(400, "the request target must be an absolute path")
    raw = urllib.parse.unquote_to_bytes(target.partition(b"?")[0].partition(b"#")[0])
    if b"\0" in raw:
        raise _RequestError(400, "the path holds a NUL byte")
    parts = []
    for segment in raw.split(b"/"):
        if segment in (b"", b"."):
            continue
        if segment == b"..":
            raise _RequestError(403, "the path leaves the served directory")
        parts.append(os.fsdecode(segment))
    return parts


def open_beneath(root: str, parts: Sequence[str]) -> _File | _Listing:
    """Open the regular file (or list the directory) ``parts`` names beneath ``root``
    (a real path), never opening anything outside it; blocking (see the module's notes).
    Raises `_RequestError` 403 or 404."""
    real = os.path.realpath(os.path.join(root, *parts))
    if os.path.commonpath([root, real]) != root:
        raise _RequestError(403, "the path leads outside the served directory")
    relative = os.path.relpath(real, root)
    names = [] if relative == os.curdir else relative.split(os.sep)
    try:
        directory = os.open(root, _OPEN_DIR)
        try:
            for name in names[:-1]:
                inner = os.open(name, _OPEN_DIR, dir_fd=directory)
                os.close(directory)
                directory = inner
            if not names:
                return _list(directory)
            status = os.stat(names[-1], dir_fd=directory, follow_symlinks=False)
            if stat.S_ISDIR(status.st_mode):
                inner = os.open(names[-1], _OPEN_DIR, dir_fd=directory)
                try:
                    return _list(inner)
                finally:
                    os.close(inner)
            if not stat.S_ISREG(status.st_mode):
                raise _RequestError(404, "not a regular file")
            fd = os.open(names[-1], _OPEN_FILE, dir_fd=directory)
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                os.close(fd)
                raise _RequestError(404, "not a regular file")
            return _File(fd, status.st_size, status.st_mtime)
        finally:
            os.close(directory)
    except PermissionError:
        raise _RequestError(403, "permission denied") from None
    except OSError as exc:
        # ENOENT, ENOTDIR, and ELOOP for a component that became a symlink.
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            raise _RequestError(404, "not found") from None
        raise


def _list(directory: int) -> _Listing:
    with os.scandir(directory) as entries:
        names = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in entries)
    return _Listing(names, os.fstat(directory).st_mtime)


def _listing_page(path: str, listing: _Listing) -> bytes:
    base = path.rstrip("/")
    title = html.escape(f"Index of {base}/")
    items = []
    for name, is_dir in listing.names:
        suffix = "/" if is_dir else ""
        href = urllib.parse.quote(os.fsencode(f"{base}/{name}")) + suffix
        items.append(f'<li><a href="{href}">{html.escape(name)}{suffix}</a></li>')
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{title}</title></head>'
        f"<body><h1>{title}</h1><ul>\n" + "\n".join(items) + "\n</ul></body></html>\n"
    ).encode("utf-8", "surrogateescape")


# -- conditional and range requests (RFC 9110 §13, §14), sans-IO ----------------------


def http_date(timestamp: float | None = None) -> str:
    """An IMF-fixdate (RFC 9110 §5.6.7)."""
    return email.utils.formatdate(timestamp, usegmt=True)


def not_modified_since(if_modified_since: str | None, mtime: float) -> bool:
    """Whether ``If-Modified-Since`` lets us answer 304 (RFC 9110 §13.1.3); an invalid
    date is ignored."""
    if not if_modified_since:
        return False
    try:
        since = email.utils.parsedate_to_datetime(if_modified_since)
    except (TypeError, ValueError):
        return False
    if since.tzinfo is None:
        return False  # not an HTTP date
    return int(mtime) <= since.timestamp()


def byte_range(
    range_header: str | None, size: int
) -> tuple[int, int] | Literal["unsatisfiable"] | None:
    """The one range ``Range: bytes=...`` asks for, as (offset, count); None to send the
    whole file (no header, several ranges, bad syntax, an empty file: §14.2 lets us
    ignore them); ``"unsatisfiable"`` for a 416."""
    if range_header is None or size == 0:
        return None
    unit, _, spec = range_header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash or not (first.isdigit() or first == "") or not (last.isdigit() or last == ""):
        return None
    if first == "":
        if last == "":
            return None
        suffix = int(last)
        if suffix == 0:
            return "unsatisfiable"
        start = max(size - suffix, 0)
        return start, size - start
    start = int(first)
    end = size - 1 if last == "" else int(last)
    if last != "" and end < start:
        return None
    if start >= size:
        return "unsatisfiable"
    end = min(end, size - 1)
    return start, end - start + 1


# -- the connection -------------------------------------------------------------------


@final
class FileServer:
    """Serves the files beneath ``directory`` (GET and HEAD) to `KTLSStream`\\s.

    ``await serve_ktls_over_tcp(FileServer(path).handle, port, ssl_context)`` is a whole
    HTTPS file server. ``directory`` must exist (checked here, before any connection).
    """

    def __init__(self, directory: str | os.PathLike[str], *, limits: ServerLimits | None = None):
        root = os.path.realpath(directory)
        if not os.path.isdir(root):
            raise ValueError(f"{os.fspath(directory)!r} is not a directory")
        #: The served directory, as a real path.
        self.root: Final = root
        #: The limits every connection gets.
        self.limits: Final = limits or ServerLimits()
        mimetypes.init()  # reads the system's tables now, not on the event loop later

    async def handle(self, stream: KTLSStream) -> None:
        """Serve HTTP/1.1 requests on ``stream`` until the client is done, or the
        connection must close; never raises for what the peer does."""
        peer = _peer(stream)
        connection = h11.Connection(
            h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes
        )
        try:
            while True:
                started = time.monotonic()
                try:
                    request = await self._receive_request(stream, connection)
                except _RequestError as error:
                    await self._send_error(stream, connection, error, peer, started)
                    return
                except h11.RemoteProtocolError as exc:
                    status = exc.error_status_hint
                    await self._send_error(
                        stream, connection, _RequestError(status, str(exc)), peer, started
                    )
                    return
                if request is None:
                    return
                await self._respond(stream, connection, request, peer, started)
                if connection.our_state is not h11.DONE or connection.their_state is not h11.DONE:
                    return
                connection.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError) as exc:
            logger.debug("%s: connection ended: %s", peer, exc)
        except Exception:
            logger.exception("%s: the request failed (this connection only)", peer)

    async def _next_event(self, stream: KTLSStream, connection: h11.Connection) -> object:
        while True:
            event = connection.next_event()
            if event is not h11.NEED_DATA:
                return event
            # Never let h11 buffer more than max_header_bytes + 1 (so a header block past
            # the limit can never complete: h11 raises 431 first).
            buffered = len(connection.trailing_data[0])
            wanted = max(self.limits.max_header_bytes + 1 - buffered, 1)
            connection.receive_data(bytes(await stream.receive_some(wanted)))

    async def _receive_request(
        self, stream: KTLSStream, connection: h11.Connection
    ) -> h11.Request | None:
        """The next request, its body read and dropped; None when the client is done."""
        with trio.move_on_after(self.limits.header_timeout):
            event = await self._next_event(stream, connection)
            if isinstance(event, h11.ConnectionClosed):
                return None
            assert isinstance(event, h11.Request), event  # h11's server only makes these
            try:
                return await self._check_request(stream, connection, event)
            except _RequestError as error:
                error.request = event
                raise
        if connection.their_state is h11.IDLE and not connection.trailing_data[0]:
            return None  # an idle keep-alive connection: close it quietly
        raise _RequestError(408, "the request did not arrive in time")

    async def _check_request(
        self, stream: KTLSStream, connection: h11.Connection, event: h11.Request
    ) -> h11.Request:
        """``event`` if it is a request we serve, once its body was read and dropped."""
        if event.method not in (b"GET", b"HEAD"):
            raise _RequestError(405, "only GET and HEAD", [("Allow", "GET, HEAD")])
        if len(event.target) > self.limits.max_target_length:
            raise _RequestError(414, "the request target is too long")
        body = 0
        while True:
            part = await self._next_event(stream, connection)
            if isinstance(part, h11.EndOfMessage):
                return event
            assert isinstance(part, h11.Data), part
            body += len(part.data)
            if body > self.limits.max_request_body:
                raise _RequestError(413, "the request body is too large")

    async def _respond(
        self,
        stream: KTLSStream,
        connection: h11.Connection,
        request: h11.Request,
        peer: str,
        started: float,
    ) -> None:
        method = request.method.decode()
        target = request.target.decode("ascii", "replace")
        fields = {name.decode(): value.decode("latin-1") for name, value in request.headers}
        try:
            parts = request_path(request.target)
            opened = await trio.to_thread.run_sync(open_beneath, self.root, parts)
        except _RequestError as error:
            status, headers, body = _error_reply(error)
            await _send_small(stream, connection, status, headers, body, method)
            self._log(peer, method, target, status, len(body), started, stream, method)
            return
        if isinstance(opened, _Listing):
            page = _listing_page("/" + "/".join(parts), opened)
            headers = [
                ("Content-Type", "text/html; charset=utf-8"),
                ("Last-Modified", http_date(opened.mtime)),
            ]
            await _send_small(stream, connection, 200, headers, page, method)
            self._log(peer, method, target, 200, len(page), started, stream, method)
            return
        try:
            status, sent = await _send_file_response(
                stream, connection, opened, parts, method, fields
            )
        finally:
            os.close(opened.fd)
        self._log(peer, method, target, status, sent, started, stream, method)

    async def _send_error(
        self,
        stream: KTLSStream,
        connection: h11.Connection,
        error: _RequestError,
        peer: str,
        started: float,
    ) -> None:
        logger.debug("%s: %d %s", peer, error.status, error)
        if connection.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        status, headers, body = _error_reply(error)
        headers.append(("Connection", "close"))
        await _send_small(stream, connection, status, headers, body, "GET")
        await _linger(stream)
        method, target = "-", "-"
        if error.request is not None:
            method = error.request.method.decode("ascii", "replace")
            target = error.request.target.decode("ascii", "replace")
        self._log(peer, method, target, status, len(body), started, stream, "GET")

    def _log(
        self,
        peer: str,
        method: str,
        target: str,
        status: int,
        sent: int,
        started: float,
        stream: KTLSStream,
        body_method: str,
    ) -> None:
        record = AccessRecord(
            peer,
            method,
            target,
            status,
            0 if body_method == "HEAD" else sent,
            time.monotonic() - started,
            stream.ktls_info,
        )
        logger.info("%s", record.format(), extra={"access": record})


#: How long, and how much, an error's close waits for and drops what the client still sends.
_LINGER_SECONDS: Final = 2.0
_LINGER_BYTES: Final = 1024 * 1024


async def _linger(stream: KTLSStream) -> None:
    """Close our side, then read and drop what the client is still sending for a moment:
    closing with unread data would send a reset, and the client's TCP stack may then
    drop our error response before the client reads it (RFC 9112 §9.6)."""
    await stream.send_eof()
    dropped = 0
    with trio.move_on_after(_LINGER_SECONDS):
        while dropped < _LINGER_BYTES and (data := await stream.receive_some(64 * 1024)):
            dropped += len(data)


def _peer(stream: KTLSStream) -> str:
    transport = stream.transport_stream
    if isinstance(transport, trio.SocketStream):
        try:
            host, port, *_ = transport.socket.getpeername()
        except OSError:
            return "?"
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return "?"


def _common_headers() -> list[tuple[str, str]]:
    return [("Server", SERVER_NAME), ("Date", http_date())]


def _error_reply(error: _RequestError) -> tuple[int, list[tuple[str, str]], bytes]:
    reason = _reason(error.status)
    body = f"{error.status} {reason}: {error}\n".encode()
    return error.status, [("Content-Type", "text/plain; charset=utf-8"), *error.headers], body


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _encode(connection: h11.Connection, *events: h11.Event) -> bytes:
    """What h11 writes for ``events`` (a bodiless answer, or one in memory)."""
    return b"".join(connection.send(event) or b"" for event in events)


async def _send_small(
    stream: KTLSStream,
    connection: h11.Connection,
    status: int,
    headers: list[tuple[str, str]],
    body: bytes,
    method: str,
) -> None:
    """A response with an in-memory body (dropped for HEAD by h11), in one send."""
    response = h11.Response(
        status_code=status,
        headers=[*_common_headers(), ("Content-Length", str(len(body))), *headers],
        reason=_reason(status),
    )
    body_events = [h11.Data(data=body)] if method != "HEAD" and body else []
    await stream.send_all(_encode(connection, response, *body_events, h11.EndOfMessage()))


async def _send_file_response(
    stream: KTLSStream,
    connection: h11.Connection,
    file: _File,
    parts: Sequence[str],
    method: str,
    fields: dict[str, str],
) -> tuple[int, int]:
    """200, 206, 304 or 416 for ``file``; (status, body bytes sent)."""
    last_modified = http_date(file.mtime)
    content_type = mimetypes.guess_type(parts[-1])[0] or "application/octet-stream"
    headers = [
        *_common_headers(),
        ("Last-Modified", last_modified),
        ("Accept-Ranges", "bytes"),
    ]
    # §13.2.2: If-Modified-Since is evaluated only without If-None-Match, before Range.
    if "if-none-match" not in fields and not_modified_since(
        fields.get("if-modified-since"), file.mtime
    ):
        response = h11.Response(status_code=304, headers=headers, reason=_reason(304))
        await stream.send_all(_encode(connection, response, h11.EndOfMessage()))
        return 304, 0
    wanted: tuple[int, int] | Literal["unsatisfiable"] | None = None
    if_range = fields.get("if-range")
    if method == "GET" and (if_range is None or if_range == last_modified):
        wanted = byte_range(fields.get("range"), file.size)
    if wanted == "unsatisfiable":
        headers += [("Content-Range", f"bytes */{file.size}"), ("Content-Length", "0")]
        response = h11.Response(status_code=416, headers=headers, reason=_reason(416))
        await stream.send_all(_encode(connection, response, h11.EndOfMessage()))
        return 416, 0
    status, offset, count = 200, 0, file.size
    if isinstance(wanted, tuple):
        status, (offset, count) = 206, wanted
        headers.append(("Content-Range", f"bytes {offset}-{offset + count - 1}/{file.size}"))
    headers += [("Content-Type", content_type), ("Content-Length", str(count))]
    response = h11.Response(status_code=status, headers=headers, reason=_reason(status))
    await stream.send_all(_encode(connection, response))
    if method == "GET" and count:
        # h11 hands back the very object it was given (its documented sendfile support),
        # after checking it against Content-Length.
        body = _FileRange(file.fd, offset, count)
        for piece in connection.send_with_data_passthrough(h11.Data(data=body)) or ():  # type: ignore[arg-type]
            if isinstance(piece, _FileRange):
                await stream.send_file(piece.fd, offset=piece.offset, count=piece.count)
            else:
                await stream.send_all(piece)
    tail = _encode(connection, h11.EndOfMessage())
    if tail:
        await stream.send_all(tail)
    return status, count if method == "GET" else 0


# -- serving on listeners the caller opened -------------------------------------------


async def serve_handshaken(
    handler: Callable[[KTLSStream], Awaitable[object]],
    listeners: list[KTLSListener],
    *,
    task_status: trio.TaskStatus[list[KTLSListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """`serve_ktls_over_tcp` for listeners that exist already (``trio-ktls serve
    --workers`` binds its sockets before forking): each connection's handshake runs in
    its own task, a failure closes that connection only (logged as by
    `serve_ktls_over_tcp`), then ``handler`` gets the stream, which is closed when it
    returns."""

    await trio.serve_listeners(handshake_then(handler), listeners, task_status=task_status)
