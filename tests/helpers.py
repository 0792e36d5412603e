"""Shared test helpers, the only module tests import from (besides the package).

A trustme CA and TLS contexts; one loopback TCP pair; one in-memory handshake driver; one
``openssl`` launcher; and the kernel matrix's table of kernel lines (from
``tools/kernel_lab.py``, which boots them), so that tests know what the guest they run in
can do.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import trio_ktls
from trio_ktls import KTLSMode, KTLSStream
from trio_ktls._keyschedule import tls_version_from_name

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import kernel_lab

#: The kernel line whose guest runs these tests (set by the kernel lab), or None on a host.
GUEST_KERNEL = os.environ.get("TRIO_KTLS_GUEST_KERNEL")
#: The matrix's kernel lines and what each can do.
KERNEL_LINES = kernel_lab.KERNEL_LINES


@functools.cache
def kernel_probe() -> trio_ktls.ProbeResult:
    return trio_ktls.probe()


def kernel_can_rekey() -> bool:
    """TLS 1.3 rekey here: from the matrix's table in a guest (so a kernel that lost it
    fails the tests), from the probe elsewhere."""
    if GUEST_KERNEL is not None:
        return KERNEL_LINES[GUEST_KERNEL].tls13_rekey
    return bool(kernel_probe().tls13_tx_rekey and kernel_probe().tls13_rx_rekey)


CA = trustme.CA()
SERVER_CERT = CA.issue_cert("trio-ktls.example", "127.0.0.1")
HOSTNAME = "trio-ktls.example"

VERSIONS = ["TLSv1.2", "TLSv1.3"]


def _tls_version(name: str) -> ssl.TLSVersion:
    version = tls_version_from_name(name)
    assert version is not None, name
    return version


def server_context(version: str, *, ciphers: str | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    SERVER_CERT.configure_cert(ctx)
    ctx.minimum_version = ctx.maximum_version = _tls_version(version)
    if ciphers:
        ctx.set_ciphers(ciphers)
    return ctx


def client_context(version: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    CA.configure_trust(ctx)
    ctx.minimum_version = ctx.maximum_version = _tls_version(version)
    return ctx


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listener = listeners[0]
    port = listener.socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listener.accept()
    await listener.aclose()
    return client, server


StreamMaker = Callable[[], Awaitable[tuple[trio.abc.Stream, trio.abc.Stream]]]


def ktls_pair_maker(
    nursery: trio.Nursery,
    version: str,
    ktls: KTLSMode,
    *,
    handshake: bool = True,
    client_options: dict[str, Any] | None = None,
    server_options: dict[str, Any] | None = None,
) -> Callable[[], Awaitable[tuple[KTLSStream, KTLSStream]]]:
    async def make() -> tuple[KTLSStream, KTLSStream]:
        client_tcp, server_tcp = await tcp_pair()
        client = KTLSStream(
            client_tcp,
            client_context(version),
            nursery=nursery,
            server_hostname=HOSTNAME,
            ktls=ktls,
            **(client_options or {}),
        )
        server = KTLSStream(
            server_tcp,
            server_context(version),
            nursery=nursery,
            server_side=True,
            ktls=ktls,
            **(server_options or {}),
        )
        if handshake:
            async with trio.open_nursery() as hs:
                hs.start_soon(client.do_handshake)
                hs.start_soon(server.do_handshake)
        return client, server

    return make


class ProcessOutput:
    """Collects a subprocess's output; ``wait_for`` a marker without polling."""

    def __init__(self) -> None:
        self.data = bytearray()
        self._changed = trio.Event()

    async def collect(self, stream: trio.abc.ReceiveStream) -> None:
        async for chunk in stream:
            self.data.extend(chunk)
            self._changed.set()
            self._changed = trio.Event()

    async def wait_for(self, marker: bytes) -> None:
        while marker not in self.data:
            await self._changed.wait()

    async def wait_until(self, condition: Callable[[bytes], bool]) -> None:
        while not condition(bytes(self.data)):
            await self._changed.wait()


