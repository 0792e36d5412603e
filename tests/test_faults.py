"""Faults from a hostile peer, the network and cancellation: nothing lost, clear errors.

Modelled on the kernel's own selftests (``tools/testing/selftests/net/tls.c``: bad_auth,
bad_rec, control messages, shutdown) and trio's stream tests. The peer is a
`HostilePeer`: a real TLS server whose records after the handshake the test writes itself,
so a fault always follows valid data, which must all come out first. Every wait is
bounded.

Every scenario runs both in user space (on the host too) and offloaded (the kernel matrix).
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

import trio_ktls
from trio_ktls import KTLSMode, KTLSStream, TLSProtocolError

from .helpers import (
    GUEST_KERNEL,
    HOSTNAME,
    MODES,
    SERVER_CERT,
    VERSIONS,
    HostilePeer,
    client_context,
    ktls_pair_maker,
    receive_exactly,
    server_context,
    tcp_pair,
)

BEFORE = os.urandom(30_000)

# Alert descriptions (RFC 8446 §6.2).
UNEXPECTED_MESSAGE, BAD_RECORD_MAC, RECORD_OVERFLOW, DECODE_ERROR = 10, 20, 22, 50
NO_RENEGOTIATION, PROTOCOL_VERSION, INTERNAL_ERROR = 100, 70, 80
WARNING, FATAL = 1, 2


async def _connect(
    nursery: trio.Nursery, version: str, mode: KTLSMode, *, https_compatible: bool = False
) -> tuple[KTLSStream, HostilePeer]:
    ours, theirs = await tcp_pair()
    context = client_context(version)
    context.options |= ssl.OP_NO_RENEGOTIATION  # decline a HelloRequest in user space too
    client = KTLSStream(
        ours,
        context,
        nursery=nursery,
        server_hostname=HOSTNAME,
        https_compatible=https_compatible,
        ktls=mode,
    )
    peer = HostilePeer(theirs, server_context(version))
    async with trio.open_nursery() as handshakes:
        handshakes.start_soon(client.do_handshake)
        handshakes.start_soon(peer.do_handshake)
    return client, peer


def _plain_record(content_type: int, body: bytes) -> bytes:
    return bytes([content_type, 3, 3]) + struct.pack(">H", len(body)) + body


# (name, versions it applies to, the bytes after BEFORE (made from the peer), the
# error's words, the fatal alerts TLS calls for; kernel mode may be unable to send an
# alert after a failed decryption: the kernel keeps the socket's error and drops it).
FATAL_FAULTS: dict[str, tuple[Callable[[HostilePeer], bytes], str, set[int]]] = {
    "corrupted-ciphertext": (
        lambda peer: _flip_last_byte(peer.seal(23, b"x" * 1000)),
        r"(?i)bad.record.mac|authentication",
        {BAD_RECORD_MAC},
    ),
    "oversized-record": (
        lambda peer: _plain_record(23, bytes(2**14 + 2048 + 1)),
        r"(?i)overflow|oversized|too long|length",
        {RECORD_OVERFLOW},
    ),
    "garbage": (
        lambda peer: b"\xff" * 64,
        r"(?i)receiving failed|record|version|type",
        {UNEXPECTED_MESSAGE, DECODE_ERROR, RECORD_OVERFLOW, PROTOCOL_VERSION},
    ),
    "plaintext-ccs": (
        lambda peer: _plain_record(20, b"\x01"),
        r"(?i)unexpected|record|authentication|ccs|cipher|internal error",
        # RFC 5246 and 8446 call for unexpected_message; OpenSSL 3.0 answers a TLS 1.2
        # one with internal_error.
        {UNEXPECTED_MESSAGE, BAD_RECORD_MAC, INTERNAL_ERROR},
    ),
    "protected-ccs": (
        lambda peer: peer.seal(20, b"\x01"),
        r"(?i)unexpected|record type|ccs|internal error",
        {UNEXPECTED_MESSAGE},
    ),
    "heartbeat": (
        lambda peer: peer.seal(24, b"\x01\x00\x10" + bytes(32)),
        r"(?i)unexpected|record type|internal error",
        {UNEXPECTED_MESSAGE},
    ),
}


def _flip_last_byte(record: bytes) -> bytes:
    return record[:-1] + bytes([record[-1] ^ 0x01])


@pytest.mark.parametrize("fault", list(FATAL_FAULTS))
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("mode", MODES)
async def test_hostile_peer_after_the_handshake(
    fault: str, version: str, mode: KTLSMode, record_figure: Callable[[str, object], None]
) -> None:
    make_fault, words, alerts = FATAL_FAULTS[fault]
    async with trio.open_nursery() as nursery:
        client, peer = await _connect(nursery, version, mode)
        # Valid data follows the fault and must never come out. It also lets the kernel
        # see a TLS 1.2 record shorter than its 13-byte prefix (header and explicit
        # nonce): tls_rx_msg_size() waits for that many bytes before it reads the length,
        # so a lone 6-byte plaintext CCS is only refused once more bytes arrive.
        await peer.stream.send_all(
            peer.seal_data(BEFORE) + make_fault(peer) + peer.seal_data(b"after the fault")
        )
        with trio.fail_after(60):
            assert await receive_exactly(client, len(BEFORE)) == BEFORE
            with pytest.raises(trio.BrokenResourceError, match=words) as failure:
                await client.receive_some()
        print(f"{fault} {version} {mode}: {failure.value!r}")
        assert isinstance(failure.value, TLSProtocolError | trio.BrokenResourceError)
        with pytest.raises(trio.BrokenResourceError):  # and it stays broken
            await client.receive_some()
        with pytest.raises(trio.BrokenResourceError):
            await client.send_all(b"after")
        await client.aclose()
        sent = await peer.alerts_until_eof()
        print(f"  alerts on the wire: {sent}")
        record_figure("error", repr(failure.value))
        record_figure("alerts", repr(sent))
        fatal = [description for level, description in sent if level == FATAL]
        if fatal:
            assert fatal == [fatal[0]] and fatal[0] in alerts, sent
        else:
            # Only the kernel may fail to answer: after a failed decryption it keeps the
            # socket's error and drops what we send (docs/design.md).
            assert mode == "require", f"no alert for {fault} in user space"
        await peer.stream.aclose()


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("mode", MODES)
async def test_empty_data_records_are_harmless(version: str, mode: KTLSMode) -> None:
    """RFC 8446 §5.1 and RFC 5246 §6.2.1 allow zero-length application data."""
    async with trio.open_nursery() as nursery:
        client, peer = await _connect(nursery, version, mode)
        wire = peer.seal_data(BEFORE)  # sealed in wire order: each record has its number
        wire += b"".join(peer.seal(23, b"") for _ in range(3))
        wire += peer.seal_data(b"after")
        await peer.stream.send_all(wire)
        with trio.fail_after(60):
            assert await receive_exactly(client, len(BEFORE) + 5) == BEFORE + b"after"
        await client.aclose()
        await peer.stream.aclose()


@pytest.mark.parametrize("mode", MODES)
async def test_tls12_hello_request_is_declined_and_data_flows(mode: KTLSMode) -> None:
    """RFC 5746 §4.2: a client may refuse renegotiation with a no_renegotiation warning;
    the connection goes on."""
    async with trio.open_nursery() as nursery:
        client, peer = await _connect(nursery, "TLSv1.2", mode)
        hello_request = b"\x00\x00\x00\x00"
        await peer.stream.send_all(
            peer.seal_data(BEFORE) + peer.seal(22, hello_request) + peer.seal_data(b"after")
        )
        with trio.fail_after(60):
            assert await receive_exactly(client, len(BEFORE) + 5) == BEFORE + b"after"
            record = await peer.receive_record()
        assert record == (21, bytes([WARNING, NO_RENEGOTIATION]))
        await client.send_all(b"still working")
        with trio.fail_after(60):
            assert await peer.receive_record() == (23, b"still working")
        await client.aclose()
        await peer.stream.aclose()


# -- the network ------------------------------------------------------------------------


def _reset(stream: trio.SocketStream) -> None:
    """Close with an RST: SO_LINGER on, timeout 0."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("mode", MODES)
