"""Interop with peers that know nothing of kTLS: OpenSSL's command-line tools and blocking
stdlib ``ssl`` sockets, both roles, every cipher suite the kernel offloads.

16 MiB go each way, byte-exact. In the kernel matrix (``ktls``) both directions must be
offloaded; on the host the same tests run in user space (``ktls="off"``).
"""

from __future__ import annotations

import os
import socket
import ssl
from pathlib import Path

import pytest
import trio

from trio_ktls import KTLSMode, KTLSStream

from .helpers import (
    CA,
    HOSTNAME,
    MODES,
    client_context,
    connect_when_listening,
    free_port,
    needs_openssl,
    server_context,
    server_pem_file,
    start_openssl,
    tcp_pair,
)

SIZE = 16 * 1024 * 1024
SUITES = [
    ("TLSv1.3", "TLS_AES_128_GCM_SHA256"),
    ("TLSv1.3", "TLS_AES_256_GCM_SHA384"),
    ("TLSv1.3", "TLS_CHACHA20_POLY1305_SHA256"),
    ("TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256"),
    ("TLSv1.2", "ECDHE-ECDSA-AES256-GCM-SHA384"),
    ("TLSv1.2", "ECDHE-ECDSA-CHACHA20-POLY1305"),
]


def _openssl_version_args(version: str, suite: str) -> list[str]:
    if version == "TLSv1.3":
        return ["-tls1_3", "-ciphersuites", suite]
    return ["-tls1_2", "-cipher", suite]


def _check_stream(stream: KTLSStream, mode: KTLSMode, version: str, suite: str) -> None:
    info = stream.ktls_info
    assert info is not None
    assert (info.version, info.cipher) == (version, suite)
    assert info.tx_offload is info.rx_offload is (mode == "require"), info


async def _exchange(stream: KTLSStream, outgoing: bytes) -> bytes:
    """Send ``outgoing`` while receiving as many bytes; return what arrived."""
    received = bytearray()

    async def receive() -> None:
        while len(received) < len(outgoing):
            chunk = await stream.receive_some()
            assert chunk, f"EOF after {len(received)} bytes"
            received.extend(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.send_all, outgoing)
        nursery.start_soon(receive)
    return bytes(received)


def _pem_files(tmp_path: Path) -> tuple[Path, Path]:
    server_pem, ca_pem = server_pem_file(tmp_path), tmp_path / "ca.pem"
    CA.cert_pem.write_to_path(str(ca_pem))
    return server_pem, ca_pem


@needs_openssl
@pytest.mark.parametrize(("version", "suite"), SUITES)
@pytest.mark.parametrize("mode", MODES)
async def test_openssl_s_client_against_our_server(
    tmp_path: Path, mode: KTLSMode, version: str, suite: str
) -> None:
    _, ca_pem = _pem_files(tmp_path)
    to_server, to_client = os.urandom(SIZE), os.urandom(SIZE)
    (tmp_path / "in").write_bytes(to_server)
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    args = ["s_client", "-connect", f"127.0.0.1:{port}", "-quiet", "-CAfile",
            str(ca_pem), "-servername", HOSTNAME, "-verify_return_error",
            *_openssl_version_args(version, suite)]  # fmt: skip
    with (tmp_path / "in").open("rb") as stdin, (tmp_path / "out").open("wb") as stdout:
        async with trio.open_nursery() as nursery:
            proc = await start_openssl(nursery, args, stdin=stdin, stdout=stdout, stderr=None)
            tcp = await listener.accept()
            await listener.aclose()
            stream = KTLSStream(tcp, server_context(version), nursery=nursery,
                                server_side=True, ktls=mode)  # fmt: skip
            await stream.do_handshake()
            _check_stream(stream, mode, version, suite)
            assert await _exchange(stream, to_client) == to_server
            await stream.aclose()  # close_notify: s_client exits
            await proc.wait()
    assert proc.returncode == 0
    assert (tmp_path / "out").read_bytes() == to_client


