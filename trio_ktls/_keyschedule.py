"""The TLS key schedule: from the secrets OpenSSL logs to the keys the kernel installs.

The handshake runs in OpenSSL, which tells us (through the key log, see ``_keylog``) the
secrets it derived. The kernel wants record-protection keys and IVs. This module derives
the second from the first, and holds the table of cipher suites the kernel can take.
Nothing here touches a socket.

TLS 1.3 (RFC 8446)
------------------
§7.1 defines every derivation as ``HKDF-Expand-Label``: HKDF-Expand (RFC 5869 §2.3)
with the ``HkdfLabel`` structure as ``info``::

    struct {
        uint16 length = Length;
        opaque label<7..255> = "tls13 " + Label;
        opaque context<0..255> = Context;
    } HkdfLabel;

§7.3: each direction's record key and IV come from its traffic secret::

    [sender]_write_key = HKDF-Expand-Label(Secret, "key", "", key_length)
    [sender]_write_iv  = HKDF-Expand-Label(Secret, "iv", "", iv_length)

``iv_length`` is 12 for every AEAD TLS 1.3 defines (§5.3: max(8, N_MIN), and N_MIN is 12
for AES-GCM, AES-CCM and ChaCha20-Poly1305). The key log gives the generation-0
application traffic secrets (``CLIENT_TRAFFIC_SECRET_0``/``SERVER_TRAFFIC_SECRET_0``).

§7.2: after a KeyUpdate (§4.6.3) the sender moves to the next generation::

    application_traffic_secret_N+1 =
        HKDF-Expand-Label(application_traffic_secret_N, "traffic upd", "", Hash.length)

and re-derives key and IV from it as in §7.3; the record sequence number restarts at 0.

TLS 1.2 (RFC 5246)
------------------
§5 defines the PRF as ``P_<hash>(secret, label + seed)``, with::

    P_hash(secret, seed) = HMAC_hash(secret, A(1) + seed) +
                           HMAC_hash(secret, A(2) + seed) + ...
    A(0) = seed,  A(i) = HMAC_hash(secret, A(i-1))

and ``<hash>`` SHA-256 unless the cipher suite names another (SHA-384 for the
``*_SHA384`` suites, RFC 5289 §3 and RFC 5288 §3). §6.3 cuts the key block::

    key_block = PRF(master_secret, "key expansion", server_random + client_random)

into client MAC key, server MAC key, client write key, server write key, client IV,
server IV. AEAD suites have no MAC keys (RFC 5246 §6.2.3.3), and their "IV" is the
implicit part of the nonce: 4 bytes for AES-GCM (RFC 5288 §3) and AES-CCM (RFC 6655 §3),
which prefix an 8-byte explicit nonce carried in every record; 12 bytes for
ChaCha20-Poly1305 (RFC 7905 §2), which has no explicit nonce. The key log gives the
48-byte master secret (``CLIENT_RANDOM``).

Cipher suites
-------------
``CIPHER_SUITES`` lists the AEAD suites whose cipher the kernel implements
(``Documentation/networking/tls.rst``: AES-GCM-128/256, AES-CCM-128, ChaCha20-Poly1305), by
the name OpenSSL gives them (``SSLObject.cipher()[0]``, ``openssl ciphers -V``). CCM_8 suites
(8-byte tag) and AES-256-CCM are absent: the kernel has neither.
"""

from __future__ import annotations

import enum
import ssl
from dataclasses import dataclass, field
from typing import Final

from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

#: The TLS versions the kernel's record layer implements, as the stdlib spells them
#: (``ssl.TLSVersion`` values are the wire code points, 0x0303 and 0x0304).
KTLS_VERSIONS: Final = (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3)

#: RFC 8446 §7.1: every TLS 1.3 label is prefixed with this.
TLS13_LABEL_PREFIX: Final = b"tls13 "

#: RFC 8446 §5.3: iv_length = max(8, N_MIN); N_MIN = 12 for all TLS 1.3 AEADs.
TLS13_IV_LENGTH: Final = 12

#: RFC 5246 §8.1: the master secret is always 48 bytes.
TLS12_MASTER_SECRET_LENGTH: Final = 48

