"""The sdist and the wheel: what a user installs, and a test suite that runs from the sdist."""

from __future__ import annotations

import email
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import trio_ktls

ROOT = Path(__file__).resolve().parents[1]


def test_sdist_and_wheel(tmp_path: Path) -> None:
    """Both build without deprecation warnings and carry the licences, the version and
    ``py.typed``; the sdist's own test suite runs (the host tests; this one excluded, so
    that it does not build itself again)."""
    out = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel",
         "--outdir", str(out), str(ROOT)],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    assert "Deprecat" not in build.stdout + build.stderr, build.stdout + build.stderr

    version = trio_ktls.__version__
    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = f"trio_ktls-{version}.dist-info"
        metadata = email.message_from_bytes(archive.read(f"{info}/METADATA"))
    assert "trio_ktls/py.typed" in names
    assert {f"{info}/licenses/LICENSE-MIT", f"{info}/licenses/LICENSE-APACHE"} <= set(names)
    assert metadata["Version"] == version
    assert metadata["License-Expression"] == "MIT OR Apache-2.0"
    assert not any(name.startswith("tests/") for name in names)

    (sdist,) = out.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp_path, filter="data")
    unpacked = tmp_path / f"trio_ktls-{version}"
    for needed in ("LICENSE-MIT", "LICENSE-APACHE", "tests/conftest.py", "tests/helpers.py",
                   "tools/kernel_lab.py", "docs/design.md"):  # fmt: skip
        assert (unpacked / needed).is_file(), needed
    env = dict(os.environ, PYTHONPATH=str(unpacked))
    where = subprocess.run(
        [sys.executable, "-c", "import trio_ktls; print(trio_ktls.__file__)"],
        cwd=unpacked, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert Path(where.stdout.strip()).is_relative_to(unpacked)  # the sdist's package
    suite = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "--ignore", "tests/test_packaging.py"],
        cwd=unpacked, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert suite.returncode == 0, suite.stdout[-3000:] + suite.stderr[-3000:]
    assert " passed" in suite.stdout
