"""Known-answer tests for ``trio_ktls._keyschedule``.

Where the vectors come from:

- RFC 8448 §3 ("Simple 1-RTT Handshake", TLS_AES_128_GCM_SHA256) and §4: traffic secrets,
  HKDF-Expand-Label inputs/outputs, write keys/IVs and whole encrypted records, as quoted
  verbatim in aws/s2n-tls ``tests/unit/s2n_tls13_key_schedule_rfc8448_test.c`` (its
  duvet annotations reproduce the RFC text) and randombit/botan
  ``src/tests/test_tls_cipher_state.cpp`` (the §3 records, ciphertext and plaintext).
- TLS 1.2 PRF: the IETF TLS WG vectors (https://www.ietf.org/mail-archive/web/tls/current/
  msg03416.html) for P_SHA256 and P_SHA384, as carried by gnutls ``tests/tls12-prf.c``
  and BearSSL ``test/test_crypto.c``; the "master secret"/"key expansion" pair from NIST
  CAVP, as carried by openssl ``test/recipes/30-test_evp_data/evpkdf_tls12_prf.txt``.
- KeyUpdate ("traffic upd", RFC 8446 §7.2) has no published vector. The ones below were
  computed with an independent implementation, OpenSSL 3.0's TLS13-KDF::

      openssl kdf -keylen 32 -kdfopt digest:SHA256 -kdfopt mode:EXPAND_ONLY \\
          -kdfopt hexkey:<secret> -kdfopt 'prefix:tls13 ' -kdfopt 'label:traffic upd' \\
          -kdfopt hexdata: TLS13-KDF

  (the same command with ``label:key`` reproduces RFC 8448's keys, which validates it).
  ``test_matches_openssl_cli`` reruns that command on random secrets when ``openssl``
  3 is installed.

Finally, real OpenSSL connections (``ssl.SSLObject`` over memory BIOs, no sockets) are
decrypted with keys derived here from their key logs: the end-to-end check that the key
schedule, the key-log parser and the record layout agree with OpenSSL.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM, ChaCha20Poly1305

from trio_ktls._keylog import (
    KeyLogCollector,
    client_random_from_client_hello,
    server_random_from_server_hello,
)
from trio_ktls._keyschedule import (
    CIPHER_SUITES,
    Aead,
    CipherSuite,
    Tls12KeyBlock,
    hkdf_expand_label,
    lookup_suite,
    tls12_key_block,
    tls12_prf,
    tls13_next_traffic_secret,
    tls13_traffic_key_iv,
    tls_version_from_name,
)
from trio_ktls._messages import (
    RECORD_HEADER_LENGTH,
    ContentType,
    HandshakeReassembler,
    HandshakeType,
    parse_new_session_ticket,
    parse_record_header,
)

from .helpers import (
    RFC8448_TICKET,
    RFC8448_TICKET_RECORD,
    S_AP_TRAFFIC,
    h,
    handshake_in_memory,
)

SHA256 = hashes.SHA256()
SHA384 = hashes.SHA384()


# --- RFC 8448 §3 values --------------------------------------------------------------

EARLY_SECRET = h("33ad0a1c607ec03b09e6cd9893680ce210adf300aa1f2660e1b22e10f170f92a")
DERIVED_FOR_HANDSHAKE = h("6f2615a108c702c5678f54fc9dbab69716c076189c48250cebeac3576c3611ba")
HANDSHAKE_SECRET = h("1dc826e93606aa6fdc0aadc12f741b01046aa6b99f691ed221a9f0ca043fbeac")
DERIVED_FOR_MASTER = h("43de77e0c77713859a944db9db2590b53190a65b3ee2e4f12dd7a0bb7ce254b4")
MASTER_SECRET = h("18df06843d13a08bf2a449844c5f8a478001bc4d4c627984d5a41da8d0402919")
HASH_CH_SH = h("860c06edc07858ee8e78f0e7428c58edd6b43f2ca3e6e95f02ed063cf0e1cad8")
HASH_CH_SERVER_FINISHED = h("9608102a0f1ccc6db6250b7b7e417b1a000eaada3daae4777a7686c9ff83df13")

C_HS_TRAFFIC = h("b3eddb126e067f35a780b3abf45e2d8f3b1a950738f52e9600746a0e27a55a21")
S_HS_TRAFFIC = h("b67b7d690cc16c4e75e54213cb2d37b4e9c912bcded9105d42befd59d391ad38")
C_AP_TRAFFIC = h("9e40646ce79a7f9dc05af8889bce6552875afa0b06df0087f792ebb7c17504a5")

# (secret, write key, write iv): §3 handshake and application keys, §4 early data keys.
RFC8448_TRAFFIC_KEYS = [
    pytest.param(
        S_HS_TRAFFIC,
        h("3fce516009c21727d0f2e4e86ee403bc"),
        h("5d313eb2671276ee13000b30"),
        id="server-handshake",
    ),
    pytest.param(
        C_HS_TRAFFIC,
        h("dbfaa693d1762c5b666af5d950258d01"),
        h("5bd3c71b836e0b76bb73265f"),
        id="client-handshake",
    ),
    pytest.param(
        S_AP_TRAFFIC,
        h("9f02283b6c9c07efc26bb9f2ac92e356"),
        h("cf782b88dd83549aadf1e984"),
        id="server-application",
    ),
    pytest.param(
        C_AP_TRAFFIC,
        h("17422dda596ed5d9acd890e3c63f5051"),
        h("5b78923dee08579033e523d9"),
        id="client-application",
    ),
    pytest.param(
        h("3fbbe6a60deb66c30a32795aba0eff7eaa10105586e7be5c09678d63b6caab62"),
        h("920205a5b7bf2115e6fc5c2942834f54"),
        h("6d475f0993c8e564610db2b9"),
        id="client-early-data-section-4",
    ),
]


@pytest.mark.parametrize(("secret", "key", "iv"), RFC8448_TRAFFIC_KEYS)
def test_rfc8448_traffic_key_iv(secret: bytes, key: bytes, iv: bytes) -> None:
    assert tls13_traffic_key_iv(secret, 16, SHA256) == (key, iv)


@pytest.mark.parametrize(
    ("secret", "label", "context", "length", "expected"),
    [
        pytest.param(
            EARLY_SECRET,
            b"derived",
            hashlib.sha256(b"").digest(),
            32,
            DERIVED_FOR_HANDSHAKE,
            id="derived-early",
        ),
        pytest.param(
            HANDSHAKE_SECRET, b"c hs traffic", HASH_CH_SH, 32, C_HS_TRAFFIC, id="c-hs-traffic"
        ),
        pytest.param(
            HANDSHAKE_SECRET, b"s hs traffic", HASH_CH_SH, 32, S_HS_TRAFFIC, id="s-hs-traffic"
        ),
        pytest.param(
            HANDSHAKE_SECRET,
            b"derived",
            hashlib.sha256(b"").digest(),
            32,
            DERIVED_FOR_MASTER,
            id="derived-handshake",
        ),
        pytest.param(
            MASTER_SECRET,
            b"c ap traffic",
            HASH_CH_SERVER_FINISHED,
            32,
            C_AP_TRAFFIC,
            id="c-ap-traffic",
        ),
        pytest.param(
            MASTER_SECRET,
            b"s ap traffic",
            HASH_CH_SERVER_FINISHED,
            32,
            S_AP_TRAFFIC,
            id="s-ap-traffic",
        ),
        pytest.param(
            C_HS_TRAFFIC,
            b"finished",
            b"",
            32,
            h("b80ad01015fb2f0bd65ff7d4da5d6bf83f84821d1f87fdc7d3c75b5a7b42d9c4"),
            id="client-finished-key",
        ),
    ],
)
def test_rfc8448_hkdf_expand_label(
    secret: bytes, label: bytes, context: bytes, length: int, expected: bytes
) -> None:
    assert hkdf_expand_label(secret, label, context, length, SHA256) == expected


def test_hkdf_expand_label_argument_checks() -> None:
    with pytest.raises(ValueError, match="label"):
        hkdf_expand_label(C_AP_TRAFFIC, b"", b"", 16, SHA256)
    with pytest.raises(ValueError, match="label"):
        hkdf_expand_label(C_AP_TRAFFIC, b"x" * 250, b"", 16, SHA256)
    hkdf_expand_label(C_AP_TRAFFIC, b"x" * 249, b"c" * 255, 16, SHA256)
    with pytest.raises(ValueError, match="context"):
        hkdf_expand_label(C_AP_TRAFFIC, b"key", b"c" * 256, 16, SHA256)
    with pytest.raises(ValueError, match="length"):
        hkdf_expand_label(C_AP_TRAFFIC, b"key", b"", 0, SHA256)
    with pytest.raises(ValueError, match="length"):
        hkdf_expand_label(C_AP_TRAFFIC, b"key", b"", 0x10000, SHA256)


# --- RFC 8448 §3 records, decrypted with keys derived here ---------------------------


def _xor_nonce(iv: bytes, seq: int) -> bytes:
    return bytes(a ^ b for a, b in zip(iv, seq.to_bytes(len(iv), "big"), strict=True))


def _open_tls13(suite: CipherSuite, key: bytes, iv: bytes, seq: int, record: bytes) -> bytes:
    """Decrypt a TLS 1.3 record (RFC 8446 §5.2-§5.3): TLSInnerPlaintext, padding removed,
    content type still last."""
    header = parse_record_header(record[:RECORD_HEADER_LENGTH])
    assert header.content_type is ContentType.APPLICATION_DATA
    body = record[RECORD_HEADER_LENGTH:]
    assert len(body) == header.length
    inner = _aead(suite.aead, key).decrypt(_xor_nonce(iv, seq), body, record[:5])
    return inner.rstrip(b"\0")


def _aead(aead: Aead, key: bytes) -> AESGCM | AESCCM | ChaCha20Poly1305:
    if aead is Aead.CHACHA20_POLY1305:
        return ChaCha20Poly1305(key)
    if aead is Aead.AES_128_CCM:
        return AESCCM(key, tag_length=16)
    return AESGCM(key)


RFC8448_SUITE = lookup_suite("TLS_AES_128_GCM_SHA256", ssl.TLSVersion.TLSv1_3)

# randombit/botan src/tests/test_tls_cipher_state.cpp, from RFC 8448 §3.
RFC8448_SERVER_FLIGHT_RECORD = h(
    """17 03 03 02 a2 d1 ff 33 4a 56 f5 bf
    f6 59 4a 07 cc 87 b5 80 23 3f 50 0f 45 e4 89 e7 f3 3a f3 5e df
    78 69 fc f4 0a a4 0a a2 b8 ea 73 f8 48 a7 ca 07 61 2e f9 f9 45
    cb 96 0b 40 68 90 51 23 ea 78 b1 11 b4 29 ba 91 91 cd 05 d2 a3
    89 28 0f 52 61 34 aa dc 7f c7 8c 4b 72 9d f8 28 b5 ec f7 b1 3b
    d9 ae fb 0e 57 f2 71 58 5b 8e a9 bb 35 5c 7c 79 02 07 16 cf b9
    b1 18 3e f3 ab 20 e3 7d 57 a6 b9 d7 47 76 09 ae e6 e1 22 a4 cf
    51 42 73 25 25 0c 7d 0e 50 92 89 44 4c 9b 3a 64 8f 1d 71 03 5d
    2e d6 5b 0e 3c dd 0c ba e8 bf 2d 0b 22 78 12 cb b3 60 98 72 55
    cc 74 41 10 c4 53 ba a4 fc d6 10 92 8d 80 98 10 e4 b7 ed 1a 8f
    d9 91 f0 6a a6 24 82 04 79 7e 36 a6 a7 3b 70 a2 55 9c 09 ea d6
    86 94 5b a2 46 ab 66 e5 ed d8 04 4b 4c 6d e3 fc f2 a8 94 41 ac
    66 27 2f d8 fb 33 0e f8 19 05 79 b3 68 45 96 c9 60 bd 59 6e ea
    52 0a 56 a8 d6 50 f5 63 aa d2 74 09 96 0d ca 63 d3 e6 88 61 1e
    a5 e2 2f 44 15 cf 95 38 d5 1a 20 0c 27 03 42 72 96 8a 26 4e d6
    54 0c 84 83 8d 89 f7 2c 24 46 1a ad 6d 26 f5 9e ca ba 9a cb bb
    31 7b 66 d9 02 f4 f2 92 a3 6a c1 b6 39 c6 37 ce 34 31 17 b6 59
    62 22 45 31 7b 49 ee da 0c 62 58 f1 00 d7 d9 61 ff b1 38 64 7e
    92 ea 33 0f ae ea 6d fa 31 c7 a8 4d c3 bd 7e 1b 7a 6c 71 78 af
    36 87 90 18 e3 f2 52 10 7f 24 3d 24 3d c7 33 9d 56 84 c8 b0 37
    8b f3 02 44 da 8c 87 c8 43 f5 e5 6e b4 c5 e8 28 0a 2b 48 05 2c
    f9 3b 16 49 9a 66 db 7c ca 71 e4 59 94 26 f7 d4 61 e6 6f 99 88
    2b d8 9f c5 08 00 be cc a6 2d 6c 74 11 6d bd 29 72 fd a1 fa 80
    f8 5d f8 81 ed be 5a 37 66 89 36 b3 35 58 3b 59 91 86 dc 5c 69
    18 a3 96 fa 48 a1 81 d6 b6 fa 4f 9d 62 d5 13 af bb 99 2f 2b 99
    2f 67 f8 af e6 7f 76 91 3f a3 88 cb 56 30 c8 ca 01 e0 c6 5d 11
    c6 6a 1e 2a c4 c8 59 77 b7 c7 a6 99 9b bf 10 dc 35 ae 69 f5 51
    56 14 63 6c 0b 9b 68 c1 9e d2 e3 1c 0b 3b 66 76 30 38 eb ba 42
    f3 b3 8e dc 03 99 f3 a9 f2 3f aa 63 97 8c 31 7f c9 fa 66 a7 3f
    60 f0 50 4d e9 3b 5b 84 5e 27 55 92 c1 23 35 ee 34 0b bc 4f dd
    d5 02 78 40 16 e4 b3 be 7e f0 4d da 49 f4 b4 40 a3 0c b5 d2 af
    93 98 28 fd 4a e3 79 4e 44 f9 4d f5 a6 31 ed e4 2c 17 19 bf da
    bf 02 53 fe 51 75 be 89 8e 75 0e dc 53 37 0d 2b"""
)
RFC8448_CLIENT_FINISHED_RECORD = h(
    """17 03 03 00 35 75 ec 4d c2 38 cc e6
    0b 29 80 44 a7 1e 21 9c 56 cc 77 b0 51 7f e9 b9 3c 7a 4b fc 44
    d8 7f 38 f8 03 38 ac 98 fc 46 de b3 84 bd 1c ae ac ab 68 67 d7
    26 c4 05 46"""
)
RFC8448_CLIENT_FINISHED = h(
    """14 00 00 20 a8 ec 43 6d 67 76 34 ae 52 5a c1
    fc eb e1 1a 03 9e c1 76 94 fa c6 e9 85 27 b6 42 f2 ed d5 ce 61"""
)
RFC8448_CLIENT_DATA_RECORD = h(
    """17 03 03 00 43 a2 3f 70 54 b6 2c 94
    d0 af fa fe 82 28 ba 55 cb ef ac ea 42 f9 14 aa 66 bc ab 3f 2b
    98 19 a8 a5 b4 6b 39 5b d5 4a 9a 20 44 1e 2b 62 97 4e 1f 5a 62
    92 a2 97 70 14 bd 1e 3d ea e6 3a ee bb 21 69 49 15 e4"""
)
RFC8448_SERVER_DATA_RECORD = h(
    """17 03 03 00 43 2e 93 7e 11 ef 4a c7
    40 e5 38 ad 36 00 5f c4 a4 69 32 fc 32 25 d0 5f 82 aa 1b 36 e3
    0e fa f9 7d 90 e6 df fc 60 2d cb 50 1a 59 a8 fc c4 9c 4b f2 e5
    f0 a2 1c 00 47 c2 ab f3 32 54 0d d0 32 e1 67 c2 95 5d"""
)


def _rfc8448_open(secret: bytes, seq: int, record: bytes) -> tuple[int, bytes]:
    assert RFC8448_SUITE is not None
    key, iv = tls13_traffic_key_iv(secret, RFC8448_SUITE.key_length, SHA256)
    inner = _open_tls13(RFC8448_SUITE, key, iv, seq, record)
    return inner[-1], inner[:-1]


def test_rfc8448_server_flight_decrypts_into_four_messages() -> None:
    content_type, plaintext = _rfc8448_open(S_HS_TRAFFIC, 0, RFC8448_SERVER_FLIGHT_RECORD)
    assert content_type == ContentType.HANDSHAKE
    reassembler = HandshakeReassembler()
    reassembler.feed(plaintext)
    messages = list(iter(reassembler.next_message, None))
    assert [(t, len(body)) for t, body in messages] == [
        (HandshakeType.ENCRYPTED_EXTENSIONS, 0x24),
        (HandshakeType.CERTIFICATE, 0x1B9),
        (HandshakeType.CERTIFICATE_VERIFY, 0x84),
        (HandshakeType.FINISHED, 0x20),
    ]
    assert messages[-1][1] == h("9b9b141d906337fbd2cbdce71df4deda4ab42c309572cb7fffee5454b78f0718")
    assert reassembler.pending == 0


def test_rfc8448_client_finished_record() -> None:
    assert _rfc8448_open(C_HS_TRAFFIC, 0, RFC8448_CLIENT_FINISHED_RECORD) == (
        ContentType.HANDSHAKE,
        RFC8448_CLIENT_FINISHED,
    )


def test_rfc8448_new_session_ticket_record() -> None:
    content_type, plaintext = _rfc8448_open(S_AP_TRAFFIC, 0, RFC8448_TICKET_RECORD)
    assert (content_type, plaintext) == (ContentType.HANDSHAKE, RFC8448_TICKET)
    reassembler = HandshakeReassembler()
    reassembler.feed(plaintext)
    message = reassembler.next_message()
    assert message is not None
    msg_type, body = message
    assert msg_type is HandshakeType.NEW_SESSION_TICKET
    ticket = parse_new_session_ticket(body)
    assert ticket.lifetime == 30
    assert ticket.age_add == 0xFAD6AAC5
    assert ticket.nonce == b"\0\0"
    assert len(ticket.ticket) == 0xB2
    assert ticket.extensions == h("002a000400000400")  # early_data, max_early_data_size 1024


@pytest.mark.parametrize(
    ("secret", "seq", "record"),
    [
        pytest.param(C_AP_TRAFFIC, 0, RFC8448_CLIENT_DATA_RECORD, id="client"),
        # The server's first application-data record follows its NewSessionTicket (seq 0).
        pytest.param(S_AP_TRAFFIC, 1, RFC8448_SERVER_DATA_RECORD, id="server"),
    ],
)
def test_rfc8448_application_data_records(secret: bytes, seq: int, record: bytes) -> None:
    assert _rfc8448_open(secret, seq, record) == (ContentType.APPLICATION_DATA, bytes(range(50)))


# --- KeyUpdate: "traffic upd" (RFC 8446 §7.2) ------------------------------------------

# Computed with OpenSSL 3.0.22's TLS13-KDF (see the module docstring).
C_AP_TRAFFIC_1 = h("fcdfcc72725aaee48bf64e4fd8b749cdbdbab39d90da0b26e2245ca6ea167207")
C_AP_TRAFFIC_2 = h("68474fe58c172143d0a009a76edd231b0d934f3058588ea0852662279e54a573")
S_AP_TRAFFIC_1 = h("51921b8aa3001976eb401d0a4319a8516416a6c56001a357e5d162031e84f916")
SECRET_384 = bytes(range(48))
SECRET_384_NEXT = h(
    "401331b63e9d59f202e8f041042d9516f4cd7fa2e2ee14631d3b49fc340d7af3"
    "7fc2c0c9f252d8036f81ec5b85cbe5db"
)


def test_next_traffic_secret_known_answers() -> None:
    assert tls13_next_traffic_secret(C_AP_TRAFFIC, SHA256) == C_AP_TRAFFIC_1
    assert tls13_next_traffic_secret(C_AP_TRAFFIC_1, SHA256) == C_AP_TRAFFIC_2
    assert tls13_next_traffic_secret(S_AP_TRAFFIC, SHA256) == S_AP_TRAFFIC_1
    assert tls13_next_traffic_secret(SECRET_384, SHA384) == SECRET_384_NEXT


def test_next_generation_keys_known_answers() -> None:
    assert tls13_traffic_key_iv(C_AP_TRAFFIC_1, 16, SHA256) == (
        h("3879d82f5f14056e623f2ce5bfc66fce"),
        h("5dfb2c5938c3379b6cc5d1f2"),
    )
    assert tls13_traffic_key_iv(SECRET_384, 32, SHA384) == (
        h("6877d022f1c61d24ebb7487c16752d9a4798e40431c75b39320e537c90e23225"),
        h("42822531a0fe88648fc09e9f"),
    )


@pytest.mark.parametrize("algorithm", [SHA256, SHA384], ids=["sha256", "sha384"])
def test_next_traffic_secret_properties(algorithm: hashes.HashAlgorithm) -> None:
    secret = os.urandom(algorithm.digest_size)
    chain = [secret]
    for _ in range(8):
        chain.append(tls13_next_traffic_secret(chain[-1], algorithm))
    # It is exactly §7.2's formula, as long as the hash, deterministic, and never repeats.
    assert chain[1] == hkdf_expand_label(
        secret, b"traffic upd", b"", algorithm.digest_size, algorithm
    )
    assert all(len(s) == algorithm.digest_size for s in chain)
    assert tls13_next_traffic_secret(secret, algorithm) == chain[1]
    assert len(set(chain)) == len(chain)
    # Each generation's key and IV differ from every other generation's.
    keys = {tls13_traffic_key_iv(s, 16, algorithm) for s in chain}
    assert len(keys) == len(chain)


def _openssl_tls13_kdf(secret: bytes, label: str, length: int, digest: str) -> bytes | None:
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    # fmt: off
    command = [
        openssl, "kdf", "-keylen", str(length), "-kdfopt", f"digest:{digest}",
        "-kdfopt", "mode:EXPAND_ONLY", "-kdfopt", f"hexkey:{secret.hex()}",
        "-kdfopt", "prefix:tls13 ", "-kdfopt", f"label:{label}", "-kdfopt", "hexdata:",
        "TLS13-KDF",
    ]
    # fmt: on
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:  # OpenSSL 1.1 has no TLS13-KDF
        return None
    return bytes.fromhex(result.stdout.strip().replace(":", ""))


@pytest.mark.parametrize(
    ("algorithm", "digest"), [(SHA256, "SHA256"), (SHA384, "SHA384")], ids=["sha256", "sha384"]
)
def test_matches_openssl_cli(algorithm: hashes.HashAlgorithm, digest: str) -> None:
    secret = os.urandom(algorithm.digest_size)
    expected = _openssl_tls13_kdf(secret, "traffic upd", algorithm.digest_size, digest)
    if expected is None:
        pytest.skip("no OpenSSL 3 command line (openssl kdf ... TLS13-KDF)")
    assert tls13_next_traffic_secret(secret, algorithm) == expected
    assert _openssl_tls13_kdf(secret, "key", 32, digest) == hkdf_expand_label(
        secret, b"key", b"", 32, algorithm
    )


# --- TLS 1.2 PRF (RFC 5246 §5) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("algorithm", "secret", "label", "seed", "expected"),
    [
        pytest.param(
            SHA256,
            h("9bbe436ba940f017b17652849a71db35"),
            b"test label",
            h("a0ba9f936cda311827a6f796ffd5198c"),
            h(
                "e3f229ba727be17b8d122620557cd453c2aab21d07c3d495329b52d4e61edb5a"
                "6b301791e90d35c9c9a46b4e14baf9af0fa022f7077def17abfd3797c0564bab"
                "4fbc91666e9def9b97fce34f796789baa48082d122ee42c5a72e5a5110fff701"
                "87347b66"
            ),
            id="ietf-sha256-100",
        ),
        pytest.param(
            SHA384,
            h("b80b733d6ceefcdc71566ea48e5567df"),
            b"test label",
            h("cd665cf6a8447dd6ff8b27555edb7465"),
            h(
                "7b0c18e9ced410ed1804f2cfa34a336a1c14dffb4900bb5fd7942107e81c83cd"
                "e9ca0faa60be9fe34f82b1233c9146a0e534cb400fed2700884f9dc236f80edd"
                "8bfa961144c9e8d792eca722a7b32fc3d416d473ebc2c5fd4abfdad05d918425"
                "9b5bf8cd4d90fa0d31e2dec479e4f1a26066f2eea9a69236a3e52655c9e9aee6"
                "91c8f3a26854308d5eaa3be85e0990703d73e56f"
            ),
            id="ietf-sha384-148",
        ),
        pytest.param(
            SHA256,
            h("a3691aa1f6814b80592bf1cf2acf1697"),
            b"test label",
            h("5523d41e320e694d0c1ff5734d830b933e46927071c92621"),
            h("6ad0984fa06f78fe161bd46d7c261de43340d728dddc3d0ff0dd7e0d"),
            id="gnutls-sha256-28",
        ),
        pytest.param(
            SHA256,
            h(
                "f8938ecc9edebc5030c0c6a441e213cd24e6f770a50dda07876f8d55da062bca"
                "db386b411fd4fe4313a604fce6c17fbc"
            ),
            b"master secret",
            h(
                "36c129d01a3200894b9179faac589d9835d58775f9b5ea3587cb8fd0364cae8c"
                "f6c9575ed7ddd73e1f7d16eca115415812a43c2b747daaaae043abfb50053fce"
            ),
            h(
                "202c88c00f84a17a20027079604787461176455539e705be730890602c289a50"
                "01e34eeb3a043e5d52a65e66125188bf"
            ),
            id="nist-master-secret",
        ),
    ],
)
def test_tls12_prf_known_answers(
    algorithm: hashes.HashAlgorithm, secret: bytes, label: bytes, seed: bytes, expected: bytes
) -> None:
    assert tls12_prf(secret, label, seed, len(expected), algorithm) == expected


def test_tls12_prf_shorter_output_is_a_prefix() -> None:
    secret, seed = os.urandom(48), os.urandom(64)
    full = tls12_prf(secret, b"key expansion", seed, 200, SHA384)
    for length in (1, 47, 48, 49, 96, 199):
        assert tls12_prf(secret, b"key expansion", seed, length, SHA384) == full[:length]


def test_tls12_prf_rejects_non_positive_length() -> None:
    with pytest.raises(ValueError, match="length"):
        tls12_prf(b"s", b"l", b"s", 0, SHA256)


# NIST CAVP via OpenSSL's evpkdf_tls12_prf.txt: PRF(master, "key expansion",
# server_random + client_random), 128 bytes.
NIST_MASTER = h(
    "202c88c00f84a17a20027079604787461176455539e705be730890602c289a50"
    "01e34eeb3a043e5d52a65e66125188bf"
)
NIST_SERVER_RANDOM = h("ae6c806f8ad4d80784549dff28a4b58fd837681a51d928c3e30ee5ff14f39868")
NIST_CLIENT_RANDOM = h("62e1fd91f23f558a605f28478c58cf72637b89784d959df7e946d3f07bd1b616")
NIST_KEY_BLOCK = h(
    "d06139889fffac1e3a71865f504aa5d0d2a2e89506c6f2279b670c3e1b74f531"
    "016a2530c51a3a0f7e1d6590d0f0566b2f387f8d11fd4f731cdd572d2eae927f"
    "6f2f81410b25e6960be68985add6c38445ad9f8c64bf8068bf9a6679485d966f"
    "1ad6f68b43495b10a683755ea2b858d70ccac7ec8b053c6bd41ca299d4e51928"
)
# The same inputs through OpenSSL 3.0.22's TLS1-PRF with SHA-384 (72 bytes used).
OPENSSL_KEY_BLOCK_SHA384 = h(
    "b84552bae02337724b10e65bbdb999f7310a88373cac4f9362c5768eb986898e"
    "8d1197f03b7cfef91d37d6d451a0d710390326a35375d2174cf0cf2aba720485"
    "8835f8b4396a24b8"
)


@pytest.mark.parametrize(
    ("key_length", "iv_length", "algorithm", "block"),
    [
        pytest.param(16, 4, SHA256, NIST_KEY_BLOCK, id="aes128gcm-nist"),
        pytest.param(32, 12, SHA256, NIST_KEY_BLOCK, id="chacha20-nist"),
        pytest.param(32, 4, SHA384, OPENSSL_KEY_BLOCK_SHA384, id="aes256gcm-sha384-openssl"),
    ],
)
def test_tls12_key_block_layout(
    key_length: int, iv_length: int, algorithm: hashes.HashAlgorithm, block: bytes
) -> None:
    keys = tls12_key_block(
        NIST_MASTER,
        NIST_CLIENT_RANDOM,
        NIST_SERVER_RANDOM,
        key_length=key_length,
        iv_length=iv_length,
        algorithm=algorithm,
    )
    k, i = key_length, iv_length
    assert keys == Tls12KeyBlock(
        client_write_key=block[:k],
        server_write_key=block[k : 2 * k],
        client_write_iv=block[2 * k : 2 * k + i],
        server_write_iv=block[2 * k + i : 2 * k + 2 * i],
    )
    assert block[:k].hex() not in repr(keys)


def _key_block(
    master: bytes = NIST_MASTER,
    client_random: bytes = NIST_CLIENT_RANDOM,
    server_random: bytes = NIST_SERVER_RANDOM,
    key_length: int = 16,
) -> Tls12KeyBlock:
    return tls12_key_block(
        master, client_random, server_random, key_length=key_length, iv_length=4, algorithm=SHA256
    )


def test_tls12_key_block_argument_checks() -> None:
    with pytest.raises(ValueError, match="master secret must be 48 bytes, got 47"):
        _key_block(master=NIST_MASTER[:47])
    with pytest.raises(ValueError, match="random must be 32 bytes, got 31 and 32"):
        _key_block(client_random=NIST_CLIENT_RANDOM[:31])
    with pytest.raises(ValueError, match="random must be 32 bytes, got 32 and 33"):
        _key_block(server_random=NIST_SERVER_RANDOM + b"x")
    with pytest.raises(ValueError, match="length"):
        _key_block(key_length=0)


# --- The cipher-suite table ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "version", "aead", "key_length", "hash_name", "fixed_iv", "explicit_nonce"),
    [
        ("TLS_AES_128_GCM_SHA256", 0x0304, Aead.AES_128_GCM, 16, "sha256", 12, 0),
        ("TLS_AES_256_GCM_SHA384", 0x0304, Aead.AES_256_GCM, 32, "sha384", 12, 0),
        ("TLS_CHACHA20_POLY1305_SHA256", 0x0304, Aead.CHACHA20_POLY1305, 32, "sha256", 12, 0),
        ("TLS_AES_128_CCM_SHA256", 0x0304, Aead.AES_128_CCM, 16, "sha256", 12, 0),
        ("ECDHE-RSA-AES128-GCM-SHA256", 0x0303, Aead.AES_128_GCM, 16, "sha256", 4, 8),
        ("ECDHE-ECDSA-AES256-GCM-SHA384", 0x0303, Aead.AES_256_GCM, 32, "sha384", 4, 8),
        ("DHE-RSA-AES256-GCM-SHA384", 0x0303, Aead.AES_256_GCM, 32, "sha384", 4, 8),
        ("AES128-GCM-SHA256", 0x0303, Aead.AES_128_GCM, 16, "sha256", 4, 8),
        ("ECDHE-RSA-CHACHA20-POLY1305", 0x0303, Aead.CHACHA20_POLY1305, 32, "sha256", 12, 0),
        ("DHE-RSA-CHACHA20-POLY1305", 0x0303, Aead.CHACHA20_POLY1305, 32, "sha256", 12, 0),
        ("ECDHE-ECDSA-AES128-CCM", 0x0303, Aead.AES_128_CCM, 16, "sha256", 4, 8),
        ("AES128-CCM", 0x0303, Aead.AES_128_CCM, 16, "sha256", 4, 8),
    ],
)
def test_lookup_suite(
    name: str,
    version: int,
    aead: Aead,
    key_length: int,
    hash_name: str,
    fixed_iv: int,
    explicit_nonce: int,
) -> None:
    suite = lookup_suite(name, ssl.TLSVersion(version))
    assert suite is not None
    assert (suite.name, suite.tls_version, suite.aead) == (name, version, aead)
    assert (suite.key_length, suite.fixed_iv_length) == (key_length, fixed_iv)
    assert suite.hash_algorithm.name == hash_name
    assert suite.explicit_nonce_length == explicit_nonce


@pytest.mark.parametrize(
    ("name", "version"),
    [
        ("TLS_AES_128_GCM_SHA256", 0x0303),  # right name, wrong version
        ("ECDHE-RSA-AES128-GCM-SHA256", 0x0304),
        ("ECDHE-RSA-AES128-SHA256", 0x0303),  # CBC: the kernel has no MAC-then-encrypt
        ("ECDHE-ECDSA-AES128-CCM8", 0x0303),  # 8-byte tag
        ("ECDHE-ECDSA-AES256-CCM", 0x0303),  # no AES-256-CCM in the kernel
        ("TLS_AES_128_CCM_8_SHA256", 0x0304),
        ("", 0x0303),
    ],
)
def test_lookup_suite_refuses(name: str, version: int) -> None:
    assert lookup_suite(name, ssl.TLSVersion(version)) is None


def test_suite_table_is_consistent() -> None:
    assert len({(s.name, s.tls_version) for s in CIPHER_SUITES}) == len(CIPHER_SUITES)
    assert len({s.code for s in CIPHER_SUITES}) == len(CIPHER_SUITES)
    for suite in CIPHER_SUITES:
        assert hash(suite) == hash(dataclasses.replace(suite))
        assert suite.key_length == (
            16 if suite.aead in (Aead.AES_128_GCM, Aead.AES_128_CCM) else 32
        )
        assert (suite.tls_version == ssl.TLSVersion.TLSv1_3) == suite.name.startswith("TLS_")
        assert suite.hash_algorithm.name == (
            "sha384" if suite.name.endswith("SHA384") else "sha256"
        )


def test_suite_names_and_codes_match_openssl() -> None:
    """Every name is spelled as the linked OpenSSL spells it, with the same code point."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.set_ciphers("ALL:COMPLEMENTOFALL")
    openssl = {c["name"]: c["id"] & 0xFFFF for c in context.get_ciphers()}
    for suite in CIPHER_SUITES:
        if suite.name == "TLS_AES_128_CCM_SHA256" and suite.name not in openssl:
            continue  # OpenSSL leaves it out unless configured
        assert openssl.get(suite.name) == suite.code, suite.name


