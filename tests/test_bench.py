"""The benchmark harness must not rot: a tiny run of it on the host.

The figures of a tiny run mean nothing; this checks that every contender that can run
here runs, end to end, and that the report and its plot are made. The kTLS contenders
run only under ``nox -s bench`` (a tiny run of them in the emulated guests took minutes
and is left out of the matrix).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "tools" / "bench.py"


def _run(out: Path, *workloads: str) -> dict[str, object]:
    args = [sys.executable, str(BENCH), "run", "--tiny", "--repetitions", "1", "--out", str(out)]
    for workload in workloads:
        args += ["--workload", workload]
    subprocess.run(args, check=True, timeout=900)
    (path,) = out.glob("bench-*.json")
    document: dict[str, object] = json.loads(path.read_text())
    subprocess.run([sys.executable, str(BENCH), "report", str(out)], check=True, timeout=300)
    assert (out / "bench.md").read_text().count("|") > 10
    assert (out / f"{path.stem}.png").stat().st_size > 1000
    return document


def test_tiny_run_in_user_space(tmp_path: Path) -> None:
    document = _run(tmp_path, "bulk", "echo", "setup", "concurrent-setup", "memory", "file")
    results = document["results"]
    assert isinstance(results, dict)
    assert set(results) == {"bulk", "echo", "setup", "concurrent-setup", "memory", "file"}
    for table in results.values():
        assert {"trio_sslstream", "asyncio"} <= set(table)
