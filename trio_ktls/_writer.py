"""The transmit side of an offloaded stream: one lock, one record budget, key rotation.

Theory of operation
-------------------
Every byte that reaches a kTLS socket after the handoff goes through `KernelWriter`, by
whoever holds its ``lock`` (a StrictFIFOLock, created and owned here): the application's
``send_all``/``send_file``/``send_eof``, the reader task (alerts, KeyUpdate answers) and
``update_keys``. Holding it across our KeyUpdate record and the ``TLS_TX`` re-install that
follows means no record can slip in between and be encrypted under a key the peer no
longer expects (RFC 8446 §4.6.3: the sender switches keys right after its KeyUpdate).

Data goes out in chunks. Between chunks the writer services *pending* work, so that a key
rotation asked for by the reader task (the peer sent KeyUpdate with update_requested, or
the peer's records near their limit) never waits behind a large ``send_all``, and the
reader never blocks on the lock (it could deadlock against a sender that waits for the
peer to read, while the peer waits for us to read): `update_soon` either finds the lock
free and rotates at once, or leaves the rotation to the holder.

The record budget (see ``_keys``) keeps one record below the limit in reserve: our
KeyUpdate, or close_notify where the key cannot be replaced. Where it cannot (TLS 1.2,
kernels before 6.14) the writer refuses to pass the limit: it sends close_notify, shuts
the write side and raises `ConfidentialityLimitError`.

Invariant: methods whose names do not say otherwise are called with ``lock`` held.
"""

from __future__ import annotations

import contextlib
import functools
import os
import select
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, TypeVar

import trio

from . import _kernel
from ._errors import ConfidentialityLimitError, KTLSRekeyFailedError
from ._keys import RecordBudget, TrafficKeys
from ._messages import CLOSE_NOTIFY, MAX_PLAINTEXT, ContentType, encode_key_update

if TYPE_CHECKING:  # trio's own dependency, for the type of what a thread returns
    import outcome

_T = TypeVar("_T")

#: Bytes per ``send`` between checks for pending work.
CHUNK: Final = 256 * 1024
#: Records one CHUNK can make at most.
_CHUNK_RECORDS: Final = CHUNK // MAX_PLAINTEXT
#: Bytes per worker-thread turn of ``send_file`` (see `KernelWriter.send_file`).
SENDFILE_CHUNK: Final = 16 * 1024 * 1024
#: Milliseconds a ``send_file`` thread waits for room before it looks for pending work.
_POLL_MS: Final = 50
#: Records per chunk when no limit is near (any figure above CHUNK / MAX_PLAINTEXT).
_UNLIMITED: Final = 1 << 40
#: ``TCP_NOTSENT_LOWAT`` of an offloaded stream (see `KernelWriter.raise_low_water_mark`).
NOTSENT_LOWAT: Final = 256 * 1024
#: ``TCP_NOTSENT_LOWAT`` for "no low-water mark" (UINT_MAX, the sysctl's default).
_NO_LOWAT: Final = -1
#: sendfile hands the TLS layer page-cache pages, and a record may end at a page
#: boundary: the record budget counts a page as a record, which is an upper bound.
_PAGE: Final = 4096