async def test_reset_while_receiving(version: str, mode: KTLSMode) -> None:
    async with trio.open_nursery() as nursery:
        client, peer = await _connect(nursery, version, mode)
        await peer.stream.send_all(peer.seal_data(BEFORE))
        with trio.fail_after(60):
            assert await receive_exactly(client, len(BEFORE)) == BEFORE
        _reset(peer.stream)
        with trio.fail_after(60), pytest.raises(trio.BrokenResourceError):
            await client.receive_some()
        await client.aclose()


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("mode", MODES)
async def test_reset_while_sending(version: str, mode: KTLSMode) -> None:
    async with trio.open_nursery() as nursery:
        client, peer = await _connect(nursery, version, mode)
        _reset(peer.stream)

        async def send_until_it_breaks() -> None:
            for _ in range(1000):  # the first sends may still land in buffers
                await client.send_all(b"x" * 65536)

        with trio.fail_after(60), pytest.raises(trio.BrokenResourceError):
            await send_until_it_breaks()
        with pytest.raises(trio.BrokenResourceError):
            await client.send_all(b"x")
        await client.aclose()


@pytest.mark.parametrize("mode", MODES)
async def test_reset_before_the_stream_is_made(mode: KTLSMode) -> None:
    """A client that resets between accept and the stream's construction: the handshake
    says the connection broke (with ktls="require" too: the kernel has kTLS, the TCP
    connection is just gone)."""
    ours, theirs = await tcp_pair()
    _reset(theirs)
    await trio.sleep(0.1)  # let the RST arrive
    async with trio.open_nursery() as nursery:
        server = KTLSStream(
            ours, server_context("TLSv1.3"), nursery=nursery, server_side=True, ktls=mode
        )
        with trio.fail_after(60), pytest.raises(trio.BrokenResourceError, match=r"(?i)lost|reset"):
            await server.do_handshake()
        await server.aclose()


