"""The generated parts of the documentation, as Markdown.

The Sphinx extension in ``docs/_ext/ktls_docs.py`` splices these into pages at build time,
in place of a marker line (``<!-- generated: NAME -->``); ``python tools/docs_pages.py
NAME`` prints one. Everything here works from a fresh clone: the matrix's reports
(``reports/junit-kernel-*.xml``, written by ``nox -s kernels``) and a committed benchmark
run (``docs/bench/bench.md``) add to the pages when they exist and are said to be missing
when they do not.

Standard library only, like ``kernel_lab`` (whose ``KERNEL_LINES`` is the source of truth
for the matrix).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from xml.etree import ElementTree

import kernel_lab

ROOT: Final = Path(__file__).resolve().parents[1]

#: A line of a page that is replaced by generated Markdown: ``<!-- generated: NAME -->``.
MARKER: Final = re.compile(r"^<!-- generated: ([a-z-]+) -->$", re.MULTILINE)


@dataclass(frozen=True)
class MatrixRun:
    """One kernel line's last run in this checkout, read from its junit report."""

    label: str
    counts: kernel_lab.JunitCounts
    kernel_release: str
    ktls_available: bool
    timestamp: str
    #: `trio_ktls.ProbeResult.as_dict()` of the guest, when the run recorded it.
    probe: Mapping[str, Any] | None


def junit_path(root: Path, label: str) -> Path:
    return root / "reports" / f"junit-kernel-{label}.xml"


def read_matrix_run(path: Path, label: str) -> MatrixRun:
    """A kernel line's results: the totals and the test-suite properties that
    ``tests/conftest.py`` records (kernel release, kTLS, the probe)."""
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    properties: dict[str, str] = {}
    if suite is not None:
        for prop in suite.iterfind("properties/property"):
            properties[prop.get("name", "")] = prop.get("value", "")
    probe_text = properties.get("probe")
    return MatrixRun(
        label=label,
        counts=kernel_lab.read_junit(path),
        kernel_release=properties.get("kernel_release", "?"),
        ktls_available=properties.get("ktls_available") == "True",
        timestamp=(suite.get("timestamp", "") if suite is not None else "")[:19],
        probe=json.loads(probe_text) if probe_text else None,
    )


def matrix_runs(root: Path) -> list[MatrixRun]:
    """The kernel lines that have a report in ``root/reports``, in the matrix's order."""
    return [
        read_matrix_run(junit_path(root, label), label)
        for label in kernel_lab.LABELS
        if junit_path(root, label).is_file()
    ]


def _behaviour_rows() -> list[str]:
    rows = [
        "| kernel line | `update_keys()` | a peer's KeyUpdate | our key reaches its limit "
        "| `send_file` |",
        "|---|---|---|---|---|",
    ]
    for label, line in kernel_lab.KERNEL_LINES.items():
        if line.tls13_rekey:
            update = "KeyUpdate sent, `TLS_TX` replaced"
            peer = "`TLS_RX` replaced; answered if requested"
            limit = "automatic KeyUpdate"
        else:
            update = "`KeyUpdateUnavailableError`; the stream stays usable"
            peer = "`KTLSRekeyFailedError` (needs 6.14)"
            limit = "close_notify, then `ConfidentialityLimitError`"
        send_file = "zero-copy (`sendfile(2)`)" if line.zero_copy_send_file else "chunked copy"
        rows.append(f"| {label} | {update} | {peer} | {limit} | {send_file} |")
    return rows


def _ciphers(probe: Mapping[str, Any], version: str) -> str:
    names = [
        c["cipher"]
        for c in probe.get("ciphers", ())
        if c.get("version") == version and c.get("tx") and c.get("rx")
    ]
    return ", ".join(names) or "none"


def _yes_no(value: object) -> str:
    return "untested" if value is None else ("yes" if value else "no")


