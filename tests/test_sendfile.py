"""send_file: files through the stream, and the writer lock around them."""

from __future__ import annotations

import io
import os
import socket
from pathlib import Path

import pytest
import trio
import trio.testing

import trio_ktls
from trio_ktls import KTLSMode
from trio_ktls._probe import zero_copy_send_file_works

from .helpers import (
    GUEST_KERNEL,
    KERNEL_LINES,
    MODES,
    kernel_can_rekey,
    ktls_pair_maker,
    receive_exactly,
)

REKEY = kernel_can_rekey

MiB = 1024 * 1024


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
@pytest.mark.parametrize("mode", MODES)
async def test_send_file_is_byte_exact(tmp_path: Path, version: str, mode: KTLSMode) -> None:
    """64 MiB (and a bit: not page-aligned), then a slice; zero-copy when offloaded."""
    content = os.urandom(64 * MiB + 12345)
    path = tmp_path / "payload"
    path.write_bytes(content)
    async with trio.open_nursery() as nursery:
        client, server = await ktls_pair_maker(nursery, version, mode)()
        assert server.ktls_info is not None
        expected = mode == "require" and (
            KERNEL_LINES[GUEST_KERNEL].zero_copy_send_file
            if GUEST_KERNEL
            else zero_copy_send_file_works()
        )
        assert server.ktls_info.zero_copy_send_file is expected
        transport = server.transport_stream
        assert isinstance(transport, trio.SocketStream)
        sock = transport.socket
        lowat = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)
        with path.open("rb") as f, trio.fail_after(300):  # a stall is a failure
            async with trio.open_nursery() as io:
                io.start_soon(server.send_file, f)
                assert await receive_exactly(client, len(content)) == content
            # A slice, by offset and count, from a descriptor.
            async with trio.open_nursery() as io:
                io.start_soon(lambda: server.send_file(f.fileno(), offset=1000, count=5000))
                assert await receive_exactly(client, 5000) == content[1000:6000]
            assert f.tell() == 0  # the file position is not used
        # The zero-copy path lifts trio's low-water mark only for its transfer.
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == lowat
        await server.aclose()
        assert await client.receive_some() == b""
        await client.aclose()


@pytest.mark.parametrize("mode", MODES)
async def test_send_file_checks_its_arguments_before_sending(
    tmp_path: Path, mode: KTLSMode
) -> None:
    path = tmp_path / "short"
    path.write_bytes(b"x" * 100)
    async with trio.open_nursery() as nursery:
        client, server = await ktls_pair_maker(nursery, "TLSv1.3", mode)()
        fd = os.open(path, os.O_RDONLY)
        try:
            with pytest.raises(ValueError, match="100 bytes: 200 from offset 0 is past its end"):
                await server.send_file(fd, count=200)
            with pytest.raises(ValueError, match="past its end"):
                await server.send_file(fd, offset=101, count=0)
            with pytest.raises(ValueError, match="negative"):
                await server.send_file(fd, offset=-1)
            with pytest.raises(TypeError, match="no file descriptor"):
                await server.send_file(io.BytesIO(b"in memory"))
            # Nothing was sent: the stream still works, and the file's tail goes out.
            await server.send_file(fd, offset=90)
        finally:
            os.close(fd)
        assert await receive_exactly(client, 10) == b"x" * 10
        await server.send_all(b"ok")
        assert await receive_exactly(client, 2) == b"ok"
        await server.aclose()
        await client.aclose()


@pytest.mark.ktls
async def test_key_update_waits_for_a_blocked_send_file(tmp_path: Path) -> None:
    """While send_file is blocked on a full socket (the peer is not reading), a KeyUpdate
    from another task waits for the writer lock's next chunk boundary: no byte of the file
    is sent under a key the peer does not expect."""
    content = os.urandom(8 * MiB)
    path = tmp_path / "payload"
    path.write_bytes(content)
    async with trio.open_nursery() as nursery:
        client, server = await ktls_pair_maker(nursery, "TLSv1.3", "require")()
        with path.open("rb") as f, trio.fail_after(300):  # a stall is a failure
            async with trio.open_nursery() as io:
                io.start_soon(server.send_file, f)
                await trio.testing.wait_all_tasks_blocked()  # send_file is stuck now
                if REKEY():
                    io.start_soon(server.update_keys)
                received = await receive_exactly(client, len(content))
        assert received == content
        info = server.ktls_info
        assert info is not None
        assert info.key_updates_sent == (1 if REKEY() else 0)
        assert client.ktls_info.key_updates_received == info.key_updates_sent  # type: ignore[union-attr]
        await server.aclose()
        await client.aclose()


@pytest.mark.ktls
async def test_send_file_with_100_peer_requested_key_updates(tmp_path: Path) -> None:
    """While 64 MiB go out through send_file, the receiver sends 100 KeyUpdates that ask
    for ours: each answer goes out between two sendfile calls, never inside a record, and
    the file arrives byte-exact (6.14+; before, the first one breaks the stream cleanly)."""
    content = os.urandom(64 * MiB)
    path = tmp_path / "payload"
    path.write_bytes(content)
    updates = 100
    async with trio.open_nursery() as nursery:
        client, server = await ktls_pair_maker(nursery, "TLSv1.3", "require")()
        if not REKEY():
            with pytest.raises(trio_ktls.KeyUpdateUnavailableError):
                await client.update_keys(request_peer_update=True)
            await client.aclose()
            await server.aclose()
            return
        received = bytearray()

        async def receive_and_update() -> None:
            done = 0
            while len(received) < len(content):
                received.extend(await client.receive_some())
                while done < updates and done * len(content) <= len(received) * updates:
                    await client.update_keys(request_peer_update=True)
                    done += 1
            while done < updates:
                await client.update_keys(request_peer_update=True)
                done += 1

        with path.open("rb") as f, trio.fail_after(300):  # a stall is a failure
            async with trio.open_nursery() as io:
                io.start_soon(server.send_file, f)
                io.start_soon(receive_and_update)
        assert bytes(received) == content
        client_info, server_info = client.ktls_info, server.ktls_info
        assert client_info is not None and server_info is not None
        assert client_info.key_updates_sent == updates
        assert server_info.key_updates_received == updates
        # Answers fold into one another when several requests arrive between two calls.
        assert 1 <= server_info.key_updates_sent <= updates
        assert client_info.key_updates_received == server_info.key_updates_sent
        print(f"send_file: {server_info.key_updates_sent} answers to {updates} requests")
        await server.aclose()
        await client.aclose()


@pytest.mark.ktls
async def test_cancelled_send_file_stops_waiting_for_a_peer_that_does_not_read(
    tmp_path: Path,
) -> None:
    """The zero-copy path waits for room in a worker thread; a cancelled send_file must
    not leave that thread polling a socket the peer never drains. More than loopback's
    socket buffers hold, a peer that reads nothing, a cancellation: send_file returns,
    and the stream reports the cancelled write."""
    path = tmp_path / "payload"
    path.write_bytes(os.urandom(32 * MiB))
    async with trio.open_nursery() as nursery:
        client, server = await ktls_pair_maker(nursery, "TLSv1.3", "require")()
        with path.open("rb") as f, trio.fail_after(120):  # a thread left polling hangs here
            with trio.move_on_after(2) as scope:
                await server.send_file(f)
        assert scope.cancelled_caught
        with pytest.raises(trio.BrokenResourceError, match="cancelled midway"):
            await server.send_all(b"more")
        await server.aclose()
        await client.aclose()
