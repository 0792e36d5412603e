"""KTLSStream: a TLS stream whose record layer runs in the kernel.

Theory of operation
-------------------
A `KTLSStream` lives through three phases, driven by one task that runs in the caller's
nursery (trio's idiom for objects that own tasks):

1. **Handshake, in user space** (``_handshake``): the user's ``ssl.SSLContext`` drives an
   ``ssl.SSLObject``, reading the socket one record at a time so that nothing meant for
   the kernel is consumed.
2. **Handoff** (``_handoff``): keys from OpenSSL's key log go to the kernel; the result is
   a *record layer*: the kernel's (``_recordlayer``: ``_writer``, ``_reader``, ``_keys``)
   or, where the kernel cannot help, the ``SSLObject``'s own (``_userspace``).
3. **Data**: every public method delegates to that record layer; the task goes on as the
   kernel layer's reader task (control records, key updates) or ends.

This module holds what is the same either way: construction and option checking, the
state machine (`StreamStatus`: OK, BROKEN, CLOSED), misuse detection, and the public
methods with their documentation. It never asks which record layer it has.

Invariants
----------
- A stream that broke stays broken; the first failure is the ``__cause__`` of every later
  error. Data received before a failure is delivered first: ``receive_some`` goes to the
  record layer even on a broken stream, and the layer raises only when it has nothing
  left to give.
- ``_layer`` is None until the handshake task has called ``task_status.started()``;
  ``_handshake_done`` is set once it is known whether there is one.

Cancellation follows ``trio.SSLStream``: a cancelled ``do_handshake``, ``send_all`` or
``send_file`` leaves the stream broken (we cannot know how much went out); a cancelled
``receive_some`` loses nothing.
"""

from __future__ import annotations

import logging
import operator
import os
import ssl
import stat
import sys
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, BinaryIO, Final, final

import trio

if sys.version_info >= (3, 11):
    from typing import Unpack
else:
    from typing_extensions import Unpack

from ._errors import ConfidentialityLimitError, KTLSUnavailableError
from ._handoff import CONNECTION_LOST, KeyLogTap, hand_off, prepare
from ._handshake import Handshake
from ._options import KTLSOptions, StreamOptions
from ._recordlayer import RecordLayer
from ._report import HandoffReport
from ._state import State, StreamStatus
from ._userspace import UserSpaceRecordLayer

_DEFAULT_RECEIVE_SIZE: Final = 64 * 1024

logger: Final = logging.getLogger("trio_ktls")

# Attributes of the SSLObject that mean nothing before the handshake: reading one then
# raises trio.NeedHandshakeError (trio.SSLStream's ``_after_handshake``, name for name).
_AFTER_HANDSHAKE: Final = frozenset(
    {
        "session_reused",
        "getpeercert",
        "selected_npn_protocol",
        "cipher",
        "shared_ciphers",
        "compression",
        "get_channel_binding",
        "selected_alpn_protocol",
        "version",
    }
)

# Every attribute of the SSLObject that the stream exposes, as trio.SSLStream does: read,
# assigned (``stream.session = saved`` reaches the SSLObject) and listed by ``dir()``.
_FORWARDED: Final = _AFTER_HANDSHAKE | {
    "context",
    "server_side",
    "server_hostname",
    "session",
    "pending",
}


@final
@dataclass(frozen=True)
class KTLSInfo:
    """What the kernel does for this connection (a snapshot; read ``ktls_info`` again)."""

    #: Whether the kernel encrypts what we send.
    tx_offload: bool
    #: Whether the kernel decrypts what we receive.
    rx_offload: bool
    #: ``"TLSv1.2"`` or ``"TLSv1.3"``, as ``SSLObject.version()`` says.
    version: str
    #: The cipher suite, as OpenSSL names it.
    cipher: str
    #: Why a direction is not offloaded, in words; None when both are.
    reason: str | None
    #: KeyUpdate messages we sent (our own and answers to the peer's requests).
    key_updates_sent: int = 0
    #: KeyUpdate messages the peer sent, each followed by a new receive key.
    key_updates_received: int = 0
    #: Whether ``send_file`` uses ``sendfile(2)`` (the file's bytes never enter Python)
    #: rather than reading the file and sending it like ``send_all``.
    zero_copy_send_file: bool = False
    #: How the connection was handed over (or why it stayed in user space), step by
    #: step: handshake records, secrets and keys by length only, first sequence numbers,
    #: ``setsockopt`` calls.
    handoff: HandoffReport | None = None