class KernelWriter:
    """Writes to an offloaded socket; see the module docs."""

    def __init__(
        self, sock: trio.socket.SocketType, keys: TrafficKeys, budget: RecordBudget
    ) -> None:
        self.lock: Final = trio.StrictFIFOLock()
        self._sock = sock
        self._keys = keys
        self._budget = budget
        #: None, or the update_requested flag of a KeyUpdate we owe the peer.
        self._pending: bool | None = None
        self.key_updates_sent = 0

    # -- without the lock -------------------------------------------------------------

    async def update_soon(self, *, request_peer_update: bool) -> None:
        """Have a KeyUpdate sent soon, never waiting for a busy writer.

        If a task holds the lock, it sends the update at its next chunk boundary (or
        before it releases the lock); otherwise the update goes out now.
        """
        self._pending = bool(self._pending) or request_peer_update
        if self.lock.locked():
            await trio.lowlevel.checkpoint()
            return
        async with self.lock:
            await self.service_pending()

    # -- with the lock ----------------------------------------------------------------

    async def service_pending(self) -> None:
        if self._pending is not None:
            await self.rotate(request_peer_update=self._pending)

    async def send_data(self, data: bytes | bytearray | memoryview) -> None:
        # The hot path: one send per chunk, and no await for the budget or for pending
        # KeyUpdates unless there is something to do.
        view = memoryview(data).cast("B")
        budget = self._budget
        while view:
            if self._pending is not None:
                await self.service_pending()
            if budget.limit is None or budget.bound + _CHUNK_RECORDS < budget.limit - 1:
                size = CHUNK
            else:
                size = min(CHUNK, await self._records_left() * MAX_PLAINTEXT)
            sent = await self._sock.send(view[:size])
            budget.charge(-(-sent // MAX_PLAINTEXT))  # ceil
            view = view[sent:]
        if self._pending is not None:
            await self.service_pending()

    def raise_low_water_mark(self) -> None:
        """Raise trio's ``TCP_NOTSENT_LOWAT`` of 16 KiB to `NOTSENT_LOWAT` (never lower
        a larger one), once, at the handoff.

        The TLS layer honours the mark (``tls_sw_sendmsg`` stops once that much is
        unsent, and poll reports writable below half of it). At 16 KiB, one record, a
        bulk sender ahead of its peer sent about a record per wake-up, and a ``send_all``
        that found the queue full waited for it to drain almost completely before it
        wrote again: the pipe ran dry once per call. At 256 KiB each wake-up moves
        several chunks, while unsent data stays bounded, which is what trio's mark is
        for (``wait_send_all_might_not_block`` keeps its meaning). It bounds only what
        TCP has not sent yet; data in flight is not limited by it.
        """
        with contextlib.suppress(OSError):  # not TCP, or already broken: keep trio's
            if self._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) < NOTSENT_LOWAT:
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)

    async def send_file(self, fd: int, offset: int, count: int) -> None:
        """``count`` bytes of a regular file from ``offset`` with ``sendfile(2)``: the
        kernel reads the page cache and encrypts; the bytes never enter Python.

        The calls run in a worker thread (`_sendfile_turn`), which also waits there for
        room in the socket: reading a file that is not in the page cache blocks, and the
        event loop must not; and a trip back to the event loop for every socket buffer's
        worth (a wake-up, an epoll round and a new thread trip each) cost a third of the
        throughput in the 6.18 guest. The thread comes back after `SENDFILE_CHUNK` bytes,
        when a KeyUpdate is pending (it goes out between turns, as between ``send_data``
        chunks), when the record budget asks for it, or at once when the task is
        cancelled (the cancellation writes to a pipe that its ``poll`` watches).

        Why the socket options change meanwhile (found in the 6.1-7.2 guests; see
        docs/design.md): sendfile hands pages to the TLS layer as a splice with "more to
        come", and the TLS layer pushes each full record to TCP with MSG_MORE, so TCP
        holds it back while it is shorter than a segment (on loopback, 32 KiB). One held
        record (16,413 bytes) is already above trio's ``TCP_NOTSENT_LOWAT`` of 16 KiB: the
        next record gets EAGAIN, and with nothing in flight no ACK ever reports the socket
        writable. On 6.1 that is a stall for good; later lines release the segment after
        ~0.2 s, a record at a time. So the low-water mark is lifted for the transfer and
        restored after it, and ``TCP_NODELAY`` is set again on EAGAIN and at the end,
        which makes TCP push what it holds.
        """
        saved_lowat = self._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, _NO_LOWAT)
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_read, False)
        os.set_blocking(wake_write, False)
        try:
            while count:
                await self.service_pending()
                room = await self._records_left()
                sent, records, ended = await _in_thread_woken_on_cancel(
                    functools.partial(
                        self._sendfile_turn,
                        fd,
                        offset,
                        min(SENDFILE_CHUNK, count),
                        room,
                        wake_read,
                    ),
                    wake_write,
                )
                self._budget.charge(records)
                if ended:
                    raise trio.BrokenResourceError(
                        f"send_file stopped short: the file ended {count - sent} bytes "
                        "before the requested range did"
                    )
                offset += sent
                count -= sent
        finally:
            os.close(wake_read)
            os.close(wake_write)
            with contextlib.suppress(OSError):  # a broken socket is reported elsewhere
                self._push()
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, saved_lowat)
        await self.service_pending()

    def _sendfile_turn(
        self, fd: int, offset: int, size: int, room: int, wake_fd: int
    ) -> tuple[int, int, bool]:
        """In a worker thread: up to ``size`` bytes with as many ``sendfile(2)`` calls as
        it takes, within ``room`` records. Returns the bytes sent, the records charged
        for them and whether the file ended first.

        Records are counted as an upper bound: the TLS layer may close a record at each
        page boundary and at the end of each call, so a call of n bytes makes at most
        ceil(n / 4096) + 1 of them. The socket stays non-blocking (the reader task reads
        it meanwhile); EAGAIN waits in ``poll``, which also watches ``wake_fd`` and times
        out now and then to see whether a KeyUpdate became pending.
        """
        sock_fd = self._sock.fileno()
        poller = select.poll()
        poller.register(sock_fd, select.POLLOUT)
        poller.register(wake_fd, select.POLLIN)
        sent = records = 0
        while sent < size and self._pending is None:
            allowed = min(size - sent, (room - records - 1) * _PAGE)
            if allowed <= 0:
                if records:
                    break
                allowed = min(size, _PAGE)  # the budget's reserve record covers the rest
            try:
                n = os.sendfile(sock_fd, fd, offset + sent, allowed)
            except BlockingIOError:
                self._push()
                if any(ready == wake_fd for ready, _ in poller.poll(_POLL_MS)):
                    break
                continue
            if not n:
                return sent, records, True
            sent += n
            records += -(-n // _PAGE) + 1
        return sent, records, False

    def _push(self) -> None:
        """Make TCP send what it holds back (setting ``TCP_NODELAY`` pushes pending
        segments even when it is already on, tcp(7))."""
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def send_control(self, content_type: int, payload: bytes) -> None:
        """One control record. It may use the record the budget keeps in reserve."""
        await self._sock.sendmsg([payload], _kernel.set_record_type_cmsg(content_type))
        self._budget.charge(1)

    async def send_eof(self) -> None:
        """close_notify (RFC 8446 §6.1; the kernel never sends it), then shut down the
        write side."""
        await self.send_control(ContentType.ALERT, CLOSE_NOTIFY.encode())
        self._sock.shutdown(socket.SHUT_WR)

    async def shut_down_write_side(self) -> None:
        """Shut down the write side with no close_notify (``https_compatible``: HTTPS
        peers end with a bare TCP FIN)."""
        await trio.lowlevel.checkpoint()
        self._sock.shutdown(socket.SHUT_WR)

    async def _records_left(self) -> int:
        """Data records that may still go out under this key (>= 1), rotating first if
        the limit is near. One record below the limit stays in reserve."""
        limit = self._budget.limit
        if limit is None:
            return _UNLIMITED
        last = limit - 1
        if self._budget.reached(last):
            if not await self._keys.can_update():
                reason = self._keys.cannot_update_reason()
                exact = self._budget.bound
                with contextlib.suppress(OSError):  # the limit is the news, not this
                    await self.send_eof()
                raise ConfidentialityLimitError(
                    f"the transmit key has protected {exact} records and its limit is "
                    f"{limit}; {reason}; the stream was closed with close_notify"
                )
            await self.rotate(request_peer_update=False)
        return last - self._budget.bound

    async def rotate(self, *, request_peer_update: bool) -> None:
        """Send KeyUpdate, then install the next transmit key (RFC 8446 §4.6.3, §7.2).

        A pending update is folded in (and its request to the peer kept). Callers that can
        refuse cleanly check `TrafficKeys.can_update` first; here it is too late for that:
        an update the peer asked for, or the limit, requires it.
        """
        if not await self._keys.can_update():
            raise KTLSRekeyFailedError(
                f"a key update is required but impossible: {self._keys.cannot_update_reason()}"
            )
        request_peer_update = request_peer_update or bool(self._pending)
        self._pending = None
        await self.send_control(ContentType.HANDSHAKE, encode_key_update(request_peer_update))
        info = self._keys.update_tx_secret()
        try:
            _kernel.install_key(self._sock, _kernel.TLS_TX, info)
        except OSError as exc:
            # Our KeyUpdate is on the wire: the peer expects the new key from now on.
            raise KTLSRekeyFailedError(
                f"the kernel refused the next transmit key ({os.strerror(exc.errno or 0)}) "
                "after our KeyUpdate was sent; the connection cannot continue"
            ) from exc
        finally:
            info.wipe()
        self._budget.restart()
        self.key_updates_sent += 1


async def _in_thread_woken_on_cancel(work: Callable[[], _T], wake_fd: int) -> _T:
    """``work()`` in a worker thread; a cancellation writes to ``wake_fd`` (which the
    work polls, so it returns soon) and is delivered once the work has returned, at the
    caller's next checkpoint, with its result in hand.

    Not `trio.to_thread.run_sync` beside a watcher task: the watcher's nursery would wrap
    the caller's `trio.Cancelled` in an exception group, which the stream's "a write was
    cancelled midway" bookkeeping (an ``except trio.Cancelled``) would not see.
    """
    await trio.lowlevel.checkpoint_if_cancelled()
    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()

    def deliver(result: outcome.Outcome[_T]) -> None:
        token.run_sync_soon(trio.lowlevel.reschedule, task, result)

    def abort(_: object) -> trio.lowlevel.Abort:
        with contextlib.suppress(OSError):  # the pipe is full: the work is woken already
            os.write(wake_fd, b"!")
        return trio.lowlevel.Abort.FAILED  # the work's result still comes back

    trio.lowlevel.start_thread_soon(work, deliver, name="trio_ktls send_file")
    result: _T = await trio.lowlevel.wait_task_rescheduled(abort)
    return result
