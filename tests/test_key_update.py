"""The key lifecycle after the handoff: KeyUpdate both ways, the writer lock, limits.

All in the kernel matrix. Where the kernel can replace kTLS keys (6.14+: the 6.18 and 7.x
guests) data must keep flowing byte-exact through every update; where it cannot (6.1,
6.12) ``update_keys`` must refuse with `KeyUpdateUnavailableError` (the stream still
works), and a peer's KeyUpdate must break the stream with `KTLSRekeyFailedError`: never a
hang, never undecryptable data.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from trio_ktls import (
    ConfidentialityLimitError,
    KeyUpdateUnavailableError,
    KTLSRekeyFailedError,
    KTLSStream,
    _kernel,
)
from trio_ktls._keyschedule import lookup_suite, tls_version_from_name
from trio_ktls._probe import read_tls_stat, tls13_rekey_supported

from .helpers import (
    HOSTNAME,
    OPENSSL,
    ProcessOutput,
    client_context,
    connect_when_listening,
    free_port,
    kernel_can_rekey,
    ktls_pair_maker,
    receive_exactly,
    server_context,
    server_pem_file,
    start_openssl,
)

pytestmark = pytest.mark.ktls

MiB = 1024 * 1024
REKEY = kernel_can_rekey


def _pattern(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


async def test_many_key_updates_while_data_flows_both_ways() -> None:
    """1000 KeyUpdates from each side (every other one asking the peer to update too),
    interleaved with send_all calls of random sizes, while 64 MiB flow each way."""
    size, updates = (64 * MiB, 1000) if REKEY() else (4 * MiB, 0)
    tls13_rekey_supported()  # the library's own (cached) probe rekeys a throw-away pair
    stat_before = read_tls_stat()
    async with trio.open_nursery() as nursery:
        client, server = await ktls_pair_maker(nursery, "TLSv1.3", "require")()
        received: dict[str, bytes] = {}

        async def sender(stream: KTLSStream, seed: int) -> None:
            data, rng = _pattern(seed, size), random.Random(seed + 1)
            offset, done = 0, 0
            while offset < size:
                step = rng.randrange(1, 256 * 1024)
                await stream.send_all(data[offset : offset + step])
                offset += step
                # Spread the updates over the transfer, sometimes several in a row.
                while done < updates and done * size < offset * updates:
                    await stream.update_keys(request_peer_update=done % 2 == 1)
                    done += 1
            while done < updates:
                await stream.update_keys()
                done += 1
            if not updates:
                # Before 6.14: refused up front, and the data flow is not disturbed.
                with pytest.raises(KeyUpdateUnavailableError, match=r"6\.14"):
                    await stream.update_keys()

        async def receiver(stream: KTLSStream, name: str) -> None:
            received[name] = await receive_exactly(stream, size)

        async with trio.open_nursery() as io:
            io.start_soon(sender, client, 1)
            io.start_soon(sender, server, 2)
            io.start_soon(receiver, server, "client->server")
            io.start_soon(receiver, client, "server->client")
        assert received["client->server"] == _pattern(1, size)
        assert received["server->client"] == _pattern(2, size)
        for stream, peer in ((client, server), (server, client)):
            info, peer_info = stream.ktls_info, peer.ktls_info
            assert info is not None and peer_info is not None
            # Our 1000, plus one answer to each of the peer's 500 requests (at most:
            # an answer may be folded into an update that was already pending).
            assert updates <= info.key_updates_sent <= updates + updates // 2
            assert peer_info.key_updates_received == info.key_updates_sent
        sent = client.ktls_info.key_updates_sent + server.ktls_info.key_updates_sent  # type: ignore[union-attr]
        await client.aclose()
        await server.aclose()
    stat_after = read_tls_stat()
    for counter in ("TlsTxRekeyOk", "TlsRxRekeyOk"):  # absent before 6.14
        assert stat_after.get(counter, 0) - stat_before.get(counter, 0) == sent
    print(f"key updates: {sent} (TlsTxRekeyOk and TlsRxRekeyOk agree)")


async def test_first_key_update_probes_the_kernel_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whether the kernel can rekey is found out once per process by rekeying throw-away
    sockets (blocking calls and waits). In a fresh process (the cached answer cleared
    here) the first key update must find it out in a worker thread: the instrumented
    probe below cannot finish unless another task on the event loop ticks meanwhile."""
    from trio_ktls import _probe

    monkeypatch.setattr(_probe, "_rekey_answer", None)
    _probe.tls13_rekey_supported.cache_clear()
    real_probe = _probe._probe_rekey
    probe_running, ticked_meanwhile = threading.Event(), threading.Event()
    trio_thread = threading.current_thread()

    def instrumented() -> tuple[bool | None, bool | None, str | None]:
        assert threading.current_thread() is not trio_thread
        probe_running.set()
        assert ticked_meanwhile.wait(timeout=120), "the event loop stood still"
        return real_probe()

    monkeypatch.setattr(_probe, "_probe_rekey", instrumented)

    async def ticker() -> None:
        while not probe_running.is_set():  # noqa: ASYNC110 (a thread sets it)
            await trio.sleep(0.001)
        await trio.lowlevel.checkpoint()  # a tick while the probe is under way
        ticked_meanwhile.set()

    async with trio.open_nursery() as nursery:
        client, server = await ktls_pair_maker(nursery, "TLSv1.3", "require")()
        nursery.start_soon(ticker)
        if REKEY():
            await client.update_keys()
        else:
            with pytest.raises(KeyUpdateUnavailableError, match=r"6\.14"):
                await client.update_keys()
        assert ticked_meanwhile.is_set()
        await client.aclose()
        await server.aclose()
    _probe.tls13_rekey_supported.cache_clear()


