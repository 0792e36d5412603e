"""The record layer a stream runs on after its handshake: one interface, two homes.

`KTLSStream` chooses its record layer once, at the handoff, and never asks again which
one it has (h11's idea: pick the reader and writer by state, in one place):

- `KernelRecordLayer` (here): the kernel encrypts and decrypts; `KernelWriter`
  (``_writer``) sends, `KernelReader` (``_reader``) runs the reader task, and
  `TrafficKeys` (``_keys``) owns the keys both use.
- `UserSpaceRecordLayer` (``_userspace``): the ``ssl.SSLObject`` of the handshake keeps
  doing everything, like ``trio.SSLStream``.

What each layer owns: its own write serialisation (the stream adds misuse detection, not
locks), mapping its failures to `trio.BrokenResourceError` in *one* place
(``_broken_on_os_error`` here, ``_translate`` in ``_userspace``), and every guarantee about
received data: nothing delivered twice, nothing lost to cancellation or to a later
failure. The stream owns the state machine (`StreamStatus`), which both layers share.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable, Callable, Iterator
from typing import Final, Protocol

import trio

from . import _kernel
from ._keys import TrafficKeys
from ._probe import zero_copy_send_file_works
from ._reader import KernelReader
from ._state import StreamStatus
from ._writer import CHUNK, KernelWriter

#: Bytes read from a file per chunk when ``send_file`` copies through user space.
COPY_CHUNK: Final = CHUNK


class RecordLayer(Protocol):
    """What the stream needs from a record layer (all methods may assume a finished
    handshake and a stream that was OK when the call began)."""

    #: Whether the kernel does the record layer.
    offloaded: bool
    #: Whether ``send_file`` uses ``sendfile(2)``.
    zero_copy_send_file: bool

    @property
    def key_updates_sent(self) -> int: ...

    @property
    def key_updates_received(self) -> int: ...

    @property
    def tickets_received(self) -> int: ...

    async def run(self) -> None:
        """The layer's own task, in the stream's nursery (returns at once if none)."""

    async def send(self, data: bytes | bytearray | memoryview) -> None: ...

    async def send_file(self, fd: int, offset: int, count: int) -> None:
        """``count`` bytes of ``fd`` from ``offset`` (checked by the caller)."""

    async def receive(self, max_bytes: int) -> bytes | bytearray:
        """Data, ``b""`` at end of stream, or the stream's failure: only once every byte
        received before it was delivered."""

    async def send_eof(self) -> None:
        """close_notify, then shut the write side (with ``https_compatible``: no
        close_notify, only the transport's own end of stream)."""

    async def close_notify_if_idle(self) -> None:
        """``aclose``'s courtesy close_notify: skipped if a write is under way or with
        ``https_compatible`` (which neither expects nor sends one), silent on failure."""

    async def update_keys(self, *, request_peer_update: bool) -> None: ...

    def record_sequence_numbers(self) -> tuple[int, int] | None:
        """``(TX, RX)`` sequence numbers of the next records, where they can be read."""

    async def wait_send_all_might_not_block(self) -> None: ...

    def stop(self) -> None:
        """The stream is closing: stop the task, wake every waiter, wipe keys."""


@contextlib.contextmanager
def _broken_on_os_error(what: str) -> Iterator[None]:
    """The kernel layer's one error mapping: a socket error breaks the stream."""
    try:
        yield
    except OSError as exc:
        raise trio.BrokenResourceError(f"{what} failed: {os.strerror(exc.errno or 0)}") from exc


class KernelRecordLayer:
    """Both directions in the kernel (see the module doc)."""

    offloaded = True

    def __init__(
        self,
        transport_stream: trio.SocketStream,
        keys: TrafficKeys,
        writer: KernelWriter,
        reader: KernelReader,
        status: StreamStatus,
        *,
        https_compatible: bool,
    ) -> None:
        self._transport = transport_stream
        self._https_compatible = https_compatible
        self._keys = keys
        self._writer = writer
        self._reader = reader
        self._status = status
        status.on_change = reader.wake
        self.zero_copy_send_file = zero_copy_send_file_works()

    @property
    def key_updates_sent(self) -> int:
        return self._writer.key_updates_sent

    @property
    def key_updates_received(self) -> int:
        return self._reader.key_updates_received

    @property
    def tickets_received(self) -> int:
        return self._reader.tickets_received

    async def run(self) -> None:
        await self._reader.run()

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        # The hot path takes a free lock without the scheduling round that
        # ``async with lock`` costs: each ``send`` inside is a checkpoint already (and
        # empty data gets one of its own).
        lock = self._writer.lock
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        else:
            if not data:
                await trio.lowlevel.checkpoint()
        try:
            self._status.check()
            with _broken_on_os_error("sending"):
                await self._writer.send_data(data)
        finally:
            lock.release()

    async def send_file(self, fd: int, offset: int, count: int) -> None:
        async with self._writer.lock:
            self._status.check()
            with _broken_on_os_error("sending a file"):
                if self.zero_copy_send_file:
                    await self._writer.send_file(fd, offset, count)
                else:
                    await send_file_in_chunks(fd, offset, count, self._writer.send_data)

    async def receive(self, max_bytes: int) -> bytes:
        return await self._reader.receive(max_bytes)

    async def send_eof(self) -> None:
        async with self._writer.lock:
            self._status.check()
            if self._https_compatible:
                with _broken_on_os_error("shutting down the write side"):
                    await self._writer.shut_down_write_side()
                return
            with _broken_on_os_error("sending close_notify"):
                await self._writer.send_eof()

    async def close_notify_if_idle(self) -> None:
        if self._https_compatible or self._writer.lock.locked():
            await trio.lowlevel.checkpoint()
            return
        async with self._writer.lock:
            with contextlib.suppress(OSError):
                await self._writer.send_eof()

    async def update_keys(self, *, request_peer_update: bool) -> None:
        if not await self._keys.can_update():
            await trio.lowlevel.checkpoint()
            raise self._keys.cannot_update_error()
        async with self._writer.lock:
            self._status.check()
            with _broken_on_os_error("sending KeyUpdate"):
                await self._writer.rotate(request_peer_update=request_peer_update)

    def record_sequence_numbers(self) -> tuple[int, int]:
        sock, cipher = self._transport.socket, self._keys.tx.cipher
        with _broken_on_os_error("reading the record sequence numbers"):
            return (
                _kernel.read_rec_seq(sock, _kernel.TLS_TX, cipher),
                _kernel.read_rec_seq(sock, _kernel.TLS_RX, cipher),
            )

    async def wait_send_all_might_not_block(self) -> None:
        await self._transport.wait_send_all_might_not_block()

    def stop(self) -> None:
        self._reader.stop()
        self._keys.wipe()


async def send_file_in_chunks(
    fd: int,
    offset: int,
    count: int,
    send: Callable[[bytes], Awaitable[None]],
) -> None:
    """Read ``fd`` in a worker thread, a chunk at a time, and ``send`` each chunk.

    ``pread``: the file's own position is neither used nor changed. A file that ends early
    breaks the stream (the peer has been promised nothing, but part was sent).
    """
    position, remaining = offset, count
    while remaining:
        try:
            chunk = await trio.to_thread.run_sync(
                os.pread, fd, min(COPY_CHUNK, remaining), position
            )
        except OSError as exc:
            raise trio.BrokenResourceError(
                f"send_file stopped: reading the file failed: {os.strerror(exc.errno or 0)}"
            ) from exc
        if not chunk:
            raise trio.BrokenResourceError(
                f"send_file stopped short: the file ended {remaining} bytes before the "
                "requested range did"
            )
        await send(chunk)
        position += len(chunk)
        remaining -= len(chunk)
