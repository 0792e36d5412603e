#!/usr/bin/env python3
"""Kernel lab: run a command inside a QEMU guest booted with one of Debian's kernels.

The machines this project is developed on run kernels built without ``CONFIG_TLS``, so
every test of the kernel's record layer runs in a guest.  The guests are booted with
virtme-ng (``vng``), which shares the host's root filesystem read-only with the guest:
a virtualenv built on the host runs unchanged inside, and ``--rwdir`` folders carry
results (junit XML, logs) back.

Kernels are Debian's generic ``amd64`` builds (they have kTLS and the 9p modules that
virtme-ng needs), resolved by pattern to the newest build of each line through a
private apt configuration that never touches the system's, and cached under
``${TRIO_KTLS_KERNEL_CACHE:-${XDG_CACHE_HOME:-~/.cache}}/trio_ktls/kernels/<label>/``.

Usage::

    tools/kernel_lab.py setup
    tools/kernel_lab.py fetch {6.1,6.12,6.18,7} [--refresh]
    tools/kernel_lab.py run LABEL [--rwdir DIR] [--timeout S] [--memory 2G]
                                  [--env NAME[=VALUE]]... -- CMD...

Standard library only: the noxfile imports it from the nox interpreter, and the kernel
sessions run it from their own virtualenvs.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final
from xml.etree import ElementTree

# curl: `trio-ktls serve`'s interop tests and the demo download with it, in the guest too
# (which sees the host's root filesystem).
HOST_PACKAGES = ("qemu-system-x86", "kmod", "busybox-static", "udev", "curl")
# The version every quirk in this file was checked against.
VIRTME_NG_REQUIREMENT = "virtme-ng==1.42"
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
MODULES_ROOT = Path("/lib/modules")
RECORD_NAME = "kernel.json"
# Set in the guest command's environment; the test suite turns skipped kTLS tests into
# failures when it sees it.
GUEST_KERNEL_ENV = "TRIO_KTLS_GUEST_KERNEL"
# Exit status when the guest had to be killed, as timeout(1) does.
TIMEOUT_STATUS = 124
# Exit status when the guest booted some other kernel than the one asked for.
WRONG_KERNEL_STATUS = 125


class LabError(Exception):
    """A failure worth one line to the user, not a traceback."""


@dataclass(frozen=True)
class KernelLine:
    """Where one kernel line lives in Debian's archive and how its packages are named."""

    suites: tuple[str, ...]
    # Matches the whole image package name; its groups are the numbers that order builds.
    image_pattern: re.Pattern[str]
    #: Whether the kernel can replace TLS 1.3 keys (Linux 6.14+): the tests of this line
    #: expect exactly this, so a kernel that gains or loses it shows up as a failure.
    tls13_rekey: bool
    #: Whether trio_ktls's send_file uses sendfile(2) there (zero-copy).
    zero_copy_send_file: bool
    # From 7.x on the image package is a meta package: the kernel and its modules are in
    # linux-binary-<version> and linux-modules-<version>.
    split_packages: bool = False


#: The matrix: every kernel line the tests run on, and what each can do. The tests, the
#: CI script (``kernel_lab.py labels``) and the docs (``kernel_lab.py table``) read it.
KERNEL_LINES: dict[str, KernelLine] = {
    "6.1": KernelLine(
        ("bookworm", "bookworm-security"),
        re.compile(r"linux-image-6\.1\.0-(\d+)-amd64-unsigned"),
        tls13_rekey=False,
        zero_copy_send_file=True,
    ),
    "6.12": KernelLine(
        ("trixie",),
        re.compile(r"linux-image-6\.12\.(\d+)\+deb13-amd64"),
        tls13_rekey=False,
        zero_copy_send_file=True,
    ),
    "6.18": KernelLine(
        ("trixie-backports",),
        re.compile(r"linux-image-6\.18\.(\d+)\+deb13-amd64"),
        tls13_rekey=True,
        zero_copy_send_file=True,
    ),
    "7": KernelLine(
        ("sid",),
        re.compile(r"linux-image-7\.(\d+)\.(\d+)\+deb14-amd64"),
        tls13_rekey=True,
        zero_copy_send_file=True,
        split_packages=True,
    ),
}
LABELS = tuple(KERNEL_LINES)