async def test_key_update_refused_cleanly_without_kernel_rekey() -> None:
    async with trio.open_nursery() as nursery:
        for version in ("TLSv1.2", "TLSv1.3"):
            client, server = await ktls_pair_maker(nursery, version, "require")()
            if version == "TLSv1.3" and REKEY():
                await client.update_keys()
                expected = 1
            else:
                with pytest.raises(KeyUpdateUnavailableError, match="cannot update"):
                    await client.update_keys()
                expected = 0
            # Refusing happens before anything is sent: the stream still works.
            await client.send_all(b"still fine")
            assert await receive_exactly(server, 10) == b"still fine"
            assert client.ktls_info.key_updates_sent == expected  # type: ignore[union-attr]
            await client.aclose()
            await server.aclose()


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
@pytest.mark.parametrize("trigger", ["own-limit", "peer-request"])
async def test_automatic_rekey_at_lowered_threshold(version: str, trigger: str) -> None:
    """own-limit: ``rekey_after_records=200`` on the sender, whose kernel rec_seq must
    never pass it. peer-request: the receiver asks the sender for new keys once the
    sender's records reach 150. Where keys cannot be replaced (TLS 1.2, kernels before
    6.14) the sender closes cleanly at its own limit, and the receiver asks for nothing."""
    threshold = 200
    rotates = version == "TLSv1.3" and REKEY()
    own_limit = trigger == "own-limit"
    async with trio.open_nursery() as nursery:
        client, server = await ktls_pair_maker(
            nursery,
            version,
            "require",
            client_options={"rekey_after_records": threshold} if own_limit else {},
            server_options={} if own_limit else {"request_peer_rekey_after_records": 150},
        )()
        transport = client.transport_stream
        assert isinstance(transport, trio.SocketStream)
        sock = transport.socket
        suite = lookup_suite(client.cipher()[0], tls_version_from_name(version))
        assert suite is not None
        cipher = _kernel.KERNEL_CIPHER_FOR_AEAD[suite.aead]
        data = _pattern(3, 8 * MiB)  # 512 full records at least
        received = bytearray()
        highest_seq = 0

        async def receive_all() -> None:
            while chunk := await server.receive_some():
                received.extend(chunk)

        async with trio.open_nursery() as io:
            io.start_soon(receive_all)
            refused: ConfidentialityLimitError | None = None
            try:
                for start in range(0, len(data), 32 * 1024):
                    await client.send_all(data[start : start + 32 * 1024])
                    seq = _kernel.read_rec_seq(sock, _kernel.TLS_TX, cipher)
                    highest_seq = max(highest_seq, seq)
                    if own_limit:
                        assert seq <= threshold
                await client.send_eof()
            except ConfidentialityLimitError as exc:
                refused = exc
        info, server_info = client.ktls_info, server.ktls_info
        assert info is not None
        assert server_info is not None
        if rotates or not own_limit:
            assert refused is None, refused
            assert bytes(received) == data
        if rotates:
            assert info.key_updates_sent >= len(data) // (16384 * threshold)
            assert server_info.key_updates_received == info.key_updates_sent
            if not own_limit:  # the requests were KeyUpdates from the server
                assert server_info.key_updates_sent >= 2
        elif own_limit:
            # Closed cleanly: what arrived is an exact prefix, then close_notify.
            assert refused is not None
            assert "limit" in str(refused)
            assert 0 < len(received) < len(data)
            assert bytes(received) == data[: len(received)]
        else:
            assert info.key_updates_sent == server_info.key_updates_sent == 0
        print(
            f"{version} {trigger}: highest TX rec_seq {highest_seq}, "
            f"key updates {info.key_updates_sent}"
        )
        await client.aclose()
        await server.aclose()


