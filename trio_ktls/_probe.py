"""What this kernel's kTLS can do, found out by doing it.

Kernel version numbers say little: distributions backport kTLS fixes, build it as a module
or not at all, and leave out crypto algorithms. So ``probe()`` asks the kernel directly,
on throw-away loopback TCP pairs:

1. attach the TLS ULP (the failure's errno, plus the kernel config where readable, says
   *why* it is missing);
2. for every (version, cipher) pair: a fresh pair, the same made-up key installed as TX on
   one end and RX on the other, one record sent and read back;
3. TLS 1.3 rekey: send data, a KeyUpdate record, install the next TX key, send again; on
   the other end read the data and the KeyUpdate, install the next RX key, read again.
   Kernels before 6.14 answer the second install with EBUSY.

Everything is blocking and loopback-only; it takes milliseconds on real hardware (about a
second under emulation). Nothing here is used on the data path: a stream attempts the
installs itself and falls back on failure; the probe is for people and for tests.
"""

from __future__ import annotations

import errno
import functools
import gzip
import os
import socket
import ssl
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import trio

from . import _kernel
from ._kernel import CryptoInfo, KernelCipher
from ._keyschedule import KTLS_VERSIONS, tls_version_name

_TIMEOUT: Final = 10.0
_TLS_STAT: Final = Path("/proc/net/tls_stat")
# A KeyUpdate handshake message (RFC 8446 §4.6.3): type 24, length 1, update_not_requested.
_KEY_UPDATE: Final = bytes([24, 0, 0, 1, 0])


@dataclass(frozen=True)
class CipherSupport:
    """Whether the kernel accepted one (version, cipher) pair in each direction."""

    #: ``"TLSv1.2"`` or ``"TLSv1.3"``.
    version: str
    #: The kernel's name for the cipher (``AES_GCM_128``, ``CHACHA20_POLY1305``, ...).
    cipher: str
    #: Whether the kernel took the key as a transmit key.
    tx: bool
    #: Whether it took it as a receive key and a record sent through came out intact.
    rx: bool
    #: What went wrong, in words; None when both directions work.
    error: str | None = None


@dataclass(frozen=True)
class ProbeResult:
    """The outcome of `probe`. ``reason`` is a sentence for a person."""

    #: Whether the kernel offloads at least one version/cipher pair.
    available: bool
    #: Why kTLS is or is not available, in words (the module, the config, seccomp...).
    reason: str
    #: ``uname -r`` of the kernel probed.
    kernel_release: str
    #: Every version/cipher pair tried (empty when the TLS ULP does not attach).
    ciphers: tuple[CipherSupport, ...] = ()
    #: Whether a TLS 1.3 transmit key can be replaced (Linux 6.14+); None if untried.
    tls13_tx_rekey: bool | None = None
    #: Whether a TLS 1.3 receive key can be replaced after a KeyUpdate; None if untried.
    tls13_rx_rekey: bool | None = None
    #: Why the rekey probe failed, in words; None when both directions work.
    rekey_error: str | None = None
    #: The kernel's kTLS counters from ``/proc/net/tls_stat`` at the time of the probe.
    tls_stat: Mapping[str, int] = field(default_factory=dict)

    def supports(self, version: ssl.TLSVersion, cipher: int) -> bool:
        """Whether the kernel offloads ``version`` with ``cipher`` in both directions.

        ``cipher`` is a ``TLS_CIPHER_*`` number from ``uapi/linux/tls.h`` (51 for
        AES-GCM-128, 52 AES-GCM-256, 53 AES-CCM-128, 54 ChaCha20-Poly1305); another
        number is a `ValueError`.
        """
        name = KernelCipher(cipher).name
        return any(
            c.version == tls_version_name(version) and c.cipher == name and c.tx and c.rx
            for c in self.ciphers
        )

    def as_dict(self) -> dict[str, Any]:
        """The result as plain data, for JSON (``python -m trio_ktls probe --json``)."""
        data = asdict(self)
        data["tls_stat"] = dict(self.tls_stat)
        return data

    def format(self) -> str:
        """The result as text for a person (``python -m trio_ktls probe``)."""
        lines = [
            f"kernel release: {self.kernel_release}",
            f"kTLS available: {'yes' if self.available else 'no'} ({self.reason})",
        ]
        if self.ciphers:
            lines.append("ciphers (TX/RX):")
            for c in self.ciphers:
                verdict = f"{'TX' if c.tx else '--'} {'RX' if c.rx else '--'}"
                note = f"  ({c.error})" if c.error else ""
                lines.append(f"  {c.version:7} {c.cipher:18} {verdict}{note}")
        if self.available:
            lines.append(
                f"TLS 1.3 rekey: TX {_yes_no(self.tls13_tx_rekey)}, "
                f"RX {_yes_no(self.tls13_rx_rekey)}"
                + (f" ({self.rekey_error})" if self.rekey_error else "")
            )
        if self.tls_stat:
            lines.append("/proc/net/tls_stat:")
            lines.extend(f"  {k:28} {v}" for k, v in self.tls_stat.items())
        return "\n".join(lines)