#: RFC 5246 §7.4.1.2 (and RFC 8446 §4.1.2): ClientHello.random and ServerHello.random.
RANDOM_LENGTH: Final = 32

#: Every AEAD here authenticates with a 16-byte tag (so no CCM_8).
AEAD_TAG_LENGTH: Final = 16


class Aead(enum.Enum):
    """The record-protection algorithms the kernel implements (and this library uses)."""

    AES_128_GCM = "AES-128-GCM"
    AES_256_GCM = "AES-256-GCM"
    AES_128_CCM = "AES-128-CCM"
    CHACHA20_POLY1305 = "ChaCha20-Poly1305"


@dataclass(frozen=True)
class CipherSuite:
    """One TLS cipher suite: what the record layer needs to know about it.

    ``hash`` is the suite's hash (the TLS 1.3 HKDF hash, or the TLS 1.2 PRF hash) as a
    ``cryptography`` algorithm class; ``hash_algorithm`` gives an instance.
    ``fixed_iv_length`` is the length of the IV derived by the key schedule: 12 for TLS 1.3;
    in TLS 1.2, 4 for AES-GCM/CCM (the implicit nonce salt) and 12 for ChaCha20-Poly1305.
    """

    name: str
    tls_version: ssl.TLSVersion
    aead: Aead
    key_length: int
    hash: type[hashes.HashAlgorithm]
    fixed_iv_length: int
    #: The IANA code point (RFC 8446 Appendix B.4, the TLS Cipher Suites registry).
    code: int

    @property
    def hash_algorithm(self) -> hashes.HashAlgorithm:
        """A fresh instance of the suite's hash, as ``cryptography`` functions take it."""
        return self.hash()

    @property
    def explicit_nonce_length(self) -> int:
        """Bytes of nonce carried in every record before the ciphertext.

        8 for TLS 1.2 AES-GCM (RFC 5288 §3) and AES-CCM (RFC 6655 §3); 0 for TLS 1.2
        ChaCha20-Poly1305 (RFC 7905 §2) and for all of TLS 1.3 (RFC 8446 §5.3), where the
        nonce is the IV XORed with the sequence number.
        """
        if self.tls_version is ssl.TLSVersion.TLSv1_2 and self.aead is not Aead.CHACHA20_POLY1305:
            return 8
        return 0


def _suite(
    code: int,
    name: str,
    version: ssl.TLSVersion,
    aead: Aead,
    hash_: type[hashes.HashAlgorithm],
) -> CipherSuite:
    key_length = 32 if aead in (Aead.AES_256_GCM, Aead.CHACHA20_POLY1305) else 16
    # TLS 1.3 and ChaCha20 derive the whole 12-byte nonce base; TLS 1.2 AES-GCM/CCM derive
    # a 4-byte salt and carry 8 explicit nonce bytes in each record.
    nonce_base = version is ssl.TLSVersion.TLSv1_3 or aead is Aead.CHACHA20_POLY1305
    fixed_iv_length = 12 if nonce_base else 4
    return CipherSuite(
        name=name,
        tls_version=version,
        aead=aead,
        key_length=key_length,
        hash=hash_,
        fixed_iv_length=fixed_iv_length,
        code=code,
    )


_V13: Final = ssl.TLSVersion.TLSv1_3
_V12: Final = ssl.TLSVersion.TLSv1_2
_GCM128: Final = Aead.AES_128_GCM
_GCM256: Final = Aead.AES_256_GCM
_CCM128: Final = Aead.AES_128_CCM
_CHACHA: Final = Aead.CHACHA20_POLY1305
_SHA256: Final = hashes.SHA256
_SHA384: Final = hashes.SHA384

