"""send_file: files through the stream, and the writer lock around them."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import trio
import trio.testing

from trio_ktls import KTLSMode

from .helpers import MODES, kernel_can_rekey, ktls_pair_maker, receive_exactly

REKEY = kernel_can_rekey

MiB = 1024 * 1024


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
@pytest.mark.parametrize("mode", MODES)
async def test_send_file_is_byte_exact(tmp_path: Path, version: str, mode: KTLSMode) -> None:
    content = os.urandom(16 * MiB + 12345)
    path = tmp_path / "payload"
    path.write_bytes(content)
    async with trio.open_nursery() as nursery:
        client, server = await ktls_pair_maker(nursery, version, mode)()
        with path.open("rb") as f:
            async with trio.open_nursery() as io:
                io.start_soon(server.send_file, f)
                assert await receive_exactly(client, len(content)) == content
            # A slice, by offset and count, from a descriptor.
            async with trio.open_nursery() as io:
                io.start_soon(lambda: server.send_file(f.fileno(), offset=1000, count=5000))
                assert await receive_exactly(client, 5000) == content[1000:6000]
            assert f.tell() == 0  # the file position is not used
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
        with path.open("rb") as f:
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
