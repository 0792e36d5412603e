"""The handoff's user-space parts, without sockets: key-log capture, hello randoms,
sequence numbers and key derivation, on real OpenSSL handshakes over memory BIOs."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest

from trio_ktls._handoff import (
    HandshakeObserver,
    KeyLogTap,
    derive_handoff_keys,
    initial_sequence_numbers,
    split_records,
)
from trio_ktls._keyschedule import lookup_suite

from .helpers import client_context, handshake_in_memory, server_context


def _observed_handshake(
    client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext
) -> tuple[ssl.SSLObject, HandshakeObserver, HandshakeObserver]:
    """A handshake in memory with both observers watching, as the stream's would: each
    side's flushes whole, and each record the other side reads."""
    handshake = handshake_in_memory(client_ctx, server_ctx)
    watch = {"client": HandshakeObserver(False), "server": HandshakeObserver(True)}
    for side, data in handshake.flights:
        watch[side].outgoing(data)
        peer = watch["server" if side == "client" else "client"]
        for content_type, body in split_records(data):
            peer.incoming(bytes([content_type, 3, 3]) + len(body).to_bytes(2, "big") + body)
    return handshake.client, watch["client"], watch["server"]


def test_tap_captures_in_memory_and_keeps_feeding_the_users_file(tmp_path: Path) -> None:
    user_file = tmp_path / "sslkeylog.txt"
    client_ctx = client_context("TLSv1.3")
    client_ctx.keylog_filename = str(user_file)  # as SSLKEYLOGFILE would
    tap = KeyLogTap.for_context(client_ctx)
    assert KeyLogTap.for_context(client_ctx) is tap
    assert client_ctx.keylog_filename.startswith("/proc/self/fd/")
    _, watch_client, _ = _observed_handshake(client_ctx, server_context("TLSv1.3"))
    tap.drain()
    assert watch_client.client_random is not None
    secrets = tap.take(watch_client.client_random)
    assert {"CLIENT_TRAFFIC_SECRET_0", "SERVER_TRAFFIC_SECRET_0"} <= set(secrets)
    assert os.pread(tap._fd, 16, 0) == b""  # the memfd was emptied
    logged = user_file.read_text()
    assert f"CLIENT_TRAFFIC_SECRET_0 {watch_client.client_random.hex()} " in logged


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
def test_both_ends_derive_matching_keys(version: str) -> None:
    """Each side's transmit key and IV are the other side's receive key and IV."""
    client_ctx, server_ctx = client_context(version), server_context(version)
    taps = {False: KeyLogTap.for_context(client_ctx), True: KeyLogTap.for_context(server_ctx)}
    client, watch_client, watch_server = _observed_handshake(client_ctx, server_ctx)
    assert watch_client.client_random == watch_server.client_random is not None
    assert watch_client.server_random == watch_server.server_random is not None
    tls_version = ssl.TLSVersion.TLSv1_3 if version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
    cipher = client.cipher()
    assert cipher is not None
    suite = lookup_suite(cipher[0], tls_version)
    assert suite is not None
    keys = {}
    for watch in (watch_client, watch_server):
        tap = taps[watch.server_side]
        tap.drain()
        assert watch.client_random is not None
        tx, rx = initial_sequence_numbers(
            tls_version,
            server_side=watch.server_side,
            final_flush_protected_records=watch.last_flush_protected_records,
        )
        secrets = tap.take(watch.client_random)
        keys[watch.server_side] = derive_handoff_keys(suite, secrets, watch, tx_seq=tx, rx_seq=rx)
    # Everything but the trailing 8-byte rec_seq: the server's first records under the
    # application key are its tickets, which the client's kernel will count from 0.
    client_keys, server_keys = keys[False], keys[True]
    assert client_keys.tx.packed()[:-8] == server_keys.rx.packed()[:-8]
    assert server_keys.tx.packed()[:-8] == client_keys.rx.packed()[:-8]
    assert client_keys.tx.packed()[:-8] != client_keys.rx.packed()[:-8]
    if version == "TLSv1.3":
        assert server_keys.tx.packed()[-8:] == (2).to_bytes(8, "big")  # num_tickets
        assert client_keys.tx_secret == server_keys.rx_secret


def test_initial_sequence_numbers() -> None:
    assert initial_sequence_numbers(
        ssl.TLSVersion.TLSv1_2, server_side=True, final_flush_protected_records=0
    ) == (1, 1)
    assert initial_sequence_numbers(
        ssl.TLSVersion.TLSv1_3, server_side=False, final_flush_protected_records=3
    ) == (0, 0)
    assert initial_sequence_numbers(
        ssl.TLSVersion.TLSv1_3, server_side=True, final_flush_protected_records=2
    ) == (2, 0)