@dataclass(frozen=True)
class KernelRecord:
    """What ``fetch`` resolved and extracted; stored as JSON next to the tree."""

    label: str
    package: str
    version: str
    release: str
    vmlinuz: str
    modules_dir: str

    @classmethod
    def from_json(cls, text: str) -> KernelRecord:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("kernel record is not a JSON object")
        return cls(**{name: str(data[name]) for name in cls.__dataclass_fields__})

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2) + "\n"


# --- pure logic (unit-tested on the host) ---------------------------------------------


def pick_newest(line: KernelLine, package_names: Iterable[str]) -> str:
    """Return the newest image package of ``line`` among ``package_names``.

    The archive drops old ABI numbers, so nothing is pinned: the newest name that matches
    the pattern wins, ordered numerically (6.12.10 is newer than 6.12.9).
    """
    matches: list[tuple[tuple[int, ...], str]] = []
    for name in package_names:
        match = line.image_pattern.fullmatch(name.strip())
        if match:
            matches.append((tuple(int(group) for group in match.groups()), match.group(0)))
    if not matches:
        raise LabError(f"no package matches {line.image_pattern.pattern!r} in {line.suites}")
    return max(matches)[1]


def split_package_names(image_package: str) -> list[str]:
    """The packages that hold the kernel and modules of a 7.x-style meta package."""
    version = image_package.removeprefix("linux-image-")
    return [f"linux-binary-{version}", f"linux-modules-{version}"]


@dataclass(frozen=True)
class Mirrors:
    archive: str
    security: str | None


_ARCHIVE_SUITE = re.compile(
    r"(bookworm|trixie|forky|sid|stable|testing|unstable)(-updates|-backports)?"
)
_SECURITY_SUITE = re.compile(r"(bookworm|trixie|forky|stable|testing)(-security|/updates)")


# deb [options] URI suite components...
_ONE_LINE_ENTRY = re.compile(r"\s*deb\s+(\[[^]]*\]\s+)?(?P<uri>\S+)\s+(?P<suite>\S+)")


def parse_sources(text: str, deb822: bool) -> list[tuple[str, list[str]]]:
    """(URI, suites) of every enabled ``deb`` entry of an apt sources file."""
    entries: list[tuple[str, list[str]]] = []
    if deb822:
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if "deb" not in fields.get("types", "").split():
                continue
            if fields.get("enabled", "yes").lower() == "no":
                continue
            suites = fields.get("suites", "").split()
            entries.extend((uri, suites) for uri in fields.get("uris", "").split())
    else:
        for line in text.splitlines():
            match = _ONE_LINE_ENTRY.match(line)
            if match:
                entries.append((match["uri"], [match["suite"]]))
    return entries


def pick_mirrors(entries: Iterable[tuple[str, Sequence[str]]]) -> Mirrors:
    """The Debian archive and security mirrors among the host's apt sources."""
    archive = security = None
    for uri, suites in entries:
        if not uri.startswith(("http://", "https://")):
            continue
        if archive is None and any(_ARCHIVE_SUITE.fullmatch(s) for s in suites):
            archive = uri
        if security is None and any(_SECURITY_SUITE.fullmatch(s) for s in suites):
            security = uri
    if archive is None:
        raise LabError(
            "found no Debian archive among the host's apt sources; "
            "set TRIO_KTLS_DEBIAN_MIRROR to its URI"
        )
    return Mirrors(archive.rstrip("/"), security.rstrip("/") if security else None)