@pytest.mark.parametrize("https_compatible", [False, True])
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("mode", MODES)
async def test_fin_without_close_notify(
    version: str, mode: KTLSMode, https_compatible: bool
) -> None:
    """Like trio.SSLStream: data first, then an error (or, https_compatible, EOF)."""
    async with trio.open_nursery() as nursery:
        client, peer = await _connect(nursery, version, mode, https_compatible=https_compatible)
        await peer.stream.send_all(peer.seal_data(BEFORE))
        await peer.stream.send_eof()
        with trio.fail_after(60):
            assert await receive_exactly(client, len(BEFORE)) == BEFORE
            if https_compatible:
                assert await client.receive_some() == b""
            else:
                with pytest.raises(trio.BrokenResourceError, match="close_notify"):
                    await client.receive_some()
        await client.aclose()
        await peer.stream.aclose()


# -- during the handshake, under serve_ktls_over_tcp ------------------------------------


async def _serve(
    nursery: trio.Nursery,
    handler: Callable[[KTLSStream], Awaitable[None]],
    context: ssl.SSLContext,
    **options: Any,
) -> int:
    """serve_ktls_over_tcp on a free loopback port, in ``nursery``; the port."""
    listeners = await nursery.start(
        partial(trio_ktls.serve_ktls_over_tcp, handler, 0, context, host="127.0.0.1", **options)
    )
    port: int = listeners[0].transport_listener.socket.getsockname()[1]
    return port


