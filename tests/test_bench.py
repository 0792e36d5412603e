"""The benchmark harness must not rot: a tiny run of it on the host.

The figures of a tiny run mean nothing; this checks that every contender that can run
here runs, end to end, and that the report and its plot are made. The kTLS contenders'
full runs happen only under ``nox -s bench`` (a tiny run of them in the emulated guests
took minutes); in the matrix, the hand-keyed limits run in threads of one process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

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


@pytest.mark.ktls
@pytest.mark.parametrize("contender", ["raw_ktls", "trio_raw_ktls"])
def test_raw_contenders_run_on_ktls(contender: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hand-keyed contenders (the limits the others are compared with) move every
    byte of each workload they support: both ends in threads of this process, tiny
    sizes (a subprocess per end would spend a minute importing in a guest)."""
    sys.path.insert(0, str(BENCH.parent))
    import bench

    listening = threading.Event()
    reports: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(bench, "print", lambda *a, **k: listening.set(), raising=False)
    monkeypatch.setattr(
        bench, "_report", lambda **v: reports.append((threading.current_thread().name, v))
    )
    main = bench._raw_main if contender == "raw_ktls" else bench._trio_raw_main
    for workload in bench.SUPPORTS[contender]:
        listening.clear()
        reports.clear()
        port = bench._free_port()
        server = threading.Thread(
            target=main, args=("serve", contender, workload, bench.TINY, port), name="serve"
        )
        server.start()
        assert listening.wait(60)
        main("client", contender, workload, bench.TINY, port)
        server.join(60)
        assert not server.is_alive()
        ends = dict(reports)
        assert set(ends) == {"serve", threading.current_thread().name}
        client = ends[threading.current_thread().name]
        if workload == "echo":
            assert len(client["latencies"]) == bench.TINY["echoes"]
        else:
            assert client["wall"] > 0 and ends["serve"]["wall"] > 0