#: The two ways every stream test runs: user space on any host, and offloaded in the
#: kernel matrix (where both directions must really be in the kernel).
MODES = [pytest.param("off", id="user-space"), pytest.param("require", marks=pytest.mark.ktls)]

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")


@dataclass
class OpenSSLProcess:
    """A running ``openssl`` with its pipes (each asserted to exist when used)."""

    process: trio.Process

    @property
    def stdin(self) -> trio.abc.SendStream:
        assert self.process.stdin is not None
        return self.process.stdin

    @property
    def stdout(self) -> trio.abc.ReceiveStream:
        assert self.process.stdout is not None
        return self.process.stdout

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    async def wait(self) -> int:
        return await self.process.wait()


async def start_openssl(
    nursery: trio.Nursery,
    args: Sequence[str],
    *,
    stdin: Any = subprocess.PIPE,
    stdout: Any = subprocess.PIPE,
    stderr: Any = subprocess.DEVNULL,
) -> OpenSSLProcess:
    """``openssl ARGS...`` as a child of ``nursery`` (not checked: tests read its status)."""
    assert OPENSSL is not None
    process: trio.Process = await nursery.start(
        partial(
            trio.run_process,
            [OPENSSL, *args],
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            check=False,
        )
    )
    return OpenSSLProcess(process)


def free_port() -> int:
    """A loopback port nothing listens on (for a server process to take)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def assert_mode(stream: KTLSStream, mode: KTLSMode) -> None:
    """Both directions offloaded with ``require`` (and with ``auto`` where the kernel has
    kTLS); neither, with a reason, otherwise."""
    offloaded = mode == "require" or (mode == "auto" and kernel_probe().available)
    info = stream.ktls_info
    assert info is not None
    assert info.tx_offload is info.rx_offload is offloaded, info
    assert (info.reason is None) is offloaded, info


async def receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some()
        assert chunk, f"EOF after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


async def connect_when_listening(port: int) -> trio.SocketStream:
    """Connect to a server process that may still be starting (slowly, in a guest)."""
    with trio.fail_after(120):
        while True:
            try:
                return await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.1)


def server_pem_file(tmp_path: Path) -> Path:
    """The test server's key and certificate chain, for openssl s_server."""
    path = tmp_path / "server.pem"
    SERVER_CERT.private_key_and_cert_chain_pem.write_to_path(str(path))
    return path


@dataclass
class MemoryHandshake:
    """A finished handshake between two ``SSLObject``\\s over memory BIOs."""

    client: ssl.SSLObject
    server: ssl.SSLObject
    client_out: ssl.MemoryBIO
    server_out: ssl.MemoryBIO
    #: ("client" or "server", what one ``do_handshake()`` call wrote), in order.
    flights: list[tuple[str, bytes]] = field(default_factory=list)

    def sent_by(self, side: str) -> bytes:
        return b"".join(data for who, data in self.flights if who == side)

    @property
    def server_final_flight(self) -> bytes:
        """What the call that finished the server's handshake wrote (TLS 1.3 tickets,
        TLS 1.2 ChangeCipherSpec and Finished)."""
        return [data for who, data in self.flights if who == "server"][-1]


