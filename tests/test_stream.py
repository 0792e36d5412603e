"""KTLSStream: trio's stream conformance suites, the handoff, close semantics, fallback.

Tests marked ``ktls`` run in the kernel matrix and insist that both directions really
were offloaded; unmarked ones run everywhere (on the host, in user space).
"""

from __future__ import annotations

import os
import random
import ssl
from collections.abc import Callable

import pytest
import trio
import trio.testing

import trio_ktls
from trio_ktls import KTLSStream, KTLSUnavailableError
from trio_ktls._handoff import KeyLogTap

from .helpers import (
    HOSTNAME,
    MODES,
    VERSIONS,
    assert_mode,
    client_context,
    kernel_probe,
    ktls_pair_maker,
    server_context,
    tcp_pair,
)

# "auto" runs where the suite runs: on the host it is the user-space fallback.
CONFORMANCE_MODES = [pytest.param("auto", id="auto"), *MODES]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("mode", CONFORMANCE_MODES)
async def test_two_way_conformance(version: str, mode: trio_ktls.KTLSMode) -> None:
    async with trio.open_nursery() as nursery:
        make = ktls_pair_maker(nursery, version, mode)

        async def checked() -> tuple[KTLSStream, KTLSStream]:
            client, server = await make()
            assert_mode(client, mode)
            assert_mode(server, mode)
            return client, server

        await trio.testing.check_two_way_stream(checked, None)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("mode", CONFORMANCE_MODES)
async def test_half_closeable_conformance(version: str, mode: trio_ktls.KTLSMode) -> None:
    async with trio.open_nursery() as nursery:
        await trio.testing.check_half_closeable_stream(
            ktls_pair_maker(nursery, version, mode), None
        )


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ktls_side", ["client", "server"])
async def test_mixed_pair_with_trio_sslstream(
    version: str, mode: trio_ktls.KTLSMode, ktls_side: str
) -> None:
    """One end trio_ktls, the other plain trio.SSLStream: they interoperate."""
    async with trio.open_nursery() as nursery:

        async def make() -> tuple[trio.abc.Stream, trio.abc.Stream]:
            client_tcp, server_tcp = await tcp_pair()
            if ktls_side == "client":
                a: trio.abc.Stream = KTLSStream(
                    client_tcp,
                    client_context(version),
                    nursery=nursery,
                    server_hostname=HOSTNAME,
                    ktls=mode,
                )
                b: trio.abc.Stream = trio.SSLStream(
                    server_tcp, server_context(version), server_side=True
                )
            else:
                a = trio.SSLStream(client_tcp, client_context(version), server_hostname=HOSTNAME)
                b = KTLSStream(
                    server_tcp,
                    server_context(version),
                    nursery=nursery,
                    server_side=True,
                    ktls=mode,
                )
            async with trio.open_nursery() as hs:
                hs.start_soon(a.do_handshake)  # type: ignore[attr-defined]
                hs.start_soon(b.do_handshake)  # type: ignore[attr-defined]
            ktls_end = a if ktls_side == "client" else b
            assert isinstance(ktls_end, KTLSStream)
            assert_mode(ktls_end, mode)
            return a, b

        await trio.testing.check_two_way_stream(make, None)


@pytest.mark.parametrize("version", VERSIONS)
async def test_ktls_info_and_forwarded_attributes(version: str) -> None:
    async with trio.open_nursery() as nursery:
        client, server = await ktls_pair_maker(nursery, version, "auto", handshake=False)()
        assert client.ktls_info is None
        async with trio.open_nursery() as hs:
            hs.start_soon(client.do_handshake)
            hs.start_soon(server.do_handshake)
        info = client.ktls_info
        assert info is not None
        assert info.version == version == client.version()
        assert info.cipher == client.cipher()[0]
        assert (info.key_updates_sent, info.key_updates_received) == (0, 0)
        if kernel_probe().available:
            assert info.tx_offload and info.rx_offload
        else:
            assert not info.tx_offload
            assert info.reason == kernel_probe().reason
        assert client.getpeercert()["subject"]
        assert server.server_side and not client.server_side
        await client.aclose()
        await server.aclose()


async def test_require_without_ktls_raises_with_reason() -> None:
    probe = kernel_probe()
    if probe.available:
        pytest.skip("this kernel has kTLS; require cannot fail for lack of it")  # host-only
    async with trio.open_nursery() as nursery:
        client, server = await ktls_pair_maker(nursery, "TLSv1.3", "require", handshake=False)()
        with pytest.raises(KTLSUnavailableError) as excinfo:
            await client.do_handshake()
        assert excinfo.value.reason == probe.reason
        with pytest.raises(trio.BrokenResourceError):
            await client.send_all(b"x")
        await client.aclose()
        await server.aclose()