class _ConflictDetector:
    """Raises BusyResourceError when two tasks use one direction at once."""

    def __init__(self, message: str) -> None:
        self._message = message
        self._held = False

    def __enter__(self) -> None:
        if self._held:
            raise trio.BusyResourceError(self._message)
        self._held = True

    def __exit__(self, *exc_info: object) -> None:
        self._held = False


@final
class KTLSStream(trio.abc.HalfCloseableStream):
    """A TLS stream whose record layer runs in the kernel, over a TCP `trio.SocketStream`.

    Over any other `trio.abc.Stream` (a memory stream, another TLS stream: whatever
    `trio.SSLStream` accepts) the kernel cannot help: with ``ktls="auto"`` the stream
    runs in user space and ``ktls_info.reason`` says why; ``ktls="require"`` raises
    `KTLSUnavailableError` from the handshake.

    ``ssl_context``, ``server_side``, ``server_hostname``, ``https_compatible`` and
    ``session`` mean what they mean for `trio.SSLStream` and ``SSLContext.wrap_bio``.
    ``nursery`` runs the stream's own task (handshake, handoff, then the reader).
    ``**options`` are the kTLS options (``ktls``, ``handshake_timeout``,
    ``max_receive_buffer``, ``rekey_after_records``, ``request_peer_rekey_after_records``),
    documented on `StreamOptions`; a bad value raises before anything else happens.

    Attributes of the ``SSLObject`` (``version()``, ``cipher()``, ``getpeercert()``,
    ``session``, ``selected_alpn_protocol()``...) are forwarded as by `trio.SSLStream`:
    those that describe the connection raise `trio.NeedHandshakeError` until the
    handshake is done; assigning one (``stream.session = saved`` before the handshake,
    trio's idiom for resumption) sets it on the ``SSLObject``; ``dir()`` lists them.
    """

    # Forwarded attributes, typed (methods such as ``cipher()`` come through
    # ``__getattr__`` and are typed as ``Any``, as on trio.SSLStream).
    #: The ``ssl.SSLContext`` (forwarded).
    context: ssl.SSLContext
    #: Whether this is the server end (forwarded).
    server_side: bool
    #: The name the certificate is checked against, or None (forwarded).
    server_hostname: str | None
    #: The TLS session, to resume a later connection; assign it before the handshake
    #: (forwarded).
    session: ssl.SSLSession | None
    #: Whether the handshake resumed a session (forwarded; after the handshake).
    session_reused: bool

    def __init__(
        self,
        transport_stream: trio.abc.Stream,
        ssl_context: ssl.SSLContext,
        *,
        nursery: trio.Nursery,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        https_compatible: bool = False,
        session: ssl.SSLSession | None = None,
        **options: Unpack[KTLSOptions],
    ) -> None:
        self._options: Final = StreamOptions(**options)
        if not isinstance(transport_stream, trio.abc.Stream):
            raise TypeError(
                f"transport_stream must be a trio.abc.Stream, not {transport_stream!r}"
            )
        if not isinstance(ssl_context, ssl.SSLContext):
            raise TypeError(f"ssl_context must be an ssl.SSLContext, not {ssl_context!r}")
        #: The stream underneath: a `trio.SocketStream` for kTLS; any other stream (a
        #: memory stream, another TLS stream) works in user space.
        self.transport_stream: Final[trio.abc.Stream] = transport_stream
        # Taken now (at accept time, for a listener's stream), while the peer is surely
        # still connected: log lines about this connection name it.
        self._peer = _peer_address(transport_stream)
        self._nursery = nursery
        self._https_compatible = https_compatible
        self._handshake = Handshake(
            transport_stream,
            ssl_context,
            server_side=server_side,
            server_hostname=server_hostname,
            session=session,
        )
        self._status = StreamStatus()
        self._layer: RecordLayer | None = None
        self._info: KTLSInfo | None = None
        self._handshake_started = False
        self._handshake_done = trio.Event()
        self._eof_sent = False
        self._send_conflict = _ConflictDetector("another task is sending on this stream")
        self._receive_conflict = _ConflictDetector("another task is receiving on this stream")
        # Attaching the ULP now (the socket is ESTABLISHED) lets OpenSSL's key log be
        # captured from the first handshake message on.
        self._tap: KeyLogTap | None = None
        self._offload_reason: str | None = None
        if self._options.ktls == "off":
            self._offload_reason = "kTLS is switched off for this stream (ktls='off')"
        else:
            prepared = prepare(transport_stream, ssl_context, self._handshake.observer.trace)
            if isinstance(prepared, str):
                self._offload_reason = prepared
            else:
                self._tap = prepared

    # -- introspection ----------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        if name in _FORWARDED:
            # ``_layer`` is set once the handshake (and the handoff) succeeded: the
            # counterpart of trio's ``_handshook.done``.
            if name in _AFTER_HANDSHAKE and self._layer is None:
                raise trio.NeedHandshakeError(f"call do_handshake() before calling {name!r}")
            return getattr(self._handshake.ssl_object, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: object) -> None:
        if name in _FORWARDED:
            setattr(self._handshake.ssl_object, name, value)
        else:
            super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return [*super().__dir__(), *_FORWARDED]

    @property
    def ktls_info(self) -> KTLSInfo | None:
        """None until the handshake is done; then what the kernel took over, and why not."""
        info, layer = self._info, self._layer
        if info is None or layer is None:
            return info
        return KTLSInfo(
            tx_offload=info.tx_offload,
            rx_offload=info.rx_offload,
            version=info.version,
            cipher=info.cipher,
            reason=info.reason,
            key_updates_sent=layer.key_updates_sent,
            key_updates_received=layer.key_updates_received,
            zero_copy_send_file=layer.zero_copy_send_file,
            handoff=info.handoff,
        )

    def record_sequence_numbers(self) -> tuple[int, int] | None:
        """The kernel's record counters ``(TX, RX)``: the sequence number of the next
        record it will send and receive under the current keys. Each restarts at 0 when
        that direction's key changes (a KeyUpdate, RFC 8446 §5.3).

        Read from the kernel (``getsockopt(SOL_TLS, TLS_TX/TLS_RX)``): two system calls
        that copy the key structure, so call it now and then, not on every send. None
        before the handshake and where the record layer stays in user space (OpenSSL
        keeps its counters to itself). Raises `trio.ClosedResourceError` after
        ``aclose``.
        """
        self._status.check_not_closed()
        layer = self._layer
        return None if layer is None else layer.record_sequence_numbers()

    @property
    def tickets_received(self) -> int:
        """TLS 1.3 NewSessionTicket messages that arrived after the handoff (a client's
        tickets are relayed to OpenSSL, so ``session`` resumes)."""
        return self._layer.tickets_received if self._layer else 0

    # -- handshake and handoff --------------------------------------------------------

    async def do_handshake(self) -> None:
        """Run the handshake (and the handoff) if it has not run; wait for it if it is
        running. Raises `trio.BrokenResourceError` if it failed (`KTLSUnavailableError`
        for ``ktls="require"`` where the kernel cannot take the connection), and
        `trio.TooSlowError` past ``handshake_timeout``."""
        self._status.check()
        if self._layer is not None:
            await trio.lowlevel.checkpoint()
            return
        await self._ensure_handshake()

    async def _ensure_handshake(self) -> RecordLayer:
        """The record layer, once the handshake is done; raises if the handshake failed
        (but not for a failure after it: that is the record layer's to raise).

        Callers write ``self._layer or await self._ensure_handshake()``: on the data path
        the layer's own call is the checkpoint, so a finished handshake costs nothing.
        """
        if self._layer is not None:
            return self._layer
        if self._handshake_done.is_set():
            raise self._handshake_failure()
        if self._handshake_started:
            await self._handshake_done.wait()
        else:
            self._handshake_started = True
            try:
                await self._nursery.start(self._run)
            except KTLSUnavailableError as exc:
                self._status.fail(exc)
                raise
            except ssl.SSLError as exc:
                self._status.fail(exc)
                raise trio.BrokenResourceError(f"TLS handshake failed: {exc}") from exc
            except trio.Cancelled:
                self._status.fail(trio.BrokenResourceError("the handshake was cancelled midway"))
                raise
            except BaseException as exc:
                self._status.fail(exc)
                raise
            finally:
                self._handshake_done.set()
                if self._layer is None:
                    self._forget_secrets()
        if self._layer is None:
            raise self._handshake_failure()
        return self._layer

    def _handshake_failure(self) -> Exception:
        self._status.check_not_closed()
        return self._status.broken_error()

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self._offload_reason == CONNECTION_LOST:
            raise trio.BrokenResourceError(CONNECTION_LOST)
        if self._options.ktls == "require" and self._tap is None:
            raise KTLSUnavailableError(self._offload_reason or "kTLS is unavailable")
        with trio.fail_after(self._options.handshake_timeout or float("inf")):
            await self._handshake.run()
        layer: RecordLayer
        kernel = self._kernel_layer()
        if isinstance(kernel, str):
            if self._options.ktls == "require":
                raise KTLSUnavailableError(kernel)
            self._offload_reason = kernel
            layer = UserSpaceRecordLayer(
                self._handshake, self._status, https_compatible=self._https_compatible
            )
        else:
            layer = kernel
        ssl_object = self._handshake.ssl_object
        cipher = ssl_object.cipher()
        self._info = KTLSInfo(
            tx_offload=layer.offloaded,
            rx_offload=layer.offloaded,
            version=ssl_object.version() or "unknown",
            cipher=cipher[0] if cipher else "unknown",
            reason=None if layer.offloaded else self._offload_reason,
            handoff=self._handshake.observer.trace.report(),
        )
        if layer.offloaded:
            logger.debug("%s: %s %s offloaded to the kernel", self._peer, *_names(self._info))
        else:
            logger.debug(
                "%s: %s %s stays in user space: %s",
                self._peer,
                *_names(self._info),
                self._info.reason,
            )
        self._layer = layer
        task_status.started()
        await layer.run()

    def _kernel_layer(self) -> RecordLayer | str:
        if self._tap is None:
            return self._offload_reason or "kTLS is unavailable"
        return hand_off(
            self._handshake,
            self._tap,
            self._status,
            self._options,
            https_compatible=self._https_compatible,
        )

    def _forget_secrets(self) -> None:
        """Drop this connection's key-log lines if the handshake never reached handoff."""
        client_random = self._handshake.observer.client_random
        if self._tap is not None and client_random is not None:
            self._tap.drain()
            self._tap.discard(client_random)

    # -- sending ----------------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data``; the kernel (or OpenSSL) cuts it into records.

        A cancelled ``send_all`` breaks the stream, as in `trio.SSLStream`.
        """
        with self._send_conflict:
            layer = await self._send_prelude()
            await self._sending(layer.send(data))

    async def send_file(
        self, file: int | BinaryIO, *, offset: int = 0, count: int | None = None
    ) -> None:
        """Send ``count`` bytes (default: to the end) of a regular file from ``offset``.

        ``file`` is a descriptor or a file object with one; its own position is neither
        used nor changed. The range is checked before anything is sent (`ValueError`
        past the end or for a file that is not a regular file, `TypeError` for an object
        without a descriptor). Offloaded, the kernel reads the page cache and encrypts
        (``sendfile(2)``; ``ktls_info.zero_copy_send_file``); in user space the file is
        read in chunks in a worker thread. Either way it goes out under the same writer
        lock as ``send_all``, its records count toward the key's limit, and a file that
        shrinks meanwhile breaks the stream. A ``send_file`` cancelled once sending has
        begun breaks the stream, like a cancelled ``send_all``; cancelled earlier, while
        the file is checked, it has sent nothing and the stream stays usable.
        """
        fd = _file_descriptor(file)
        offset = operator.index(offset)
        if count is not None:
            count = operator.index(count)
        if offset < 0 or (count is not None and count < 0):
            raise ValueError("offset and count must not be negative")
        try:
            status = await trio.to_thread.run_sync(os.fstat, fd)
        except OSError as exc:
            raise ValueError(f"send_file cannot use descriptor {fd}: {exc.strerror}") from None
        if not stat.S_ISREG(status.st_mode):
            raise ValueError("send_file needs a regular file")
        size = status.st_size
        if count is None:
            count = max(size - offset, 0)
        if offset + count > size:
            raise ValueError(
                f"the file has {size} bytes: {count} from offset {offset} is past its end"
            )
        with self._send_conflict:
            layer = await self._send_prelude()
            await self._sending(layer.send_file(fd, offset, count))

    async def _send_prelude(self) -> RecordLayer:
        layer = self._layer or await self._ensure_handshake()
        self._status.check()
        if self._eof_sent:
            raise trio.ClosedResourceError("can't send data after sending EOF")
        return layer

    async def _sending(self, operation: Awaitable[None], *, atomic: bool = False) -> None:
        """Run one write of the record layer; a failure breaks the stream, and so does a
        cancellation midway (we cannot know how much went out) unless the operation is
        ``atomic`` (all or nothing, like one KeyUpdate)."""
        try:
            await operation
        except trio.Cancelled:
            if not atomic:
                self._status.fail(trio.BrokenResourceError("a write was cancelled midway"))
            raise
        except trio.BrokenResourceError as exc:
            self._status.fail(exc)
            if isinstance(exc, ConfidentialityLimitError):  # it sent close_notify
                self._eof_sent = True
            raise self._status.broken_error() from exc

    async def update_keys(self, *, request_peer_update: bool = False) -> None:
        """Send a TLS 1.3 KeyUpdate and switch to the next transmit key (RFC 8446 §4.6.3).

        With ``request_peer_update`` the peer is asked to update its keys too. Waits for
        any ``send_all`` in progress to reach a chunk boundary: no application byte is
        ever encrypted under the wrong key. Raises `KeyUpdateUnavailableError` (nothing
        sent; the stream stays usable) where it cannot be done: TLS 1.2, a kernel without
        TLS 1.3 rekey (before 6.14), or a stream in user space.
        """
        layer = self._layer or await self._ensure_handshake()
        self._status.check()
        # Cancellation leaves the stream usable: the KeyUpdate record is one sendmsg (all
        # or nothing) and the key install after it is not a checkpoint.
        operation = layer.update_keys(request_peer_update=request_peer_update)
        await self._sending(operation, atomic=True)

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until ``send_all`` might not block (see `trio.abc.SendStream`)."""
        with self._send_conflict:
            layer = self._layer or await self._ensure_handshake()
            self._status.check()
            await layer.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        """Send close_notify and shut down the write side; receiving goes on.

        With ``https_compatible`` no close_notify is sent (such a stream neither expects
        nor sends one, as in `trio.SSLStream`): only the transport's write side is shut
        down (a TCP FIN), which an HTTPS-style peer reads as the end. A transport that
        cannot half-close then has no way to say it: `TypeError`, before anything is
        sent (`trio.SSLStream` has no ``send_eof`` at all).
        """
        if self._https_compatible and not isinstance(
            self.transport_stream, trio.abc.HalfCloseableStream
        ):
            raise TypeError(
                "send_eof with https_compatible=True sends no close_notify, so it needs a "
                "transport that can half-close (a trio.abc.HalfCloseableStream)"
            )
        with self._send_conflict:
            layer = self._layer or await self._ensure_handshake()
            self._status.check()
            if self._eof_sent:
                await trio.lowlevel.checkpoint()
                return
            await self._sending(layer.send_eof())
            self._eof_sent = True

    # -- receiving --------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """Up to ``max_bytes`` bytes (default 64 KiB) of data, or ``b""`` at end of
        stream (the peer's close_notify; with ``https_compatible`` also a bare TCP close,
        even one during the handshake, as in `trio.SSLStream`). Data that arrived before
        a failure is returned first."""
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)  # TypeError for 1.5, like a socket
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
        with self._receive_conflict:
            self._status.check_not_closed()
            layer = self._layer
            if layer is None:
                try:
                    layer = await self._ensure_handshake()
                except trio.BrokenResourceError:
                    if not (self._https_compatible and self._handshake.peer_closed):
                        raise
                    # As trio.SSLStream: with https_compatible, a peer that closes the
                    # connection mid-handshake has ended the stream. Every call says so
                    # (trio's later calls raise: its stream is broken by then).
                    await trio.lowlevel.checkpoint()
                    return b""
            return await layer.receive(max_bytes or _DEFAULT_RECEIVE_SIZE)

    # -- closing ----------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the stream: close_notify if it is healthy and no write is under way
        (never with ``https_compatible``, as in `trio.SSLStream`), then the transport.
        Idempotent; never raises for a broken stream."""
        if self._status.state is State.CLOSED:
            await trio.lowlevel.checkpoint()
            return
        was_ok = self._status.state is State.OK
        self._status.close()
        layer = self._layer
        if layer is None:
            await self.transport_stream.aclose()
            return
        layer.stop()  # no reader task, no key change, from here on
        try:
            if was_ok and not self._eof_sent:
                await layer.close_notify_if_idle()
        except BaseException:
            await trio.aclose_forcefully(self.transport_stream)
            raise
        await self.transport_stream.aclose()


def _names(info: KTLSInfo) -> tuple[str, str]:
    return info.version, info.cipher


def _peer_address(transport: trio.abc.Stream) -> str:
    """The peer, for log lines: its address for a socket, the transport otherwise."""
    if not isinstance(transport, trio.SocketStream):
        return f"a peer over {type(transport).__name__}"
    try:
        return str(transport.socket.getpeername())
    except OSError:
        return "a peer that had already disconnected"


def _file_descriptor(file: int | BinaryIO) -> int:
    if isinstance(file, int) and not isinstance(file, bool):
        return file
    fileno = getattr(file, "fileno", None)
    if fileno is None:
        raise TypeError(f"send_file needs a file descriptor or a file object, not {file!r}")
    try:
        fd = fileno()
    except OSError as exc:  # io.BytesIO and friends: no descriptor behind them
        raise TypeError(f"{file!r} has no file descriptor: {exc}") from None
    return operator.index(fd)
