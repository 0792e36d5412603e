"""Certificates for ``trio-ktls serve``: a fresh self-signed one, or the user's files.

A self-signed certificate is made with ``cryptography`` for the names the server answers
to (DNS names and IP addresses both go into subjectAltName, RFC 5280 §4.2.1.6) and loaded
into the ``SSLContext`` through memfds (``/proc/self/fd/N``, as `_demo` does): the private
key never touches a disk. Clients pin it by the SHA-256 of its DER encoding, the same
fingerprint ``openssl x509 -fingerprint -sha256`` prints.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ._demo import in_memory_file

#: How long a generated certificate is valid: long enough for any one run of a server.
VALIDITY: Final = datetime.timedelta(days=7)

_HEX_PIN: Final = re.compile(r"[0-9a-fA-F]{64}")


@dataclass(frozen=True)
class ServerCertificate:
    """A certificate chain and key, as PEM; ``key_pem`` stays in memory."""

    cert_pem: bytes
    key_pem: bytes | None
    #: The names a generated certificate covers; empty for a user's certificate.
    names: tuple[str, ...] = ()

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the leaf certificate's DER encoding, as ``AB:CD:...``."""
        leaf = x509.load_pem_x509_certificates(self.cert_pem)[0]
        return format_fingerprint(
            hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).digest()
        )

    def server_context(self) -> ssl.SSLContext:
        """A server context with this chain loaded (through memfds, never a file)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with in_memory_file(self.cert_pem) as cert_path:
            if self.key_pem is None:
                context.load_cert_chain(cert_path)
            else:
                with in_memory_file(self.key_pem) as key_path:
                    context.load_cert_chain(cert_path, key_path)
        return context


def format_fingerprint(digest: bytes) -> str:
    """``AB:CD:...``: a digest as ``openssl x509 -fingerprint`` writes it."""
    return ":".join(f"{byte:02X}" for byte in digest)


def parse_pin(text: str) -> bytes:
    """A SHA-256 pin given as 64 hex digits, colons allowed (``AB:CD:...`` or ``abcd...``).

    Raises `ValueError` for anything else.
    """
    compact = text.strip().replace(":", "")
    if not _HEX_PIN.fullmatch(compact):
        raise ValueError(f"a SHA-256 pin is 64 hex digits (colons allowed), not {text!r}")
    return bytes.fromhex(compact)


def self_signed(names: Sequence[str]) -> ServerCertificate:
    """A fresh ECDSA P-256 certificate for ``names`` (host names or IP addresses),
    valid from a few minutes ago for `VALIDITY`."""
    if not names:
        raise ValueError("a self-signed certificate needs at least one name")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])])
    alt_names: list[x509.GeneralName] = []
    for name in names:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt_names.append(x509.DNSName(name))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        # A CA certificate, so that clients may trust it as its own anchor (curl --cacert).
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return ServerCertificate(
        cert.public_bytes(serialization.Encoding.PEM), key_pem, names=tuple(names)
    )