def _client_hello() -> bytes:
    """A real ClientHello's first flight, as bytes."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context("TLSv1.3").wrap_bio(incoming, outgoing, server_hostname=HOSTNAME)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


async def _half_hello_then_close(stream: trio.SocketStream) -> None:
    await stream.send_all(_client_hello()[:40])
    await stream.send_eof()


async def _garbage(stream: trio.SocketStream) -> None:
    await stream.send_all(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")


async def _silent(stream: trio.SocketStream) -> None:
    pass  # says nothing at all: the handshake timeout must end it


async def _half_hello_then_reset(stream: trio.SocketStream) -> None:
    await stream.send_all(_client_hello()[:40])
    _reset(stream)


BAD_CLIENTS = [_half_hello_then_close, _garbage, _silent, _half_hello_then_reset]


@pytest.mark.parametrize("mode", MODES)
async def test_bad_clients_during_the_handshake_do_not_disturb_good_ones(mode: KTLSMode) -> None:
    handled: list[bytes | bytearray] = []

    async def echo_once(stream: KTLSStream) -> None:
        data = await stream.receive_some()
        handled.append(data)
        await stream.send_all(data)

    async with trio.open_nursery() as nursery:
        port = await _serve(
            nursery, echo_once, server_context("TLSv1.3"), ktls=mode, handshake_timeout=10
        )

        async def bad_client(behave: Callable[[trio.SocketStream], Awaitable[None]]) -> None:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await behave(stream)
            if behave is _half_hello_then_reset:
                return
            # The server closes: EOF (or a reset) within the handshake timeout and a margin.
            with trio.fail_after(60):
                try:
                    while await stream.receive_some():
                        pass
                except trio.BrokenResourceError:
                    pass
            await stream.aclose()

        async def good_client(index: int) -> None:
            async with trio_ktls.open_ktls_stream(
                "127.0.0.1",
                port,
                ssl_context=client_context("TLSv1.3"),
                server_hostname=HOSTNAME,
                ktls=mode,
            ) as stream:
                message = f"good {index}".encode()
                await stream.send_all(message)
                assert await receive_exactly(stream, len(message)) == message

        with trio.fail_after(120):
            async with trio.open_nursery() as clients:
                for behave in BAD_CLIENTS:
                    clients.start_soon(bad_client, behave)
                for index in range(4):
                    clients.start_soon(good_client, index)
        nursery.cancel_scope.cancel()
    assert sorted(handled) == sorted(f"good {i}".encode() for i in range(4))


# -- cancellation at random points ------------------------------------------------------


def _open_descriptors() -> dict[str, str]:
    """Descriptors open now (number: target), once garbage (streams and contexts in
    reference cycles, which close theirs when collected) is gone."""
    gc.collect()
    descriptors = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone
            descriptors[name] = os.readlink(f"/proc/self/fd/{name}")
    return descriptors


@pytest.mark.parametrize("mode", MODES)
async def test_cancellation_at_random_points(
    mode: KTLSMode, tmp_path: Path, record_figure: Callable[[str, object], None]
) -> None:
    """Every operation cancelled at random moments, many times (seeded; the seed is
    printed): a cancelled receive loses nothing, a cancelled send or handshake leaves the
    stream broken with a clear error, update_keys leaves it usable, aclose still closes;
    no task or descriptor outlives the nursery."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    print(f"seed {seed}")
    record_figure("seed", seed)
    path = tmp_path / "file"
    path.write_bytes(rng.randbytes(256 * 1024))
    before = _open_descriptors()
    outcomes: dict[str, int] = {}
    rounds = 300 if GUEST_KERNEL is None else 100  # emulated guests are ~10x slower
    for _ in range(rounds):
        key = await _random_round(mode, path, rng)
        outcomes[key] = outcomes.get(key, 0) + 1
    assert _open_descriptors() == before
    print(f"{rounds} rounds: {dict(sorted(outcomes.items()))}")
    record_figure("outcomes", repr(dict(sorted(outcomes.items()))))


async def _random_round(mode: KTLSMode, path: Path, rng: random.Random) -> str:
    """One operation on a fresh pair, cancelled at a random moment; what happened."""
    operation = rng.choice(
        ["do_handshake", "send_all", "send_file", "receive_some", "update_keys", "aclose"]
    )
    deadline = rng.random() * 0.003
    async with trio.open_nursery() as nursery:
        client, server = await ktls_pair_maker(
            nursery, rng.choice(VERSIONS), mode, handshake=operation != "do_handshake"
        )()
        cancelled = await _cancel_one(operation, deadline, client, server, path, rng)
        await client.aclose()
        await server.aclose()
    return f"{operation}:{'cancelled' if cancelled else 'finished'}"