def locate_kernel(root: Path) -> tuple[str, Path, Path]:
    """(release, vmlinuz, modules dir) of a kernel extracted into ``root``.

    6.1 ships ``boot/vmlinuz-<release>`` and ``lib/modules/<release>``; 6.12 and later
    moved the modules under ``usr/``, and 7.x moved the image into the modules dir.
    """
    # A set: with lib -> usr/lib (made for depmod) both parents are the same folder.
    trees = {
        tree.resolve()
        for parent in (root / "lib" / "modules", root / "usr" / "lib" / "modules")
        if parent.is_dir()
        for tree in parent.iterdir()
        if (tree / "kernel").is_dir()
    }
    if len(trees) != 1:
        raise LabError(f"expected one kernel's modules under {root}, found {sorted(trees)}")
    (modules_dir,) = trees
    release = modules_dir.name
    for vmlinuz in (root / "boot" / f"vmlinuz-{release}", modules_dir / "vmlinuz"):
        if vmlinuz.is_file():
            return release, vmlinuz, modules_dir
    raise LabError(f"no vmlinuz for {release} under {root}")


def guest_script(cwd: Path, release: str, env: Mapping[str, str], command: Sequence[str]) -> str:
    """The shell line run in the guest: check the kernel, set up, run ``command``.

    vng does not carry the host's environment into the guest, so everything the command
    needs is exported explicitly.  The kernel check proves the guest booted what was
    fetched (vng falls back to other kernels quietly).
    """
    parts = [
        f'[ "$(uname -r)" = {shlex.quote(release)} ] || '
        f'{{ echo "kernel_lab: guest runs $(uname -r), not {release}" >&2; '
        f"exit {WRONG_KERNEL_STATUS}; }}",
        f"cd {shlex.quote(str(cwd))}",
        *(f"export {name}={shlex.quote(value)}" for name, value in env.items()),
        "exec " + shlex.join(command),
    ]
    return " && ".join(parts)


@dataclass(frozen=True)
class JunitCounts:
    tests: int
    failures: int
    errors: int
    skipped: int
    seconds: float


