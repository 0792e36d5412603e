"""The reader's read helper, on plain sockets (the reader task itself runs on kTLS
sockets: its tests are in test_stream, test_key_update and test_faults)."""

from __future__ import annotations

import array
import os
import socket
import threading

from trio_ktls import _reader


def test_a_read_returns_its_own_bytes_not_a_view_of_the_scratch_buffer() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"first")
        first = _reader._recvmsg(b, 1024, 0)
        a.sendall(b"later")
        second = _reader._recvmsg(b, 1024, 0)
        assert first[0] == b"first"
        assert second[0] == b"later"
        assert type(first[0]) is bytes


def test_a_read_takes_at_most_the_scratch_buffer() -> None:
    a, b = socket.socketpair()
    with a, b:
        for sock, option in ((a, socket.SO_SNDBUF), (b, socket.SO_RCVBUF)):
            sock.setsockopt(socket.SOL_SOCKET, option, 4 * _reader.RECV_SIZE)
        payload = bytes(range(256)) * 1024
        sent = 0
        while sent <= _reader.RECV_SIZE:
            sent += a.send(payload)
        data, _, _, _ = _reader._recvmsg(b, 4 * _reader.RECV_SIZE, 0)
        assert 0 < len(data) <= _reader.RECV_SIZE
        assert data == (payload * 2)[: len(data)]


def test_ancillary_data_and_flags_come_through() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    read_end, write_end = os.pipe()
    try:
        with a, b:
            fds = array.array("i", [read_end])
            a.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            data, ancdata, flags, _ = _reader._recvmsg(b, 16, socket.CMSG_SPACE(fds.itemsize))
            assert data == b"x"
            assert flags & socket.MSG_CTRUNC == 0
            [(level, kind, payload)] = ancdata
            assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
            os.close(array.array("i", payload)[0])
    finally:
        os.close(read_end)
        os.close(write_end)


def test_each_thread_has_its_own_scratch_buffer() -> None:
    seen: list[memoryview] = []
    thread = threading.Thread(target=lambda: seen.append(_reader._scratch.view))
    thread.start()
    thread.join()
    assert seen[0].obj is not _reader._scratch.view.obj
    assert len(seen[0]) == len(_reader._scratch.view) == _reader.RECV_SIZE