@pytest.mark.parametrize("mode", MODES)
async def test_failed_verification_is_a_clear_ssl_error(mode: trio_ktls.KTLSMode) -> None:
    async with trio.open_nursery() as nursery:
        client_tcp, server_tcp = await tcp_pair()
        client = KTLSStream(
            client_tcp,
            client_context("TLSv1.3"),
            nursery=nursery,
            server_hostname="wrong.example",
            ktls=mode,
        )
        server = KTLSStream(
            server_tcp, server_context("TLSv1.3"), nursery=nursery, server_side=True, ktls=mode
        )

        async def server_side() -> None:
            with pytest.raises(trio.BrokenResourceError, match="alert bad certificate"):
                await server.do_handshake()

        nursery.start_soon(server_side)
        with pytest.raises(trio.BrokenResourceError, match="Hostname mismatch") as excinfo:
            await client.do_handshake()
        assert isinstance(excinfo.value.__cause__, ssl.SSLCertVerificationError)
        if mode == "require":
            # The failed connection's key-log lines were dropped (and zeroed), not kept.
            assert len(KeyLogTap.for_context(client.context)._collector) == 0
        await client.aclose()
        await server.aclose()


async def test_wrong_argument_types_are_refused() -> None:
    left, _ = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        with pytest.raises(TypeError, match=r"trio\.abc\.Stream"):
            KTLSStream(object(), client_context("TLSv1.3"), nursery=nursery)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="SSLContext"):
            KTLSStream(left, object(), nursery=nursery)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", MODES)
async def test_data_before_a_truncation_is_delivered_first(mode: trio_ktls.KTLSMode) -> None:
    """The peer sends 30,000 bytes, then closes TCP without close_notify. Every byte comes
    out of receive_some before the truncation is reported, even when the reader task had
    already seen the end (and broken the stream) before the application asked."""
    payload = os.urandom(30_000)
    async with trio.open_nursery() as nursery:
        client, server = await ktls_pair_maker(nursery, "TLSv1.3", mode)()
        await server.send_all(payload)
        await trio.aclose_forcefully(server.transport_stream)
        await trio.testing.wait_all_tasks_blocked()  # the reader has seen it all
        received = bytearray()
        while len(received) < len(payload):
            received += await client.receive_some()
        assert bytes(received) == payload
        with pytest.raises(trio.BrokenResourceError, match="without sending close_notify"):
            await client.receive_some()
        with pytest.raises(trio.BrokenResourceError):  # and it stays broken
            await client.receive_some()
        await client.aclose()
        await server.aclose()


@pytest.mark.parametrize("mode", MODES)
async def test_cancelled_receive_loses_nothing(
    mode: trio_ktls.KTLSMode, record_figure: Callable[[str, object], None]
) -> None:
    """2 MiB arrive while receive_some calls are cancelled at random moments (a seeded
    generator; the seed is printed): what comes out is exactly what was sent."""
    seed = random.randrange(2**32)
    print(f"seed {seed}")
    rng = random.Random(seed)
    payload = rng.randbytes(2 * 1024 * 1024)
    cancelled = 0
    async with trio.open_nursery() as nursery:
        client, server = await ktls_pair_maker(nursery, "TLSv1.3", mode)()
        received = bytearray()

        async def send() -> None:
            for start in range(0, len(payload), 8192):
                await server.send_all(payload[start : start + 8192])

        # Bounded: with data lost, the loop would wait forever for bytes that never come.
        with trio.fail_after(120):
            async with trio.open_nursery() as io:
                io.start_soon(send)
                while len(received) < len(payload):
                    # At once, within half a millisecond, or within two: cancellations
                    # land before, during and after data is taken.
                    deadline = rng.choice((0.0, 0.0005, 0.002)) * rng.random()
                    with trio.move_on_after(deadline) as scope:
                        received += await client.receive_some(rng.randrange(1, 32768))
                    cancelled += scope.cancelled_caught
        assert bytes(received) == payload
        print(f"{cancelled} receive_some calls cancelled")
        record_figure("seed", seed)
        record_figure("cancelled", cancelled)
        await client.aclose()
        await server.aclose()


# -- https_compatible: neither expects nor sends close_notify (trio.SSLStream's rule) ---


@pytest.mark.parametrize("https_compatible", [False, True])
@pytest.mark.parametrize("mode", MODES)
async def test_aclose_sends_close_notify_unless_https_compatible(
    mode: trio_ktls.KTLSMode, https_compatible: bool
) -> None:
    """The server expects close_notify: it reads a clean end after a plain client's
    aclose, and a truncation after an https_compatible client's (nothing was sent)."""
    async with trio.open_nursery() as nursery:
        make = ktls_pair_maker(
            nursery, "TLSv1.3", mode, client_options={"https_compatible": https_compatible}
        )
        client, server = await make()
        # The client reads what the server sent (its tickets too): a close with unread
        # data would be a TCP reset rather than the FIN this test is about.
        await server.send_all(b"x")
        assert await client.receive_some() == b"x"
        await client.aclose()
        if https_compatible:
            with pytest.raises(trio.BrokenResourceError, match="without sending close_notify"):
                await server.receive_some()
        else:
            assert await server.receive_some() == b""
        await server.aclose()


