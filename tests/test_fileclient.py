"""The client behind ``trio-ktls get``, in process: against the file server (user space
on any host, offloaded in the kernel matrix) and against ``openssl s_server -WWW``."""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
import subprocess
from functools import partial
from pathlib import Path

import h11
import pytest
import trio

import trio_ktls
from trio_ktls import KTLSMode, KTLSStream
from trio_ktls._fileclient import FetchError, client_context, fetch, one_line, parse_url
from trio_ktls._selfsigned import format_fingerprint, parse_pin

from .helpers import (
    CA,
    MODES,
    SERVER_CERT,
    connect_when_listening,
    free_port,
    needs_openssl,
    server_context,
    server_pem_file,
    start_file_server,
)

MiB = 1024 * 1024
LEAF_SHA256 = hashlib.sha256(
    ssl.PEM_cert_to_DER_cert(SERVER_CERT.cert_chain_pems[0].bytes().decode())
).digest()


@pytest.fixture
def served(tmp_path: Path) -> Path:
    root = tmp_path / "served"
    root.mkdir()
    (root / "big.bin").write_bytes(os.urandom(3 * MiB + 5))
    (root / "small.txt").write_text("small")
    return root


@pytest.fixture
def ca_file(tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    CA.cert_pem.write_to_path(str(path))
    return str(path)


class Collect:
    """A sink that keeps the body in memory."""

    def __init__(self) -> None:
        self.data = bytearray()

    async def __call__(self, data: bytes) -> None:
        self.data += data


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
@pytest.mark.parametrize("mode", MODES)
async def test_fetch_is_byte_exact(
    served: Path, ca_file: str, mode: KTLSMode, version: str
) -> None:
    """The server allows only ``version``; the client asks for it too."""
    async with trio.open_nursery() as nursery:
        port = await start_file_server(nursery, served, version=version, ktls=mode)
        body = Collect()
        pinned = ssl.TLSVersion.TLSv1_3 if version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
        context = client_context(cafile=ca_file, tls_version=pinned)
        result = await fetch(
            f"https://127.0.0.1:{port}/big.bin", body, ssl_context=context, ktls=mode
        )
        nursery.cancel_scope.cancel()
    assert bytes(body.data) == (served / "big.bin").read_bytes()
    assert (result.status, result.body_bytes) == (200, 3 * MiB + 5)
    assert result.version == version
    assert result.ktls is not None
    assert result.ktls.tx_offload is result.ktls.rx_offload is (mode == "require")
    assert result.certificate_sha256 == format_fingerprint(LEAF_SHA256)
    assert "MiB/s" in result.describe() and "ktls_info: KTLSInfo(" in result.describe()


@pytest.mark.parametrize("mode", MODES)
async def test_pinning(served: Path, mode: KTLSMode, caplog: pytest.LogCaptureFixture) -> None:
    """The right pin downloads; a wrong one fails after the handshake and before a byte
    of the request is sent (the server logs no request)."""
    caplog.set_level(logging.INFO, "trio_ktls.serve")
    async with trio.open_nursery() as nursery:
        port = await start_file_server(nursery, served, ktls=mode)
        url = f"https://127.0.0.1:{port}/small.txt"
        body = Collect()
        await fetch(
            url, body, ssl_context=client_context(pin=LEAF_SHA256), pin=LEAF_SHA256, ktls=mode
        )
        assert body.data == b"small"
        await _access_lines_reach(caplog, 1)
        wrong = bytes(32)
        with pytest.raises(FetchError, match="does not match the pin") as caught:
            await fetch(
                url, Collect(), ssl_context=client_context(pin=wrong), pin=wrong, ktls=mode
            )
        assert format_fingerprint(LEAF_SHA256) in str(caught.value)
        # No chain check without a pin or a CA: the test CA is not the system's.
        with pytest.raises(FetchError, match="CERTIFICATE_VERIFY_FAILED"):
            await fetch(url, Collect(), ssl_context=client_context(), ktls=mode)
        body = Collect()
        await fetch(url, body, ssl_context=client_context(insecure=True), ktls=mode)
        assert body.data == b"small"
        await _access_lines_reach(caplog, 2)
        nursery.cancel_scope.cancel()
    assert len(_access_lines(caplog)) == 2


def _access_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if hasattr(r, "access")]


async def _access_lines_reach(caplog: pytest.LogCaptureFixture, count: int) -> None:
    """Wait for the server's access log to reach ``count`` lines, then check it holds no
    more. The server logs a request once its response has gone out, which may be after
    the client has read all of it (seen on 6.1), so the line can come a moment later."""
    with trio.fail_after(60):
        while len(_access_lines(caplog)) < count:  # noqa: ASYNC110
            await trio.sleep(0.01)
    assert len(_access_lines(caplog)) == count


