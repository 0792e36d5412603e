"""Host tests of the kernel lab's pure logic (tools/kernel_lab.py); nothing boots here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import kernel_lab
from kernel_lab import KERNEL_LINES, LabError

# Names as `apt-cache pkgnames linux-image-` lists them: signed and unsigned images,
# other flavours, debug symbols and meta packages share the prefix.
BOOKWORM_LISTING = """\
linux-image-6.1.0-9-amd64-unsigned
linux-image-6.1.0-10-amd64-unsigned
linux-image-6.1.0-10-amd64
linux-image-6.1.0-10-cloud-amd64-unsigned
linux-image-6.1.0-10-amd64-dbg
linux-image-6.1.0-10-rt-amd64-unsigned
linux-image-amd64
"""
TRIXIE_LISTING = """\
linux-image-6.12.9+deb13-amd64
linux-image-6.12.10+deb13-amd64
linux-image-6.12.11+deb13-amd64-unsigned
linux-image-6.12.11+deb13-amd64-dbg
linux-image-6.12.11+deb13-cloud-amd64
linux-image-6.12.11+deb13-rt-amd64
linux-image-6.18.3+deb13-amd64
"""
SID_LISTING = """\
linux-image-6.18.15+deb14-amd64
linux-image-7.1.9+deb14-amd64
linux-image-7.10.0+deb14-amd64
linux-image-7.2.13+deb14-amd64
linux-image-7.11.0+deb14-amd64-dbg
linux-image-7.11.0+deb14-cloud-amd64
"""


@pytest.mark.parametrize(
    ("label", "listing", "expected"),
    [
        ("6.1", BOOKWORM_LISTING, "linux-image-6.1.0-10-amd64-unsigned"),
        ("6.12", TRIXIE_LISTING, "linux-image-6.12.10+deb13-amd64"),
        ("6.18", TRIXIE_LISTING, "linux-image-6.18.3+deb13-amd64"),
        ("7", SID_LISTING, "linux-image-7.10.0+deb14-amd64"),
    ],
)
def test_pick_newest_orders_numerically_and_keeps_to_the_generic_flavour(
    label: str, listing: str, expected: str
) -> None:
    assert kernel_lab.pick_newest(KERNEL_LINES[label], listing.splitlines()) == expected


def test_pick_newest_without_a_match() -> None:
    with pytest.raises(LabError, match="no package matches"):
        kernel_lab.pick_newest(KERNEL_LINES["7"], TRIXIE_LISTING.splitlines())


def test_split_package_names() -> None:
    assert kernel_lab.split_package_names("linux-image-7.2.13+deb14-amd64") == [
        "linux-binary-7.2.13+deb14-amd64",
        "linux-modules-7.2.13+deb14-amd64",
    ]


DEB822_SOURCES = """\
Types: deb
# a snapshot, commented out
URIs: http://mirror.invalid/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://source.invalid/debian
Suites: bookworm
Components: main

Types: deb
URIs: http://disabled.invalid/debian-security
Suites: bookworm-security
Components: main
Enabled: no

