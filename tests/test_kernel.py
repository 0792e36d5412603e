"""The kernel interface itself, below any handshake: raw kTLS loopback pairs with the same
made-up keys installed on both ends.

These run in every kernel guest of the matrix and prove that ``_kernel``'s struct layouts,
nonce splits and control-message plumbing are what the kernel expects.
"""

from __future__ import annotations

import os
import socket
import ssl
from pathlib import Path

import pytest
import trio

from trio_ktls import _kernel
from trio_ktls._kernel import CryptoInfo, KernelCipher
from trio_ktls._keyschedule import KTLS_VERSIONS

from .helpers import GUEST_KERNEL, kernel_probe, tcp_pair

MiB = 1024 * 1024
_ALL_PAIRS = [(v, c) for v in KTLS_VERSIONS for c in KernelCipher]


def _key(version: ssl.TLSVersion, cipher: KernelCipher, seed: bytes) -> CryptoInfo:
    material = (seed * 64)[: _kernel.key_size(cipher) + 12]
    key = material[: _kernel.key_size(cipher)]
    iv = material[len(key) : len(key) + _kernel.write_iv_size(version, cipher)]
    return CryptoInfo(version, cipher, key=key, write_iv=iv, rec_seq=0)


def test_crypto_info_layout_tls13_aes() -> None:
    info = CryptoInfo(
        ssl.TLSVersion.TLSv1_3,
        KernelCipher.AES_GCM_128,
        key=bytes(range(16)),
        write_iv=bytes(range(100, 112)),
        rec_seq=5,
    )
    packed = bytes(info.packed())
    assert len(packed) == 40
    assert packed[:4] == bytes([0x04, 0x03, 51, 0])  # native-endian u16s (x86: little)
    assert packed[4:12] == bytes(range(104, 112))  # iv = write_iv[4:]
    assert packed[12:28] == bytes(range(16))  # key
    assert packed[28:32] == bytes(range(100, 104))  # salt = write_iv[:4]
    assert packed[32:] == (5).to_bytes(8, "big")  # rec_seq
    assert "00010203" not in repr(info)
    info.wipe()
    assert not any(info.packed())


def test_crypto_info_layout_tls12_gcm_uses_sequence_as_explicit_nonce() -> None:
    info = CryptoInfo(
        ssl.TLSVersion.TLSv1_2,
        KernelCipher.AES_GCM_256,
        key=bytes(32),
        write_iv=b"\xaa\xbb\xcc\xdd",
        rec_seq=1,
    )
    packed = bytes(info.packed())
    assert len(packed) == 56
    assert packed[4:12] == (1).to_bytes(8, "big")
    assert packed[44:48] == b"\xaa\xbb\xcc\xdd"


def test_crypto_info_layout_chacha_has_no_salt() -> None:
    for version in KTLS_VERSIONS:
        info = CryptoInfo(
            version,
            KernelCipher.CHACHA20_POLY1305,
            key=bytes(32),
            write_iv=bytes(range(12)),
            rec_seq=0,
        )
        assert bytes(info.packed())[4:16] == bytes(range(12))
        assert len(info.packed()) == 56


def test_crypto_info_rejects_wrong_sizes() -> None:
    with pytest.raises(ValueError, match="16-byte key"):
        CryptoInfo(
            ssl.TLSVersion.TLSv1_3,
            KernelCipher.AES_GCM_128,
            key=bytes(32),
            write_iv=bytes(12),
            rec_seq=0,
        )
    with pytest.raises(ValueError, match="4-byte implicit IV"):
        CryptoInfo(
            ssl.TLSVersion.TLSv1_2,
            KernelCipher.AES_GCM_128,
            key=bytes(16),
            write_iv=bytes(12),
            rec_seq=0,
        )


def test_record_type_from_ancdata() -> None:
    assert _kernel.record_type_from_ancdata([]) is None
    assert _kernel.record_type_from_ancdata([(_kernel.SOL_TLS, 2, b"\x15")]) == 21
    assert _kernel.record_type_from_ancdata([(socket.SOL_SOCKET, 2, b"\x15")]) is None


async def _receive_exactly(sock: trio.socket.SocketType, size: int) -> bytes:
    received = bytearray()
    while len(received) < size:
        data, ancdata, _, _ = await sock.recvmsg(
            min(64 * 1024, size - len(received)), _kernel.RECORD_TYPE_CMSG_SPACE
        )
        assert data, "EOF before all data arrived"
        assert _kernel.record_type_from_ancdata(ancdata) == 23
        received += data
    return bytes(received)