#: Every suite the library can hand to the kernel. Names as OpenSSL spells them.
CIPHER_SUITES: Final[tuple[CipherSuite, ...]] = (
    # TLS 1.3, RFC 8446 §B.4. (OpenSSL leaves TLS_AES_128_CCM_SHA256 off by default.)
    _suite(0x1301, "TLS_AES_128_GCM_SHA256", _V13, _GCM128, _SHA256),
    _suite(0x1302, "TLS_AES_256_GCM_SHA384", _V13, _GCM256, _SHA384),
    _suite(0x1303, "TLS_CHACHA20_POLY1305_SHA256", _V13, _CHACHA, _SHA256),
    _suite(0x1304, "TLS_AES_128_CCM_SHA256", _V13, _CCM128, _SHA256),
    # TLS 1.2 AES-GCM: RFC 5289 (ECDHE), RFC 5288 (DHE, RSA key exchange).
    _suite(0xC02B, "ECDHE-ECDSA-AES128-GCM-SHA256", _V12, _GCM128, _SHA256),
    _suite(0xC02C, "ECDHE-ECDSA-AES256-GCM-SHA384", _V12, _GCM256, _SHA384),
    _suite(0xC02F, "ECDHE-RSA-AES128-GCM-SHA256", _V12, _GCM128, _SHA256),
    _suite(0xC030, "ECDHE-RSA-AES256-GCM-SHA384", _V12, _GCM256, _SHA384),
    _suite(0x009E, "DHE-RSA-AES128-GCM-SHA256", _V12, _GCM128, _SHA256),
    _suite(0x009F, "DHE-RSA-AES256-GCM-SHA384", _V12, _GCM256, _SHA384),
    _suite(0x009C, "AES128-GCM-SHA256", _V12, _GCM128, _SHA256),
    _suite(0x009D, "AES256-GCM-SHA384", _V12, _GCM256, _SHA384),
    # TLS 1.2 ChaCha20-Poly1305, RFC 7905 (PRF SHA-256).
    _suite(0xCCA8, "ECDHE-RSA-CHACHA20-POLY1305", _V12, _CHACHA, _SHA256),
    _suite(0xCCA9, "ECDHE-ECDSA-CHACHA20-POLY1305", _V12, _CHACHA, _SHA256),
    _suite(0xCCAA, "DHE-RSA-CHACHA20-POLY1305", _V12, _CHACHA, _SHA256),
    # TLS 1.2 AES-128-CCM (16-byte tag), RFC 6655 and RFC 7251 (PRF SHA-256).
    _suite(0xC09C, "AES128-CCM", _V12, _CCM128, _SHA256),
    _suite(0xC09E, "DHE-RSA-AES128-CCM", _V12, _CCM128, _SHA256),
    _suite(0xC0AC, "ECDHE-ECDSA-AES128-CCM", _V12, _CCM128, _SHA256),
)

_SUITES_BY_NAME: Final[dict[tuple[str, ssl.TLSVersion], CipherSuite]] = {
    (suite.name, suite.tls_version): suite for suite in CIPHER_SUITES
}


def lookup_suite(name: str, tls_version: ssl.TLSVersion | None) -> CipherSuite | None:
    """The suite OpenSSL calls ``name`` at ``tls_version``, or None when the kernel
    cannot take it (CBC suites, CCM_8, unknown names, versions other than 1.2 and 1.3)."""
    if tls_version is None:
        return None
    return _SUITES_BY_NAME.get((name, tls_version))


def tls_version_from_name(name: str | None) -> ssl.TLSVersion | None:
    """The version ``SSLObject.version()`` calls ``name`` (``"TLSv1.3"``), if kTLS has it."""
    for version in KTLS_VERSIONS:
        if name == tls_version_name(version):
            return version
    return None


def tls_version_name(version: ssl.TLSVersion) -> str:
    """``"TLSv1.2"`` / ``"TLSv1.3"``: the spelling of ``SSLObject.version()``."""
    return version.name.replace("_", ".")


# --- TLS 1.3 -------------------------------------------------------------------------


def hkdf_expand_label(
    secret: bytes,
    label: bytes,
    context: bytes,
    length: int,
    algorithm: hashes.HashAlgorithm,
) -> bytes:
    """RFC 8446 §7.1 ``HKDF-Expand-Label(secret, label, context, length)``.

    ``label`` is given without the ``"tls13 "`` prefix (``b"key"``, ``b"traffic upd"``).
    Raises ``ValueError`` for arguments the ``HkdfLabel`` struct cannot encode.
    """
    full_label = TLS13_LABEL_PREFIX + label
    if not 7 <= len(full_label) <= 255:
        raise ValueError(f"HKDF label must be 1..249 bytes after the prefix, got {len(label)}")
    if len(context) > 255:
        raise ValueError(f"HKDF context must be at most 255 bytes, got {len(context)}")
    if not 0 < length <= 0xFFFF:
        raise ValueError(f"HKDF output length must be 1..65535, got {length}")
    info = (
        length.to_bytes(2, "big")
        + len(full_label).to_bytes(1, "big")
        + full_label
        + len(context).to_bytes(1, "big")
        + context
    )
    return HKDFExpand(algorithm=algorithm, length=length, info=info).derive(secret)


