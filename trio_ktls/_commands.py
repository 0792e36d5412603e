"""What ``trio-ktls serve`` and ``trio-ktls get`` do, once `_cli` has parsed the command
line: certificates, the start-up lines, sockets and workers, the output file.

Everything a user can get wrong raises `CommandError` (one line on stderr, exit status 1,
from `_cli`); everything blocking runs before the event loop starts or in a worker thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import ssl
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import IO, Final

import trio

from ._fileclient import FetchError, client_context, fetch, stdout_sink
from ._fileserver import FileServer, ServerLimits, serve_handshaken
from ._highlevel import KTLSListener
from ._options import KTLSMode
from ._probe import probe
from ._selfsigned import ServerCertificate, self_signed
from ._workers import bind_sockets, run_workers

logger: Final = logging.getLogger("trio_ktls.serve")

#: The names a self-signed certificate covers unless ``--name`` is given.
DEFAULT_NAMES: Final = ("localhost", "127.0.0.1", "::1")


class CommandError(Exception):
    """A user's mistake or a missing kernel feature: one line, no traceback."""


@dataclass(frozen=True)
class ServeConfig:
    """``trio-ktls serve``'s arguments."""

    directory: str
    host: str = "127.0.0.1"
    port: int = 8443
    cert: str | None = None
    key: str | None = None
    names: Sequence[str] = ()
    tls_version: ssl.TLSVersion | None = None
    workers: int = 1
    ktls: KTLSMode = "auto"
    limits: ServerLimits = field(default_factory=ServerLimits)


def load_certificate(config: ServeConfig) -> ServerCertificate:
    """The user's certificate (and key) files, or a fresh self-signed certificate."""
    if config.cert is None:
        if config.key is not None:
            raise CommandError("--key needs --cert")
        names = list(config.names) or list(DEFAULT_NAMES)
        if not config.names and config.host not in ("", "0.0.0.0", "::", *names):
            names.append(config.host)
        return self_signed(names)
    try:
        with open(config.cert, "rb") as f:
            cert_pem = f.read()
        key_pem = None
        if config.key is not None:
            with open(config.key, "rb") as f:
                key_pem = f.read()
    except OSError as exc:
        raise CommandError(f"cannot read {exc.filename}: {exc.strerror}") from None
    return ServerCertificate(cert_pem, key_pem)


def server_context(certificate: ServerCertificate, config: ServeConfig) -> ssl.SSLContext:
    """The server's context, with the TLS version pinned if asked."""
    try:
        context = certificate.server_context()
    except (ssl.SSLError, ValueError) as exc:
        raise CommandError(f"cannot load the certificate and key: {exc}") from None
    if config.tls_version is not None:
        context.minimum_version = context.maximum_version = config.tls_version
    return context


def ktls_line(mode: KTLSMode) -> str:
    """The start-up line about this kernel's kTLS; `CommandError` for ``require``
    without it."""
    if mode == "off":
        return "kTLS off (--ktls off): TLS in user space"
    result = probe()
    if not result.available:
        if mode == "require":
            raise CommandError(f"kTLS is not available: {result.reason}")
        return f"kTLS not available ({result.reason}): TLS in user space"
    ciphers = ", ".join(f"{c.version} {c.cipher}" for c in result.ciphers if c.tx and c.rx)
    return f"kTLS active on {result.kernel_release}: {ciphers}"