@needs_openssl
@pytest.mark.parametrize(("version", "suite"), SUITES)
@pytest.mark.parametrize("mode", MODES)
async def test_our_client_against_openssl_s_server(
    tmp_path: Path, mode: KTLSMode, version: str, suite: str
) -> None:
    server_pem, _ = _pem_files(tmp_path)
    to_server, to_client = os.urandom(SIZE), os.urandom(SIZE)
    port = free_port()
    args = ["s_server", "-accept", f"127.0.0.1:{port}", "-quiet", "-naccept", "1",
            "-cert", str(server_pem), "-key", str(server_pem),
            *_openssl_version_args(version, suite)]  # fmt: skip
    with (tmp_path / "out").open("wb") as stdout:
        async with trio.open_nursery() as nursery:
            # s_server ends the connection when its stdin reaches EOF, so the pipe stays
            # open until we are done.
            proc = await start_openssl(nursery, args, stdout=stdout, stderr=None)
            nursery.start_soon(proc.stdin.send_all, to_client)
            tcp = await connect_when_listening(port)
            stream = KTLSStream(tcp, client_context(version), nursery=nursery,
                                server_hostname=HOSTNAME, ktls=mode)  # fmt: skip
            await stream.do_handshake()
            _check_stream(stream, mode, version, suite)
            assert await _exchange(stream, to_server) == to_client
            await stream.aclose()  # s_server (-naccept 1) exits when we close
            await proc.wait()
            await proc.stdin.aclose()
    assert proc.returncode == 0
    assert (tmp_path / "out").read_bytes() == to_server


def _stdlib_peer(sock: socket.socket, tls: ssl.SSLSocket, outgoing: bytes) -> bytes:
    """Blocking peer: read everything first, then answer (an SSLSocket is not safe to
    read and write from two threads at once)."""
    received = bytearray()
    with sock, tls:
        while len(received) < SIZE:
            chunk = tls.recv(1024 * 1024)
            assert chunk
            received += chunk
        tls.sendall(outgoing)
        assert tls.recv(1) == b""  # our close_notify
    return bytes(received)


# CPython cannot choose TLS 1.3 suites (no set_ciphersuites), so the stdlib peer covers
# TLS 1.3 with OpenSSL's default suite; the openssl tests above cover each TLS 1.3 suite.
STDLIB_CASES = [("TLSv1.3", None), *[case for case in SUITES if case[0] == "TLSv1.2"]]


@pytest.mark.parametrize(("version", "suite"), STDLIB_CASES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("our_side", ["client", "server"])
async def test_stdlib_ssl_socket_peer(
    mode: KTLSMode, version: str, suite: str | None, our_side: str
) -> None:
    to_peer, from_peer = os.urandom(SIZE), os.urandom(SIZE)
    ours, theirs = await tcp_pair()
    theirs_raw = socket.socket(fileno=theirs.socket.detach())  # a blocking stdlib peer
    theirs_raw.setblocking(True)
    server_ctx, client_ctx = server_context(version, ciphers=suite), client_context(version)
    ours_ctx, peer_ctx = (
        (client_ctx, server_ctx) if our_side == "client" else (server_ctx, client_ctx)
    )

    def run_peer() -> bytes:
        tls = peer_ctx.wrap_socket(
            theirs_raw,
            server_side=our_side == "client",
            server_hostname=HOSTNAME if our_side == "server" else None,
        )
        return _stdlib_peer(theirs_raw, tls, from_peer)

    peer_result: list[bytes] = []

    async def peer_task() -> None:
        peer_result.append(await trio.to_thread.run_sync(run_peer))

    async with trio.open_nursery() as nursery:
        stream = KTLSStream(
            ours, ours_ctx,
            nursery=nursery, server_side=our_side == "server",
            server_hostname=HOSTNAME if our_side == "client" else None, ktls=mode,
        )  # fmt: skip
        nursery.start_soon(peer_task)
        await stream.do_handshake()
        info = stream.ktls_info
        assert info is not None
        assert info.tx_offload is info.rx_offload is (mode == "require"), info
        assert info.version == version
        if suite is not None:
            assert info.cipher == suite
        await stream.send_all(to_peer)
        received = bytearray()
        while len(received) < SIZE:
            received += await stream.receive_some()
        await stream.aclose()
    assert peer_result == [to_peer]
    assert bytes(received) == from_peer