def tls13_traffic_key_iv(
    secret: bytes, key_length: int, algorithm: hashes.HashAlgorithm
) -> tuple[bytes, bytes]:
    """RFC 8446 §7.3: the write key and 12-byte write IV for a traffic secret."""
    key = hkdf_expand_label(secret, b"key", b"", key_length, algorithm)
    iv = hkdf_expand_label(secret, b"iv", b"", TLS13_IV_LENGTH, algorithm)
    return key, iv


def tls13_next_traffic_secret(secret: bytes, algorithm: hashes.HashAlgorithm) -> bytes:
    """RFC 8446 §7.2: application_traffic_secret_N+1 from application_traffic_secret_N."""
    return hkdf_expand_label(secret, b"traffic upd", b"", algorithm.digest_size, algorithm)


# --- TLS 1.2 -------------------------------------------------------------------------


def tls12_prf(
    secret: bytes,
    label: bytes,
    seed: bytes,
    length: int,
    algorithm: hashes.HashAlgorithm,
) -> bytes:
    """RFC 5246 §5: ``PRF(secret, label, seed) = P_<hash>(secret, label + seed)``,
    truncated to ``length`` bytes."""
    if length <= 0:
        raise ValueError(f"PRF output length must be positive, got {length}")
    full_seed = label + seed

    def hmac_hash(data: bytes) -> bytes:
        mac = hmac.HMAC(secret, algorithm)
        mac.update(data)
        return mac.finalize()

    output = bytearray()
    a = full_seed  # A(0)
    while len(output) < length:
        a = hmac_hash(a)  # A(i) = HMAC_hash(secret, A(i-1))
        output += hmac_hash(a + full_seed)
    return bytes(output[:length])


@dataclass(frozen=True)
class Tls12KeyBlock:
    """RFC 5246 §6.3 key block of an AEAD suite (no MAC keys). Keys stay out of ``repr``."""

    client_write_key: bytes = field(repr=False)
    server_write_key: bytes = field(repr=False)
    client_write_iv: bytes = field(repr=False)
    server_write_iv: bytes = field(repr=False)


def tls12_key_block(
    master_secret: bytes,
    client_random: bytes,
    server_random: bytes,
    *,
    key_length: int,
    iv_length: int,
    algorithm: hashes.HashAlgorithm,
) -> Tls12KeyBlock:
    """RFC 5246 §6.3: the write keys and implicit IVs of a TLS 1.2 AEAD connection.

    ``iv_length`` is the suite's ``fixed_iv_length`` (4 for AES-GCM/CCM, 12 for
    ChaCha20-Poly1305); ``algorithm`` its PRF hash.
    """
    if len(master_secret) != TLS12_MASTER_SECRET_LENGTH:
        raise ValueError(f"master secret must be 48 bytes, got {len(master_secret)}")
    if len(client_random) != RANDOM_LENGTH or len(server_random) != RANDOM_LENGTH:
        raise ValueError(
            f"client and server random must be 32 bytes, got {len(client_random)} "
            f"and {len(server_random)}"
        )
    if key_length <= 0 or iv_length <= 0:
        raise ValueError(f"bad key/IV length {key_length}/{iv_length}")
    block = tls12_prf(
        master_secret,
        b"key expansion",
        server_random + client_random,
        2 * (key_length + iv_length),
        algorithm,
    )
    keys_end = 2 * key_length
    return Tls12KeyBlock(
        client_write_key=block[:key_length],
        server_write_key=block[key_length:keys_end],
        client_write_iv=block[keys_end : keys_end + iv_length],
        server_write_iv=block[keys_end + iv_length :],
    )