def serve(config: ServeConfig) -> int:
    """Run the file server until SIGINT or SIGTERM; the exit status."""
    try:
        server = FileServer(config.directory, limits=config.limits)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    ktls = ktls_line(config.ktls)
    certificate = load_certificate(config)
    context = server_context(certificate, config)
    try:
        groups = bind_sockets(config.host, config.port, workers=config.workers)
    except OSError as exc:
        raise CommandError(f"cannot listen on {config.host}:{config.port}: {exc}") from None
    what = (
        f"self-signed certificate for {', '.join(certificate.names)}"
        if certificate.names
        else f"certificate {config.cert}"
    )
    logger.info("%s: SHA-256 fingerprint %s", what, certificate.fingerprint)
    address = groups[0][0].getsockname()
    host = f"[{address[0]}]" if ":" in address[0] else address[0]
    logger.info(
        "serving %s at https://%s:%d/ (%d worker%s)",
        server.root,
        host,
        address[1],
        config.workers,
        "" if config.workers == 1 else "s",
    )
    logger.info("%s", ktls)
    return run_workers(groups, partial(_serve_worker, server, context, config.ktls))


def _serve_worker(
    server: FileServer, context: ssl.SSLContext, ktls: KTLSMode, sockets: list[socket.socket]
) -> int:
    with contextlib.suppress(KeyboardInterrupt):  # a Ctrl-C before the receiver was open
        trio.run(_serve_sockets, server, context, ktls, sockets)
    return 0


async def _serve_sockets(
    server: FileServer, context: ssl.SSLContext, ktls: KTLSMode, sockets: list[socket.socket]
) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            listeners = [
                KTLSListener(
                    trio.SocketListener(trio.socket.from_stdlib_socket(sock)),
                    context,
                    nursery=nursery,
                    https_compatible=True,
                    ktls=ktls,
                )
                for sock in sockets
            ]
            await nursery.start(serve_handshaken, server.handle, listeners)
            logger.info("worker %d accepting connections", os.getpid())
            async for signum in signals:
                logger.info("worker %d stopping (%s)", os.getpid(), signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


@dataclass(frozen=True)
class GetConfig:
    """``trio-ktls get``'s arguments."""

    url: str
    output: str | None = None
    cafile: str | None = None
    pin: bytes | None = None
    insecure: bool = False
    tls_version: ssl.TLSVersion | None = None
    ktls: KTLSMode = "auto"
    location: bool = False
    verbose: bool = False


def get(config: GetConfig) -> int:
    """Download ``config.url``; the exit status (`CommandError` on failure)."""
    try:
        context = client_context(
            cafile=config.cafile,
            pin=config.pin,
            insecure=config.insecure,
            tls_version=config.tls_version,
        )
    except FetchError as exc:
        raise CommandError(str(exc)) from None
    try:
        trio.run(_get, config, context)
    except FetchError as exc:
        raise CommandError(str(exc)) from None
    return 0


def _temporary_beside(directory: str) -> IO[bytes]:
    return tempfile.NamedTemporaryFile(dir=directory, prefix=".trio-ktls-get-", delete=False)


def _write(file: IO[bytes], data: bytes) -> None:
    file.write(data)


async def _get(config: GetConfig, context: ssl.SSLContext) -> None:
    if config.output is None:
        result = await fetch(
            config.url,
            stdout_sink(),
            ssl_context=context,
            pin=config.pin,
            ktls=config.ktls,
            follow_redirects=config.location,
            progress=sys.stderr,
        )
    else:
        # Into a temporary file beside the output, renamed over it once complete: a
        # failed download leaves whatever was there before.
        directory = os.path.dirname(config.output) or os.curdir
        try:
            part = await trio.to_thread.run_sync(_temporary_beside, directory)
        except OSError as exc:
            raise FetchError(f"cannot write into {directory}: {exc.strerror}") from None
        try:

            async def write(data: bytes) -> None:
                await trio.to_thread.run_sync(_write, part, data)

            result = await fetch(
                config.url,
                write,
                ssl_context=context,
                pin=config.pin,
                ktls=config.ktls,
                follow_redirects=config.location,
                progress=sys.stderr,
            )
            await trio.to_thread.run_sync(part.close)
            await trio.to_thread.run_sync(os.replace, part.name, config.output)
        except BaseException:
            part.close()
            os.unlink(part.name)
            raise
    if config.verbose:
        print(result.describe(), file=sys.stderr)