def read_junit(path: Path) -> JunitCounts:
    """Totals over the test suites of a junit XML file, as pytest writes it."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    if not suites:
        raise LabError(f"{path} has no test suite")

    def total(name: str) -> int:
        return sum(int(suite.get(name, "0")) for suite in suites)

    return JunitCounts(
        tests=total("tests"),
        failures=total("failures"),
        errors=total("errors"),
        skipped=total("skipped"),
        seconds=sum(float(suite.get("time", "0")) for suite in suites),
    )


def check_guest_junit(path: Path, not_before: float) -> JunitCounts:
    """The counts of a guest's test run, if they prove that the kTLS tests really ran.

    A guest that never booted, a run that selected nothing, or tests that skipped for
    want of kTLS all look like success from an exit status alone; a file left by an
    earlier run must not stand in for this one (``not_before`` is a ``time.time()``).
    """
    try:
        written = path.stat().st_mtime
    except FileNotFoundError:
        raise LabError(f"{path} was not written: the tests did not run in the guest") from None
    if written < not_before:
        raise LabError(f"{path} is left over from an earlier run")
    counts = read_junit(path)
    if counts.tests == 0:
        raise LabError(f"{path}: no tests ran")
    if counts.failures or counts.errors or counts.skipped:
        raise LabError(
            f"{path}: {counts.failures} failed, {counts.errors} errors, "
            f"{counts.skipped} skipped of {counts.tests}"
        )
    return counts


# --- host side ------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"kernel_lab: {message}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    base = (
        os.environ.get("TRIO_KTLS_KERNEL_CACHE")
        or os.environ.get("XDG_CACHE_HOME")
        or str(Path.home() / ".cache")
    )
    return Path(base) / "trio_ktls" / "kernels"


def host_mirrors() -> Mirrors:
    """Read the mirrors from the host's apt configuration (or the override variables),
    so that no archive host name is written down anywhere in this project."""
    archive = os.environ.get("TRIO_KTLS_DEBIAN_MIRROR")
    security = os.environ.get("TRIO_KTLS_DEBIAN_SECURITY_MIRROR")
    if archive:
        return Mirrors(archive.rstrip("/"), security.rstrip("/") if security else None)
    etc = Path("/etc/apt")
    entries: list[tuple[str, list[str]]] = []
    for path in [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*"))]:
        if path.suffix in (".list", ".sources") and path.is_file():
            entries += parse_sources(path.read_text(), deb822=path.suffix == ".sources")
    mirrors = pick_mirrors(entries)
    if security:
        mirrors = Mirrors(mirrors.archive, security.rstrip("/"))
    return mirrors


def is_root() -> bool:
    return os.geteuid() == 0


class PrivateApt:
    """apt-get/apt-cache with their own sources, lists and cache: the system's apt state
    is neither read for sources nor written."""

    def __init__(self, directory: Path, suites: Sequence[str]) -> None:
        self.directory = directory
        self.suites = suites

    def options(self) -> list[str]:
        d = self.directory
        options = [
            f"-o=Dir::Etc::sourcelist={d / 'sources.list'}",
            # An empty folder: apt 2.6 takes "-" for a folder name and warns.
            f"-o=Dir::Etc::sourceparts={d / 'empty.d'}",
            # The host's pinning must not hide the versions we ask for.
            f"-o=Dir::Etc::preferences={d / 'preferences'}",
            f"-o=Dir::Etc::preferencesparts={d / 'empty.d'}",
            f"-o=Dir::State::Lists={d / 'lists'}",
            f"-o=Dir::Cache={d / 'cache'}",
            "-o=APT::Architectures=amd64",
        ]
        if is_root():
            # Root's cache dir is not readable by the _apt sandbox user: apt would fall
            # back to root anyway, with a warning per file.
            options.append("-o=APT::Sandbox::User=root")
        return options

    def write_config(self, mirrors: Mirrors) -> None:
        for sub in ("lists/partial", "cache/archives/partial", "empty.d"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True)
        (self.directory / "preferences").write_text("")
        lines = []
        for suite in self.suites:
            uri = mirrors.security if suite.endswith("-security") else mirrors.archive
            if uri is None:
                log(f"no Debian security mirror on the host: skipping {suite}")
                continue
            # Only the Packages indices: no translations, Contents or DEP-11 metadata.
            lines.append(
                f"deb [arch=amd64 target=Packages signed-by={DEBIAN_KEYRING}] {uri} {suite} main\n"
            )
        (self.directory / "sources.list").write_text("".join(lines))

    def update(self) -> None:
        subprocess.run(["apt-get", *self.options(), "update"], check=True)

    def package_names(self) -> list[str]:
        listing = subprocess.run(
            ["apt-cache", *self.options(), "pkgnames", "linux-image-"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return listing.splitlines()

    def candidate_version(self, package: str) -> str:
        shown = subprocess.run(
            ["apt-cache", *self.options(), "show", "--no-all-versions", package],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        match = re.search(r"^Version: (\S+)$", shown, re.MULTILINE)
        if not match:
            raise LabError(f"apt-cache shows no version for {package}")
        return match.group(1)

    def download(self, packages: Sequence[str], into: Path) -> list[Path]:
        into.mkdir(parents=True, exist_ok=True)
        # apt draws its progress bar on a terminal; elsewhere it prints a line per file
        # with its size, and the rate when done.
        subprocess.run(["apt-get", *self.options(), "download", *packages], cwd=into, check=True)
        return sorted(into.glob("*.deb"))


def kernel_dir(label: str) -> Path:
    return cache_root() / label


def load_record(label: str) -> KernelRecord | None:
    """The cached kernel of ``label``, if it was fetched completely and is still there."""
    path = kernel_dir(label) / RECORD_NAME
    try:
        record = KernelRecord.from_json(path.read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (Path(record.vmlinuz).is_file() and Path(record.modules_dir).is_dir()):
        return None
    return record


def fetch(label: str, refresh: bool = False) -> KernelRecord:
    """Resolve, download and extract the newest kernel of ``label``; cached after that."""
    record = load_record(label)
    if record is not None and not refresh:
        return record

    directory = kernel_dir(label)
    directory.mkdir(parents=True, exist_ok=True)
    # The cache is shared by every checkout (and CI) on the machine: one fetch at a time
    # per kernel; whoever waited uses what the other one fetched.
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        waited_for = load_record(label)
        if waited_for is not None and waited_for != record:
            return waited_for
        return _fetch_locked(label, directory, record)


def _fetch_locked(label: str, directory: Path, record: KernelRecord | None) -> KernelRecord:
    line = KERNEL_LINES[label]
    apt = PrivateApt(directory / "apt", line.suites)
    apt.write_config(host_mirrors())
    log(f"resolving the newest {label} kernel in {', '.join(line.suites)}")
    apt.update()
    package = pick_newest(line, apt.package_names())
    version = apt.candidate_version(package)
    if record is not None and (record.package, record.version) == (package, version):
        log(f"{package} {version} is still the newest")
        return record

    packages = [package, *(split_package_names(package) if line.split_packages else [])]
    log(f"downloading {' '.join(packages)} ({version})")
    with tempfile.TemporaryDirectory(dir=directory, prefix="fetch-") as scratch:
        staging = Path(scratch) / "root"
        for deb in apt.download(packages, Path(scratch) / "debs"):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(staging)], check=True)
        release, _, _ = locate_kernel(staging)
        # Debian's packages leave modules.dep to their postinst.  depmod looks in
        # <base>/lib/modules, which the usr-merged packages (6.12+) lack.
        if not (staging / "lib").exists():
            (staging / "lib").symlink_to("usr/lib")
        subprocess.run(["depmod", "-b", str(staging), release], check=True)
        # Swap the tree in only when it is complete, and record it last: an interrupted
        # fetch leaves no record, so the next run fetches again.
        (directory / RECORD_NAME).unlink(missing_ok=True)
        root = directory / "root"
        if root.exists():
            shutil.rmtree(root)
        staging.rename(root)
    release, vmlinuz, modules_dir = locate_kernel(root)
    record = KernelRecord(label, package, version, release, str(vmlinuz), str(modules_dir))
    (directory / RECORD_NAME).write_text(record.to_json())
    return record


def link_modules(record: KernelRecord) -> None:
    """Make the modules visible at /lib/modules/<release>, where virtme-ng (and the
    guest's modprobe) look for them; the guest sees the host's filesystem."""
    link = MODULES_ROOT / record.release
    target = Path(record.modules_dir)
    if link.is_symlink() and link.resolve() == target.resolve():
        return
    if link.exists() and not link.is_symlink():
        raise LabError(f"{link} exists and is not a link made by this tool; not touching it")
    if not is_root():
        raise LabError(f"{link} must link to {target}: run as root, or: ln -sfn {target} {link}")
    MODULES_ROOT.mkdir(parents=True, exist_ok=True)
    # Links into the cache left by kernels that --refresh replaced point nowhere now.
    cache = str(cache_root())
    for stale in MODULES_ROOT.iterdir():
        if stale.is_symlink() and not stale.exists() and os.readlink(stale).startswith(cache):
            stale.unlink()
    # Atomically, in case another run is making the same link right now.
    temporary = link.with_name(f".{link.name}.{os.getpid()}")
    temporary.symlink_to(target)
    temporary.replace(link)


def find_vng() -> Path:
    """vng of the running interpreter's environment first: the noxfile installs it into
    the session's virtualenv, which need not be on PATH."""
    beside = Path(sys.executable).parent / "vng"
    if beside.is_file():
        return beside
    found = shutil.which("vng")
    if found is None:
        raise LabError("vng not found: run `tools/kernel_lab.py setup` with this Python")
    return Path(found)


def copy_stream(source: BinaryIO, sink: BinaryIO) -> None:
    """Copy as the bytes come, so that a slow guest's progress shows as it happens."""
    with source:
        while chunk := os.read(source.fileno(), 65536):
            sink.write(chunk)
            sink.flush()


def run_in_guest(
    label: str,
    command: Sequence[str],
    *,
    rwdirs: Sequence[Path] = (),
    env: Mapping[str, str] | None = None,
    timeout: float = 900,
    memory: str = "2G",
) -> int:
    """Boot ``label``'s kernel, run ``command`` in the current directory, and return the
    command's exit status (TIMEOUT_STATUS when the guest had to be killed)."""
    record = fetch(label)
    link_modules(record)
    vng = find_vng()
    cwd = Path.cwd()
    guest_env = {**(env or {}), GUEST_KERNEL_ENV: label}
    argv = [
        str(vng),
        "--run",
        record.vmlinuz,
        # A guest under KVM hangs at boot on these machines; emulation is slow but works.
        "--disable-kvm",
        # virtiofsd is not installable on bookworm.
        "--force-9p",
        "--cpus",
        "2",
        "--memory",
        memory,
        *(f"--rwdir={path.resolve()}" for path in rwdirs),
        "--exec",
        guest_script(cwd, record.release, guest_env, command),
    ]
    # vng runs virtme-run by name, from its own bin directory.
    host_env = {**os.environ, "PATH": f"{vng.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for attempt in range(1, BOOT_ATTEMPTS + 1):
        log(f"booting {record.release} ({label}); guest runs: {shlex.join(command)}")
        started = time.monotonic()
        status = _boot(argv, host_env, cwd, timeout, label, record.release)
        elapsed = time.monotonic() - started
        log(f"guest {label} exited with status {status} after {elapsed:.0f} s")
        # vng now and then exits 255 at once, silently: that guest never booted (a boot
        # alone takes 25-40 s), so no test ran and booting again is safe.
        if not (status == 255 and elapsed < NEVER_BOOTED_SECONDS) or attempt == BOOT_ATTEMPTS:
            return status
        log(f"guest {label} never booted; booting again ({attempt + 1}/{BOOT_ATTEMPTS})")
    raise AssertionError("unreachable")


#: How often a guest that never booted is booted again, and what "never booted" means.
BOOT_ATTEMPTS: Final = 3
NEVER_BOOTED_SECONDS: Final = 20


def _boot(
    argv: Sequence[str],
    host_env: Mapping[str, str],
    cwd: Path,
    timeout: float,
    label: str,
    release: str,
) -> int:
    """One boot: the guest's exit status (TIMEOUT_STATUS when it had to be killed)."""
    # QEMU opens the guest's output ports as files at /proc/self/fd/{1,2}, truncating
    # them and writing from offset 0 twice over: with a regular file as stdout (a CI
    # log) guest output gets clobbered.  A pipe is immune, so relay through one.
    # Its own process group, so that a timeout kills QEMU along with vng.
    guest = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=host_env,
        cwd=cwd,
        start_new_session=True,
    )
    assert guest.stdout is not None
    relay = threading.Thread(target=copy_stream, args=(guest.stdout, sys.stdout.buffer))
    relay.start()
    try:
        status = guest.wait(timeout=timeout)
        if status < 0:
            # Killed by a signal: report it the way shells do, not as 256 - signal.
            status = 128 - status
    except subprocess.TimeoutExpired:
        log(f"guest {label} ({release}) still running after {timeout:g} s: killed")
        status = TIMEOUT_STATUS
    finally:
        # Also reaps stragglers after a normal exit: anything left in the group would
        # hold the pipe open and the relay with it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(guest.pid, signal.SIGKILL)
        guest.wait()
        relay.join()
    return status


def missing_packages() -> list[str]:
    missing = []
    for package in HOST_PACKAGES:
        query = subprocess.run(
            ["dpkg-query", "-W", "-f=${db:Status-Status}", package],
            capture_output=True,
            text=True,
        )
        if query.stdout.strip() != "installed":
            missing.append(package)
    return missing


def setup() -> None:
    """Install what the guests need on the host: Debian packages and virtme-ng."""
    missing = missing_packages()
    if missing and not is_root():
        raise LabError(
            f"missing host packages: {' '.join(missing)}; as root run: "
            f"apt-get install --no-install-recommends {' '.join(missing)}"
        )
    if missing:
        apt_env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
        # A fresh machine has no package lists yet; otherwise skip the slow update, but
        # still retry after one if the lists turn out stale.
        updated = not any(Path("/var/lib/apt/lists").glob("*Packages*"))
        if updated:
            subprocess.run(["apt-get", "update"], check=True, env=apt_env)
        if subprocess.run(install, env=apt_env).returncode != 0:
            if updated:
                raise LabError(f"apt-get install {' '.join(missing)} failed")
            subprocess.run(["apt-get", "update"], check=True, env=apt_env)
            subprocess.run(install, check=True, env=apt_env)
    log(f"host packages present: {' '.join(HOST_PACKAGES)}")

    if importlib.util.find_spec("virtme_ng") is None:
        log(f"installing {VIRTME_NG_REQUIREMENT} into {sys.prefix}")
        subprocess.run([sys.executable, "-m", "pip", "install", VIRTME_NG_REQUIREMENT], check=True)
    subprocess.run([str(find_vng()), "--version"], check=True)


# --- command line ---------------------------------------------------------------------


def parse_env(items: Sequence[str]) -> dict[str, str]:
    """``NAME=VALUE`` sets a variable; a bare ``NAME`` passes the host's value on."""
    env = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            if name not in os.environ:
                raise LabError(f"--env {name}: not set on the host")
            value = os.environ[name]
        env[name] = value
    return env


def matrix_table() -> str:
    """The matrix as Markdown: each line's Debian suites and what it can do."""
    rows = [
        "| kernel line | Debian suites | TLS 1.3 rekey | zero-copy send_file |",
        "|---|---|---|---|",
    ]
    for label, line in KERNEL_LINES.items():
        rekey = "yes (6.14+)" if line.tls13_rekey else "no (before 6.14)"
        sendfile = "yes" if line.zero_copy_send_file else "no (chunked copy)"
        rows.append(f"| {label} | {', '.join(line.suites)} | {rekey} | {sendfile} |")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("setup", help="install host packages and virtme-ng")
    commands.add_parser("labels", help="print the matrix's kernel lines, one a line")
    commands.add_parser("table", help="print the matrix's kernel lines as a Markdown table")

    fetch_parser = commands.add_parser("fetch", help="download a kernel; print its release")
    fetch_parser.add_argument("label", choices=LABELS)
    fetch_parser.add_argument(
        "--refresh", action="store_true", help="look for a newer build even when cached"
    )

    run_parser = commands.add_parser("run", help="run a command in a guest")
    run_parser.add_argument("label", choices=LABELS)
    run_parser.add_argument(
        "--rwdir",
        action="append",
        default=[],
        type=Path,
        help="a folder the guest may write to (repeatable; created if missing)",
    )
    run_parser.add_argument("--timeout", type=float, default=900, help="seconds (900)")
    run_parser.add_argument("--memory", default="2G", help="guest memory (2G)")
    run_parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME[=VALUE]",
        help="set a variable for the guest command (repeatable)",
    )
    run_parser.add_argument("cmd", nargs="+", help="the command, after --")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "setup":
            setup()
        elif args.command == "labels":
            print("\n".join(LABELS))
        elif args.command == "table":
            print(matrix_table())
        elif args.command == "fetch":
            print(fetch(args.label, refresh=args.refresh).release)
        else:
            for rwdir in args.rwdir:
                rwdir.mkdir(parents=True, exist_ok=True)
            return run_in_guest(
                args.label,
                args.cmd,
                rwdirs=args.rwdir,
                env=parse_env(args.env),
                timeout=args.timeout,
                memory=args.memory,
            )
    except LabError as error:
        log(f"error: {error}")
        return 1
    except subprocess.CalledProcessError as error:
        log(f"error: {shlex.join(map(str, error.cmd))} exited with status {error.returncode}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