def _yes_no(value: bool | None) -> str:
    return "untested" if value is None else ("yes" if value else "no")


def probe() -> ProbeResult:
    """Find out what the running kernel's kTLS supports. Never raises for a missing kTLS."""
    release = os.uname().release
    try:
        with _loopback_pair() as (a, _):
            _kernel.attach_ulp(a)
    except OSError as exc:
        return ProbeResult(False, ulp_error_reason(exc), release, tls_stat=read_tls_stat())
    ciphers = tuple(_probe_cipher(v, c) for v in KTLS_VERSIONS for c in KernelCipher)
    tx_rekey, rx_rekey, rekey_error = _probe_rekey()
    usable = [c for c in ciphers if c.tx and c.rx]
    return ProbeResult(
        available=bool(usable),
        reason=(
            f"the TLS ULP attaches; {len(usable)} of {len(ciphers)} version/cipher pairs work"
            if usable
            else "the TLS ULP attaches but the kernel accepted no cipher"
        ),
        kernel_release=release,
        ciphers=ciphers,
        tls13_tx_rekey=tx_rekey,
        tls13_rx_rekey=rx_rekey,
        rekey_error=rekey_error,
        tls_stat=read_tls_stat(),
    )


@functools.cache
def tls13_rekey_supported() -> bool:
    """Whether this kernel can replace TLS 1.3 keys in both directions (6.14+).

    Checked once per process by doing it (see `probe`), not from the version number.
    Blocking (sockets, and waits of up to ``_TIMEOUT``): streams use
    `kernel_can_rekey_tls13`, which runs it in a worker thread.
    """
    tx_ok, rx_ok, _ = _probe_rekey()
    return bool(tx_ok and rx_ok)


#: `tls13_rekey_supported`'s answer once a stream has asked for it.
_rekey_answer: bool | None = None


async def kernel_can_rekey_tls13() -> bool:
    """`tls13_rekey_supported`, found once per process in a worker thread, so that the
    event loop keeps running while throw-away sockets are rekeyed. Asked the first time a
    key update is wanted, not at every handoff: most connections never update keys."""
    global _rekey_answer
    if _rekey_answer is None:
        _rekey_answer = await trio.to_thread.run_sync(tls13_rekey_supported)
    return _rekey_answer


#: The oldest kernel line on which ``send_file`` uses ``sendfile(2)``: the oldest the
#: matrix runs (6.1, 6.12, 6.18 and 7.x all pass its zero-copy tests).
ZERO_COPY_SEND_FILE_SINCE: Final = (6, 1)


@functools.cache
def zero_copy_send_file_works(release: str | None = None) -> bool:
    """Whether ``send_file`` may use ``sendfile(2)`` on this kernel line.

    Decided by kernel line, as the matrix has shown it, never assumed: from 6.1 on, with
    the writer's loop (``TCP_NOTSENT_LOWAT`` lifted during the transfer, ``TCP_NODELAY``
    set again on EAGAIN; ``_writer.KernelWriter.send_file`` says why), 64 MiB go through
    byte-exact on every line of the matrix, TLS 1.2 and 1.3. Older lines were never
    tried, so they keep the chunked path.
    """
    numbers = (release or os.uname().release).split("-")[0].split(".")
    try:
        line = (int(numbers[0]), int(numbers[1]))
    except (IndexError, ValueError):
        return False
    return line >= ZERO_COPY_SEND_FILE_SINCE


def read_tls_stat() -> dict[str, int]:
    """The kernel's kTLS counters (``TlsTxSw``, ``TlsRxRekeyOk``, ...), empty without kTLS."""
    try:
        text = _TLS_STAT.read_text()
    except OSError:
        return {}
    stats = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if value.strip().isdigit():
            stats[name] = int(value)
    return stats


def ulp_error_reason(exc: OSError) -> str:
    """A sentence explaining why attaching the TLS ULP failed with ``exc``."""
    if exc.errno == errno.ENOENT:
        return _missing_module_reason()
    if exc.errno in (errno.EPERM, errno.EACCES):
        return "not permitted to attach the TLS ULP (a seccomp filter or LSM policy forbids it)"
    if exc.errno == errno.ENOTCONN:
        return "the socket is not a connected TCP socket"
    if exc.errno == errno.EEXIST:
        return "the socket already has an upper-layer protocol attached"
    if exc.errno == errno.ENOPROTOOPT:
        return "the kernel does not know TCP_ULP (kernels before 4.13)"
    return f"attaching the TLS ULP failed: {os.strerror(exc.errno or 0)}"


def _missing_module_reason() -> str:
    setting = kernel_config_value("CONFIG_TLS")
    if setting == "n":
        return "the kernel was built without kTLS (CONFIG_TLS is not set)"
    if tls_module_installed():
        return (
            "the kernel's tls module is installed but not loaded, and this process may not "
            "load it (run `modprobe tls` as root)"
        )
    if setting == "m":
        return "the kernel has kTLS as a module (CONFIG_TLS=m) but tls.ko is not installed"
    return (
        "the kernel has no TLS ULP: the tls module is neither loaded nor installed "
        "(the kernel was probably built without CONFIG_TLS)"
    )


