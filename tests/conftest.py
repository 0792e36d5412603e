"""Test-suite plumbing for the kTLS marker and the kernel matrix.

- Tests marked ``ktls`` need a kernel with kTLS. Where the probe says there is none (this
  project's development hosts), they are skipped with the probe's reason.
- Inside a kernel guest (``TRIO_KTLS_GUEST_KERNEL`` is set by the kernel lab), a skipped
  ``ktls`` test is a failure: the guest run exists to prove those tests ran.
- Every run records the kernel release and the probe's answer (JSON) in the junit
  report, so the matrix shows which kernel each result came from and what it can do.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Generator

import pytest
from hypothesis import settings

from .helpers import GUEST_KERNEL, kernel_probe

# The kernel guests see the repository read-only, and emulation is ~10x slower: keep
# hypothesis's files out of the repository (its plugin looks there before any test runs)
# and its example database in memory, and let examples take as long as they take.
os.environ.setdefault(
    "HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "trio_ktls-hypothesis")
)
settings.register_profile("trio_ktls", database=None, deadline=None)
settings.load_profile("trio_ktls")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    result = kernel_probe()
    if result.available:
        return
    skip = pytest.mark.skip(reason=f"no kTLS on this kernel: {result.reason}")
    for item in items:
        if "ktls" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if GUEST_KERNEL and report.skipped and "ktls" in item.keywords:
        report.outcome = "failed"
        report.longrepr = (
            f"a kTLS test was skipped inside the {GUEST_KERNEL} kernel guest, where it must "
            f"run: {report.longrepr}"
        )
    return report


@pytest.fixture(scope="session", autouse=True)
def _record_kernel(record_testsuite_property: Callable[[str, object], None]) -> None:
    record_testsuite_property("kernel_release", os.uname().release)
    record_testsuite_property("guest_kernel_label", GUEST_KERNEL or "host")
    record_testsuite_property("ktls_available", kernel_probe().available)
    # The whole probe (ciphers, rekey), for the matrix's capability table.
    record_testsuite_property("probe", json.dumps(kernel_probe().as_dict()))


@pytest.fixture
def record_figure(
    request: pytest.FixtureRequest, record_testsuite_property: Callable[[str, object], None]
) -> Callable[[str, object], None]:
    """Record a figure of this test (a seed, a count) in the junit report, named
    ``test-id:name``, so a matrix run's figures can be read back from its reports."""

    def record(name: str, value: object) -> None:
        record_testsuite_property(f"{request.node.name}:{name}", value)

    return record