SUITES_13 = ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"]


async def _key_updates_received(stream: KTLSStream, count: int) -> None:
    """Wait until the reader task has taken ``count`` KeyUpdates from the peer: the
    sign that openssl read its 'k'/'K' command alone (a command and the next line read
    together would be taken as one command) and acted on it."""
    with trio.fail_after(60):
        while stream.ktls_info.key_updates_received < count:  # type: ignore[union-attr]  # noqa: ASYNC110
            await trio.sleep(0.01)


@pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")
@pytest.mark.parametrize("suite", SUITES_13)
async def test_openssl_s_client_sends_key_updates(tmp_path: Path, suite: str) -> None:
    """openssl s_client, interactive: 'k' sends KeyUpdate, 'K' one that asks us to update
    too. On 6.14+ data keeps flowing both ways; before, our server fails clearly."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    args = ["s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3", "-ciphersuites", suite,
            "-noservername"]  # fmt: skip
    async with trio.open_nursery() as nursery:
        proc = await start_openssl(nursery, args)
        tcp = await listener.accept()
        await listener.aclose()
        server = KTLSStream(tcp, server_context("TLSv1.3"), nursery=nursery, server_side=True,
                            ktls="require")  # fmt: skip
        await server.do_handshake()
        client_out = ProcessOutput()
        nursery.start_soon(client_out.collect, proc.stdout)
        await proc.stdin.send_all(b"one\n")
        assert await receive_exactly(server, 4) == b"one\n"
        if not REKEY():
            await proc.stdin.send_all(b"k\n")
            with pytest.raises(KTLSRekeyFailedError, match=r"6\.14"):
                with trio.fail_after(60):
                    await server.receive_some()
            await server.aclose()
            await proc.stdin.aclose()
            await proc.wait()
            return
        commands = ((b"k\n", b"two\n"), (b"K\n", b"three\n"), (b"k\n", b"four\n"))
        for count, (command, line) in enumerate(commands, start=1):
            await proc.stdin.send_all(command)
            await _key_updates_received(server, count)
            await proc.stdin.send_all(line)
            assert await receive_exactly(server, len(line)) == line
            await server.send_all(b"echo " + line)
        with trio.fail_after(60):
            await client_out.wait_for(b"echo four\n")
        assert b"echo two\n" in client_out.data
        assert b"echo three\n" in client_out.data
        info = server.ktls_info
        assert info is not None
        assert info.key_updates_received == 3
        assert info.key_updates_sent == 1  # the answer to 'K'
        await proc.stdin.aclose()
        assert await server.receive_some() in (b"",)
        await server.aclose()
        await proc.wait()


@pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")
@pytest.mark.parametrize("suite", SUITES_13)
async def test_openssl_s_server_sends_key_updates(tmp_path: Path, suite: str) -> None:
    server_pem = server_pem_file(tmp_path)
    port = free_port()
    args = ["s_server", "-accept", f"127.0.0.1:{port}", "-naccept", "1",
            "-cert", str(server_pem), "-key", str(server_pem), "-tls1_3",
            "-ciphersuites", suite]  # fmt: skip
    async with trio.open_nursery() as nursery:
        proc = await start_openssl(nursery, args)
        server_out = ProcessOutput()
        nursery.start_soon(server_out.collect, proc.stdout)
        tcp = await connect_when_listening(port)
        client = KTLSStream(tcp, client_context("TLSv1.3"), nursery=nursery,
                            server_hostname=HOSTNAME, ktls="require")  # fmt: skip
        await client.do_handshake()
        await proc.stdin.send_all(b"one\n")
        assert await receive_exactly(client, 4) == b"one\n"
        if not REKEY():
            await proc.stdin.send_all(b"k\n")
            with pytest.raises(KTLSRekeyFailedError, match=r"6\.14"):
                with trio.fail_after(60):
                    await client.receive_some()
            await client.aclose()
        else:
            commands = ((b"k\n", b"two\n"), (b"K\n", b"three\n"))
            for count, (command, line) in enumerate(commands, start=1):
                await proc.stdin.send_all(command)
                await _key_updates_received(client, count)
                await proc.stdin.send_all(line)
                assert await receive_exactly(client, len(line)) == line
                await client.send_all(b"echo " + line)
            with trio.fail_after(60):
                await server_out.wait_for(b"echo three\n")
            info = client.ktls_info
            assert info is not None
            assert info.key_updates_received == 2
            assert info.key_updates_sent == 1
            await client.aclose()
        await proc.stdin.aclose()
        with trio.fail_after(60):
            await proc.wait()