@pytest.mark.parametrize("mode", MODES)
async def test_https_compatible_send_eof_is_a_bare_fin(mode: trio_ktls.KTLSMode) -> None:
    """send_eof with https_compatible shuts the write side without close_notify: an
    https_compatible peer reads the end, a strict one a truncation; until then the other
    direction keeps working."""
    async with trio.open_nursery() as nursery:
        for peer_https in (True, False):
            make = ktls_pair_maker(
                nursery,
                "TLSv1.3",
                mode,
                client_options={"https_compatible": True},
                server_options={"https_compatible": peer_https},
            )
            client, server = await make()
            await server.send_all(b"x")  # the client reads the tickets (no reset on close)
            assert await client.receive_some() == b"x"
            await client.send_all(b"request")
            await client.send_eof()
            with pytest.raises(trio.ClosedResourceError):
                await client.send_all(b"more")
            assert await server.receive_some() == b"request"
            if peer_https:
                # The other direction still works. (In user space only until the server
                # reads the bare FIN: then OpenSSL refuses to write, as for
                # trio.SSLStream; so the reply goes first.)
                await server.send_all(b"response")
                assert await client.receive_some() == b"response"
                assert await server.receive_some() == b""
            else:
                # A strict peer calls it a truncation: once it has seen the FIN the
                # stream is broken (offloaded, the reader task may see it before the
                # application asks), and what came before it was delivered first.
                with pytest.raises(trio.BrokenResourceError, match="without sending close_notify"):
                    await server.receive_some()
            await client.aclose()
            await server.aclose()


# -- attribute forwarding, as trio.SSLStream does it ------------------------------------

# trio.SSLStream's own lists: parity is checked against trio, not against a copy.
TRIO_FORWARDED = sorted(trio.SSLStream._forwarded)
TRIO_AFTER_HANDSHAKE = sorted(trio.SSLStream._after_handshake)


@pytest.mark.parametrize("mode", MODES)
async def test_forwarded_attributes_need_the_handshake_where_trios_do(
    mode: trio_ktls.KTLSMode,
) -> None:
    async with trio.open_nursery() as nursery:
        client, server = await ktls_pair_maker(nursery, "TLSv1.3", mode, handshake=False)()
        listed = dir(client)
        for name in TRIO_FORWARDED:
            assert name in listed, name
        for name in TRIO_AFTER_HANDSHAKE:
            with pytest.raises(trio.NeedHandshakeError, match=name):
                getattr(client, name)
        # The rest are there before the handshake.
        assert client.context is not None
        assert client.server_side is False and server.server_side is True
        assert client.server_hostname == HOSTNAME
        assert client.session is None
        assert client.pending() == 0
        async with trio.open_nursery() as hs:
            hs.start_soon(client.do_handshake)
            hs.start_soon(server.do_handshake)
        assert client.version() == "TLSv1.3"
        assert client.cipher()[0] == server.cipher()[0]
        assert client.session_reused is False
        assert client.getpeercert()["subject"]
        assert client.selected_alpn_protocol() is None
        with pytest.raises(AttributeError, match="no_such_thing"):
            client.no_such_thing  # noqa: B018
        await client.aclose()
        await server.aclose()


async def test_failed_handshake_leaves_forwarded_attributes_needing_one() -> None:
    """As in trio, a handshake that failed is not done."""
    async with trio.open_nursery() as nursery:
        client_tcp, server_tcp = await tcp_pair()
        client = KTLSStream(
            client_tcp, client_context("TLSv1.3"), nursery=nursery, server_hostname="no.example"
        )
        server = KTLSStream(
            server_tcp, server_context("TLSv1.3"), nursery=nursery, server_side=True
        )
        async with trio.open_nursery() as hs:
            hs.start_soon(_expect_broken, server)
            hs.start_soon(_expect_broken, client)
        with pytest.raises(trio.NeedHandshakeError):
            client.version()
        await client.aclose()
        await server.aclose()


async def _expect_broken(stream: KTLSStream) -> None:
    with pytest.raises(trio.BrokenResourceError):
        await stream.do_handshake()


async def test_assigning_a_forwarded_attribute_reaches_the_ssl_object() -> None:
    async with trio.open_nursery() as nursery:
        client_tcp, server_tcp = await tcp_pair()
        client = KTLSStream(
            client_tcp, client_context("TLSv1.3"), nursery=nursery, server_hostname=HOSTNAME
        )
        # A read-only SSLObject attribute stays read-only, as on trio.SSLStream.
        with pytest.raises(AttributeError):
            client.server_side = True
        assert "server_side" not in vars(client)
        # The SSLObject's own checks apply (trio's too): a session must be an SSLSession.
        with pytest.raises(TypeError, match="SSLSession"):
            client.session = "not a session"  # type: ignore[assignment]
        # Ordinary attributes are still the stream's own.
        client.my_note = "mine"
        assert vars(client)["my_note"] == "mine"
        await client.aclose()
        await server_tcp.aclose()
