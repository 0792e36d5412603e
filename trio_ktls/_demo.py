"""``python -m trio_ktls demo``: a kTLS server and client talking over loopback.

The server is `serve_ktls_over_tcp` with an echo handler; the client is
`open_ktls_stream`. Both print their `KTLSInfo`, so the demo shows whether the kernel took
over each direction (and why not, where it did not). The certificate is made on the spot
with ``cryptography`` and loaded through a memfd, so no key touches the disk.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ._highlevel import open_ktls_stream, serve_ktls_over_tcp
from ._options import KTLSMode
from ._stream import KTLSStream

_HOSTNAME = "trio-ktls.demo"


@contextmanager
def in_memory_file(data: bytes) -> Iterator[str]:
    """A path to ``data`` in a memfd (never on disk), valid inside the ``with``."""
    fd = os.memfd_create("trio_ktls-demo", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def demo_certificate() -> tuple[bytes, bytes]:
    """(private key, certificate) PEM of a fresh self-signed ECDSA certificate for the
    demo's host name, valid for an hour. Keep the key in memory (`in_memory_file`)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _HOSTNAME)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(_HOSTNAME)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, cert_pem


def demo_contexts(
    certificate: tuple[bytes, bytes] | None = None,
) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts around ``certificate`` (default: a fresh one)."""
    key_pem, cert_pem = certificate or demo_certificate()
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with in_memory_file(cert_pem) as cert_path, in_memory_file(key_pem) as key_path:
        server.load_cert_chain(cert_path, key_path)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cadata=cert_pem.decode())
    return server, client


async def _echo(stream: KTLSStream) -> None:
    print(f"server: {stream.ktls_info}")
    while data := await stream.receive_some():
        await stream.send_all(data)


async def _echo_through(client: KTLSStream, megabytes: int) -> None:
    payload = os.urandom(megabytes * 1024 * 1024)
    echoed = bytearray()
    started = time.perf_counter()

    async def receive_all() -> None:
        while len(echoed) < len(payload):
            echoed.extend(await client.receive_some())

    async with trio.open_nursery() as io:
        io.start_soon(client.send_all, payload)
        io.start_soon(receive_all)
    elapsed = time.perf_counter() - started
    same = hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    print(
        f"client: echoed {megabytes} MiB over {client.version()} {client.cipher()[0]} "
        f"in {elapsed:.2f} s, byte-exact: {same}"
    )
    if not same:
        raise RuntimeError("the echoed data differs from what was sent")


async def run_demo(*, megabytes: int = 4, ktls: KTLSMode = "auto") -> None:
    """Echo ``megabytes`` through a kTLS server, over TLS 1.3 and then TLS 1.2."""
    server_ctx, client_ctx = demo_contexts()
    for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
        client_ctx.minimum_version = client_ctx.maximum_version = version
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(serve_ktls_over_tcp, _echo, 0, server_ctx)
            port = listeners[0].transport_listener.socket.getsockname()[1]
            async with open_ktls_stream(
                "127.0.0.1", port, ssl_context=client_ctx, server_hostname=_HOSTNAME, ktls=ktls
            ) as client:
                print(f"client: {client.ktls_info}")
                await _echo_through(client, megabytes)
            nursery.cancel_scope.cancel()
