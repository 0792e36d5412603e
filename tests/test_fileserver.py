"""The file server behind ``trio-ktls serve``, in process, on `serve_ktls_over_tcp`: in
user space on any host and offloaded in the kernel matrix (where the access log must
show that the kernel encrypted and decrypted every connection)."""

from __future__ import annotations

import email.utils
import hashlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h11
import pytest
import trio

import trio_ktls
from trio_ktls import KTLSMode
from trio_ktls._fileserver import (
    AccessRecord,
    ServerLimits,
    byte_range,
    not_modified_since,
    request_path,
)

from .helpers import (
    HOSTNAME,
    MODES,
    client_context,
    http_exchange,
    raw_http,
    start_file_server,
)

KiB = 1024
MiB = 1024 * KiB
#: The sizes that matter to a record layer: empty, one byte, a full 16 KiB record and
#: one byte either side of it, and several MiB.
SIZES = [0, 1, 16 * KiB - 1, 16 * KiB, 16 * KiB + 1, 3 * MiB + 7]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A served directory beside a secret file that must never be read."""
    root = tmp_path / "served"
    root.mkdir()
    for size in SIZES:
        (root / f"file-{size}.bin").write_bytes(os.urandom(size))
    (root / "page.html").write_text("<p>hello</p>")
    (root / "sub dir").mkdir()
    (root / "sub dir" / "inner <&>.txt").write_text("inside")
    (tmp_path / "outside-secret.txt").write_text("the secret")
    (root / "link-out").symlink_to(tmp_path / "outside-secret.txt")
    (root / "dir-out").symlink_to(tmp_path)
    (root / "link-in").symlink_to(root / "page.html")
    return root


def access_records(caplog: pytest.LogCaptureFixture) -> list[AccessRecord]:
    return [r.access for r in caplog.records if hasattr(r, "access")]


def assert_offloaded(records: list[AccessRecord], mode: KTLSMode) -> None:
    """Every request was answered on a connection the kernel encrypted (kTLS mode), or
    on one in user space."""
    assert records
    for record in records:
        assert record.ktls is not None
        assert record.ktls.tx_offload is record.ktls.rx_offload is (mode == "require"), record


async def connect(port: int, version: str, mode: KTLSMode) -> Any:
    return trio_ktls.open_ktls_stream(
        "127.0.0.1",
        port,
        ssl_context=client_context(version),
        server_hostname=HOSTNAME,
        https_compatible=True,
        ktls=mode,
    )


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
@pytest.mark.parametrize("mode", MODES)
async def test_files_are_byte_exact_on_one_connection(
    tree: Path, version: str, mode: KTLSMode, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "trio_ktls.serve")
    async with trio.open_nursery() as nursery:
        port = await start_file_server(nursery, tree, version=version, ktls=mode)
        async with await connect(port, version, mode) as stream:
            connection = h11.Connection(h11.CLIENT)
            for size in SIZES:
                name = f"file-{size}.bin"
                reply = await http_exchange(stream, connection, "GET", f"/{name}")
                assert reply.status == 200
                expected = (tree / name).read_bytes()
                assert hashlib.sha256(reply.body).digest() == hashlib.sha256(expected).digest()
                assert reply.headers["content-length"] == str(size)
                assert reply.headers["content-type"] == "application/octet-stream"
                head = await http_exchange(stream, connection, "HEAD", f"/{name}")
                assert (head.status, head.body) == (200, b"")
                assert head.headers["content-length"] == str(size)
                assert head.headers["last-modified"] == reply.headers["last-modified"]
            page = await http_exchange(stream, connection, "GET", "/page.html")
            assert page.headers["content-type"] == "text/html"
        nursery.cancel_scope.cancel()
    records = access_records(caplog)
    assert len(records) == 2 * len(SIZES) + 1
    assert len({r.peer for r in records}) == 1  # all on one kept-alive connection
    assert [r.body_bytes for r in records[:4]] == [0, 0, 1, 0]
    assert_offloaded(records, mode)
    assert all(r.ktls and r.ktls.version == version for r in records)


@pytest.mark.parametrize("mode", MODES)
async def test_range_requests(
    tree: Path, mode: KTLSMode, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "trio_ktls.serve")
    size = 3 * MiB + 7
    content = (tree / f"file-{size}.bin").read_bytes()
    async with trio.open_nursery() as nursery:
        port = await start_file_server(nursery, tree, ktls=mode)
        async with await connect(port, "TLSv1.3", mode) as stream:
            connection = h11.Connection(h11.CLIENT)

            async def get(range_: str) -> Any:
                return await http_exchange(
                    stream, connection, "GET", f"/file-{size}.bin", [("Range", range_)]
                )

            reply = await get("bytes=1000-70999")
            assert reply.status == 206
            assert reply.body == content[1000:71000]
            assert reply.headers["content-range"] == f"bytes 1000-70999/{size}"
            reply = await get("bytes=-10")
            assert (reply.status, reply.body) == (206, content[-10:])
            reply = await get(f"bytes={size - 5}-")
            assert (reply.status, reply.body) == (206, content[-5:])
            reply = await get(f"bytes={size}-")
            assert reply.status == 416
            assert reply.headers["content-range"] == f"bytes */{size}"
            assert reply.body == b""
            reply = await get("bytes=0-1,5-6")  # several ranges: ignored
            assert (reply.status, len(reply.body)) == (200, size)
            # The connection is still usable after a 416.
            reply = await get("bytes=0-0")
            assert (reply.status, reply.body) == (206, content[:1])
        nursery.cancel_scope.cancel()
    assert_offloaded(access_records(caplog), mode)


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, 10, None),
        ("bytes=0-4", 10, (0, 5)),
        ("bytes=5-", 10, (5, 5)),
        ("bytes=-3", 10, (7, 3)),
        ("bytes=-30", 10, (0, 10)),
        ("bytes=8-100", 10, (8, 2)),
        ("bytes=10-", 10, "unsatisfiable"),
        ("bytes=-0", 10, "unsatisfiable"),
        ("bytes=4-2", 10, None),
        ("bytes=a-b", 10, None),
        ("bytes=-", 10, None),
        ("items=0-1", 10, None),
        ("bytes=0-1,3-4", 10, None),
        ("bytes=0-", 0, None),
    ],
)
def test_byte_range(header: str | None, size: int, expected: object) -> None:
    assert byte_range(header, size) == expected


def test_if_modified_since_parsing() -> None:
    mtime = 1_700_000_000.7
    assert not_modified_since(email.utils.formatdate(mtime, usegmt=True), mtime)
    assert not not_modified_since(email.utils.formatdate(mtime - 1, usegmt=True), mtime)
    assert not not_modified_since("yesterday", mtime)
    assert not not_modified_since(None, mtime)


async def test_if_modified_since(tree: Path) -> None:
    async with trio.open_nursery() as nursery:
        port = await start_file_server(nursery, tree)
        async with await connect(port, "TLSv1.3", "off") as stream:
            connection = h11.Connection(h11.CLIENT)
            first = await http_exchange(stream, connection, "GET", "/page.html")
            stamp = first.headers["last-modified"]
            again = await http_exchange(
                stream, connection, "GET", "/page.html", [("If-Modified-Since", stamp)]
            )
            assert (again.status, again.body) == (304, b"")
            assert again.headers["last-modified"] == stamp
            older = email.utils.formatdate(
                email.utils.parsedate_to_datetime(stamp).timestamp() - 10, usegmt=True
            )
            changed = await http_exchange(
                stream, connection, "GET", "/page.html", [("If-Modified-Since", older)]
            )
            assert (changed.status, changed.body) == (200, b"<p>hello</p>")
        nursery.cancel_scope.cancel()


async def test_directories_are_listed(tree: Path) -> None:
    async with trio.open_nursery() as nursery:
        port = await start_file_server(nursery, tree)
        async with await connect(port, "TLSv1.3", "off") as stream:
            connection = h11.Connection(h11.CLIENT)
            root = await http_exchange(stream, connection, "GET", "/")
            assert root.status == 200
            assert root.headers["content-type"] == "text/html; charset=utf-8"
            assert b'<a href="/sub%20dir/">sub dir/</a>' in root.body
            assert b'<a href="/file-1.bin">file-1.bin</a>' in root.body
            inner = await http_exchange(stream, connection, "GET", "/sub%20dir")
            assert (
                b'href="/sub%20dir/inner%20%3C%26%3E.txt">inner &lt;&amp;&gt;.txt<' in inner.body
            )
            text = await http_exchange(
                stream, connection, "GET", "/sub%20dir/inner%20%3C%26%3E.txt"
            )
            assert text.body == b"inside"
        nursery.cancel_scope.cancel()


def test_request_path() -> None:
    assert request_path(b"/a/b%20c/./d?x=1#f") == ["a", "b c", "d"]
    assert request_path(b"//etc//passwd") == ["etc", "passwd"]  # beneath the root
    for target in (b"/../x", b"/a/%2e%2e/x", b"/%2E%2E%2Fx", b"/a/..%2f..%2fx"):
        with pytest.raises(Exception, match="leaves the served directory"):
            request_path(target)
    with pytest.raises(Exception, match="absolute path"):
        request_path(b"https://elsewhere/x")
    with pytest.raises(Exception, match="NUL"):
        request_path(b"/a%00b")


#: Paths the server opened (audit events), while a test listens.
OPENED: list[str] | None = None


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if OPENED is not None and event == "open" and isinstance(args[0], str | bytes):
        OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


@pytest.fixture
def opened_paths() -> Iterator[list[str]]:
    global OPENED
    OPENED = []
    try:
        yield OPENED
    finally:
        OPENED = None


@pytest.mark.parametrize("mode", MODES)
async def test_no_path_leaves_the_directory(
    tree: Path, mode: KTLSMode, opened_paths: list[str]
) -> None:
    """``..`` in every spelling, absolute targets and symlinks out: refused, and nothing
    outside the directory is ever opened; symlinks that stay inside work."""
    attempts = {
        "/../outside-secret.txt": 403,
        "/%2e%2e/outside-secret.txt": 403,
        "/%2E%2E%2Foutside-secret.txt": 403,
        "/sub%20dir/../../outside-secret.txt": 403,
        "/..%5coutside-secret.txt": 404,  # a backslash is a plain character on Linux
        "/%252e%252e/outside-secret.txt": 404,  # decoded once: a name, not ".."
        "/link-out": 403,
        "/dir-out/outside-secret.txt": 403,
        "/dir-out/": 403,
        f"/{tree.parent}/outside-secret.txt": 404,  # absolute: taken beneath the root
    }
    async with trio.open_nursery() as nursery:
        port = await start_file_server(nursery, tree, ktls=mode)
        for target, status in attempts.items():
            answer = await raw_http(
                port,
                f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
                ktls=mode,
            )
            assert answer.startswith(f"HTTP/1.1 {status} ".encode()), (target, answer[:80])
            assert b"the secret" not in answer
        # An absolute-form target (RFC 9112 §3.2.2) is not a path: 400.
        answer = await raw_http(
            port,
            b"GET http://x/../outside-secret.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            ktls=mode,
        )
        assert answer.startswith(b"HTTP/1.1 400 ")
        answer = await raw_http(
            port, b"GET /link-in HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", ktls=mode
        )
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"<p>hello</p>")
        nursery.cancel_scope.cancel()
    # The server opens the root by its absolute path, then names relative to it.
    assert "page.html" in opened_paths  # the audit hook saw the server's opens
    assert all("outside-secret" not in p for p in opened_paths), opened_paths
    absolute = {p for p in opened_paths if p.startswith(str(tree.parent))}
    assert absolute == {str(tree)}, opened_paths


@pytest.mark.parametrize("mode", MODES)
async def test_bad_requests_get_their_status_and_the_server_keeps_serving(
    tree: Path, mode: KTLSMode
) -> None:
    limits = ServerLimits(max_header_bytes=4 * KiB, max_target_length=1 * KiB)
    cases = [
        (b"NONSENSE\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
        (b"POST /page.html HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", 405),
        (b"DELETE / HTTP/1.1\r\nHost: x\r\n\r\n", 405),
        (b"GET /" + b"a" * 2 * KiB + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"b" * 16 * KiB + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Many: c\r\n" * 2000 + b"\r\n", 431),
    ]
    async with trio.open_nursery() as nursery:
        port = await start_file_server(nursery, tree, ktls=mode, limits=limits)
        for request, status in cases:
            answer = await raw_http(port, request, ktls=mode)
            assert answer.startswith(f"HTTP/1.1 {status} ".encode()), (request[:40], answer[:80])
            if status == 405:
                assert b"\r\nallow: GET, HEAD\r\n" in answer.lower().replace(
                    b"get, head", b"GET, HEAD"
                )
        answer = await raw_http(
            port, b"GET /page.html HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", ktls=mode
        )
        assert answer.endswith(b"\r\n\r\n<p>hello</p>")
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("mode", MODES)
async def test_slow_headers_are_cut_off_while_others_are_served(
    tree: Path, mode: KTLSMode
) -> None:
    """A client that sends half its headers and stalls gets 408 and a close after
    ``header_timeout``, and an idle connection is closed quietly; a client that connects
    once both are waiting is served. (No timing is asserted.)"""
    limits = ServerLimits(header_timeout=3.0)
    waiting = trio.Semaphore(0)
    async with trio.open_nursery() as nursery:
        port = await start_file_server(nursery, tree, ktls=mode, limits=limits)

        async def slow() -> None:
            async with await connect(port, "TLSv1.3", mode) as stream:
                await stream.send_all(b"GET /page.html HTTP/1.1\r\nHost: x\r\n")
                waiting.release()
                answer = bytearray()
                while chunk := await stream.receive_some():
                    answer += chunk
                assert answer.startswith(b"HTTP/1.1 408 "), answer

        async def idle() -> None:
            async with await connect(port, "TLSv1.3", mode) as stream:
                waiting.release()
                assert await stream.receive_some() == b""

        async def fast() -> None:
            for _ in range(2):
                await waiting.acquire()
            async with await connect(port, "TLSv1.3", mode) as stream:
                reply = await http_exchange(
                    stream, h11.Connection(h11.CLIENT), "GET", "/file-16384.bin"
                )
                assert reply.body == (tree / "file-16384.bin").read_bytes()

        with trio.fail_after(120):  # a hang is a failure, not a measurement
            async with trio.open_nursery() as clients:
                clients.start_soon(slow)
                clients.start_soon(idle)
                clients.start_soon(fast)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("mode", "clients"),
    [
        pytest.param("off", 200, id="user-space"),
        pytest.param("require", 40, id="ktls", marks=pytest.mark.ktls),
    ],
)
async def test_concurrent_downloads(
    tree: Path, mode: KTLSMode, clients: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "trio_ktls.serve")
    name = f"file-{16 * KiB + 1}.bin"
    expected = (tree / name).read_bytes()
    async with trio.open_nursery() as nursery:
        port = await start_file_server(nursery, tree, ktls=mode)

        async def download() -> None:
            async with await connect(port, "TLSv1.3", mode) as stream:
                reply = await http_exchange(stream, h11.Connection(h11.CLIENT), "GET", f"/{name}")
                assert reply.body == expected

        async with trio.open_nursery() as downloads:
            for _ in range(clients):
                downloads.start_soon(download)
        nursery.cancel_scope.cancel()
    records = access_records(caplog)
    assert len(records) == clients
    assert_offloaded(records, mode)