def _results_section(runs: list[MatrixRun]) -> list[str]:
    if not runs:
        return [
            "No matrix run in this checkout: `reports/junit-kernel-*.xml` is written by "
            "`nox -s kernels` (or `nox -s kernel-6.18`, ...), and this page shows its "
            "results once it exists. The tables above are what the matrix's tests require "
            "of each line.",
        ]
    lines = [
        "From `reports/junit-kernel-*.xml` in the checkout that built this page (guest "
        "kernels are Debian's newest of each line at the time of the run).",
        "",
        "| kernel line | kernel release | kTLS | tests | failed | errors | skipped "
        "| time in the guest | run at (UTC) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        c = run.counts
        lines.append(
            f"| {run.label} | {run.kernel_release} | {'yes' if run.ktls_available else 'no'} "
            f"| {c.tests} | {c.failures} | {c.errors} | {c.skipped} | {c.seconds:.0f} s "
            f"| {run.timestamp.replace('T', ' ')} |"
        )
    probed = [run for run in runs if run.probe is not None]
    if probed:
        lines += [
            "",
            "What `trio_ktls.probe()` found in each guest (version/cipher pairs that "
            "round-tripped a record in both directions):",
            "",
            "| kernel line | TLS 1.2 | TLS 1.3 | TLS 1.3 rekey (TX/RX) |",
            "|---|---|---|---|",
        ]
        for run in probed:
            assert run.probe is not None
            rekey = (
                f"{_yes_no(run.probe.get('tls13_tx_rekey'))}/"
                f"{_yes_no(run.probe.get('tls13_rx_rekey'))}"
            )
            lines.append(
                f"| {run.label} | {_ciphers(run.probe, 'TLSv1.2')} "
                f"| {_ciphers(run.probe, 'TLSv1.3')} | {rekey} |"
            )
    return lines


def kernel_matrix(root: Path = ROOT) -> str:
    """The compatibility tables: the matrix's lines, what the API does on each, and the
    results of the last matrix run in ``root`` if there is one."""
    lines = [
        "## The kernel lines",
        "",
        kernel_lab.matrix_table(),
        "",
        "## What the API does on each line",
        "",
        *_behaviour_rows(),
        "",
        "TLS 1.2 behaves like a line without TLS 1.3 rekey on every kernel (it has no KeyUpdate).",
        "",
        "## The last matrix run",
        "",
        *_results_section(matrix_runs(root)),
    ]
    return "\n".join(lines) + "\n"


BENCH_REPORT: Final = Path("docs") / "bench" / "bench.md"

_HEADING: Final = re.compile(r"^(#+) ", re.MULTILINE)
# A Markdown link or image with a relative target: ``](file.png)``.
_RELATIVE_LINK: Final = re.compile(r"\]\((?![a-z][a-z0-9+.-]*:|/|#)([^)\s]+)\)")


def bench_report(root: Path = ROOT) -> str:
    """The committed benchmark run (``docs/bench/bench.md``, as ``tools/bench.py report``
    writes it) with its headings one level down and its plots' paths relative to the
    docs; or a sentence saying there is none."""
    path = root / BENCH_REPORT
    if not path.is_file():
        return (
            "No benchmark run is committed yet. `nox -s bench` writes one to "
            "`reports/bench/`; a run copied to `docs/bench/` (`bench.md` and its plots) "
            "appears on this page.\n"
        )
    text = path.read_text()
    text = _HEADING.sub(lambda m: "#" + m.group(1) + " ", text)
    return _RELATIVE_LINK.sub(lambda m: f"](bench/{m.group(1)})", text)


GENERATORS: Final[Mapping[str, Callable[[Path], str]]] = {
    "kernel-matrix": kernel_matrix,
    "bench-report": bench_report,
}


def expand(text: str, root: Path = ROOT) -> str:
    """``text`` with every marker line replaced by what its generator makes."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in GENERATORS:
            raise KeyError(f"no generator named {name!r} (known: {', '.join(GENERATORS)})")
        return GENERATORS[name](root)

    return MARKER.sub(replace, text)


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in GENERATORS:
        print(f"usage: docs_pages.py {{{','.join(GENERATORS)}}}", file=sys.stderr)
        return 2
    print(GENERATORS[argv[0]](ROOT), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