Types: deb
URIs: http://security.invalid/debian-security
Suites: bookworm-security
Components: main
"""
ONE_LINE_SOURCES = """\
# deb http://commented.invalid/debian bookworm main
deb [signed-by=/usr/share/keyrings/v.gpg] https://vendor.invalid/apt cloud-sdk-bookworm main
deb cdrom:[Debian GNU/Linux 12]/ bookworm main
deb https://mirror.invalid/debian/ bookworm main contrib
deb https://security.invalid/debian-security bookworm-security main
"""


def test_parse_sources_deb822() -> None:
    assert kernel_lab.parse_sources(DEB822_SOURCES, deb822=True) == [
        ("http://mirror.invalid/debian", ["bookworm", "bookworm-updates"]),
        ("http://security.invalid/debian-security", ["bookworm-security"]),
    ]


def test_pick_mirrors_from_one_line_sources() -> None:
    entries = kernel_lab.parse_sources(ONE_LINE_SOURCES, deb822=False)
    assert kernel_lab.pick_mirrors(entries) == kernel_lab.Mirrors(
        archive="https://mirror.invalid/debian",
        security="https://security.invalid/debian-security",
    )


def test_pick_mirrors_security_is_optional_the_archive_is_not() -> None:
    archive_only = [("http://mirror.invalid/debian", ["trixie"])]
    assert kernel_lab.pick_mirrors(archive_only).security is None
    with pytest.raises(LabError, match="TRIO_KTLS_DEBIAN_MIRROR"):
        kernel_lab.pick_mirrors([("https://vendor.invalid/apt", ["nodistro"])])


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def test_locate_kernel_6_1_layout(tmp_path: Path) -> None:
    modules = tmp_path / "lib/modules/6.1.0-56-amd64"
    (modules / "kernel").mkdir(parents=True)
    _touch(tmp_path / "boot/vmlinuz-6.1.0-56-amd64")
    assert kernel_lab.locate_kernel(tmp_path) == (
        "6.1.0-56-amd64",
        tmp_path / "boot/vmlinuz-6.1.0-56-amd64",
        modules,
    )


def test_locate_kernel_usr_merged_layout_seen_twice_through_the_lib_link(
    tmp_path: Path,
) -> None:
    modules = tmp_path / "usr/lib/modules/7.2.13+deb14-amd64"
    (modules / "kernel").mkdir(parents=True)
    _touch(modules / "vmlinuz")
    (tmp_path / "lib").symlink_to("usr/lib")
    assert kernel_lab.locate_kernel(tmp_path) == (
        "7.2.13+deb14-amd64",
        modules / "vmlinuz",
        modules,
    )


def test_locate_kernel_without_an_image(tmp_path: Path) -> None:
    (tmp_path / "usr/lib/modules/6.12.117+deb13-amd64/kernel").mkdir(parents=True)
    with pytest.raises(LabError, match="no vmlinuz"):
        kernel_lab.locate_kernel(tmp_path)


def test_guest_script_sets_up_and_runs_the_command(tmp_path: Path) -> None:
    script = kernel_lab.guest_script(
        tmp_path,
        os.uname().release,
        {"GREETING": "it's $HOME; `x`", kernel_lab.GUEST_KERNEL_ENV: "6.18"},
        ["sh", "-c", 'printf "%s|%s|%s" "$GREETING" "$TRIO_KTLS_GUEST_KERNEL" "$PWD"; exit 3'],
    )
    done = subprocess.run(["sh", "-c", script], capture_output=True, text=True)
    assert (done.returncode, done.stdout) == (3, f"it's $HOME; `x`|6.18|{tmp_path}")


def test_guest_script_refuses_another_kernel(tmp_path: Path) -> None:
    script = kernel_lab.guest_script(tmp_path, "0.0.0-other", {}, ["true"])
    done = subprocess.run(["sh", "-c", script], capture_output=True, text=True)
    assert done.returncode == kernel_lab.WRONG_KERNEL_STATUS
    assert "not 0.0.0-other" in done.stderr


def test_parse_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FROM_HOST", "h")
    monkeypatch.delenv("NOT_SET", raising=False)
    assert kernel_lab.parse_env(["A=1=2", "FROM_HOST", "EMPTY="]) == {
        "A": "1=2",
        "FROM_HOST": "h",
        "EMPTY": "",
    }
    with pytest.raises(LabError, match="NOT_SET"):
        kernel_lab.parse_env(["NOT_SET"])


def test_kernel_record_round_trip() -> None:
    record = kernel_lab.KernelRecord(
        "6.1", "linux-image-6.1.0-56-amd64-unsigned", "6.1.192-2", "6.1.0-56-amd64", "/v", "/m"
    )
    assert kernel_lab.KernelRecord.from_json(record.to_json()) == record


def _junit(path: Path, tests: int, failures: int = 0, errors: int = 0, skipped: int = 0) -> Path:
    path.write_text(
        '<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests">'
        f'<testsuite name="pytest" errors="{errors}" failures="{failures}" '
        f'skipped="{skipped}" tests="{tests}" time="12.5"></testsuite></testsuites>'
    )
    return path


def test_check_guest_junit_accepts_a_fresh_clean_run(tmp_path: Path) -> None:
    junit = _junit(tmp_path / "junit.xml", tests=7)
    counts = kernel_lab.check_guest_junit(junit, not_before=junit.stat().st_mtime)
    assert counts == kernel_lab.JunitCounts(7, 0, 0, 0, 12.5)


@pytest.mark.parametrize(
    ("counts", "complaint"),
    [
        ({"tests": 0}, "no tests ran"),
        ({"tests": 5, "skipped": 1}, "1 skipped of 5"),
        ({"tests": 5, "failures": 2}, "2 failed"),
        ({"tests": 5, "errors": 1}, "1 errors"),
    ],
)
def test_check_guest_junit_rejects_runs_that_prove_nothing(
    tmp_path: Path, counts: dict[str, int], complaint: str
) -> None:
    junit = _junit(tmp_path / "junit.xml", **counts)
    with pytest.raises(LabError, match=complaint):
        kernel_lab.check_guest_junit(junit, not_before=0)


def test_check_guest_junit_rejects_missing_and_stale_files(tmp_path: Path) -> None:
    with pytest.raises(LabError, match="not written"):
        kernel_lab.check_guest_junit(tmp_path / "absent.xml", not_before=0)
    junit = _junit(tmp_path / "junit.xml", tests=3)
    with pytest.raises(LabError, match="earlier run"):
        kernel_lab.check_guest_junit(junit, not_before=junit.stat().st_mtime + 1)


def test_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("TRIO_KTLS_KERNEL_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert kernel_lab.cache_root() == tmp_path / ".cache/trio_ktls/kernels"
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert kernel_lab.cache_root() == Path("/xdg/trio_ktls/kernels")
    monkeypatch.setenv("TRIO_KTLS_KERNEL_CACHE", "/lab")
    assert kernel_lab.cache_root() == Path("/lab/trio_ktls/kernels")


def test_the_design_notes_show_the_matrix_table() -> None:
    """docs/design.md carries `kernel_lab.py table` verbatim, so it cannot drift."""
    design = Path(__file__).resolve().parents[1] / "docs" / "design.md"
    assert kernel_lab.matrix_table() in design.read_text()


def test_labels_command_prints_the_matrix() -> None:
    lab = Path(__file__).resolve().parents[1] / "tools" / "kernel_lab.py"
    output = subprocess.run(
        [sys.executable, str(lab), "labels"], check=True, capture_output=True, text=True
    ).stdout
    assert tuple(output.split()) == kernel_lab.LABELS


@pytest.mark.parametrize(
    ("boots", "expected", "attempts"),
    [
        ([(255, 6.0), (0, 300.0)], 0, 2),  # never booted, then ran
        ([(255, 6.0)] * 3, 255, 3),  # never booted, three times: give up
        ([(255, 400.0)], 255, 1),  # booted and failed: no second run
        ([(1, 5.0)], 1, 1),  # any other status is the command's
    ],
)
def test_a_guest_that_never_booted_is_booted_again(
    monkeypatch: pytest.MonkeyPatch,
    boots: list[tuple[int, float]],
    expected: int,
    attempts: int,
) -> None:
    clock = [0.0]
    calls: list[tuple[object, ...]] = []

    def boot(*args: object) -> int:
        status, seconds = boots[len(calls)]
        calls.append(args)
        clock[0] += seconds
        return status

    record = kernel_lab.KernelRecord.__new__(kernel_lab.KernelRecord)
    monkeypatch.setattr(kernel_lab, "fetch", lambda label: record)
    monkeypatch.setattr(kernel_lab, "link_modules", lambda record: None)
    monkeypatch.setattr(kernel_lab, "find_vng", lambda: Path("/nonexistent/vng"))
    monkeypatch.setattr(kernel_lab, "guest_script", lambda *args: "true")
    monkeypatch.setattr(kernel_lab, "_boot", boot)
    monkeypatch.setattr("kernel_lab.time.monotonic", lambda: clock[0])
    monkeypatch.setattr(type(record), "vmlinuz", "vmlinuz", raising=False)
    monkeypatch.setattr(type(record), "release", "7.2.13", raising=False)
    assert kernel_lab.run_in_guest("7", ["true"]) == expected
    assert len(calls) == attempts
