"""``trio-ktls serve --workers N``: N processes accepting on one port.

Every socket is bound and listening before any process starts, so a port in use is one
error in the parent, and connections that arrive early wait in a backlog. With more than
one worker each worker gets its own set of sockets, all bound with ``SO_REUSEPORT``: the
kernel spreads incoming connections over their accept queues by a hash of the
connection's addresses (``socket(7)``), so no lock, no thundering herd, every core busy.

Workers are forked (before any event loop or thread exists) and each closes the other
workers' sockets, so a worker that dies takes only its own queue with it. Stopping:
SIGINT or SIGTERM to the parent is passed on to every worker as SIGTERM; a Ctrl-C on a
terminal reaches them all at once anyway. Each worker stops on either signal (its
``run`` handles them inside the event loop, see `_commands`), and ignores SIGINT outside
it, so a second Ctrl-C during shutdown never prints a traceback. A worker that exits on
its own while the others run is an error: the others are stopped and the parent exits
non-zero. Workers get SIGTERM if the parent itself dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
from collections.abc import Callable
from types import FrameType
from typing import Any, Final

logger: Final = logging.getLogger("trio_ktls.serve")

_PR_SET_PDEATHSIG: Final = 1


def bind_sockets(
    host: str, port: int, *, workers: int, backlog: int = 128
) -> list[list[socket.socket]]:
    """For each worker, listening TCP sockets on every address ``host`` resolves to, all
    on one port (``port``, or the one the kernel picked for the first socket when it
    is 0). Raises `OSError` (for example EADDRINUSE) before anything is listening."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    addresses: list[tuple[int, int, int, tuple[Any, ...]]] = []
    for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
        entry = (int(info[0]), int(info[1]), info[2], info[4])
        if entry not in addresses:
            addresses.append(entry)
    groups: list[list[socket.socket]] = []
    try:
        for _ in range(workers):
            group: list[socket.socket] = []
            groups.append(group)
            for family, kind, proto, address in addresses:
                sock = socket.socket(family, kind, proto)
                group.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if workers > 1:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    # One socket per family, as trio.open_tcp_listeners does.
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((address[0], port, *address[2:]))
                sock.listen(backlog)
                port = port or sock.getsockname()[1]
    except BaseException:
        for group in groups:
            for sock in group:
                sock.close()
        raise
    return groups


Worker = Callable[[list[socket.socket]], int]


def run_workers(groups: list[list[socket.socket]], worker: Worker) -> int:
    """Run ``worker(sockets)`` for each group: in this process for one group, else in
    one forked process per group; the exit status is 0 when every worker returned 0."""
    if len(groups) == 1:
        return worker(groups[0])
    context = multiprocessing.get_context("fork")
    processes = []
    for index, group in enumerate(groups):
        others = [sock for other in groups if other is not group for sock in other]
        process = context.Process(
            target=_worker_main, args=(worker, group, others), name=f"worker-{index}"
        )
        process.start()
        processes.append(process)
    for group in groups:
        for sock in group:
            sock.close()
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for process in processes:
            if process.pid is not None and process.exitcode is None:
                os.kill(process.pid, signal.SIGTERM)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while running := [p for p in processes if p.exitcode is None]:
            multiprocessing.connection.wait([p.sentinel for p in running])
            failed = [p for p in processes if p.exitcode not in (None, 0)]
            if failed and not stopping:
                logger.error(
                    "%s exited with status %s: stopping", failed[0].name, failed[0].exitcode
                )
                stop(signal.SIGTERM, None)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0 if all(p.exitcode == 0 for p in processes) else 1


def _worker_main(worker: Worker, mine: list[socket.socket], others: list[socket.socket]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):  # not Linux's libc: no such call
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    for sock in others:
        sock.close()
    raise SystemExit(worker(mine))
