"""Shared test helpers: a trustme CA, TLS contexts, connected TCP pairs."""

from __future__ import annotations

import shutil
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from trio_ktls import KTLSMode, KTLSStream

CA = trustme.CA()
SERVER_CERT = CA.issue_cert("trio-ktls.example", "127.0.0.1")
HOSTNAME = "trio-ktls.example"

TLS_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


def server_context(version: str, *, ciphers: str | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    SERVER_CERT.configure_cert(ctx)
    ctx.minimum_version = ctx.maximum_version = TLS_VERSIONS[version]
    if ciphers:
        ctx.set_ciphers(ciphers)
    return ctx


def client_context(version: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    CA.configure_trust(ctx)
    ctx.minimum_version = ctx.maximum_version = TLS_VERSIONS[version]
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


#: The two ways every stream test runs: user space on any host, and offloaded in the
#: kernel matrix (where both directions must really be in the kernel).
MODES = [pytest.param("off", id="user-space"), pytest.param("require", marks=pytest.mark.ktls)]

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")


def assert_mode(stream: KTLSStream, mode: KTLSMode) -> None:
    """Both directions offloaded with ``require`` (and with ``auto`` where the kernel has
    kTLS); neither, with a reason, otherwise."""
    from .conftest import kernel_probe

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