def handshake_in_memory(
    client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, *, server_hostname: str = HOSTNAME
) -> MemoryHandshake:
    """Run a handshake with no sockets, each side's output delivered after each call."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    result = MemoryHandshake(client, server, c_out, s_out)
    done = {"client": False, "server": False}
    for _ in range(10):
        sides = (("client", client, c_out, s_in), ("server", server, s_out, c_in))
        for side, obj, out, peer_in in sides:
            if done[side]:
                continue
            try:
                obj.do_handshake()
                done[side] = True
            except ssl.SSLWantReadError:
                pass
            data = out.read()
            result.flights.append((side, data))
            peer_in.write(data)
        if all(done.values()):
            return result
    raise AssertionError("in-memory handshake did not finish")


# --- RFC 8448 §3 (a TLS 1.3 trace with its secrets): values two test modules share ----


def h(text: str) -> bytes:
    """Hex with any whitespace (RFC traces paste verbatim)."""
    return bytes.fromhex(text)


S_AP_TRAFFIC = h("a11af9f05531f856ad47116b45a950328204b4f44bfb6b3a4b4f1f3fcb631643")
RFC8448_TICKET_RECORD = h(
    """17 03 03 00 de 3a 6b 8f 90 41 4a 97
    d6 95 9c 34 87 68 0d e5 13 4a 2b 24 0e 6c ff ac 11 6e 95 d4 1d
    6a f8 f6 b5 80 dc f3 d1 1d 63 c7 58 db 28 9a 01 59 40 25 2f 55
    71 3e 06 1d c1 3e 07 88 91 a3 8e fb cf 57 53 ad 8e f1 70 ad 3c
    73 53 d1 6d 9d a7 73 b9 ca 7f 2b 9f a1 b6 c0 d4 a3 d0 3f 75 e0
    9c 30 ba 1e 62 97 2a c4 6f 75 f7 b9 81 be 63 43 9b 29 99 ce 13
    06 46 15 13 98 91 d5 e4 c5 b4 06 f1 6e 3f c1 81 a7 7c a4 75 84
    00 25 db 2f 0a 77 f8 1b 5a b0 5b 94 c0 13 46 75 5f 69 23 2c 86
    51 9d 86 cb ee ac 87 aa c3 47 d1 43 f9 60 5d 64 f6 50 db 4d 02
    3e 70 e9 52 ca 49 fe 51 37 12 1c 74 bc 26 97 68 7e 24 87 46 d6
    df 35 30 05 f3 bc e1 86 96 12 9c 81 53 55 6b 3b 6c 67 79 b3 7b
    f1 59 85 68 4f"""
)
RFC8448_TICKET = h(
    """04 00 00 c9 00 00 00 1e fa d6 aa c5 02 00
    00 00 b2 2c 03 5d 82 93 59 ee 5f f7 af 4e c9 00 00 00 00 26 2a
    64 94 dc 48 6d 2c 8a 34 cb 33 fa 90 bf 1b 00 70 ad 3c 49 88 83
    c9 36 7c 09 a2 be 78 5a bc 55 cd 22 60 97 a3 a9 82 11 72 83 f8
    2a 03 a1 43 ef d3 ff 5d d3 6d 64 e8 61 be 7f d6 1d 28 27 db 27
    9c ce 14 50 77 d4 54 a3 66 4d 4e 6d a4 d2 9e e0 37 25 a6 a4 da
    fc d0 fc 67 d2 ae a7 05 29 51 3e 3d a2 67 7f a5 90 6c 5b 3f 7d
    8f 92 f2 28 bd a4 0d da 72 14 70 f9 fb f2 97 b5 ae a6 17 64 6f
    ac 5c 03 27 2e 97 07 27 c6 21 a7 91 41 ef 5f 7d e6 50 5e 5b fb
    c3 88 e9 33 43 69 40 93 93 4a e4 d3 57 00 08 00 2a 00 04 00 00
    04 00"""
)


# --- A hostile peer: real TLS, but any bytes on the wire -------------------------------


class HostilePeer:
    """A TLS peer that does its handshake with OpenSSL, then seals and opens records
    itself (keys from its key log, as trio_ktls derives them), so a test can send
    corrupted, oversized, out-of-place or forbidden records after valid data, and read
    back exactly what our side answered (alerts included)."""

    def __init__(self, stream: trio.SocketStream, context: ssl.SSLContext) -> None:
        from trio_ktls._handoff import KeyLogTap
        from trio_ktls._handshake import Handshake

        self.stream = stream
        self._tap = KeyLogTap.for_context(context)
        self._handshake = Handshake(
            stream, context, server_side=True, server_hostname=None, session=None
        )
        self._tx: tuple[AESGCM, bytes] | None = None
        self._rx: tuple[AESGCM, bytes] | None = None
        self.tls13 = False
        self._tx_seq = self._rx_seq = 0
        self._buffer = bytearray()

    async def do_handshake(self) -> None:
        from trio_ktls._handoff import initial_sequence_numbers
        from trio_ktls._keyschedule import (
            lookup_suite,
            tls12_key_block,
            tls13_traffic_key_iv,
        )

        await self._handshake.run()
        ssl_object, observer = self._handshake.ssl_object, self._handshake.observer
        cipher = ssl_object.cipher()
        assert cipher is not None
        suite = lookup_suite(cipher[0], tls_version_from_name(ssl_object.version()))
        assert suite is not None and "GCM" in suite.aead.value, cipher
        self._tap.drain()
        assert observer.client_random is not None
        secrets = self._tap.take(observer.client_random)
        self.tls13 = suite.tls_version is ssl.TLSVersion.TLSv1_3
        self._tx_seq, self._rx_seq = initial_sequence_numbers(
            suite.tls_version,
            server_side=True,
            final_flush_protected_records=observer.last_flush_protected_records,
        )
        algorithm = suite.hash_algorithm
        if self.tls13:
            tx_key, tx_iv = tls13_traffic_key_iv(
                bytes(secrets["SERVER_TRAFFIC_SECRET_0"]), suite.key_length, algorithm
            )
            rx_key, rx_iv = tls13_traffic_key_iv(
                bytes(secrets["CLIENT_TRAFFIC_SECRET_0"]), suite.key_length, algorithm
            )
        else:
            assert observer.server_random is not None
            block = tls12_key_block(
                bytes(secrets["CLIENT_RANDOM"]),
                observer.client_random,
                observer.server_random,
                key_length=suite.key_length,
                iv_length=suite.fixed_iv_length,
                algorithm=algorithm,
            )
            tx_key, tx_iv = block.server_write_key, block.server_write_iv
            rx_key, rx_iv = block.client_write_key, block.client_write_iv
        self._tx = (AESGCM(tx_key), tx_iv)
        self._rx = (AESGCM(rx_key), rx_iv)

    def seal(self, content_type: int, payload: bytes) -> bytes:
        """One protected record (RFC 8446 §5.2; RFC 5288 §3 for TLS 1.2 AES-GCM)."""
        assert self._tx is not None
        aead, iv = self._tx
        seq, self._tx_seq = self._tx_seq, self._tx_seq + 1
        if self.tls13:
            inner = payload + bytes([content_type])
            header = b"\x17\x03\x03" + (len(inner) + 16).to_bytes(2, "big")
            nonce = (int.from_bytes(iv, "big") ^ seq).to_bytes(12, "big")
            return header + bytes(aead.encrypt(nonce, inner, header))
        explicit = seq.to_bytes(8, "big")
        aad = explicit + bytes([content_type]) + b"\x03\x03" + len(payload).to_bytes(2, "big")
        body = explicit + aead.encrypt(iv + explicit, payload, aad)
        return bytes([content_type]) + b"\x03\x03" + len(body).to_bytes(2, "big") + body

    def seal_data(self, data: bytes) -> bytes:
        return b"".join(
            self.seal(23, data[start : start + 16384]) for start in range(0, len(data), 16384)
        )

    async def receive_record(self) -> tuple[int, bytes] | None:
        """Our side's next record, opened: (content type, plaintext); None at EOF."""
        assert self._rx is not None
        while True:
            if len(self._buffer) >= 5:
                length = int.from_bytes(self._buffer[3:5], "big")
                if len(self._buffer) >= 5 + length:
                    break
            chunk = await self.stream.receive_some()
            if not chunk:
                return None
            self._buffer += chunk
        record = bytes(self._buffer[: 5 + length])
        del self._buffer[: 5 + length]
        aead, iv = self._rx
        seq, self._rx_seq = self._rx_seq, self._rx_seq + 1
        if self.tls13:
            nonce = (int.from_bytes(iv, "big") ^ seq).to_bytes(12, "big")
            inner = aead.decrypt(nonce, record[5:], record[:5]).rstrip(b"\0")
            return inner[-1], inner[:-1]
        explicit, ciphertext = record[5:13], record[13:]
        aad = seq.to_bytes(8, "big") + record[:3] + (len(ciphertext) - 16).to_bytes(2, "big")
        return record[0], aead.decrypt(iv + explicit, ciphertext, aad)

    async def alerts_until_eof(self) -> list[tuple[int, int]]:
        """Every (level, description) our side sent until it closed the connection.

        A reset also ends it: a side that closes with unread bytes in its receive queue
        (the rest of a record it refused) resets the connection (RFC 1122 §4.2.2.13), and
        what it sent before is still read first.
        """
        alerts = []
        with trio.fail_after(60):
            while True:
                try:
                    record = await self.receive_record()
                except trio.BrokenResourceError as exc:
                    if isinstance(exc.__cause__, ConnectionResetError):
                        break
                    raise
                if record is None:
                    break
                content_type, plaintext = record
                if content_type == 21:
                    alerts += [
                        (plaintext[i], plaintext[i + 1]) for i in range(0, len(plaintext), 2)
                    ]
        return alerts


