"""trio_ktls benchmarks: each contender's two ends in two processes, over loopback.

``python tools/bench.py run --out DIR`` measures every workload for every contender that
exists here (kTLS ones only where the kernel has kTLS), a few repetitions each, and writes
``DIR/bench-<kernel>.json``; ``python tools/bench.py report DIR`` turns the JSON files into
``DIR/bench.md`` and PNG plots. ``nox -s bench`` runs both, in the default kernel guest
and on the host.

Each measurement starts a server process and a client process (``serve`` and ``client``
below), so the two ends never share a CPU's time slice in one interpreter. Each end
reports its own wall time and process CPU time for the measured part only (after the
handshake, for bulk transfers). Throughput is taken at the end that finishes last.
Emulated guests are slow and noisy: only ratios within one run mean anything.

Contenders:

- ``trio_ktls``: `KTLSStream` with ``ktls="require"`` (``send_all``/``receive_some``;
  ``send_file`` for the file workload).
- ``trio_sslstream``: ``trio.SSLStream``, what a trio user has today.
- ``asyncio`` (and ``uvloop`` where it is installed): asyncio's SSL transport, what a
  Python user would pick instead.
- ``raw_ktls``: the limit. Blocking sockets with kTLS keys installed by hand on both ends
  (no handshake), a minimal loop (``sendall``, ``recv_into``, ``os.sendfile``).
- ``trio_raw_ktls``: the limit for a trio program. The same hand-keyed kTLS sockets driven
  by trio's socket methods (``send`` until all is sent, ``recv`` into new ``bytes``, as
  ``trio.SocketStream`` does) with no library in between. trio_ktls against it is what the
  library costs; it against ``raw_ktls`` is what trio's scheduling costs.
- ``openssl``: ``openssl s_server -WWW`` serving the file workload; ``/proc/net/tls_stat``
  read before and after says whether OpenSSL itself used kTLS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import resource
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

MiB = 1024 * 1024
WRITE = 64 * 1024
ECHO_MESSAGE = 1024

#: Workloads, in the order of the report, and the sizes of a full and a tiny run.
WORKLOADS = ("bulk", "file", "echo", "setup", "concurrent-setup", "memory")
FULL = {"bytes": 64 * MiB, "echoes": 2000, "connections": 200, "concurrent": 50, "idle": 200}
TINY = {"bytes": 1 * MiB, "echoes": 50, "connections": 5, "concurrent": 5, "idle": 5}

CONTENDERS = (
    "trio_ktls",
    "trio_sslstream",
    "asyncio",
    "uvloop",
    "trio_raw_ktls",
    "raw_ktls",
    "openssl",
)
#: What each contender can do (raw kTLS has no handshake; s_server only serves files).
SUPPORTS: dict[str, tuple[str, ...]] = {
    "trio_ktls": WORKLOADS,
    "trio_sslstream": WORKLOADS,
    "asyncio": WORKLOADS,
    "uvloop": WORKLOADS,
    "raw_ktls": ("bulk", "file", "echo"),
    "trio_raw_ktls": ("bulk", "echo"),
    "openssl": ("file",),
}
NEEDS_KTLS = {"trio_ktls", "trio_raw_ktls", "raw_ktls"}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _report(**values: Any) -> None:
    """One JSON line on stdout: what this end measured."""
    print(json.dumps(values), flush=True)


# -- certificates: made by the server in memory; the client gets the public part --------


def _server_context() -> tuple[ssl.SSLContext, str]:
    from trio_ktls._demo import demo_certificate, demo_contexts

    certificate = demo_certificate()
    server, _ = demo_contexts(certificate)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    return server, certificate[1].decode()


def _client_context(cert_pem: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=cert_pem)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


HOSTNAME = "trio-ktls.demo"


# -- trio contenders (trio_ktls and trio.SSLStream share everything but the wrapper) -----


def _trio_main(role: str, contender: str, workload: str, sizes: dict[str, int], port: int) -> None:
    import trio

    import trio_ktls

    cert_pem = os.environ.get("BENCH_CERT", "")

    async def wrap(
        nursery: trio.Nursery, tcp: trio.SocketStream, context: ssl.SSLContext, server: bool
    ) -> trio.abc.Stream:
        if contender == "trio_ktls":
            stream: Any = trio_ktls.KTLSStream(
                tcp,
                context,
                nursery=nursery,
                server_side=server,
                server_hostname=None if server else HOSTNAME,
                ktls="require",
            )
        else:
            stream = trio.SSLStream(
                tcp, context, server_side=server, server_hostname=None if server else HOSTNAME
            )
        await stream.do_handshake()
        return stream  # type: ignore[no-any-return]

    async def receive_exactly(stream: trio.abc.Stream, size: int) -> None:
        left = size
        while left:
            data = await stream.receive_some(min(left, 256 * 1024))
            if not data:
                raise EOFError(f"{left} bytes missing")
            left -= len(data)

    async def serve() -> None:
        context, pem = _server_context()
        listener = trio.socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await listener.bind(("127.0.0.1", port))
        listener.listen(256)
        print(json.dumps({"cert": pem}), flush=True)
        async with trio.open_nursery() as nursery:
            if workload in ("bulk", "file", "echo"):
                sock, _ = await listener.accept()
                stream = await wrap(nursery, trio.SocketStream(sock), context, True)
                cpu, start = _cpu(), time.perf_counter()
                if workload == "bulk":
                    await receive_exactly(stream, sizes["bytes"])
                    await stream.send_all(b"k")
                elif workload == "file":
                    await _trio_send_file(stream, sizes["bytes"])
                else:
                    left = sizes["echoes"] * ECHO_MESSAGE
                    while left:
                        data = await stream.receive_some(ECHO_MESSAGE)
                        await stream.send_all(data)
                        left -= len(data)
                _report(wall=time.perf_counter() - start, cpu=_cpu() - cpu)
                await stream.aclose()
            else:
                count = sizes["idle"] if workload == "memory" else sizes["connections"]
                if workload == "concurrent-setup":
                    count = sizes["concurrent"]
                rss = _rss()
                streams = []

                async def one(sock: trio.socket.SocketType) -> None:
                    stream = await wrap(nursery, trio.SocketStream(sock), context, True)
                    if workload == "memory":
                        streams.append(stream)
                        return
                    await receive_exactly(stream, 1)
                    await stream.send_all(b"y")
                    await stream.aclose()

                async with trio.open_nursery() as handlers:
                    for _ in range(count):
                        sock, _ = await listener.accept()
                        handlers.start_soon(one, sock)
                _report(rss_growth=_rss() - rss, connections=count)
                if workload == "memory":
                    await receive_exactly_done(listener)
                    for stream in streams:
                        await stream.aclose()
            nursery.cancel_scope.cancel()

    async def receive_exactly_done(listener: trio.socket.SocketType) -> None:
        """The client says it has measured: one last connection."""
        sock, _ = await listener.accept()
        sock.close()

    async def _trio_send_file(stream: trio.abc.Stream, size: int) -> None:
        with _payload_file(size) as f:
            if contender == "trio_ktls":
                await stream.send_file(f)  # type: ignore[attr-defined]
            else:
                offset = 0
                while offset < size:
                    chunk = await trio.to_thread.run_sync(os.pread, f.fileno(), 256 * 1024, offset)
                    await stream.send_all(chunk)
                    offset += len(chunk)

    async def client() -> None:
        context = _client_context(cert_pem)
        async with trio.open_nursery() as nursery:
            if workload in ("bulk", "file", "echo"):
                tcp = await trio.open_tcp_stream("127.0.0.1", port)
                stream = await wrap(nursery, tcp, context, False)
                cpu, start = _cpu(), time.perf_counter()
                if workload == "bulk":
                    payload = memoryview(bytes(WRITE))
                    for _ in range(sizes["bytes"] // WRITE):
                        await stream.send_all(payload)
                    await receive_exactly(stream, 1)
                    _report(wall=time.perf_counter() - start, cpu=_cpu() - cpu)
                elif workload == "file":
                    await receive_exactly(stream, sizes["bytes"])
                    _report(wall=time.perf_counter() - start, cpu=_cpu() - cpu)
                else:
                    message, latencies = b"e" * ECHO_MESSAGE, []
                    for _ in range(sizes["echoes"]):
                        sent = time.perf_counter()
                        await stream.send_all(message)
                        await receive_exactly(stream, ECHO_MESSAGE)
                        latencies.append(time.perf_counter() - sent)
                    _report(latencies=latencies)
                await stream.aclose()
            elif workload in ("setup", "concurrent-setup"):
                count = sizes["connections"] if workload == "setup" else sizes["concurrent"]
                times: list[float] = []

                async def one() -> None:
                    begin = time.perf_counter()
                    tcp = await trio.open_tcp_stream("127.0.0.1", port)
                    async with trio.open_nursery() as own:
                        stream = await wrap(own, tcp, context, False)
                        await stream.send_all(b"x")
                        await receive_exactly(stream, 1)
                        await stream.aclose()
                    times.append(time.perf_counter() - begin)

                start = time.perf_counter()
                if workload == "setup":
                    for _ in range(count):
                        await one()
                else:
                    async with trio.open_nursery() as all_of_them:
                        for _ in range(count):
                            all_of_them.start_soon(one)
                _report(times=times, wall=time.perf_counter() - start)
            else:
                rss, streams = _rss(), []
                for _ in range(sizes["idle"]):
                    tcp = await trio.open_tcp_stream("127.0.0.1", port)
                    streams.append(await wrap(nursery, tcp, context, False))
                _report(rss_growth=_rss() - rss, connections=len(streams))
                (await trio.open_tcp_stream("127.0.0.1", port)).socket.close()
                for stream in streams:
                    await trio.aclose_forcefully(stream)
            nursery.cancel_scope.cancel()

    trio.run(serve if role == "serve" else client)


def _rss() -> int:
    """This process's resident set, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class _payload_file:
    """A temporary file of ``size`` bytes (in /tmp: the page cache serves it)."""

    def __init__(self, size: int) -> None:
        self._size = size

    def __enter__(self) -> Any:
        self._file = tempfile.TemporaryFile()
        block = os.urandom(MiB)
        for _ in range(self._size // MiB):
            self._file.write(block)
        self._file.write(block[: self._size % MiB])
        self._file.flush()
        return self._file

    def __exit__(self, *exc: object) -> None:
        self._file.close()


# -- asyncio (default loop or uvloop) ----------------------------------------------------


def _asyncio_main(
    role: str, contender: str, workload: str, sizes: dict[str, int], port: int
) -> None:
    if contender == "uvloop":
        import uvloop

        uvloop.install()

    async def read_exactly(reader: asyncio.StreamReader, size: int) -> None:
        left = size
        while left:
            data = await reader.read(min(left, 256 * 1024))
            if not data:
                raise EOFError(f"{left} bytes missing")
            left -= len(data)

    async def serve() -> None:
        context, pem = _server_context()
        done = asyncio.Event()
        connections: list[asyncio.StreamWriter] = []
        rss = _rss()
        count = {"memory": sizes["idle"], "setup": sizes["connections"]}.get(
            workload, sizes["concurrent"]
        )
        seen = 0

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal seen
            if workload in ("bulk", "file", "echo"):
                cpu, start = _cpu(), time.perf_counter()
                if workload == "bulk":
                    await read_exactly(reader, sizes["bytes"])
                    writer.write(b"k")
                    await writer.drain()
                elif workload == "file":
                    with _payload_file(sizes["bytes"]) as f:
                        offset = 0
                        while offset < sizes["bytes"]:
                            chunk = os.pread(f.fileno(), 256 * 1024, offset)
                            writer.write(chunk)
                            await writer.drain()
                            offset += len(chunk)
                else:
                    left = sizes["echoes"] * ECHO_MESSAGE
                    while left:
                        data = await reader.read(ECHO_MESSAGE)
                        writer.write(data)
                        await writer.drain()
                        left -= len(data)
                _report(wall=time.perf_counter() - start, cpu=_cpu() - cpu)
                writer.close()
                # Until the transport has flushed: uvloop's would drop what it still
                # buffers when the loop ends.
                with contextlib.suppress(ConnectionError, ssl.SSLError):
                    await writer.wait_closed()
                done.set()
                return
            if workload == "memory":
                connections.append(writer)
            else:
                await read_exactly(reader, 1)
                writer.write(b"y")
                await writer.drain()
                writer.close()
                with contextlib.suppress(ConnectionError, ssl.SSLError):
                    await writer.wait_closed()
            seen += 1  # counted when done: the last to arrive need not finish last
            if seen == count:
                _report(rss_growth=_rss() - rss, connections=count)
                done.set()

        server = await asyncio.start_server(
            handle, "127.0.0.1", port, ssl=context, reuse_address=True, backlog=256
        )
        print(json.dumps({"cert": pem}), flush=True)
        await done.wait()
        if workload == "memory":
            await asyncio.sleep(0)
        server.close()

    async def client() -> None:
        context = _client_context(os.environ.get("BENCH_CERT", ""))

        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await asyncio.open_connection(
                "127.0.0.1", port, ssl=context, server_hostname=HOSTNAME
            )

        if workload in ("bulk", "file", "echo"):
            reader, writer = await connect()
            cpu, start = _cpu(), time.perf_counter()
            if workload == "bulk":
                payload = bytes(WRITE)
                for _ in range(sizes["bytes"] // WRITE):
                    writer.write(payload)
                    await writer.drain()
                await read_exactly(reader, 1)
                _report(wall=time.perf_counter() - start, cpu=_cpu() - cpu)
            elif workload == "file":
                await read_exactly(reader, sizes["bytes"])
                _report(wall=time.perf_counter() - start, cpu=_cpu() - cpu)
            else:
                latencies = []
                for _ in range(sizes["echoes"]):
                    sent = time.perf_counter()
                    writer.write(b"e" * ECHO_MESSAGE)
                    await writer.drain()
                    await read_exactly(reader, ECHO_MESSAGE)
                    latencies.append(time.perf_counter() - sent)
                _report(latencies=latencies)
            writer.close()
        elif workload in ("setup", "concurrent-setup"):
            count = sizes["connections"] if workload == "setup" else sizes["concurrent"]
            times: list[float] = []

            async def one() -> None:
                begin = time.perf_counter()
                reader, writer = await connect()
                writer.write(b"x")
                await writer.drain()
                await read_exactly(reader, 1)
                writer.close()
                times.append(time.perf_counter() - begin)

            start = time.perf_counter()
            if workload == "setup":
                for _ in range(count):
                    await one()
            else:
                await asyncio.gather(*(one() for _ in range(count)))
            _report(times=times, wall=time.perf_counter() - start)
        else:
            rss = _rss()
            held = [await connect() for _ in range(sizes["idle"])]
            _report(rss_growth=_rss() - rss, connections=len(held))
            for _, writer in held:
                writer.close()

    asyncio.run(serve() if role == "serve" else client())


# -- raw kTLS: the limit ----------------------------------------------------------------


def _made_up_key(from_client: bool) -> Any:
    """The same made-up key at both ends (there is no handshake): one per direction."""
    from trio_ktls._kernel import CryptoInfo, KernelCipher

    first = 0 if from_client else 100
    return CryptoInfo(
        ssl.TLSVersion.TLSv1_3,
        KernelCipher.AES_GCM_256,
        key=bytes(range(first, first + 32)),
        write_iv=bytes(range(first, first + 12)),
        rec_seq=0,
    )


def _raw_socket(role: str, workload: str, port: int) -> socket.socket:
    """A connected socket with kTLS keys installed by hand for what ``workload`` sends:
    bulk goes client to server, a file server to client, echo both ways."""
    from trio_ktls import _kernel

    if role == "serve":
        with socket.create_server(("127.0.0.1", port)) as listener:
            print(json.dumps({"cert": ""}), flush=True)
            sock, _ = listener.accept()
    else:
        sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as trio's streams do
    _kernel.attach_ulp(sock)
    serving = role == "serve"
    if workload in ("bulk", "echo"):  # client to server
        _kernel.install_key(
            sock, _kernel.TLS_RX if serving else _kernel.TLS_TX, _made_up_key(True)
        )
    if workload in ("file", "echo"):  # server to client
        _kernel.install_key(
            sock, _kernel.TLS_TX if serving else _kernel.TLS_RX, _made_up_key(False)
        )
    return sock


def _raw_main(role: str, contender: str, workload: str, sizes: dict[str, int], port: int) -> None:
    """``raw_ktls``: the kernel's limit, a minimal blocking loop per workload."""
    sock = _raw_socket(role, workload, port)
    size = sizes["bytes"]
    cpu, start = _cpu(), time.perf_counter()
    if workload == "echo":
        if role == "serve":
            left = sizes["echoes"] * ECHO_MESSAGE
            while left:
                data = sock.recv(ECHO_MESSAGE)
                if not data:
                    raise EOFError(left)
                sock.sendall(data)
                left -= len(data)
            _report(wall=time.perf_counter() - start, cpu=_cpu() - cpu)
        else:
            message, latencies = b"e" * ECHO_MESSAGE, []
            buffer = bytearray(ECHO_MESSAGE)
            for _ in range(sizes["echoes"]):
                sent = time.perf_counter()
                sock.sendall(message)
                got = 0
                while got < ECHO_MESSAGE:
                    n = sock.recv_into(memoryview(buffer)[got:])
                    if not n:
                        raise EOFError(ECHO_MESSAGE - got)
                    got += n
                latencies.append(time.perf_counter() - sent)
            _report(latencies=latencies)
        sock.close()
        return
    sending = (workload == "bulk") == (role == "client")
    if not sending:
        buffer, left = bytearray(256 * 1024), size
        while left:
            n = sock.recv_into(buffer, min(left, len(buffer)))
            if not n:
                raise EOFError(left)
            left -= n
    elif workload == "bulk":
        payload = bytes(WRITE)
        for _ in range(size // WRITE):
            sock.sendall(payload)
    else:
        with _payload_file(size) as f:
            offset = 0
            while offset < size:
                offset += os.sendfile(sock.fileno(), f.fileno(), offset, size - offset)
    if sending:  # the receiver closes once it has everything
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)
    _report(wall=time.perf_counter() - start, cpu=_cpu() - cpu)
    sock.close()


def _trio_raw_main(
    role: str, contender: str, workload: str, sizes: dict[str, int], port: int
) -> None:
    """``trio_raw_ktls``: the same kTLS sockets driven by trio's socket methods, with no
    library: what any trio program pays per call (a scheduling round, the wrappers)."""
    import trio

    sock = _raw_socket(role, workload, port)
    size = sizes["bytes"]

    async def send_all(tsock: trio.socket.SocketType, data: bytes) -> None:
        view = memoryview(data)
        while view:  # as trio.SocketStream.send_all
            view = view[await tsock.send(view) :]

    async def main() -> None:
        tsock = trio.socket.from_stdlib_socket(sock)
        cpu, start = _cpu(), time.perf_counter()
        if workload == "echo":
            if role == "serve":
                left = sizes["echoes"] * ECHO_MESSAGE
                while left:
                    data = await tsock.recv(ECHO_MESSAGE)
                    if not data:
                        raise EOFError(left)
                    await send_all(tsock, data)
                    left -= len(data)
                _report(wall=time.perf_counter() - start, cpu=_cpu() - cpu)
            else:
                message, latencies = b"e" * ECHO_MESSAGE, []
                for _ in range(sizes["echoes"]):
                    sent = time.perf_counter()
                    await send_all(tsock, message)
                    got = 0
                    while got < ECHO_MESSAGE:
                        data = await tsock.recv(ECHO_MESSAGE - got)
                        if not data:
                            raise EOFError(ECHO_MESSAGE - got)
                        got += len(data)
                    latencies.append(time.perf_counter() - sent)
                _report(latencies=latencies)
            tsock.close()
            return
        if role == "serve":  # bulk: receives, into new bytes each time as receive_some
            left = size
            while left:
                data = await tsock.recv(min(left, 256 * 1024))
                if not data:
                    raise EOFError(left)
                left -= len(data)
        else:
            payload = bytes(WRITE)
            for _ in range(size // WRITE):
                await send_all(tsock, payload)
            tsock.shutdown(socket.SHUT_WR)
            await tsock.recv(1)  # the receiver closes once it has everything
        _report(wall=time.perf_counter() - start, cpu=_cpu() - cpu)
        tsock.close()

    trio.run(main)


# -- openssl s_server -WWW ----------------------------------------------------------------


def _openssl_file(sizes: dict[str, int], port: int) -> dict[str, Any]:
    """s_server -WWW serves a file; a blocking stdlib client fetches it."""
    from trio_ktls._demo import demo_certificate
    from trio_ktls._probe import read_tls_stat

    key_pem, cert_pem = demo_certificate()
    key_fd = os.memfd_create("bench-key", 0)  # the key reaches openssl, not the disk
    os.write(key_fd, key_pem)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "cert.pem").write_bytes(cert_pem)
        with _payload_file(sizes["bytes"]) as f:
            f.seek(0)
            (root / "payload").write_bytes(f.read())
        # OpenSSL 3.0's s_server has no -ktls flag: kTLS is asked for through the
        # configuration (SSL_OP_ENABLE_KTLS); whether it was used is read from tls_stat.
        (root / "openssl.cnf").write_text(_OPENSSL_KTLS_CONF)
        stat_before = read_tls_stat()
        server = subprocess.Popen(
            ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-WWW", "-naccept", "1",
             "-cert", "cert.pem", "-key", f"/proc/self/fd/{key_fd}", "-quiet"],
            cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=[key_fd],
            env=dict(os.environ, OPENSSL_CONF=str(root / "openssl.cnf")),
        )  # fmt: skip
        os.close(key_fd)
        try:
            context = _client_context(cert_pem.decode())
            raw = _connect_when_listening(port, server)
            raw.settimeout(300)  # a stall fails the run instead of hanging it
            with context.wrap_socket(raw, server_hostname=HOSTNAME) as tls:
                cpu, start = _cpu(), time.perf_counter()
                tls.sendall(b"GET /payload HTTP/1.0\r\n\r\n")
                # Read to the end of the body (the response has no Content-Length, and
                # s_server with -ktls was seen not to close after the file).
                head = bytearray()
                while b"\r\n\r\n" not in head:
                    head += tls.recv(4096) or _eof()
                received = len(head) - head.index(b"\r\n\r\n") - 4
                while received < sizes["bytes"]:
                    received += len(tls.recv(256 * 1024) or _eof())
                wall = time.perf_counter() - start
            server.kill()
        finally:
            server.kill()
        stat_after = read_tls_stat()
    ktls = stat_after.get("TlsTxSw", 0) > stat_before.get("TlsTxSw", 0)
    return {"client": {"wall": wall, "cpu": _cpu() - cpu, "bytes": received}, "ktls": ktls}


_OPENSSL_KTLS_CONF: Final = """\
openssl_conf = openssl_init
[openssl_init]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
Options = KTLS
"""


def _connect_when_listening(port: int, server: subprocess.Popen[bytes]) -> socket.socket:
    for _ in range(600):
        if server.poll() is not None:
            raise RuntimeError(f"openssl s_server exited with status {server.returncode}")
        try:
            return socket.create_connection(("127.0.0.1", port))
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("openssl s_server did not listen within 60 s")


def _eof() -> bytes:
    raise EOFError("openssl s_server closed the connection before the whole file")


# -- the orchestrator ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _end(role: str, contender: str, workload: str, tiny: bool, port: int) -> list[str]:
    return [sys.executable, __file__, role, contender, workload, str(port)] + (
        ["--tiny"] if tiny else []
    )


def measure_once(contender: str, workload: str, tiny: bool) -> dict[str, Any]:
    """One run of one workload: both ends' reports."""
    sizes = TINY if tiny else FULL
    port = _free_port()
    if contender == "openssl":
        return _openssl_file(sizes, port)
    server = subprocess.Popen(
        _end("serve", contender, workload, tiny, port), stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        hello = json.loads(server.stdout.readline())
        env = dict(os.environ, BENCH_CERT=hello["cert"])
        client = subprocess.run(
            _end("client", contender, workload, tiny, port),
            env=env, capture_output=True, text=True, timeout=1800, check=True,
        )  # fmt: skip
        server_out, _ = server.communicate(timeout=300)
    finally:
        server.kill()
    if server.returncode:
        raise RuntimeError(f"{contender} {workload}: server exited {server.returncode}")
    return {
        "server": json.loads(server_out.strip().splitlines()[-1]),
        "client": json.loads(client.stdout.strip().splitlines()[-1]),
    }


def summarize(workload: str, runs: list[dict[str, Any]], size: int) -> dict[str, Any]:
    """Median, min and max of each figure over the repetitions."""

    def spread(values: Sequence[float]) -> dict[str, float]:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    if workload in ("bulk", "file"):
        walls = [max(run["client"]["wall"], run.get("server", {}).get("wall", 0)) for run in runs]
        gib = size / (1024 * MiB)
        result: dict[str, Any] = {"MB/s": spread([size / 1e6 / wall for wall in walls])}
        for end in ("client", "server"):
            if all(end in run and "cpu" in run[end] for run in runs):
                result[f"{end} CPU s/GiB"] = spread([run[end]["cpu"] / gib for run in runs])
        if any("ktls" in run for run in runs):
            result["openssl used kTLS"] = all(run.get("ktls") for run in runs)
        return result
    if workload == "echo":
        latencies = [run["client"]["latencies"] for run in runs]
        return {
            "median ms": spread([statistics.median(lat) * 1e3 for lat in latencies]),
            "p99 ms": spread([sorted(lat)[int(len(lat) * 0.99) - 1] * 1e3 for lat in latencies]),
        }
    if workload in ("setup", "concurrent-setup"):
        return {
            "ms per connection": spread(
                [statistics.median(run["client"]["times"]) * 1e3 for run in runs]
            ),
            "total s": spread([run["client"]["wall"] for run in runs]),
        }
    return {
        "KiB per connection (client)": spread(
            [run["client"]["rss_growth"] / run["client"]["connections"] for run in runs]
        ),
        "KiB per connection (server)": spread(
            [run["server"]["rss_growth"] / run["server"]["connections"] for run in runs]
        ),
    }


def available_contenders(ktls: bool) -> list[str]:
    contenders = []
    for name in CONTENDERS:
        if name in NEEDS_KTLS and not ktls:
            continue
        if name == "uvloop":
            try:
                import uvloop  # noqa: F401
            except ImportError:
                continue
        if name == "openssl" and (not ktls or shutil.which("openssl") is None):
            continue
        contenders.append(name)
    return contenders


def run(
    out: Path,
    *,
    tiny: bool,
    repetitions: int,
    workloads: Sequence[str],
    contenders: Sequence[str] = CONTENDERS,
) -> Path:
    import trio_ktls

    probe = trio_ktls.probe()
    sizes = TINY if tiny else FULL
    results: dict[str, Any] = {}
    for workload in workloads:
        names = [
            name
            for name in available_contenders(probe.available)
            if workload in SUPPORTS[name] and name in contenders
        ]
        # Repetitions take turns (A B C, A B C, ...), so that a slow spell of the machine
        # falls on every contender rather than on all of one contender's runs.
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for _ in range(repetitions):
            for contender in names:
                runs[contender].append(measure_once(contender, workload, tiny))
        for contender in names:
            summary = summarize(workload, runs[contender], sizes["bytes"])
            results.setdefault(workload, {})[contender] = summary
            print(f"{workload:17} {contender:15} {_headline(summary)}", flush=True)
    document = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "kernel": os.uname().release,
        "ktls": probe.available,
        "tiny": tiny,
        "repetitions": repetitions,
        "sizes": sizes,
        "results": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    label = os.environ.get("TRIO_KTLS_GUEST_KERNEL") or "host"
    path = out / f"bench-{label}.json"
    path.write_text(json.dumps(document, indent=1))
    return path


def _headline(summary: dict[str, Any]) -> str:
    parts = []
    for name, value in summary.items():
        if isinstance(value, dict):
            parts.append(f"{name} {value['median']:.2f} [{value['min']:.2f}-{value['max']:.2f}]")
        else:
            parts.append(f"{name} {value}")
    return "; ".join(parts)


# -- the report ---------------------------------------------------------------------------


def ratios(results: dict[str, Any]) -> dict[str, float]:
    """The headline ratios of one run (medians; within the run only)."""
    found: dict[str, float] = {}
    bulk, files = results.get("bulk", {}), results.get("file", {})

    def mbs(table: dict[str, Any], name: str) -> float | None:
        entry = table.get(name)
        return entry["MB/s"]["median"] if entry else None

    pairs = [
        ("bulk: trio_ktls / raw kTLS", mbs(bulk, "trio_ktls"), mbs(bulk, "raw_ktls")),
        (
            "bulk: trio_ktls / trio over raw kTLS",
            mbs(bulk, "trio_ktls"),
            mbs(bulk, "trio_raw_ktls"),
        ),
        ("bulk: trio over raw kTLS / raw kTLS", mbs(bulk, "trio_raw_ktls"), mbs(bulk, "raw_ktls")),
        ("bulk: trio_ktls / trio.SSLStream", mbs(bulk, "trio_ktls"), mbs(bulk, "trio_sslstream")),
        ("file: send_file / raw sendfile", mbs(files, "trio_ktls"), mbs(files, "raw_ktls")),
        ("file: send_file / openssl -WWW", mbs(files, "trio_ktls"), mbs(files, "openssl")),
    ]
    for name, key in (("bulk", "server CPU s/GiB"), ("file", "server CPU s/GiB")):
        table = results.get(name, {})
        if "trio_ktls" in table and "raw_ktls" in table and key in table["trio_ktls"]:
            pairs.append(
                (
                    f"{name}: trio_ktls / raw kTLS ({key})",
                    table["trio_ktls"][key]["median"],
                    table["raw_ktls"][key]["median"],
                )
            )
    # Against trio.SSLStream: times and sizes, so below 1 is better.
    for workload, key in (
        ("setup", "ms per connection"),
        ("concurrent-setup", "ms per connection"),
        ("echo", "median ms"),
        ("echo", "p99 ms"),
        ("memory", "KiB per connection (server)"),
        ("memory", "KiB per connection (client)"),
    ):
        table = results.get(workload, {})
        if "trio_ktls" in table and "trio_sslstream" in table:
            pairs.append(
                (
                    f"{workload}: trio_ktls / trio.SSLStream ({key})",
                    table["trio_ktls"][key]["median"],
                    table["trio_sslstream"][key]["median"],
                )
            )
    # Where echo latency goes: the library (against trio over the same raw kTLS
    # sockets), trio (against a blocking loop over them), kTLS itself (against
    # trio.SSLStream, whose crypto runs in user space over plain TCP).
    echo = results.get("echo", {})
    for name, mine, theirs in (
        ("trio_ktls / trio over raw kTLS", "trio_ktls", "trio_raw_ktls"),
        ("trio over raw kTLS / raw kTLS", "trio_raw_ktls", "raw_ktls"),
        ("trio over raw kTLS / trio.SSLStream", "trio_raw_ktls", "trio_sslstream"),
    ):
        if mine in echo and theirs in echo:
            key = "median ms"
            pairs.append(
                (f"echo: {name} ({key})", echo[mine][key]["median"], echo[theirs][key]["median"])
            )
    for name, a, b in pairs:
        if a and b:
            found[name] = a / b
    return found


def report(folder: Path) -> Path:
    lines = ["# trio_ktls benchmarks", ""]
    for path in sorted(folder.glob("bench-*.json")):
        document = json.loads(path.read_text())
        where = f"kernel {document['kernel']}" + ("" if document["ktls"] else " (no kTLS)")
        lines += [
            f"## {where}, {document['date']}",
            "",
            (
                f"Medians of {document['repetitions']} repetitions, [min-max]; "
                if document["repetitions"] > 1
                else "One repetition (no spread); "
            )
            + f"{document['sizes']['bytes'] // MiB} MiB transfers"
            + (
                " (a tiny run: the harness works, the figures mean nothing)"
                if document["tiny"]
                else ""
            )
            + ".",
            "",
        ]
        for workload, table in document["results"].items():
            lines += [f"### {workload}", ""]
            columns = sorted({c for entry in table.values() for c in entry})
            lines.append("| contender | " + " | ".join(columns) + " |")
            lines.append("|---|" + "---|" * len(columns))
            for contender, entry in table.items():
                cells = [_cell(entry.get(column)) for column in columns]
                lines.append(f"| {contender} | " + " | ".join(cells) + " |")
            lines.append("")
        found = ratios(document["results"])
        if found:
            lines += ["### ratios (within this run)", ""]
            lines += [f"- {name}: {value:.2f}x" for name, value in found.items()]
            lines.append("")
        _plot(document, folder / f"{path.stem}.png")
        lines += [f"![throughput]({path.stem}.png)", ""]
    out = folder / "bench.md"
    out.write_text("\n".join(lines))
    return out


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict):
        return f"{value['median']:.2f} [{value['min']:.2f}-{value['max']:.2f}]"
    return str(value)


def _plot(document: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [w for w in ("bulk", "file") if w in document["results"]]
    if not panels:
        return
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.6), squeeze=False)
    for axis, workload in zip(axes[0], panels, strict=True):
        table = document["results"][workload]
        names = list(table)
        medians = [table[n]["MB/s"]["median"] for n in names]
        low = [m - table[n]["MB/s"]["min"] for m, n in zip(medians, names, strict=True)]
        high = [table[n]["MB/s"]["max"] - m for m, n in zip(medians, names, strict=True)]
        axis.barh(names, medians, xerr=[low, high], color="#4477aa")
        axis.set_xlabel("MB/s (median, min-max)")
        axis.set_title(f"{workload}, {document['sizes']['bytes'] // MiB} MiB")
    figure.suptitle(f"kernel {document['kernel']}, {document['date'][:10]}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="measure; write DIR/bench-<kernel>.json")
    run_parser.add_argument("--out", type=Path, default=Path("reports/bench"))
    run_parser.add_argument("--tiny", action="store_true", help="tiny sizes: a smoke run")
    run_parser.add_argument("--repetitions", type=int, default=3)
    run_parser.add_argument("--workload", action="append", choices=WORKLOADS)
    run_parser.add_argument(
        "--contender", action="append", choices=CONTENDERS, help="only these (default: all)"
    )
    report_parser = commands.add_parser("report", help="bench.md and plots from DIR's JSON")
    report_parser.add_argument("folder", type=Path)
    for role in ("serve", "client"):
        end = commands.add_parser(role, help=f"one end of a measurement ({role})")
        end.add_argument("contender", choices=CONTENDERS)
        end.add_argument("workload", choices=WORKLOADS)
        end.add_argument("port", type=int)
        end.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "run":
        path = run(
            args.out,
            tiny=args.tiny,
            repetitions=args.repetitions,
            workloads=args.workload or WORKLOADS,
            contenders=args.contender or CONTENDERS,
        )
        print(f"wrote {path}")
        return 0
    if args.command == "report":
        print(f"wrote {report(args.folder)}")
        return 0
    sizes = TINY if args.tiny else FULL
    mains: dict[str, Callable[[str, str, str, dict[str, int], int], None]] = {
        "trio_ktls": _trio_main,
        "trio_sslstream": _trio_main,
        "asyncio": _asyncio_main,
        "uvloop": _asyncio_main,
        "trio_raw_ktls": _trio_raw_main,
        "raw_ktls": _raw_main,
    }
    mains[args.contender](args.command, args.contender, args.workload, sizes, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
