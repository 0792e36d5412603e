"""send_file: files through the stream, and the writer lock around them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.testing

from trio_ktls import KTLSMode

from .helpers import MODES, ktls_pair_maker, receive_exactly
from .test_key_update import REKEY

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
async def test_send_file_shorter_than_count_breaks_the_stream(
    tmp_path: Path, mode: KTLSMode
) -> None:
    path = tmp_path / "short"
    path.write_bytes(b"x" * 100)
    async with trio.open_nursery() as nursery:
        client, server = await ktls_pair_maker(nursery, "TLSv1.3", mode)()
        fd = os.open(path, os.O_RDONLY)
        try:
            with pytest.raises(EOFError, match="bytes before the requested count"):
                await server.send_file(fd, count=200)
        finally:
            os.close(fd)
        assert await receive_exactly(client, 100) == b"x" * 100
        with pytest.raises(trio.BrokenResourceError):
            await server.send_all(b"more")
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
