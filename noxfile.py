"""Nox sessions: host tests, lint, the docs, and the kernel matrix.

The host kernel has no kTLS, so the ``ktls``-marked tests skip there; the ``kernel-*``
sessions run them for real in QEMU guests booted with Debian's kernels (see
``tools/kernel_lab.py``).  ``nox`` alone runs tests, lint, docs and all four kernels.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import nox
from nox.command import CommandFailed

# kernel_lab is a script, not a package.
sys.path.insert(0, str(Path(__file__).resolve().parent / "tools"))
import kernel_lab

ROOT = Path(__file__).resolve().parent

nox.options.sessions = ["tests", "lint", "docs", "kernels"]
nox.options.reuse_venv = "yes"

LAB = ("python", "tools/kernel_lab.py")
REPORTS = "reports"
# Where the demo runs: a kernel with TLS 1.3 rekeying.
DEMO_KERNEL = "6.18"
# The demo's steps in that guest, each the arguments of one `python` run, in one boot,
# stopping at the first that fails.
GUEST_DEMO_COMMAND: tuple[tuple[str, ...], ...] = (
    ("-m", "trio_ktls", "probe"),
    # `serve` on a generated directory; a 64 MiB file downloaded with `get` and with curl
    # over TLS 1.3 and 1.2, each copy checked byte for byte (trio_ktls/_filedemo.py).
    ("-m", "trio_ktls", "demo", "--files", "--megabytes", "64", "--ktls", "require"),
)


@nox.session
def tests(session: nox.Session) -> None:
    """Host tests (kTLS tests skip here, with the probe's reason)."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff and mypy --strict (nox too, so that this file is type-checked against it)."""
    session.install("-e", ".[test,lint]", "nox")
    session.run("ruff", "check", ".")
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site (Sphinx) in docs/_build/html; any warning, an unresolved
    reference included, fails the build."""
    session.install("-e", ".[docs]")
    session.run(
        "sphinx-build", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html",
        *session.posargs,
    )  # fmt: skip


def _prepare_guest_venv(session: nox.Session) -> Path:
    """Install the package into the session's virtualenv, which the guest runs unchanged
    (it sees the host's filesystem), and the lab's host packages and virtme-ng."""
    session.install("-e", ".[test]")
    session.run(*LAB, "setup")
    return Path(session.bin) / "python"


def _kernel_tests(session: nox.Session, python: Path, label: str) -> str:
    """Run the kTLS tests in ``label``'s guest; the summary line if they all passed."""
    junit = Path(REPORTS) / f"junit-kernel-{label}.xml"
    junit.unlink(missing_ok=True)
    started = time.time()
    session.run(
        *LAB,
        "run",
        label,
        f"--rwdir={REPORTS}",
        # The whole kTLS suite in one emulated guest: well under this, but a hang must
        # not outlive it by much.
        "--timeout=1800",
        "--",
        str(python),
        "-m",
        "pytest",
        "-m",
        "ktls",
        # The repository is read-only in the guest.
        "-p",
        "no:cacheprovider",
        f"--junitxml={junit}",
        # `nox -s kernel-6.1 -- tests/test_x.py -k y` runs a subset.
        *(session.posargs or ["tests"]),
    )
    # The exit status alone would not tell "all passed" from "nothing ran".
    counts = kernel_lab.check_guest_junit(ROOT / junit, not_before=started)
    record = kernel_lab.load_record(label)
    release = record.release if record else "?"
    return (
        f"kernel-{label}: {release}: {counts.tests} kTLS tests passed "
        f"({counts.seconds:.0f} s in the guest, {time.time() - started:.0f} s in all)"
    )


def _kernel_matrix(session: nox.Session, labels: Sequence[str]) -> None:
    """Every kernel runs even when an earlier one failed; then each one is reported."""
    python = _prepare_guest_venv(session)
    results = {}
    for label in labels:
        try:
            results[label] = _kernel_tests(session, python, label)
        except (CommandFailed, kernel_lab.LabError) as error:
            results[label] = f"kernel-{label}: FAILED: {error}"
    for summary in results.values():
        session.log(summary)
    failed = [label for label, summary in results.items() if "FAILED" in summary]
    if failed:
        session.error(f"kTLS tests failed on kernel {', '.join(failed)}")


def _register_kernel_session(label: str) -> None:
    @nox.session(name=f"kernel-{label}")
    def kernel(session: nox.Session) -> None:
        _kernel_matrix(session, [label])

    kernel.__doc__ = f"kTLS tests in a QEMU guest running Debian's newest {label} kernel."


for _label in kernel_lab.LABELS:
    _register_kernel_session(_label)


@nox.session
def kernels(session: nox.Session) -> None:
    """kTLS tests on every kernel of the matrix."""
    _kernel_matrix(session, kernel_lab.LABELS)


#: Where `nox -s bench` measures kTLS (and writes its reports).
BENCH_KERNEL = "6.18"
BENCH_DIR = "reports/bench"


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks: user-space contenders on the host, every contender in the 6.18 guest;
    then reports/bench/bench.md and its plots (``-- --tiny`` for a smoke run)."""
    python = _prepare_guest_venv(session)
    session.install("-e", ".[bench]")
    tiny = ["--tiny", "--repetitions", "1"] if "--tiny" in session.posargs else []
    session.run("python", "tools/bench.py", "run", "--out", BENCH_DIR, *tiny)
    session.run(
        *LAB, "run", BENCH_KERNEL, f"--rwdir={BENCH_DIR}", "--timeout", "3600", "--",
        str(python), "tools/bench.py", "run", "--out", BENCH_DIR, *tiny,
    )  # fmt: skip
    session.run("python", "tools/bench.py", "report", BENCH_DIR)


@nox.session
def demo(session: nox.Session) -> None:
    """The probe on the host, then the demo in a guest with kTLS."""
    python = _prepare_guest_venv(session)
    # The host has no kTLS: the probe says why (and exits 0, as a successful probe).
    session.run("python", "-m", "trio_ktls", "probe")
    steps = " && ".join(shlex.join([str(python), *step]) for step in GUEST_DEMO_COMMAND)
    session.run(*LAB, "run", DEMO_KERNEL, "--", "sh", "-c", steps)


@nox.session
def notebooks(session: nox.Session) -> None:
    """Execute every notebook in the default kernel guest (so the stored outputs show
    real kTLS) and write the executed notebooks, outputs and plots included, back."""
    python = _prepare_guest_venv(session)
    session.run(
        *LAB, "run", DEMO_KERNEL, "--rwdir=notebooks", "--timeout=3600", "--memory=3G", "--",
        str(python), "tools/notebooks.py", "run", "--write",
    )  # fmt: skip
