"""``trio-ktls demo --files``: the README's main job, end to end, with real processes.

Makes a directory with one large random file, starts ``trio-ktls serve`` on it (a fresh
certificate passed through memfds, so no key is written anywhere), downloads the file
with ``trio-ktls get`` and with curl over TLS 1.3 and TLS 1.2, checks each copy byte for
byte (SHA-256), and prints the throughput and ``ktls_info`` of both ends: the client's
from ``get -v``, the server's from its access log, which this demo echoes.
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Final

from ._options import KTLSMode
from ._selfsigned import self_signed

_URL: Final = re.compile(r"at (https://\S+/) ")
_CHUNK: Final = 1024 * 1024


@contextmanager
def _memfd(name: str, data: bytes) -> Iterator[int]:
    fd = os.memfd_create(name)  # inheritable only through pass_fds
    try:
        os.write(fd, data)
        yield fd
    finally:
        os.close(fd)


def _make_file(path: Path, megabytes: int) -> str:
    digest = hashlib.sha256()
    with path.open("wb") as f:
        for _ in range(megabytes):
            chunk = os.urandom(_CHUNK)
            digest.update(chunk)
            f.write(chunk)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _echo_lines(pipe: IO[str], prefix: str, found: queue.Queue[str]) -> None:
    """Print the server's log lines as they come, and hand over its URL."""
    for line in pipe:
        print(f"{prefix}{line.rstrip()}", flush=True)
        if match := _URL.search(line):
            found.put(match.group(1))
    found.put("")  # the server's stderr closed


def run_file_demo(*, megabytes: int = 64, ktls: KTLSMode = "auto") -> int:
    """The file demo; exit status 0 when every download was byte-exact."""
    certificate = self_signed(["127.0.0.1"])
    assert certificate.key_pem is not None
    with (
        tempfile.TemporaryDirectory(prefix="trio-ktls-demo-") as work,
        _memfd("cert", certificate.cert_pem) as cert_fd,
        _memfd("key", certificate.key_pem) as key_fd,
    ):
        files = Path(work, "files")
        files.mkdir()
        name = f"random-{megabytes}MiB.bin"
        expected = _make_file(files / name, megabytes)
        print(f"demo: {megabytes} MiB of random data in {files / name}", flush=True)
        cert_path = f"/proc/self/fd/{cert_fd}"
        python = [sys.executable, "-m", "trio_ktls"]
        server = subprocess.Popen(
            [*python, "serve", str(files), "--port", "0", "--ktls", ktls,
             "--cert", cert_path, "--key", f"/proc/self/fd/{key_fd}"],
            pass_fds=(cert_fd, key_fd),
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )  # fmt: skip
        assert server.stderr is not None
        found: queue.Queue[str] = queue.Queue()
        reader = threading.Thread(
            target=_echo_lines, args=(server.stderr, "serve: ", found), daemon=True
        )
        reader.start()
        try:
            base = found.get(timeout=300)
            if not base:
                print("demo: the server did not start", file=sys.stderr)
                return 1
            url = base + name
            downloads: list[tuple[str, Sequence[str]]] = []
            for version in ("1.3", "1.2"):
                out = str(Path(work, f"get-{version}.bin"))
                downloads.append(
                    (
                        f"get TLS {version}",
                        [*python, "get", url, "-o", out, "--cafile", cert_path,
                         f"--tls{version}", "--ktls", ktls, "-v"],
                    )
                )  # fmt: skip
            curl = shutil.which("curl")
            if curl is None:
                print("demo: curl is not installed: only get downloads", flush=True)
            else:
                for version, extra in (
                    ("1.3", ["--tlsv1.3"]),
                    ("1.2", ["--tlsv1.2", "--tls-max", "1.2"]),
                ):
                    out = str(Path(work, f"curl-{version}.bin"))
                    downloads.append(
                        (
                            f"curl TLS {version}",
                            [curl, "-sS", "--cacert", cert_path, *extra, "-o", out, url],
                        )
                    )
            failures = 0
            for label, command in downloads:
                failures += not _download(label, command, Path(command[command.index("-o") + 1]),
                                          expected, megabytes, (cert_fd,))  # fmt: skip
        finally:
            server.send_signal(signal.SIGINT)
            try:
                status = server.wait(timeout=120)
            except subprocess.TimeoutExpired:
                server.kill()
                status = server.wait()
            reader.join(timeout=10)
        print(f"demo: the server stopped with status {status}", flush=True)
        if failures or status != 0:
            print(f"demo: FAILED ({failures} bad downloads)", file=sys.stderr)
            return 1
        print(f"demo: {len(downloads)} downloads of {megabytes} MiB, all byte-exact", flush=True)
        return 0


def _download(
    label: str,
    command: Sequence[str],
    out: Path,
    expected: str,
    megabytes: int,
    fds: tuple[int, ...],
) -> bool:
    started = time.monotonic()
    done = subprocess.run(
        command,
        pass_fds=fds,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.monotonic() - started
    for line in (done.stdout + done.stderr).splitlines():
        print(f"{label.split()[0]}: {line}", flush=True)
    if done.returncode != 0:
        print(f"demo: {label}: exit status {done.returncode}", flush=True)
        return False
    same = _sha256(out) == expected
    out.unlink()
    print(
        f"demo: {label}: {megabytes} MiB in {seconds:.2f} s ({megabytes / seconds:.1f} MiB/s, "
        f"process start included), byte-exact: {same}",
        flush=True,
    )
    return same