# --- End to end: real OpenSSL connections in memory ------------------------------------


@dataclasses.dataclass
class _Connection:
    client: ssl.SSLObject
    server: ssl.SSLObject
    client_out: ssl.MemoryBIO
    server_out: ssl.MemoryBIO
    client_keylog: Path
    server_keylog: Path
    client_handshake_bytes: bytes
    server_handshake_bytes: bytes
    server_final_flight: bytes


def _connect(
    tmp_path: Path,
    ca: trustme.CA,
    key_type: trustme.KeyType,
    tls12_cipher: str | None,
    num_tickets: int = 2,
) -> _Connection:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("example.test", key_type=key_type).configure_cert(server_ctx)
    server_ctx.num_tickets = num_tickets
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client_ctx)
    if tls12_cipher is not None:
        client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        client_ctx.set_ciphers(tls12_cipher)
        server_ctx.set_ciphers(tls12_cipher)
    client_keylog, server_keylog = tmp_path / "client.keys", tmp_path / "server.keys"
    client_ctx.keylog_filename = str(client_keylog)
    server_ctx.keylog_filename = str(server_keylog)

    handshake = handshake_in_memory(client_ctx, server_ctx, server_hostname="example.test")
    return _Connection(
        handshake.client,
        handshake.server,
        handshake.client_out,
        handshake.server_out,
        client_keylog,
        server_keylog,
        handshake.sent_by("client"),
        handshake.sent_by("server"),
        handshake.server_final_flight,
    )


