"""The ``trio-ktls`` command (also ``python -m trio_ktls``): argparse and exit statuses.

Exit statuses: 0 success; 1 a failure with a one-line reason on stderr (a download that
failed, kTLS required but missing, a port in use, a file that cannot be read); 2 a
command line argparse rejects; 130 interrupted. A traceback means a bug.
"""

from __future__ import annotations

import argparse
import json
import logging
import ssl
import sys
from collections.abc import Callable, Sequence
from functools import partial
from typing import TypeVar

import trio

from . import _commands
from ._commands import CommandError, GetConfig, ServeConfig
from ._demo import run_demo
from ._fileclient import FetchError, one_line
from ._fileserver import ServerLimits
from ._probe import probe
from ._selfsigned import parse_pin
from ._version import __version__

DESCRIPTION = """\
Linux kernel TLS (kTLS) for trio: the handshake runs in user space, the kernel encrypts
and decrypts every record afterwards.

Run "trio-ktls COMMAND --help" for a command's options.
"""

SERVE_DESCRIPTION = """\
Serve the files beneath DIR over HTTPS/1.1 (GET and HEAD, keep-alive, ranges,
If-Modified-Since). A directory gets an HTML listing of its entries. Nothing outside
DIR is ever opened: "..", percent-encoded forms and symlinks leading out are refused.

Without --cert a self-signed certificate is made for the --name values (default:
localhost, 127.0.0.1, ::1 and --host), kept in memory, and its SHA-256 fingerprint is
logged, for "trio-ktls get --pin". One access-log line per request on stderr says
whether the kernel encrypted that connection.
"""

GET_DESCRIPTION = """\
Download an https URL to FILE (-o) or standard output. Redirects are followed only with
--location. An HTTP status of 300 or more, a TLS failure or a truncated body exits with
status 1 and one line of reason. On a terminal, large bodies get a progress bar (when
tqdm is installed: pip install "trio_ktls[cli]").
"""


_N = TypeVar("_N", int, float)