def kernel_config_value(name: str) -> str | None:
    """``y``/``m``/``n`` for a kernel config option, or None when no config is readable.

    Reads ``/proc/config.gz`` (CONFIG_IKCONFIG_PROC) or ``/boot/config-<release>``.
    """
    release = os.uname().release
    text: str | None = None
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            text = f.read()
    except OSError:
        try:
            text = Path(f"/boot/config-{release}").read_text()
        except OSError:
            return None
    for line in text.splitlines():
        if line.startswith(f"{name}="):
            return line.partition("=")[2].strip()
        if line.strip() == f"# {name} is not set":
            return "n"
    return "n"


def tls_module_installed() -> bool:
    release = os.uname().release
    moddir = Path("/lib/modules") / release / "kernel" / "net" / "tls"
    return Path("/sys/module/tls").exists() or any(moddir.glob("tls.ko*"))


@contextmanager
def _loopback_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=_TIMEOUT)
        server, _ = listener.accept()
    server.settimeout(_TIMEOUT)
    with client, server:
        yield client, server


def _made_up_key(version: ssl.TLSVersion, cipher: KernelCipher, fill: int) -> CryptoInfo:
    return CryptoInfo(
        version,
        cipher,
        key=bytes([fill]) * _kernel.key_size(cipher),
        write_iv=bytes([fill ^ 0x5A]) * _kernel.write_iv_size(version, cipher),
        rec_seq=0,
    )


def _probe_cipher(version: ssl.TLSVersion, cipher: KernelCipher) -> CipherSupport:
    tx = rx = False
    try:
        with _loopback_pair() as (a, b):
            _kernel.attach_ulp(a)
            _kernel.attach_ulp(b)
            _kernel.install_key(a, _kernel.TLS_TX, _made_up_key(version, cipher, 1))
            tx = True
            _kernel.install_key(b, _kernel.TLS_RX, _made_up_key(version, cipher, 1))
            rx = True
            a.sendall(b"probe")
            data, _, _, _ = b.recvmsg(64, _kernel.RECORD_TYPE_CMSG_SPACE)
            if data != b"probe":
                return CipherSupport(
                    tls_version_name(version), cipher.name, tx, rx, "record did not round-trip"
                )
    except OSError as exc:
        why = os.strerror(exc.errno or 0)
        return CipherSupport(tls_version_name(version), cipher.name, tx, rx, why)
    return CipherSupport(tls_version_name(version), cipher.name, tx, rx)


def _probe_rekey() -> tuple[bool | None, bool | None, str | None]:
    """(TX rekey works, RX rekey works, why not) for TLS 1.3 AES-GCM-128."""
    version, cipher = ssl.TLSVersion.TLSv1_3, KernelCipher.AES_GCM_128
    tx_ok: bool | None = None
    rx_ok: bool | None = None
    try:
        with _loopback_pair() as (a, b):
            for s in (a, b):
                _kernel.attach_ulp(s)
            _kernel.install_key(a, _kernel.TLS_TX, _made_up_key(version, cipher, 1))
            _kernel.install_key(b, _kernel.TLS_RX, _made_up_key(version, cipher, 1))
            a.sendall(b"before")
            a.sendmsg([_KEY_UPDATE], _kernel.set_record_type_cmsg(22))
            tx_ok = _try_install(a, _kernel.TLS_TX, _made_up_key(version, cipher, 2))
            if tx_ok:
                a.sendall(b"after")
            if _receive_record(b)[0] != b"before":
                return tx_ok, False, "data before the KeyUpdate did not round-trip"
            if _receive_record(b) != (_KEY_UPDATE, 22):
                return tx_ok, False, "the KeyUpdate record did not arrive as a handshake record"
            rx_ok = _try_install(b, _kernel.TLS_RX, _made_up_key(version, cipher, 2))
            if tx_ok and rx_ok and _receive_record(b)[0] != b"after":
                return tx_ok, False, "data after the rekey did not round-trip"
    except OSError as exc:
        return tx_ok, rx_ok, f"rekey probe failed: {exc}"
    why = None if tx_ok and rx_ok else "a second key install is refused (EBUSY): kernel < 6.14"
    return tx_ok, rx_ok, why


def _receive_record(sock: socket.socket) -> tuple[bytes, int | None]:
    """One ``recvmsg`` without polling first.

    Once the kernel has decrypted a KeyUpdate (TLS 1.3 record types are only known after
    decryption, so this can happen during the *previous* read) it reports the socket as
    not readable until a new RX key is installed, yet a read still returns the record.
    So: non-blocking reads, retried, never poll().
    """
    sock.setblocking(False)
    deadline = time.monotonic() + _TIMEOUT
    while True:
        try:
            data, ancdata, _, _ = sock.recvmsg(64, _kernel.RECORD_TYPE_CMSG_SPACE)
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TimeoutError("no record arrived") from None
            time.sleep(0.005)
            continue
        return data, _kernel.record_type_from_ancdata(ancdata)


def _try_install(sock: socket.socket, direction: int, info: CryptoInfo) -> bool:
    try:
        _kernel.install_key(sock, direction, info)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return False
        raise
    return True