def _records(stream: bytes) -> Iterator[bytes]:
    while stream:
        header = parse_record_header(stream[:RECORD_HEADER_LENGTH])
        end = RECORD_HEADER_LENGTH + header.length
        yield stream[:end]
        stream = stream[end:]


def _first_handshake_message(stream: bytes) -> bytes:
    """The first handshake message of a (plaintext) handshake stream, header included."""
    reassembler = HandshakeReassembler()
    for record in _records(stream):
        assert record[0] == ContentType.HANDSHAKE
        reassembler.feed(record[RECORD_HEADER_LENGTH:])
        message = reassembler.next_message()
        if message is not None:
            msg_type, body = message
            return bytes((msg_type,)) + len(body).to_bytes(3, "big") + body
    raise AssertionError("no complete handshake message")


def _collect(path: Path, client_random: bytes, chunk: int) -> dict[str, bytearray]:
    collector = KeyLogCollector()
    data = path.read_bytes()
    for start in range(0, len(data), chunk):
        collector.feed(data[start : start + chunk])
    return collector.take(client_random)


def _open_tls12(suite: CipherSuite, key: bytes, iv: bytes, seq: int, record: bytes) -> bytes:
    """Decrypt a TLS 1.2 AEAD record: RFC 5288 §3 / RFC 6655 §3 (salt + explicit nonce)
    or RFC 7905 §2 (IV XOR sequence number); additional data per RFC 5246 §6.2.3.3."""
    header = parse_record_header(record[:RECORD_HEADER_LENGTH])
    body = record[RECORD_HEADER_LENGTH:]
    explicit = body[: suite.explicit_nonce_length]
    ciphertext = body[len(explicit) :]
    nonce = iv + explicit if explicit else _xor_nonce(iv, seq)
    additional_data = (
        seq.to_bytes(8, "big")
        + bytes((header.content_type,))
        + header.legacy_version.to_bytes(2, "big")
        + (len(ciphertext) - 16).to_bytes(2, "big")
    )
    return _aead(suite.aead, key).decrypt(nonce, ciphertext, additional_data)


