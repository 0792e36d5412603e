"""The demo behind the README's main command, run in-process."""

from __future__ import annotations

import pytest

from trio_ktls._demo import run_demo


async def test_demo_echoes_in_user_space(capsys: pytest.CaptureFixture[str]) -> None:
    await run_demo(megabytes=1, ktls="off")
    out = capsys.readouterr().out
    assert out.count("byte-exact: True") == 2
    assert "tx_offload=False" in out


@pytest.mark.ktls
async def test_demo_offloads_both_directions(capsys: pytest.CaptureFixture[str]) -> None:
    await run_demo(megabytes=1, ktls="require")
    out = capsys.readouterr().out
    assert out.count("byte-exact: True") == 2
    assert out.count("tx_offload=True, rx_offload=True") == 4  # client and server, twice
    assert "tx_offload=False" not in out
