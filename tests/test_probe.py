"""The capability probe: on every host (never raises, explains itself) and in each kernel
guest (what that kernel line must show)."""

from __future__ import annotations

import errno
import json
import ssl
import subprocess
import sys

import pytest

from trio_ktls import _probe
from trio_ktls._kernel import KernelCipher
from trio_ktls._keyschedule import KTLS_VERSIONS

from .helpers import GUEST_KERNEL, KERNEL_LINES, kernel_probe


def test_probe_always_answers() -> None:
    result = kernel_probe()
    assert result.kernel_release
    assert result.reason
    if not result.available:
        assert not any(c.tx or c.rx for c in result.ciphers)
        assert result.tls13_tx_rekey is None


def test_cli_probe_json_exits_zero() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "trio_ktls", "probe", "--json"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["available"] == kernel_probe().available
    assert data["kernel_release"] == kernel_probe().kernel_release


def test_cli_probe_text_states_the_reason() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "trio_ktls", "probe"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert kernel_probe().reason in proc.stdout
    assert "kTLS available: " in proc.stdout


@pytest.mark.parametrize(
    ("config", "installed", "expected"),
    [
        ("n", False, "built without kTLS (CONFIG_TLS is not set)"),
        ("m", True, "not loaded"),
        ("m", False, "tls.ko is not installed"),
        (None, False, "neither loaded nor installed"),
    ],
)
def test_missing_module_reasons(
    monkeypatch: pytest.MonkeyPatch, config: str | None, installed: bool, expected: str
) -> None:
    monkeypatch.setattr(_probe, "kernel_config_value", lambda name: config)
    monkeypatch.setattr(_probe, "tls_module_installed", lambda: installed)
    assert expected in _probe.ulp_error_reason(OSError(errno.ENOENT, "No such file"))


def test_supports_takes_the_kernel_cipher_number() -> None:
    result = _probe.ProbeResult(
        True,
        "made up",
        "6.18.0-test",
        ciphers=(
            _probe.CipherSupport("TLSv1.3", "AES_GCM_128", True, True),
            _probe.CipherSupport("TLSv1.2", "AES_GCM_256", True, False, "RX refused"),
        ),
    )
    assert result.supports(ssl.TLSVersion.TLSv1_3, 51)
    assert result.supports(ssl.TLSVersion.TLSv1_3, KernelCipher.AES_GCM_128)
    assert not result.supports(ssl.TLSVersion.TLSv1_2, KernelCipher.AES_GCM_256)  # RX only
    assert not result.supports(ssl.TLSVersion.TLSv1_2, 51)
    with pytest.raises(ValueError, match="99"):
        result.supports(ssl.TLSVersion.TLSv1_3, 99)


def test_other_ulp_errors_are_explained() -> None:
    assert "not permitted" in _probe.ulp_error_reason(OSError(errno.EPERM, "x"))
    assert "not a connected TCP socket" in _probe.ulp_error_reason(OSError(errno.ENOTCONN, "x"))


def test_read_tls_stat_parses_counters(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    stat = tmp_path / "tls_stat"
    stat.write_text("TlsCurrTxSw                     \t3\nTlsTxRekeyOk 7\n")
    monkeypatch.setattr(_probe, "_TLS_STAT", stat)
    assert _probe.read_tls_stat() == {"TlsCurrTxSw": 3, "TlsTxRekeyOk": 7}


# What each kernel line of the matrix must show (tls.rst; rekey arrived in 6.14).


@pytest.mark.ktls
def test_kernel_line_capabilities() -> None:
    result = kernel_probe()
    print(result.format())
    assert result.available, result.reason
    for version in KTLS_VERSIONS:
        for cipher in (
            KernelCipher.AES_GCM_128,
            KernelCipher.AES_GCM_256,
            KernelCipher.CHACHA20_POLY1305,
        ):
            assert result.supports(version, cipher), (version, cipher, result.ciphers)
    assert result.tls_stat.get("TlsCurrTxSw", -1) >= 0
    if GUEST_KERNEL is None:
        return
    line = GUEST_KERNEL
    assert result.kernel_release.startswith(f"{line}."), (line, result.kernel_release)
    assert _probe.zero_copy_send_file_works() is KERNEL_LINES[line].zero_copy_send_file
    expect = KERNEL_LINES[line].tls13_rekey
    assert result.tls13_tx_rekey is expect, result.rekey_error
    assert result.tls13_rx_rekey is expect, result.rekey_error
    if expect:
        assert result.tls_stat["TlsTxRekeyOk"] >= 1
        assert result.tls_stat["TlsRxRekeyOk"] >= 1


@pytest.mark.parametrize(
    ("release", "works"),
    [
        ("6.1.0-57-amd64", True),
        ("6.12.117+deb13-amd64", True),
        ("6.18.15+deb13-amd64", True),
        ("7.2.13+deb14-amd64", True),
        ("6.0.12-generic", False),
        ("5.15.0-generic", False),
        ("garbage", False),
    ],
)
def test_zero_copy_send_file_by_kernel_line(release: str, works: bool) -> None:
    assert _probe.zero_copy_send_file_works(release) is works