CA = trustme.CA()


def test_openssl_tls13_connection(tmp_path: Path) -> None:
    conn = _connect(tmp_path, CA, trustme.KeyType.ECDSA, tls12_cipher=None, num_tickets=2)
    version, name = conn.client.version(), conn.client.cipher()
    assert version == "TLSv1.3"
    assert name is not None
    suite = lookup_suite(name[0], tls_version_from_name(version))
    assert suite is not None  # OpenSSL's default pick: TLS_AES_256_GCM_SHA384
    client_random = client_random_from_client_hello(
        _first_handshake_message(conn.client_handshake_bytes)
    )
    secrets = _collect(conn.client_keylog, client_random, chunk=7)
    assert _collect(conn.server_keylog, client_random, chunk=64) == secrets
    assert {
        "CLIENT_HANDSHAKE_TRAFFIC_SECRET",
        "SERVER_HANDSHAKE_TRAFFIC_SECRET",
        "CLIENT_TRAFFIC_SECRET_0",
        "SERVER_TRAFFIC_SECRET_0",
        "EXPORTER_SECRET",
    } <= secrets.keys()

    def keys(label: str) -> tuple[bytes, bytes]:
        return tls13_traffic_key_iv(bytes(secrets[label]), suite.key_length, suite.hash_algorithm)

    # Client to server: the first application record is sequence 0.
    conn.client.write(b"ping")
    (record,) = _records(conn.client_out.read())
    assert _open_tls13(suite, *keys("CLIENT_TRAFFIC_SECRET_0"), 0, record) == b"ping\x17"

    # Server to client: the tickets (one record each), then data.
    conn.server.write(b"pong")
    records = [*_records(conn.server_final_flight), *_records(conn.server_out.read())]
    assert len(records) == 3
    server_key, server_iv = keys("SERVER_TRAFFIC_SECRET_0")
    for seq, record in enumerate(records[:2]):
        inner = _open_tls13(suite, server_key, server_iv, seq, record)
        assert inner[-1] == ContentType.HANDSHAKE
        reassembler = HandshakeReassembler()
        reassembler.feed(inner[:-1])
        message = reassembler.next_message()
        assert message is not None
        assert message[0] is HandshakeType.NEW_SESSION_TICKET
        ticket = parse_new_session_ticket(message[1])
        assert 0 < ticket.lifetime <= 604800
        assert reassembler.pending == 0
    assert _open_tls13(suite, server_key, server_iv, 2, records[2]) == b"pong\x17"


