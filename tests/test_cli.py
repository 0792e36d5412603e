"""The ``trio-ktls`` command line, as a user runs it (``python -m trio_ktls``): help,
exit statuses, one-line errors, ``serve`` with ``get`` and curl, ``--workers``, and the
file demo. kTLS-marked variants run in the kernel matrix and check that the server's
access log says the kernel encrypted and decrypted every connection."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import h11
import pytest
import trio

import trio_ktls
from trio_ktls import KTLSMode

from .helpers import (
    CA,
    HOSTNAME,
    MODES,
    OPENSSL,
    ProcessOutput,
    client_context,
    free_port,
    http_exchange,
    kernel_probe,
    needs_openssl,
    server_pem_file,
)

PYTHON_M = [sys.executable, "-m", "trio_ktls"]
PROG = "python -m trio_ktls"
MiB = 1024 * 1024
CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(
    CURL is None, reason="curl is not installed (Debian package curl): curl downloads untested"
)


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PYTHON_M, *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def assert_one_line_error(done: subprocess.CompletedProcess[str], message: str) -> None:
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"{PROG}: error: "), done.stderr
    assert message in done.stderr, done.stderr


def test_version_and_help() -> None:
    done = run("--version")
    assert done.stdout.strip() == f"{PROG} {trio_ktls.__version__}"
    for command in ([], ["probe"], ["demo"], ["serve"], ["get"]):
        done = run(*command, "--help")
        assert done.returncode == 0, done.stderr
        assert "usage: " in done.stdout
        for markup in ("``", ":func:", ":class:", "`trio"):
            assert markup not in done.stdout, (command, markup)
    assert re.search(r"^ +serve +an HTTPS file server$", run("--help").stdout, re.M)


def test_console_script_is_declared() -> None:
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert '\ntrio-ktls = "trio_ktls._cli:main"\n' in pyproject
    from trio_ktls._cli import main

    assert main(["probe", "--json"]) == 0


def test_probe_require_exit_status() -> None:
    done = run("probe", "--require")
    assert done.returncode == (0 if kernel_probe().available else 1), done
    assert kernel_probe().reason in done.stdout


def test_demo_require_says_why_not() -> None:
    done = run("demo", "--ktls", "require", "--megabytes", "1")
    if kernel_probe().available:
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("byte-exact: True") == 2
    else:
        assert_one_line_error(done, f"kTLS is not available: {kernel_probe().reason}")


@pytest.fixture
def served(tmp_path: Path) -> Path:
    root = tmp_path / "served"
    root.mkdir()
    (root / "big.bin").write_bytes(os.urandom(3 * MiB + 1))
    (root / "small.txt").write_text("small")
    return root


#: Sizes at the edges of a record (16 KiB of plaintext), and none at all.
EDGE_SIZES = (0, 1, 16 * 1024 - 1, 16 * 1024, 16 * 1024 + 1)


def add_edge_files(root: Path) -> list[str]:
    names = []
    for size in EDGE_SIZES:
        names.append(f"edge-{size}.bin")
        (root / names[-1]).write_bytes(os.urandom(size))
    # 64 MiB: a random MiB, repeated with a changing byte so no two MiB are alike.
    block = bytearray(os.urandom(MiB))
    with (root / "huge.bin").open("wb") as f:
        for i in range(64):
            block[0] = i
            f.write(block)
    return [*names, "huge.bin"]


@dataclass
class Server:
    process: trio.Process
    output: ProcessOutput
    port: int
    fingerprint: str

    @property
    def log(self) -> str:
        return self.output.data.decode()

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}/{path}"


@asynccontextmanager
async def serving(directory: Path, *args: str) -> AsyncIterator[Server]:
    """``trio-ktls serve DIR --port 0 ARGS`` until the body is done, then SIGINT, which
    must stop it with status 0 and no traceback."""
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                [*PYTHON_M, "serve", str(directory), "--port", "0", *args],
                stdin=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                check=False,
            )
        )
        output = ProcessOutput()
        assert process.stderr is not None
        nursery.start_soon(output.collect, process.stderr)
        with trio.fail_after(120):  # a server that never starts is a failure
            await output.wait_for(b"accepting connections")
        text = output.data.decode()
        port = re.search(r"https://127\.0\.0\.1:(\d+)/", text)
        fingerprint = re.search(r"SHA-256 fingerprint ([0-9A-F:]{95})", text)
        assert port and fingerprint, text
        server = Server(process, output, int(port.group(1)), fingerprint.group(1))
        try:
            yield server
        finally:
            process.send_signal(signal.SIGINT)
            with trio.fail_after(60):
                status = await process.wait()
        assert status == 0, server.log
        assert "Traceback" not in server.log
        assert "stopping (SIG" in server.log


def access_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if '"GET ' in line or '"HEAD ' in line]


def assert_server_offloaded(log: str, mode: KTLSMode) -> None:
    lines = access_lines(log)
    assert lines
    for line in lines:
        assert ("kTLS=TX+RX " in line) is (mode == "require"), line


async def run_async(*command: str) -> subprocess.CompletedProcess[bytes]:
    result: subprocess.CompletedProcess[bytes] = await trio.run_process(
        list(command), capture_stdout=True, capture_stderr=True, check=False, stdin=b""
    )
    return result


@pytest.mark.parametrize("mode", MODES)
async def test_serve_and_get(tmp_path: Path, served: Path, mode: KTLSMode) -> None:
    pem = server_pem_file(tmp_path)
    ca = tmp_path / "ca.pem"
    CA.cert_pem.write_to_path(str(ca))
    expected = hashlib.sha256((served / "big.bin").read_bytes()).hexdigest()
    async with serving(served, "--cert", str(pem), "--ktls", mode) as server:
        assert ("kTLS active" in server.log) is (mode != "off" and kernel_probe().available)
        out = tmp_path / "out.bin"
        for version in ("--tls1.2", "--tls1.3"):
            done = await run_async(
                *PYTHON_M, "get", server.url("big.bin"), "-o", str(out), "--cafile", str(ca),
                version, "--ktls", mode, "-v",
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            assert hashlib.sha256(out.read_bytes()).hexdigest() == expected
            offloaded = mode == "require"
            assert (b"tx_offload=True, rx_offload=True" in done.stderr) is offloaded
            assert b"MiB/s" in done.stderr
        # To standard output, and a failure that leaves no file behind.
        done = await run_async(*PYTHON_M, "get", server.url("small.txt"), "--cafile", str(ca))
        assert (done.returncode, done.stdout) == (0, b"small")
        missing = tmp_path / "missing.bin"
        done = await run_async(
            *PYTHON_M, "get", server.url("nope"), "-o", str(missing), "--cafile", str(ca)
        )
        assert done.returncode == 1
        assert (
            done.stderr.decode() == f"{PROG}: error: HTTP 404 Not Found for {server.url('nope')}\n"
        )
        assert not missing.exists()
        left = [p.name for p in await trio.Path(tmp_path).iterdir()]
        assert [name for name in left if name.startswith(".trio-ktls")] == []
    assert_server_offloaded(server.log, mode)


@needs_curl
@pytest.mark.parametrize("mode", MODES)
async def test_curl_downloads(tmp_path: Path, served: Path, mode: KTLSMode) -> None:
    """curl over TLS 1.2 and 1.3: files of 0 B, 1 B, 16 KiB and 16 KiB +- 1, 3 MiB and
    64 MiB on one kept-alive connection, each checked by SHA-256; a range; HEAD."""
    assert CURL is not None
    pem = server_pem_file(tmp_path)
    ca = tmp_path / "ca.pem"
    CA.cert_pem.write_to_path(str(ca))
    names = ["big.bin", "small.txt", *add_edge_files(served)]
    big = (served / "big.bin").read_bytes()
    async with serving(served, "--cert", str(pem), "--ktls", mode) as server:
        for versions in (["--tlsv1.2", "--tls-max", "1.2"], ["--tlsv1.3"]):
            curl = [CURL, "-sS", "--fail", "--cacert", str(ca), *versions]
            fetch = []
            for name in names:
                fetch += [server.url(name), "-o", str(tmp_path / f"got-{name}")]
            done = await run_async(*curl, *fetch)
            assert done.returncode == 0, done.stderr
            for name in names:
                assert _sha256(tmp_path / f"got-{name}") == _sha256(served / name), name
            done = await run_async(*curl, "-r", "100-199", server.url("big.bin"))
            assert done.stdout == big[100:200]
            done = await run_async(*curl, "-I", server.url("big.bin"))
            assert b"content-length: 3145729" in done.stdout.lower()
    lines = access_lines(server.log)
    per_version = len(names) + 2
    assert len(lines) == 2 * per_version
    # Each curl run fetched all its files over one kept-alive connection.
    peers = [line.split()[2] for line in lines]
    for first in (0, per_version):
        assert len(set(peers[first : first + len(names)])) == 1, lines
    assert_server_offloaded(server.log, mode)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


@needs_openssl
@pytest.mark.parametrize("mode", MODES)
async def test_openssl_s_client_fetches_from_serve(
    tmp_path: Path, served: Path, mode: KTLSMode
) -> None:
    """``openssl s_client`` (OpenSSL's own TLS, not ours) fetches a file over TLS 1.2
    and 1.3."""
    assert OPENSSL is not None
    pem = server_pem_file(tmp_path)
    ca = tmp_path / "ca.pem"
    CA.cert_pem.write_to_path(str(ca))
    big = (served / "big.bin").read_bytes()
    request = b"GET /big.bin HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    async with serving(served, "--cert", str(pem), "--ktls", mode) as server:
        for version in ("-tls1_2", "-tls1_3"):
            done: subprocess.CompletedProcess[bytes] = await trio.run_process(
                [OPENSSL, "s_client", "-connect", f"127.0.0.1:{server.port}", version,
                 "-CAfile", str(ca), "-verify_return_error", "-quiet", "-ign_eof"],
                stdin=request, capture_stdout=True, capture_stderr=True, check=False,
            )  # fmt: skip
            # The server ends with a bare FIN, like most HTTPS servers (``serve`` is
            # https_compatible): s_client reports that as an unexpected EOF, its exit
            # status 1; anything else is a failure.
            assert done.returncode == 0 or b"unexpected eof" in done.stderr, done.stderr
            head, _, body = done.stdout.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 "), head
            assert body == big
    assert len(access_lines(server.log)) == 2
    assert_server_offloaded(server.log, mode)


async def test_self_signed_certificate_and_pins(tmp_path: Path, served: Path) -> None:
    async with serving(served, "--name", "127.0.0.1") as server:
        assert (
            f"self-signed certificate for 127.0.0.1: SHA-256 fingerprint {server.fingerprint}"
            in server.log
        )
        done = await run_async(
            *PYTHON_M, "get", server.url("small.txt"), "--pin", server.fingerprint
        )
        assert (done.returncode, done.stdout) == (0, b"small")
        done = await run_async(
            *PYTHON_M,
            "get",
            server.url("small.txt"),
            "--pin",
            server.fingerprint.replace(":", "").lower(),
        )
        assert done.returncode == 0
        wrong = "00" * 32
        done = await run_async(*PYTHON_M, "get", server.url("small.txt"), "--pin", wrong)
        assert done.returncode == 1
        assert done.stderr.decode().count("\n") == 1
        assert b"does not match the pin" in done.stderr
        done = await run_async(*PYTHON_M, "get", server.url("small.txt"))
        assert done.returncode == 1
        assert b"CERTIFICATE_VERIFY_FAILED" in done.stderr and b"Traceback" not in done.stderr
    assert len(access_lines(server.log)) == 2  # a wrong pin sends no request


@pytest.mark.parametrize("mode", MODES)
async def test_workers_share_the_port_and_stop_cleanly(
    tmp_path: Path, served: Path, mode: KTLSMode
) -> None:
    """Connections spread over both processes (by the kernel's hash of their addresses,
    so with 24 connections all landing on one worker has odds of 2**-23), each logging its
    pid; SIGINT to the parent stops both with status 0."""
    pem = server_pem_file(tmp_path)
    async with serving(served, "--cert", str(pem), "--workers", "2", "--ktls", mode) as server:
        with trio.fail_after(120):  # the second worker may start a little later
            await server.output.wait_until(lambda log: log.count(b"accepting connections") == 2)
        workers = set(re.findall(r"worker (\d+) accepting", server.log))
        for _ in range(24):
            async with trio_ktls.open_ktls_stream(
                "127.0.0.1",
                server.port,
                ssl_context=client_context("TLSv1.3"),
                server_hostname=HOSTNAME,
                https_compatible=True,
                ktls=mode,
            ) as stream:
                reply = await http_exchange(
                    stream, h11.Connection(h11.CLIENT), "GET", "/small.txt"
                )
                assert reply.body == b"small"
        with trio.fail_after(60):
            await server.output.wait_until(lambda log: len(access_lines(log.decode())) == 24)
    pids = {re.search(r"trio-ktls\[(\d+)\]", line).group(1) for line in access_lines(server.log)}  # type: ignore[union-attr]
    assert pids == workers, server.log
    assert server.log.count("stopping (SIGTERM)") == 2
    assert_server_offloaded(server.log, mode)


def _error_cases(tmp_path: Path, busy_port: int) -> list[tuple[list[str], str]]:
    served = tmp_path / "served"
    served.mkdir(exist_ok=True)
    cases = [
        (["get", "http://127.0.0.1/"], "only https URLs"),
        (["get", f"https://127.0.0.1:{free_port()}/", "--insecure"], "all attempts to connect"),
        (
            ["get", "https://127.0.0.1/", "--cafile", str(tmp_path / "none.pem")],
            "cannot load CA file",
        ),
        (["serve", str(tmp_path / "absent")], "is not a directory"),
        (["serve", str(served), "--key", "k.pem"], "--key needs --cert"),
        (["serve", str(served), "--cert", str(tmp_path / "none.pem")], "cannot read"),
        (
            ["serve", str(served), "--port", str(busy_port)],
            f"cannot listen on 127.0.0.1:{busy_port}",
        ),
    ]
    if not kernel_probe().available:
        cases.append((["serve", str(served), "--ktls", "require"], "kTLS is not available: "))
    return cases


def test_errors_are_one_line(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        for args, message in _error_cases(tmp_path, busy.getsockname()[1]):
            assert_one_line_error(run(*args), message)


def test_usage_errors_exit_2() -> None:
    done = run("get", "https://x/", "--pin", "12")
    assert done.returncode == 2
    assert "64 hex digits" in done.stderr and "Traceback" not in done.stderr
    assert run("serve", "DIR", "--workers", "0").returncode == 2
    assert run("get", "https://x/", "--insecure", "--cafile", "x").returncode == 2


@needs_curl
def test_file_demo_in_user_space() -> None:
    """The README's main command, with a small file and kTLS off (the guest runs it with
    64 MiB and ``--ktls require`` through ``nox -s demo``)."""
    done = run("demo", "--files", "--megabytes", "2", "--ktls", "off")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("byte-exact: True") == 4
    assert "demo: 4 downloads of 2 MiB, all byte-exact" in done.stdout
    assert "ktls_info: KTLSInfo(" in done.stdout
    assert "the server stopped with status 0" in done.stdout
