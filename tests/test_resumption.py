"""Session tickets and resumption with the record layer in the kernel.

TLS 1.3 tickets arrive after the handoff, so the kernel decrypts them and the library
relays them to OpenSSL; TLS 1.2 tickets and session IDs travel inside the handshake.
Either way ``stream.session`` must resume, and the resumed connection is offloaded too.
"""

from __future__ import annotations

import subprocess
from functools import partial
from pathlib import Path

import pytest
import trio

import trio_ktls
from trio_ktls import KTLSMode, KTLSStream

from .helpers import (
    CA,
    HOSTNAME,
    MODES,
    ProcessOutput,
    assert_mode,
    client_context,
    connect_when_listening,
    free_port,
    needs_openssl,
    server_context,
    server_pem_file,
    start_openssl,
)


def _assert_ticket_arrived(stream: KTLSStream) -> None:
    """Servers send their tickets before any data: once the client has read data the
    server sent, the tickets are in (the reader task relays them in order; in user space
    OpenSSL processes them on the way to the data)."""
    assert stream.session is not None
    assert stream.session.has_ticket


async def _serve_hi(
    nursery: trio.Nursery, version: str, mode: KTLSMode, reused_on_server: list[bool]
) -> int:
    """Our server on a free loopback port: each connection is checked for ``mode``, noted
    as resumed or not in ``reused_on_server``, and sent b"hi"; the port."""

    async def handler(stream: KTLSStream) -> None:
        assert_mode(stream, mode)
        reused_on_server.append(stream.session_reused)
        await stream.send_all(b"hi")
        await stream.receive_some()

    listeners = await nursery.start(
        partial(trio_ktls.serve_ktls_over_tcp, handler, 0, server_context(version), ktls=mode)
    )
    port: int = listeners[0].transport_listener.socket.getsockname()[1]
    return port


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
@pytest.mark.parametrize("mode", MODES)
async def test_resume_against_our_own_server(version: str, mode: KTLSMode) -> None:
    client_ctx = client_context(version)
    reused_on_server: list[bool] = []
    async with trio.open_nursery() as nursery:
        port = await _serve_hi(nursery, version, mode, reused_on_server)
        session = None
        for attempt in range(2):
            async with trio_ktls.open_ktls_stream(
                "127.0.0.1", port, ssl_context=client_ctx, server_hostname=HOSTNAME,
                ktls=mode, session=session,
            ) as client:  # fmt: skip
                assert_mode(client, mode)
                assert client.session_reused is (attempt == 1)
                assert await client.receive_some() == b"hi"
                _assert_ticket_arrived(client)
                session = client.session
                if version == "TLSv1.3" and mode == "require":
                    assert client.tickets_received >= 1
        nursery.cancel_scope.cancel()
    assert reused_on_server == [False, True]


@needs_openssl
@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
@pytest.mark.parametrize("mode", MODES)
async def test_resume_against_openssl_s_server(
    tmp_path: Path, version: str, mode: KTLSMode
) -> None:
    server_pem = server_pem_file(tmp_path)
    port = free_port()
    flag = "-tls1_3" if version == "TLSv1.3" else "-tls1_2"
    args = ["s_server", "-accept", f"127.0.0.1:{port}", "-quiet", "-naccept", "2",
            "-cert", str(server_pem), "-key", str(server_pem), flag]  # fmt: skip
    client_ctx = client_context(version)
    async with trio.open_nursery() as nursery:
        proc = await start_openssl(nursery, args, stdout=None, stderr=None)
        session = None
        for attempt in range(2):
            tcp = await connect_when_listening(port)
            async with trio_ktls.wrap_stream(
                tcp, client_ctx, server_hostname=HOSTNAME, ktls=mode, session=session
            ) as client:
                assert_mode(client, mode)
                assert client.session_reused is (attempt == 1)
                await proc.stdin.send_all(b"hi\n")
                assert await client.receive_some() == b"hi\n"
                _assert_ticket_arrived(client)
                session = client.session
        await proc.stdin.aclose()
        with trio.fail_after(60):
            await proc.wait()


@needs_openssl
@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
@pytest.mark.parametrize("mode", MODES)
async def test_openssl_s_client_resumes_with_our_server(
    tmp_path: Path, version: str, mode: KTLSMode
) -> None:
    ca_pem = tmp_path / "ca.pem"
    CA.cert_pem.write_to_path(str(ca_pem))
    session_file = tmp_path / "session.pem"
    server_ctx = server_context(version)
    reused: list[bool] = []

    async def handler(stream: KTLSStream) -> None:
        assert_mode(stream, mode)
        reused.append(stream.session_reused)
        await stream.send_all(b"bye\n")

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio_ktls.serve_ktls_over_tcp, handler, 0, server_ctx, ktls=mode)
        )
        port = listeners[0].transport_listener.socket.getsockname()[1]
        flag = "-tls1_3" if version == "TLSv1.3" else "-tls1_2"
        for session_arg in ("-sess_out", "-sess_in"):
            args = ["s_client", "-connect", f"127.0.0.1:{port}", flag,
                    "-CAfile", str(ca_pem), "-servername", HOSTNAME, "-ign_eof",
                    session_arg, str(session_file)]  # fmt: skip
            output = ProcessOutput()
            async with trio.open_nursery() as client_nursery:
                proc = await start_openssl(
                    client_nursery, args, stdin=subprocess.DEVNULL, stderr=subprocess.STDOUT
                )
                client_nursery.start_soon(output.collect, proc.stdout)
                with trio.fail_after(120):
                    await proc.wait()
            assert proc.returncode == 0, output.data.decode(errors="replace")
            assert b"bye" in output.data
            expected = b"Reused," if session_arg == "-sess_in" else b"New,"
            assert expected in output.data, output.data.decode(errors="replace")
        nursery.cancel_scope.cancel()
    assert reused == [False, True]


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
@pytest.mark.parametrize("mode", MODES)
async def test_resume_by_assigning_session_like_trio(version: str, mode: KTLSMode) -> None:
    """trio's idiom: ``stream.session = saved`` before the handshake reaches the
    SSLObject, so the second connection resumes (it used to land in the stream's own
    ``__dict__`` and resume nothing)."""
    client_ctx = client_context(version)
    reused_on_server: list[bool] = []
    async with trio.open_nursery() as nursery:
        port = await _serve_hi(nursery, version, mode, reused_on_server)
        saved = None
        for attempt in range(2):
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            client = KTLSStream(
                tcp, client_ctx, nursery=nursery, server_hostname=HOSTNAME, ktls=mode
            )
            if saved is not None:
                client.session = saved
                assert "session" not in vars(client)
            assert await client.receive_some() == b"hi"  # the handshake runs on first use
            assert_mode(client, mode)
            assert client.session_reused is (attempt == 1)
            _assert_ticket_arrived(client)
            saved = client.session
            await client.aclose()
        nursery.cancel_scope.cancel()
    assert reused_on_server == [False, True]