async def _cancel_one(
    operation: str,
    deadline: float,
    client: KTLSStream,
    server: KTLSStream,
    path: Path,
    rng: random.Random,
) -> bool:
    if operation == "do_handshake":
        with trio.move_on_after(deadline) as scope:
            async with trio.open_nursery() as both:
                both.start_soon(client.do_handshake)
                both.start_soon(server.do_handshake)
        if scope.cancelled_caught:
            for stream in (client, server):
                if stream.ktls_info is None:  # cancelled before its handshake finished
                    with pytest.raises(trio.BrokenResourceError):
                        await stream.send_all(b"x")
        return scope.cancelled_caught
    if operation in ("send_all", "send_file"):
        payload = await trio.Path(path).read_bytes()
        with trio.move_on_after(deadline) as scope:
            if operation == "send_all":
                await client.send_all(payload)
            else:
                with path.open("rb") as f:
                    await client.send_file(f)
        if scope.cancelled_caught:
            failure: trio.BrokenResourceError | None = None
            try:
                await client.send_all(b"more")
            except trio.BrokenResourceError as exc:
                failure = exc
            if failure is not None:
                assert "cancelled midway" in str(failure)
            else:
                # Cancelled while it checked the file (in a thread), before any write: the
                # stream is intact and nothing of the file went out.
                assert operation == "send_file"
                assert await receive_exactly(server, 4) == b"more"
        else:
            assert await receive_exactly(server, len(payload)) == payload
        return scope.cancelled_caught
    if operation == "receive_some":
        payload = rng.randbytes(200_000)
        received = bytearray()
        cancelled = 0
        with trio.fail_after(120):  # with data lost this would wait forever
            async with trio.open_nursery() as io:
                io.start_soon(server.send_all, payload)
                while len(received) < len(payload):
                    with trio.move_on_after(rng.random() * 0.001) as scope:
                        received += await client.receive_some(rng.randrange(1, 70_000))
                    cancelled += scope.cancelled_caught
        assert bytes(received) == payload
        return cancelled > 0
    if operation == "update_keys":
        with trio.move_on_after(deadline) as scope:
            with contextlib.suppress(trio_ktls.KeyUpdateUnavailableError):
                await client.update_keys()
        await client.send_all(b"usable")
        assert await receive_exactly(server, 6) == b"usable"
        return scope.cancelled_caught
    with trio.move_on_after(deadline) as scope:
        await client.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await client.send_all(b"x")
    return scope.cancelled_caught


# -- load and resources -----------------------------------------------------------------


def _any_version_server_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    SERVER_CERT.configure_cert(context)
    return context


@pytest.mark.parametrize("mode", MODES)
async def test_many_concurrent_clients(
    mode: KTLSMode, record_figure: Callable[[str, object], None]
) -> None:
    """200 clients at once, TLS 1.2 and 1.3 mixed, each echoing 256 KiB byte-exact
    through serve_ktls_over_tcp; afterwards every descriptor is closed again."""
    clients, size = 200, 256 * 1024
    before = _open_descriptors()

    async def echo(stream: KTLSStream) -> None:
        while data := await stream.receive_some():
            await stream.send_all(data)

    async with trio.open_nursery() as nursery:
        port = await _serve(
            nursery, echo, _any_version_server_context(), ktls=mode, backlog=clients
        )

        async def client(index: int) -> None:
            payload = random.Random(index).randbytes(size)
            async with trio_ktls.open_ktls_stream(
                "127.0.0.1",
                port,
                ssl_context=client_context(VERSIONS[index % 2]),
                server_hostname=HOSTNAME,
                ktls=mode,
            ) as stream:
                async with trio.open_nursery() as io:
                    io.start_soon(stream.send_all, payload)
                    assert await receive_exactly(stream, size) == payload
                await stream.send_eof()
                assert await stream.receive_some() == b""

        with trio.fail_after(600):
            async with trio.open_nursery() as all_clients:
                for index in range(clients):
                    all_clients.start_soon(client, index)
        nursery.cancel_scope.cancel()
    assert _open_descriptors() == before
    print(f"{clients} clients echoed {clients * size} bytes each way")
    record_figure("bytes_each_way", clients * size)


