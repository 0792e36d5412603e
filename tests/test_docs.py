"""The documentation: every public name documented, the tutorial's code runs, and the
generated pages (``tools/docs_pages.py``) say what the matrix and the benchmarks say.

``nox -s docs`` builds the site itself (Sphinx, warnings as errors); these tests need no
Sphinx.
"""

from __future__ import annotations

import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

import trio_ktls

from .helpers import kernel_can_rekey

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import docs_pages
import kernel_lab

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TUTORIAL = DOCS / "tutorial.md"
REFERENCE = DOCS / "reference.rst"
NOT_RUN = "<!-- tutorial: not run"


# -- docstrings ---------------------------------------------------------------------------


def _own_doc(obj: Any) -> str:
    doc = obj.__doc__ if not isinstance(obj, property) else obj.fget.__doc__
    return (doc or "").strip()


def _public_members(cls: type) -> list[tuple[str, Any]]:
    """Methods and properties a class defines itself (not inherited, not dunders)."""
    found = []
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, staticmethod | classmethod):
            value = value.__func__
        if inspect.isfunction(value) or isinstance(value, property):
            found.append((name, value))
    return found


def test_every_public_class_function_and_method_has_a_docstring() -> None:
    missing = []
    for name in trio_ktls.__all__:
        obj = getattr(trio_ktls, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if not _own_doc(obj):
            missing.append(name)
        if inspect.isclass(obj):
            missing += [
                f"{name}.{member}" for member, value in _public_members(obj) if not _own_doc(value)
            ]
    assert not missing, f"public names without a docstring: {missing}"


def test_the_member_walk_sees_methods_and_properties() -> None:
    """The walk above would pass vacuously if it found nothing."""
    names = {name for name, _ in _public_members(trio_ktls.KTLSStream)}
    assert {"send_all", "receive_some", "aclose", "send_eof", "ktls_info"} <= names
    assert {"supports", "as_dict", "format"} <= {
        name for name, _ in _public_members(trio_ktls.ProbeResult)
    }


def test_the_reference_shows_every_public_name() -> None:
    """Classes and functions through autodoc (their docstrings, checked above); the two
    plain values (``__version__`` and the ``KTLSMode`` alias) with a written entry."""
    text = REFERENCE.read_text()
    for name in trio_ktls.__all__:
        obj = getattr(trio_ktls, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            pattern = rf"^\.\. auto(class|function|exception):: {re.escape(name)}$"
        else:  # a written entry: the directive, then an indented paragraph
            pattern = rf"^\.\. data:: {re.escape(name)}\n(   :.*\n)*\n   \w"
        assert re.search(pattern, text, re.MULTILINE), f"{name} is not in {REFERENCE.name}"


# -- code on the pages --------------------------------------------------------------------

_FENCE = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def _python_blocks(path: Path) -> list[tuple[int, str, bool]]:
    """(line, code, runs) for each ``python`` block of a Markdown page; a block right
    after a ``<!-- tutorial: not run ... -->`` line is only compiled."""
    text = path.read_text()
    blocks = []
    for match in _FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        line = text.count("\n", 0, match.start()) + 2
        blocks.append((line, match.group(1), not before.startswith(NOT_RUN)))
    return blocks


@pytest.mark.parametrize(
    "page", sorted(DOCS.rglob("*.md")), ids=lambda p: str(p.relative_to(DOCS))
)
def test_every_python_block_on_the_pages_compiles(page: Path) -> None:
    for line, code, _ in _python_blocks(page):
        compile(code, f"{page}:{line}", "exec")


def _run_tutorial() -> None:
    blocks = _python_blocks(TUTORIAL)
    assert sum(runs for _, _, runs in blocks) >= 8, "the tutorial lost its code"
    namespace: dict[str, Any] = {"__name__": "tutorial"}
    for line, code, runs in blocks:
        if runs:
            exec(compile(code, f"{TUTORIAL}:{line}", "exec"), namespace)


def _check_tutorial_output(output: str) -> None:
    assert output.count("echoed: hello, kernel") == 2, output
    assert "server counted 999000 bytes" in output, output
    assert "echoed: after the key update" in output, output
    assert "connection 1: resumed = False" in output, output
    assert "connection 2: resumed = True" in output, output
    assert "connection failed" not in output, output


def test_the_tutorial_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """The tutorial's blocks, in order, as one program: in user space where the host
    has no kTLS, offloaded where it has."""
    _run_tutorial()
    _check_tutorial_output(capsys.readouterr().out)


@pytest.mark.ktls
def test_the_tutorial_runs_offloaded(capsys: pytest.CaptureFixture[str]) -> None:
    """In the kernel matrix: every connection of the tutorial is offloaded, and what it
    says about key updates and send_file is what this kernel line does."""
    _run_tutorial()
    output = capsys.readouterr().out
    _check_tutorial_output(output)
    infos = re.findall(r"^(?:client|server): (KTLSInfo\(.*\))$", output, re.MULTILINE)
    assert len(infos) == 7, output  # each stream the tutorial prints
    for info in infos:
        assert "tx_offload=True, rx_offload=True" in info and "reason=None" in info, info
    assert "zero-copy: True" in output, output
    if kernel_can_rekey():
        assert "KeyUpdates sent: 1" in output, output
    else:
        assert "no key update on this connection" in output, output


# -- generated pages ----------------------------------------------------------------------


def _junit(path: Path, label: str, *, probe: dict[str, Any] | None) -> None:
    properties = {
        "kernel_release": f"{label}.5-test",
        "guest_kernel_label": label,
        "ktls_available": "True",
    }
    if probe is not None:
        properties["probe"] = json.dumps(probe)
    props = "".join(
        f'<property name="{name}" value="{value.replace(chr(34), "&quot;")}" />'
        for name, value in properties.items()
    )
    path.write_text(
        '<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests">'
        '<testsuite name="pytest" errors="0" failures="1" skipped="0" tests="111" '
        f'time="480.4" timestamp="2026-12-03T18:38:03.356031+00:00"><properties>{props}'
        '</properties><testcase classname="t" name="x" time="1" /></testsuite></testsuites>'
    )


def test_kernel_matrix_page_without_reports(tmp_path: Path) -> None:
    page = docs_pages.kernel_matrix(tmp_path)
    for label, line in kernel_lab.KERNEL_LINES.items():
        assert f"| {label} | {', '.join(line.suites)} |" in page
        (row,) = [
            r for r in page.splitlines() if r.startswith(f"| {label} | ") and "KeyUpdate" in r
        ]
        assert ("automatic KeyUpdate" in row) is line.tls13_rekey
    assert "No matrix run in this checkout" in page


def test_kernel_matrix_page_with_reports(tmp_path: Path) -> None:
    (tmp_path / "reports").mkdir()
    probe = trio_ktls.ProbeResult(
        available=True,
        reason="ok",
        kernel_release="6.18.5-test",
        ciphers=(
            trio_ktls.CipherSupport("TLSv1.2", "AES_GCM_128", True, True),
            trio_ktls.CipherSupport("TLSv1.3", "AES_GCM_128", True, True),
            trio_ktls.CipherSupport("TLSv1.3", "AES_CCM_128", True, False, "no"),
        ),
        tls13_tx_rekey=True,
        tls13_rx_rekey=False,
    ).as_dict()
    _junit(docs_pages.junit_path(tmp_path, "6.18"), "6.18", probe=probe)
    _junit(docs_pages.junit_path(tmp_path, "6.1"), "6.1", probe=None)
    page = docs_pages.kernel_matrix(tmp_path)
    assert "No matrix run" not in page
    assert "| 6.1 | 6.1.5-test | yes | 111 | 1 | 0 | 0 | 480 s | 2026-12-03 18:38:03 |" in page
    assert "| 6.18 | 6.18.5-test | yes | 111 |" in page
    assert "| 6.18 | AES_GCM_128 | AES_GCM_128 | yes/no |" in page
    assert "| 6.12 | 6.12" not in page  # no report, no row


def test_bench_page_without_and_with_a_committed_run(tmp_path: Path) -> None:
    assert "No benchmark run is committed yet" in docs_pages.bench_report(tmp_path)
    report = tmp_path / docs_pages.BENCH_REPORT
    report.parent.mkdir(parents=True)
    report.write_text(
        "# trio_ktls benchmarks\n\n## kernel 6.18\n\n![throughput](bench-6.18.png)\n"
        "[elsewhere](https://example.org/x.png)\n"
    )
    page = docs_pages.bench_report(tmp_path)
    assert page.startswith("## trio_ktls benchmarks\n\n### kernel 6.18\n")
    assert "![throughput](bench/bench-6.18.png)" in page
    assert "(https://example.org/x.png)" in page


def test_markers_are_expanded_and_unknown_ones_refused(tmp_path: Path) -> None:
    text = "# Page\n\n<!-- generated: bench-report -->\n\nafter\n"
    expanded = docs_pages.expand(text, tmp_path)
    assert "No benchmark run is committed yet" in expanded and "after" in expanded
    assert "generated:" not in expanded
    with pytest.raises(KeyError, match="no generator named 'nope'"):
        docs_pages.expand("<!-- generated: nope -->\n", tmp_path)


def test_every_marker_in_the_docs_has_a_generator() -> None:
    names = {
        m.group(1) for p in DOCS.rglob("*.md") for m in docs_pages.MARKER.finditer(p.read_text())
    }
    assert names == set(docs_pages.GENERATORS)
