"""The Linux kTLS socket interface: constants, ``crypto_info`` structs, control messages.

This is the only module that calls ``setsockopt(SOL_TLS, ...)``. Everything here follows
the kernel's ``Documentation/networking/tls.rst`` and ``include/uapi/linux/tls.h``; Python's
``socket`` module defines none of these names.

Theory of operation
-------------------
1. ``attach_ulp(sock)``: ``setsockopt(IPPROTO_TCP, TCP_ULP, "tls")`` turns an ESTABLISHED
   TCP socket into a kTLS socket (ENOTCONN otherwise; EEXIST the second time; ENOENT when
   the kernel has no ``tls`` module). Until a key is installed the socket still passes
   bytes through untouched.
2. ``install_key(sock, TLS_TX or TLS_RX, crypto_info)``: from then on the kernel encrypts
   everything written (TX) or decrypts everything read (RX) in that direction. A key
   replaces an earlier one only on kernels with TLS 1.3 rekey (6.14+); older kernels,
   and TLS 1.2 everywhere, answer EBUSY.
3. Records that are not application data travel with a one-byte control message: on send
   ``SOL_TLS/TLS_SET_RECORD_TYPE`` names the record type; on receive the kernel tags each
   non-data record with ``SOL_TLS/TLS_GET_RECORD_TYPE`` and hands it back only to a
   ``recvmsg`` with room for that control message (plain ``recv`` gets EIO). One
   ``recvmsg`` never mixes records of different types.

The ``crypto_info`` struct is ``u16 version, u16 cipher_type`` followed by, per cipher,
``iv, key, salt, rec_seq`` (packed, no padding). Its exact size is part of the ABI: any other
length is EINVAL.
"""

from __future__ import annotations

import enum
import socket
import ssl
import struct
from dataclasses import dataclass
from typing import Final, TypeAlias

import trio

from ._keyschedule import Aead

SOL_TLS: Final = 282
TCP_ULP: Final = 31

# Socket options at level SOL_TLS (uapi/linux/tls.h).
TLS_TX: Final = 1
TLS_RX: Final = 2
TLS_TX_ZEROCOPY_RO: Final = 3
TLS_RX_EXPECT_NO_PAD: Final = 4

# Control-message types at level SOL_TLS.
TLS_SET_RECORD_TYPE: Final = 1
TLS_GET_RECORD_TYPE: Final = 2

# recvmsg flag the kernel sets when a control record was returned whole.
MSG_EOR: Final = socket.MSG_EOR

#: Room for the one-byte record-type control message on receive.
RECORD_TYPE_CMSG_SPACE: Final = socket.CMSG_SPACE(1)


class KernelCipher(enum.IntEnum):
    """``TLS_CIPHER_*`` numbers from uapi/linux/tls.h."""

    AES_GCM_128 = 51
    AES_GCM_256 = 52
    AES_CCM_128 = 53
    CHACHA20_POLY1305 = 54


@dataclass(frozen=True)
class _Layout:
    iv: int
    key: int
    salt: int
    rec_seq: int = 8

    @property
    def size(self) -> int:
        return 4 + self.iv + self.key + self.salt + self.rec_seq


# Field sizes of struct tls12_crypto_info_<cipher> (the same structs serve TLS 1.3).
_LAYOUTS: Final[dict[KernelCipher, _Layout]] = {
    KernelCipher.AES_GCM_128: _Layout(iv=8, key=16, salt=4),
    KernelCipher.AES_GCM_256: _Layout(iv=8, key=32, salt=4),
    KernelCipher.AES_CCM_128: _Layout(iv=8, key=16, salt=4),
    KernelCipher.CHACHA20_POLY1305: _Layout(iv=12, key=32, salt=0),
}

KERNEL_CIPHER_FOR_AEAD: Final[dict[Aead, KernelCipher]] = {
    Aead.AES_128_GCM: KernelCipher.AES_GCM_128,
    Aead.AES_256_GCM: KernelCipher.AES_GCM_256,
    Aead.AES_128_CCM: KernelCipher.AES_CCM_128,
    Aead.CHACHA20_POLY1305: KernelCipher.CHACHA20_POLY1305,
}


#: The kernel calls accept a blocking stdlib socket (the probe) or a trio socket.
AnySocket: TypeAlias = "socket.socket | trio.socket.SocketType"


def crypto_info_size(cipher: KernelCipher) -> int:
    return _LAYOUTS[cipher].size


def key_size(cipher: KernelCipher) -> int:
    return _LAYOUTS[cipher].key


def write_iv_size(version: ssl.TLSVersion, cipher: KernelCipher) -> int:
    """Length of the IV that `CryptoInfo` takes: TLS 1.2 AES's 4-byte implicit part, else 12."""
    layout = _LAYOUTS[cipher]
    if version is ssl.TLSVersion.TLSv1_2 and layout.salt:
        return layout.salt
    return layout.salt + layout.iv