@pytest.mark.parametrize("mode", MODES)
async def test_no_descriptor_or_key_log_growth_across_handshakes(
    mode: KTLSMode, record_figure: Callable[[str, object], None]
) -> None:
    """Many handshakes on two contexts, a third of them failing certificate checks: the
    descriptor count comes back, and the contexts' in-memory key logs end empty."""
    from trio_ktls._handoff import KeyLogTap

    rounds = 2000 if GUEST_KERNEL is None else 100  # emulated guests are ~10x slower
    client_ctx, server_ctx = client_context("TLSv1.3"), server_context("TLSv1.3")
    failed = 0
    before: dict[str, str] = {}
    for index in range(rounds):
        if index == 1:  # after the first round has tapped both contexts' key logs
            before = _open_descriptors()
        ours, theirs = await tcp_pair()
        bad = index % 3 == 0
        async with trio.open_nursery() as nursery:
            client = KTLSStream(
                ours,
                client_ctx,
                nursery=nursery,
                server_hostname="wrong.example" if bad else HOSTNAME,
                ktls=mode,
            )
            server = KTLSStream(theirs, server_ctx, nursery=nursery, server_side=True, ktls=mode)
            async with trio.open_nursery() as both:
                both.start_soon(_handshake_or_fail, client)
                both.start_soon(_handshake_or_fail, server)
            assert (client.ktls_info is None) is bad
            failed += bad
            await client.aclose()
            await server.aclose()
    assert failed == len(range(0, rounds, 3))
    if mode != "off":
        for context in (client_ctx, server_ctx):
            tap = KeyLogTap.for_context(context)
            assert len(tap._collector) == 0
            assert os.fstat(tap._fd).st_size == 0
    assert _open_descriptors() == before
    print(f"{rounds} handshakes ({failed} failed): no descriptor or key-log growth")
    record_figure("handshakes", rounds)
    record_figure("failed", failed)


async def _receive_until_failure(stream: KTLSStream) -> None:
    while True:
        await stream.receive_some()


async def _handshake_or_fail(stream: KTLSStream) -> None:
    with contextlib.suppress(trio.BrokenResourceError):
        await stream.do_handshake()


# -- secrets ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("mode", MODES)
async def test_no_secret_leaks(
    version: str,
    mode: KTLSMode,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a key log file of the user's own, no traffic secret shows up in any repr, in
    ktls_info, in an exception or in the library's DEBUG log; the library writes no file
    but that one."""
    caplog.set_level("DEBUG", logger="trio_ktls")
    key_log = tmp_path / "keys.log"
    client_ctx, server_ctx = client_context(version), server_context(version)
    client_ctx.keylog_filename = server_ctx.keylog_filename = str(key_log)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    text: list[str] = []
    async with trio.open_nursery() as nursery:
        ours, theirs = await tcp_pair()
        client = KTLSStream(ours, client_ctx, nursery=nursery, server_hostname=HOSTNAME, ktls=mode)
        server = KTLSStream(theirs, server_ctx, nursery=nursery, server_side=True, ktls=mode)
        async with trio.open_nursery() as both:
            both.start_soon(client.do_handshake)
            both.start_soon(server.do_handshake)
        with contextlib.suppress(trio_ktls.KeyUpdateUnavailableError):
            await client.update_keys(request_peer_update=True)
        await client.send_all(b"hello")
        assert await receive_exactly(server, 5) == b"hello"
        for stream in (client, server):
            text += [repr(stream), repr(stream.ktls_info), str(stream.ktls_info)]
            text += [repr(stream._layer), repr(getattr(stream._layer, "_keys", None))]
        await trio.aclose_forcefully(theirs)  # a truncation: an error with a cause chain
        with pytest.raises(trio.BrokenResourceError) as failure:
            await _receive_until_failure(client)
        error: BaseException | None = failure.value
        while error is not None:
            text += [str(error), repr(error)]
            error = error.__cause__ or error.__context__
        await client.aclose()
        await server.aclose()
    text += [record.getMessage() for record in caplog.records]
    lines = (await trio.Path(key_log).read_text()).splitlines()
    secrets = [line.split()[-1] for line in lines if line.strip()]
    assert secrets
    blob = "\n".join(text).lower()
    for secret in secrets:
        assert secret.lower() not in blob
    assert sorted(await trio.to_thread.run_sync(os.listdir, tmp_path)) == ["cwd", "keys.log"]
    assert await trio.to_thread.run_sync(os.listdir, work) == []