# -- HTTP over kTLS: the file server (trio_ktls._fileserver) and raw clients -----------


async def start_file_server(
    nursery: trio.Nursery,
    root: Path,
    *,
    version: str = "TLSv1.3",
    ktls: KTLSMode = "off",
    limits: Any = None,
) -> int:
    """``FileServer(root).handle`` on `serve_ktls_over_tcp` (the test certificate), in
    ``nursery``; its port."""
    from trio_ktls._fileserver import FileServer

    handler = FileServer(root, limits=limits).handle
    listeners = await nursery.start(
        partial(
            trio_ktls.serve_ktls_over_tcp,
            handler,
            0,
            server_context(version),
            host="127.0.0.1",
            https_compatible=True,
            ktls=ktls,
        )
    )
    port: int = listeners[0].transport_listener.socket.getsockname()[1]
    return port


@dataclass
class HTTPReply:
    status: int
    headers: dict[str, str]
    body: bytes


async def http_exchange(
    stream: trio.abc.Stream,
    connection: Any,
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]] = (),
) -> HTTPReply:
    """One request on a kept-alive h11 client ``connection``; the next cycle is started
    when both sides allow it."""
    import h11

    request = h11.Request(method=method, target=target, headers=[("Host", HOSTNAME), *headers])
    await stream.send_all(connection.send(request) + connection.send(h11.EndOfMessage()))
    reply = HTTPReply(0, {}, b"")
    body = bytearray()
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(bytes(await stream.receive_some()))
        elif isinstance(event, h11.Response):
            reply.status = event.status_code
            reply.headers = {k.decode(): v.decode() for k, v in event.headers}
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            break
    reply.body = bytes(body)
    if connection.our_state is h11.DONE and connection.their_state is h11.DONE:
        connection.start_next_cycle()
    return reply


async def raw_http(
    port: int, data: bytes, *, version: str = "TLSv1.3", ktls: KTLSMode = "off"
) -> bytes:
    """Send ``data`` on a fresh TLS connection and read until the server closes."""
    async with trio_ktls.open_ktls_stream(
        "127.0.0.1",
        port,
        ssl_context=client_context(version),
        server_hostname=HOSTNAME,
        https_compatible=True,
        ktls=ktls,
    ) as stream:
        await stream.send_all(data)
        received = bytearray()
        while chunk := await stream.receive_some():
            received += chunk
    return bytes(received)