class CryptoInfo:
    """One direction's kernel key material, packed into a wipeable buffer.

    How the record nonce is split between ``salt`` and ``iv`` depends on the version:

    - TLS 1.3 (RFC 8446 §5.3): the per-record nonce is ``write_iv XOR seq``. AES ciphers
      take ``salt = write_iv[:4]`` and ``iv = write_iv[4:]``; ChaCha20 has no salt and
      takes the whole 12-byte IV. The kernel does the XOR.
    - TLS 1.2 AES-GCM/CCM (RFC 5288 §3): nonce = 4-byte implicit ``salt`` from the key
      block + 8-byte explicit nonce carried in each record. For TX the kernel uses ``iv``
      as the first explicit nonce and counts up from it; like OpenSSL we use the record
      sequence number, so ``iv = rec_seq``.
    - TLS 1.2 ChaCha20 (RFC 7905 §2): nonce = 12-byte IV XOR seq, like TLS 1.3.

    ``rec_seq`` is the sequence number of the next record in that direction.
    """

    __slots__ = ("_buffer", "cipher", "version")

    def __init__(
        self,
        version: ssl.TLSVersion,
        cipher: KernelCipher,
        *,
        key: bytes | bytearray,
        write_iv: bytes | bytearray,
        rec_seq: int,
    ) -> None:
        layout = _LAYOUTS[cipher]
        if len(key) != layout.key:
            raise ValueError(f"{cipher.name} needs a {layout.key}-byte key, got {len(key)}")
        seq = rec_seq.to_bytes(8, "big")
        if version is ssl.TLSVersion.TLSv1_2 and layout.salt:
            if len(write_iv) != layout.salt:
                raise ValueError(f"TLS 1.2 {cipher.name} needs a {layout.salt}-byte implicit IV")
            salt, iv = bytes(write_iv), seq
        else:
            if len(write_iv) != layout.salt + layout.iv:
                raise ValueError(f"{cipher.name} needs a {layout.salt + layout.iv}-byte IV")
            salt, iv = bytes(write_iv[: layout.salt]), bytes(write_iv[layout.salt :])
        self.version = version
        self.cipher = cipher
        self._buffer = bytearray(struct.pack("=HH", version, cipher))
        self._buffer += iv
        self._buffer += key
        self._buffer += salt
        self._buffer += seq
        assert len(self._buffer) == layout.size

    def packed(self) -> bytearray:
        return self._buffer

    def wipe(self) -> None:
        self._buffer[:] = bytes(len(self._buffer))

    def __repr__(self) -> str:  # never show key material
        return f"<CryptoInfo {self.version.name} {self.cipher.name}>"


def attach_ulp(sock: AnySocket) -> None:
    """Attach the kernel's TLS upper-layer protocol (raises OSError as the kernel does)."""
    sock.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")


def install_key(sock: AnySocket, direction: int, info: CryptoInfo) -> None:
    """Install ``info`` for ``direction`` (TLS_TX or TLS_RX); raises OSError on refusal."""
    if direction not in (TLS_TX, TLS_RX):
        raise ValueError("direction must be TLS_TX or TLS_RX")
    sock.setsockopt(SOL_TLS, direction, info.packed())


def read_rec_seq(sock: AnySocket, direction: int, cipher: KernelCipher) -> int:
    """The kernel's live record sequence number for ``direction``.

    ``getsockopt(SOL_TLS, TLS_TX/RX)`` copies the whole crypto_info back (the kernel insists
    on the exact struct size); its last 8 bytes are ``rec_seq``. It is a syscall plus a
    copy of key material, so callers use it sparingly. The returned buffer is wiped.
    """
    raw = bytearray(sock.getsockopt(SOL_TLS, direction, crypto_info_size(cipher)))
    try:
        return int.from_bytes(raw[-8:], "big")
    finally:
        raw[:] = bytes(len(raw))


def set_record_type_cmsg(content_type: int) -> list[tuple[int, int, bytes]]:
    """Ancillary data for ``sendmsg`` that makes the kernel send one record of this type."""
    return [(SOL_TLS, TLS_SET_RECORD_TYPE, bytes([content_type]))]


def record_type_from_ancdata(ancdata: list[tuple[int, int, bytes]]) -> int | None:
    """The record type a ``recvmsg`` reported, or None when it carried no such message.

    The kernel attaches the type to every record it decrypted when the caller gave room
    for it; data records (23) are tagged too. None therefore means "plain bytes": either
    RX is not offloaded, or this is EOF.
    """
    for level, kind, data in ancdata:
        if level == SOL_TLS and kind == TLS_GET_RECORD_TYPE and len(data) >= 1:
            return data[0]
    return None