@pytest.mark.ktls
@pytest.mark.parametrize(("version", "cipher"), _ALL_PAIRS, ids=lambda p: p.name)
async def test_raw_ktls_round_trip(version: ssl.TLSVersion, cipher: KernelCipher) -> None:
    """1 MiB each way, byte-exact, plus a control record each way, on a raw kTLS pair.

    Where the probe says the kernel refuses this pair, the test checks that the refusal
    is a clean OSError at install time rather than skipping.
    """
    a_stream, b_stream = await tcp_pair()
    a, b = a_stream.socket, b_stream.socket
    with a, b:
        for s in (a, b):
            _kernel.attach_ulp(s)
        if not kernel_probe().supports(version, cipher):
            with pytest.raises(OSError):  # noqa: PT011, PT012  (errno differs by kernel)
                _kernel.install_key(a, _kernel.TLS_TX, _key(version, cipher, b"a"))
                _kernel.install_key(b, _kernel.TLS_RX, _key(version, cipher, b"a"))
            return
        _kernel.install_key(a, _kernel.TLS_TX, _key(version, cipher, b"ab"))
        _kernel.install_key(b, _kernel.TLS_RX, _key(version, cipher, b"ab"))
        _kernel.install_key(b, _kernel.TLS_TX, _key(version, cipher, b"ba"))
        _kernel.install_key(a, _kernel.TLS_RX, _key(version, cipher, b"ba"))
        a_to_b, b_to_a = os.urandom(MiB), os.urandom(MiB)
        got: dict[str, bytes] = {}

        async def pump(
            tx: trio.SocketStream, rx: trio.socket.SocketType, payload: bytes, name: str
        ) -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(tx.send_all, payload)
                got[name] = await _receive_exactly(rx, len(payload))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, a_stream, b, a_to_b, "a->b")
            nursery.start_soon(pump, b_stream, a, b_to_a, "b->a")
        assert got["a->b"] == a_to_b
        assert got["b->a"] == b_to_a

        # A control record (here a handshake-type record) travels with its type.
        handshake_payload = bytes([4, 0, 0, 3, 1, 2, 3])
        await a.sendmsg([handshake_payload], _kernel.set_record_type_cmsg(22))
        await b.sendmsg([b"\x01\x00"], _kernel.set_record_type_cmsg(21))
        data, ancdata, flags, _ = await b.recvmsg(64, _kernel.RECORD_TYPE_CMSG_SPACE)
        assert (data, _kernel.record_type_from_ancdata(ancdata)) == (handshake_payload, 22)
        assert flags & _kernel.MSG_EOR
        data, ancdata, _, _ = await a.recvmsg(64, _kernel.RECORD_TYPE_CMSG_SPACE)
        assert (data, _kernel.record_type_from_ancdata(ancdata)) == (b"\x01\x00", 21)

        # The kernel counted every record it sent: its live rec_seq says so.
        assert _kernel.read_rec_seq(a, _kernel.TLS_TX, cipher) > MiB // 16384


#: trio's SocketStream sets TCP_NOTSENT_LOWAT to 16 KiB; -1 is the kernel's "no limit".
_TCP_NOTSENT_LOWAT = 25


# trio's low-water mark is tried where its outcome is known: it stalls on 6.1.
_LOWAT_CASES = ["unlimited", "trio"] if GUEST_KERNEL == "6.1" else ["unlimited"]


@pytest.mark.ktls
@pytest.mark.parametrize("lowat", _LOWAT_CASES)
@pytest.mark.parametrize("version", KTLS_VERSIONS, ids=lambda v: v.name)
async def test_sendfile_into_a_nonblocking_ktls_socket(
    tmp_path: Path, version: ssl.TLSVersion, lowat: str
) -> None:
    """The reproduction behind docs/design.md's sendfile note: a raw non-blocking loop,
    ``os.sendfile`` with 1 MiB counts and trio's ``wait_writable`` after EAGAIN, into a
    kTLS socket of a trio ``SocketStream``, a reader on the other end.

    With no TCP_NOTSENT_LOWAT it completes on every kernel line. With trio's 16 KiB
    TCP_NOTSENT_LOWAT, on 6.1 it stalls (TLS 1.2 and 1.3): TCP holds one full record back
    (the TLS layer pushed it with MSG_MORE), that is above the mark, and with nothing in
    flight the sender waits for a writability that never comes (docs/design.md; later
    lines crawl instead). The stream's own loop is tested in tests/test_sendfile.py.
    """
    stalls = lowat == "trio"
    size = 16 * MiB + 4321
    path = tmp_path / "payload"
    content = os.urandom(size)
    path.write_bytes(content)
    cipher = KernelCipher.AES_GCM_256
    a_stream, b_stream = await tcp_pair()
    a, b = a_stream.socket, b_stream.socket
    if lowat == "unlimited":
        a.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, -1)
    with a, b, path.open("rb") as f:
        for s in (a, b):
            _kernel.attach_ulp(s)
        _kernel.install_key(a, _kernel.TLS_TX, _key(version, cipher, b"sf"))
        _kernel.install_key(b, _kernel.TLS_RX, _key(version, cipher, b"sf"))
        received = bytearray()

        async def send() -> None:
            offset = 0
            while offset < size:
                try:
                    offset += os.sendfile(a.fileno(), f.fileno(), offset, min(MiB, size - offset))
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(a)

        async def receive() -> None:
            while len(received) < size:
                data = await b.recv(256 * 1024)
                assert data, "EOF"
                received.extend(data)

        with trio.move_on_after(30 if stalls else 300) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                nursery.start_soon(receive)
        if stalls:
            assert scope.cancelled_caught, "the 6.1 sendfile stall did not reproduce"
            assert len(received) < size
        else:
            assert not scope.cancelled_caught, f"stalled after {len(received)} bytes"
            assert bytes(received) == content
