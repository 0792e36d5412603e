"""The shared kTLS options: every value checked once, before any socket is opened."""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import trio

import trio_ktls
from trio_ktls import StreamOptions

from .helpers import client_context, server_context, tcp_pair

BAD_OPTIONS = [
    pytest.param({"ktls": "bogus"}, ValueError, "ktls must be", id="mode"),
    pytest.param({"handshake_timeout": 0}, ValueError, "positive", id="timeout-zero"),
    pytest.param({"handshake_timeout": "1"}, TypeError, "number", id="timeout-type"),
    pytest.param({"max_receive_buffer": 0}, ValueError, "at least 1", id="buffer"),
    pytest.param({"max_receive_buffer": 1.5}, TypeError, "integer", id="buffer-type"),
    pytest.param({"rekey_after_records": 1}, ValueError, "at least 2", id="rekey"),
    pytest.param(
        {"request_peer_rekey_after_records": -5}, ValueError, "at least 2", id="peer-rekey"
    ),
]


def test_defaults() -> None:
    options = StreamOptions()
    assert options.ktls == "auto"
    assert options.handshake_timeout is None
    assert options.max_receive_buffer > 0
    assert options.rekey_after_records is options.request_peer_rekey_after_records is None


@pytest.mark.parametrize(("options", "error", "message"), BAD_OPTIONS)
async def test_every_way_in_refuses_a_bad_value_before_any_io(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        StreamOptions(**options)
    # Nothing listens on this port: connecting first would be an OSError instead.
    with pytest.raises(error, match=message):
        async with trio_ktls.open_ktls_stream("127.0.0.1", 1, **options):
            pass  # pragma: no cover
    with pytest.raises(error, match=message):
        await trio_ktls.serve_ktls_over_tcp(
            partial(trio.sleep, 0), 1, server_context("TLSv1.3"), host="127.0.0.1", **options
        )
    client, server = await tcp_pair()
    async with client, server, trio.open_nursery() as nursery:
        with pytest.raises(error, match=message):
            trio_ktls.KTLSStream(client, client_context("TLSv1.3"), nursery=nursery, **options)
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        async with listener:
            with pytest.raises(error, match=message):
                trio_ktls.KTLSListener(
                    listener, server_context("TLSv1.3"), nursery=nursery, **options
                )