def _number(
    text: str, convert: Callable[[str], _N], what: str, ok: Callable[[_N], bool], rule: str
) -> _N:
    """An argparse ``type``: ``text`` as a number that ``ok`` accepts."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{rule}, not {text}")
    return value


def _positive_int(text: str) -> int:
    return _number(text, int, "a whole number", lambda v: v >= 1, "must be at least 1")


def _port(text: str) -> int:
    return _number(text, int, "a port number", lambda v: 0 <= v <= 65535, "a port is 0 to 65535")


def _seconds(text: str) -> float:
    return _number(text, float, "a number of seconds", lambda v: v > 0, "must be positive")


def _pin(text: str) -> bytes:
    try:
        return parse_pin(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_tls_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    for name, version in (("1.2", ssl.TLSVersion.TLSv1_2), ("1.3", ssl.TLSVersion.TLSv1_3)):
        group.add_argument(
            f"--tls{name}",
            dest="tls_version",
            action="store_const",
            const=version,
            help=f"TLS {name} only",
        )
    parser.add_argument(
        "--ktls",
        choices=["auto", "require", "off"],
        default="auto",
        help="auto: use the kernel where it can, else user space (default); "
        "require: fail without it; off: user space only",
    )


def build_parser(prog: str = "trio-ktls") -> argparse.ArgumentParser:
    """The whole command line."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, formatter_class=formatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(
        title="commands", dest="command", required=True, metavar="COMMAND"
    )

    probe_cmd = commands.add_parser(
        "probe",
        help="what this kernel's kTLS can do",
        description="Find out what this kernel's kTLS supports by trying it on loopback "
        "sockets. Exit status 0, even without kTLS, unless --require is given.",
    )
    probe_cmd.add_argument("--json", action="store_true", help="print JSON instead of text")
    probe_cmd.add_argument(
        "--require", action="store_true", help="exit with status 1 when kTLS is not available"
    )

    demo_cmd = commands.add_parser(
        "demo",
        help="a kTLS client and server on loopback",
        description="Echo data through a kTLS server and client on loopback, TLS 1.3 then "
        "TLS 1.2, printing what the kernel offloaded. With --files: start 'serve' on a "
        "generated directory and download a large file with 'get' and with curl.",
    )
    demo_cmd.add_argument(
        "--megabytes", metavar="N", type=_positive_int, default=4, help="data (MiB)"
    )
    demo_cmd.add_argument("--ktls", choices=["auto", "require", "off"], default="auto")
    demo_cmd.add_argument(
        "--files", action="store_true", help="the file server demo (serve, get, curl)"
    )

    serve_cmd = commands.add_parser(
        "serve",
        help="an HTTPS file server",
        description=SERVE_DESCRIPTION,
        formatter_class=formatter,
    )
    serve_cmd.add_argument("directory", metavar="DIR", help="the directory to serve")
    serve_cmd.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    serve_cmd.add_argument(
        "--port", type=_port, default=8443, help="0 picks a free one (default: %(default)s)"
    )
    serve_cmd.add_argument("--cert", help="certificate chain (PEM; may hold the key too)")
    serve_cmd.add_argument("--key", help="private key (PEM) for --cert")
    serve_cmd.add_argument(
        "--name",
        action="append",
        dest="names",
        metavar="NAME",
        default=[],
        help="a host name or address for the self-signed certificate (repeatable)",
    )
    serve_cmd.add_argument(
        "--workers",
        metavar="N",
        type=_positive_int,
        default=1,
        help="processes sharing the port (SO_REUSEPORT)",
    )
    serve_cmd.add_argument(
        "--header-timeout",
        metavar="SECONDS",
        type=_seconds,
        default=ServerLimits.header_timeout,
        help="seconds a client has to send a request's headers (default: %(default)s)",
    )
    serve_cmd.add_argument(
        "--max-header-bytes",
        metavar="BYTES",
        type=_positive_int,
        default=ServerLimits.max_header_bytes,
        help="largest request header block, then 431 (default: %(default)s)",
    )
    _add_tls_options(serve_cmd)
    serve_cmd.add_argument("-v", "--verbose", action="store_true", help="log debug lines too")

    get_cmd = commands.add_parser(
        "get", help="download an https URL", description=GET_DESCRIPTION, formatter_class=formatter
    )
    get_cmd.add_argument("url", metavar="URL")
    get_cmd.add_argument(
        "-o", "--output", metavar="FILE", help="write the body here, not to stdout"
    )
    trust = get_cmd.add_mutually_exclusive_group()
    trust.add_argument("--cafile", metavar="F", help="trust these CA certificates (PEM)")
    trust.add_argument(
        "--pin",
        metavar="SHA256",
        type=_pin,
        help="accept only the certificate with this SHA-256 fingerprint (as serve logs it)",
    )
    trust.add_argument("--insecure", action="store_true", help="check no certificate at all")
    get_cmd.add_argument(
        "-L", "--location", action="store_true", help="follow redirects (https only)"
    )
    _add_tls_options(get_cmd)
    get_cmd.add_argument(
        "-v", "--verbose", action="store_true", help="print ktls_info and throughput on stderr"
    )
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "probe":
        result = probe()
        if args.json:
            json.dump(result.as_dict(), sys.stdout, indent=2)
            print()
        else:
            print(result.format())
        return 1 if args.require and not result.available else 0
    if args.command == "demo":
        if args.ktls == "require" and not (result := probe()).available:
            raise CommandError(f"kTLS is not available: {result.reason}")
        if args.files:
            from ._filedemo import run_file_demo

            return run_file_demo(megabytes=args.megabytes, ktls=args.ktls)
        trio.run(partial(run_demo, megabytes=args.megabytes, ktls=args.ktls))
        return 0
    if args.command == "serve":
        _configure_logging(logging.DEBUG if args.verbose else logging.INFO)
        limits = ServerLimits(
            header_timeout=args.header_timeout, max_header_bytes=args.max_header_bytes
        )
        return _commands.serve(
            ServeConfig(
                directory=args.directory,
                host=args.host,
                port=args.port,
                cert=args.cert,
                key=args.key,
                names=args.names,
                tls_version=args.tls_version,
                workers=args.workers,
                ktls=args.ktls,
                limits=limits,
            )
        )
    if args.command == "get":
        return _commands.get(
            GetConfig(
                url=args.url,
                output=args.output,
                cafile=args.cafile,
                pin=args.pin,
                insecure=args.insecure,
                tls_version=args.tls_version,
                ktls=args.ktls,
                location=args.location,
                verbose=args.verbose,
            )
        )
    raise AssertionError(f"unhandled command {args.command}")  # argparse rejects others


def _configure_logging(level: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s trio-ktls[%(process)d] %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger("trio_ktls")
    root.addHandler(handler)
    root.setLevel(level)


def main(argv: Sequence[str] | None = None, prog: str = "trio-ktls") -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); the exit status."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (CommandError, FetchError) as exc:
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