@pytest.mark.parametrize(
    ("cipher", "key_type"),
    [
        ("ECDHE-RSA-AES128-GCM-SHA256", trustme.KeyType.RSA),
        ("ECDHE-RSA-AES256-GCM-SHA384", trustme.KeyType.RSA),
        ("ECDHE-RSA-CHACHA20-POLY1305", trustme.KeyType.RSA),
        ("ECDHE-ECDSA-AES128-CCM", trustme.KeyType.ECDSA),
        # RSA key exchange: the client's key log also gets an "RSA" line, which is skipped.
        ("AES128-GCM-SHA256", trustme.KeyType.RSA),
    ],
)
def test_openssl_tls12_connection(tmp_path: Path, cipher: str, key_type: trustme.KeyType) -> None:
    conn = _connect(tmp_path, CA, key_type, tls12_cipher=cipher)
    assert conn.client.version() == "TLSv1.2"
    suite = lookup_suite(cipher, ssl.TLSVersion.TLSv1_2)
    assert suite is not None
    client_random = client_random_from_client_hello(
        _first_handshake_message(conn.client_handshake_bytes)
    )
    server_random = server_random_from_server_hello(
        _first_handshake_message(conn.server_handshake_bytes)
    )
    secrets = _collect(conn.client_keylog, client_random, chunk=1)
    assert secrets.keys() == {"CLIENT_RANDOM"}
    assert _collect(conn.server_keylog, client_random, chunk=4096) == secrets
    block = tls12_key_block(
        bytes(secrets["CLIENT_RANDOM"]),
        client_random,
        server_random,
        key_length=suite.key_length,
        iv_length=suite.fixed_iv_length,
        algorithm=suite.hash_algorithm,
    )
    # After the handshake both directions continue at sequence 1 (Finished used 0).
    conn.client.write(b"ping")
    (record,) = _records(conn.client_out.read())
    assert _open_tls12(suite, block.client_write_key, block.client_write_iv, 1, record) == b"ping"
    conn.server.write(b"pong")
    (record,) = _records(conn.server_out.read())
    assert _open_tls12(suite, block.server_write_key, block.server_write_iv, 1, record) == b"pong"