async def _redirector(target: str, stream: KTLSStream) -> None:
    """Answers every request with a 301 to ``target``."""
    connection = h11.Connection(h11.SERVER)
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(bytes(await stream.receive_some()))
        elif isinstance(event, h11.EndOfMessage):
            break
    headers = [("Location", target), ("Content-Length", "0"), ("Connection", "close")]
    await stream.send_all(
        connection.send(h11.Response(status_code=301, headers=headers))
        + connection.send(h11.EndOfMessage())
    )


async def test_redirects_are_followed_only_when_asked(served: Path, ca_file: str) -> None:
    async with trio.open_nursery() as nursery:
        port = await start_file_server(nursery, served)
        target = f"https://127.0.0.1:{port}/small.txt"
        listeners = await nursery.start(
            partial(
                trio_ktls.serve_ktls_over_tcp,
                partial(_redirector, target),
                0,
                server_context("TLSv1.3"),
                host="127.0.0.1",
                https_compatible=True,
            )
        )
        old = f"https://127.0.0.1:{listeners[0].transport_listener.socket.getsockname()[1]}/old"
        context = client_context(cafile=ca_file)
        with pytest.raises(FetchError, match=f"HTTP 301 .*: redirected to {target} \\(--location"):
            await fetch(old, Collect(), ssl_context=context)
        body = Collect()
        result = await fetch(old, body, ssl_context=context, follow_redirects=True)
        assert (result.url, bytes(body.data)) == (target, b"small")
        with pytest.raises(FetchError, match="HTTP 404 Not Found"):
            await fetch(target + "-missing", Collect(), ssl_context=context)
        nursery.cancel_scope.cancel()


@needs_openssl
@pytest.mark.parametrize(("version", "flag"), [("TLSv1.2", "-tls1_2"), ("TLSv1.3", "-tls1_3")])
@pytest.mark.parametrize("mode", MODES)
async def test_fetch_from_openssl_s_server(
    tmp_path: Path, ca_file: str, mode: KTLSMode, version: str, flag: str
) -> None:
    """``openssl s_server -WWW`` answers HTTP/1.0 with a body that ends at the close."""
    content = os.urandom(MiB + 3)
    (tmp_path / "payload.bin").write_bytes(content)
    port = free_port()
    pem = server_pem_file(tmp_path)
    async with trio.open_nursery() as nursery:
        process = await nursery.start(
            partial(
                trio.run_process,
                [
                    "openssl",
                    "s_server",
                    "-WWW",
                    "-accept",
                    f"127.0.0.1:{port}",
                    "-cert",
                    str(pem),
                    flag,
                ],
                cwd=tmp_path,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )
        )
        await (await connect_when_listening(port)).aclose()
        body = Collect()
        result = await fetch(
            f"https://127.0.0.1:{port}/payload.bin",
            body,
            ssl_context=client_context(cafile=ca_file),
            ktls=mode,
        )
        process.kill()
    assert bytes(body.data) == content
    assert result.version == version
    assert result.ktls is not None
    assert result.ktls.tx_offload is result.ktls.rx_offload is (mode == "require")


def test_parse_url() -> None:
    target = parse_url("https://example.org:8443/a b?x=1")
    assert (target.host, target.port, target.target) == ("example.org", 8443, "/a%20b?x=1")
    assert target.authority == "example.org:8443"
    assert parse_url("https://[::1]/").authority == "[::1]"
    assert parse_url("https://example.org").target == "/"
    for url, message in [
        ("http://example.org/", "only https"),
        ("https:///x", "names no host"),
        ("https://example.org:99999/", "not a valid URL"),
    ]:
        with pytest.raises(FetchError, match=message):
            parse_url(url)


def test_parse_pin() -> None:
    digest = bytes(range(32))
    assert parse_pin(format_fingerprint(digest)) == digest
    assert parse_pin(digest.hex()) == digest
    for bad in ("", "00:11", "zz" * 32, "00" * 33):
        with pytest.raises(ValueError, match="64 hex digits"):
            parse_pin(bad)


def test_client_context_options_exclude_one_another() -> None:
    with pytest.raises(ValueError, match="exclude one another"):
        client_context(pin=bytes(32), insecure=True)
    with pytest.raises(FetchError, match="cannot load CA file"):
        client_context(cafile="/nonexistent/ca.pem")


class _Group(Exception):
    """Quacks like an ExceptionGroup (builtin only from 3.11)."""

    exceptions = (OSError("refused"), OSError("unreachable"))


def test_one_line() -> None:
    error = trio.BrokenResourceError("TLS handshake failed\nsecond line")
    error.__cause__ = OSError("[Errno 111] Connection refused")
    assert one_line(error) == "TLS handshake failed second line: [Errno 111] Connection refused"
    group = OSError("all attempts to connect to h:1 failed")
    # trio.open_tcp_stream raises from an exception group: only its members count.
    group.__cause__ = _Group("all attempts failed")
    assert one_line(group) == "all attempts to connect to h:1 failed: refused; unreachable"
    suppressed = ValueError("plain")
    suppressed.__context__ = KeyError("hidden")
    suppressed.__suppress_context__ = True
    assert one_line(suppressed) == "plain"
