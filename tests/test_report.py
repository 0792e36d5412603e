"""``ktls_info.handoff`` (`HandoffReport`) and ``record_sequence_numbers()``: what a person
can see of a handoff, never a byte of key material.

The parsing of handshake messages is tested without sockets; the reports of real
connections run both ways (user space here, the kernel in the matrix)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import trio

import trio_ktls
from trio_ktls import HandoffReport, KTLSMode, KTLSStream
from trio_ktls._report import HandoffTrace

from .helpers import (
    HOSTNAME,
    MODES,
    VERSIONS,
    client_context,
    kernel_can_rekey,
    ktls_pair_maker,
    receive_exactly,
    server_context,
    tcp_pair,
)


def _message(msg_type: int, length: int) -> bytes:
    return bytes([msg_type]) + length.to_bytes(3, "big") + bytes(length)


def _names(trace: HandoffTrace) -> list[tuple[str, ...]]:
    return [record.messages for record in trace.records]


def test_several_messages_in_one_record_are_all_named() -> None:
    trace = HandoffTrace()
    body = _message(2, 70) + _message(11, 500) + _message(12, 100) + _message(14, 0)
    trace.record(sent=False, content_type=22, body=body, encrypted=False)
    (record,) = trace.records
    assert record.messages == (
        "server_hello",
        "certificate",
        "server_key_exchange",
        "server_hello_done",
    )
    assert (record.sent, record.content_type, record.length) == (False, "handshake", len(body))


def test_a_message_split_across_records_is_named_once_and_followed() -> None:
    trace = HandoffTrace()
    certificate = _message(11, 20000)
    trace.record(sent=False, content_type=22, body=certificate[:16384], encrypted=False)
    trace.record(
        sent=False,
        content_type=22,
        body=certificate[16384:] + _message(14, 0),
        encrypted=False,
    )
    # The other direction keeps its own place.
    trace.record(sent=True, content_type=22, body=_message(16, 37), encrypted=False)
    assert _names(trace) == [("certificate",), ("server_hello_done",), ("client_key_exchange",)]


def test_a_header_split_across_records_stops_naming_that_direction_only() -> None:
    trace = HandoffTrace()
    body = _message(2, 10) + bytes([11, 0])  # the Certificate's header is cut short
    trace.record(sent=False, content_type=22, body=body, encrypted=False)
    trace.record(sent=False, content_type=22, body=bytes(40), encrypted=False)
    trace.record(sent=True, content_type=22, body=_message(1, 5), encrypted=False)
    assert _names(trace) == [("server_hello",), (), ("client_hello",)]


def test_encrypted_and_non_handshake_records_name_no_messages() -> None:
    trace = HandoffTrace()
    trace.record(sent=True, content_type=22, body=_message(20, 12), encrypted=True)
    trace.record(sent=True, content_type=20, body=b"\x01", encrypted=False)
    trace.record(sent=False, content_type=23, body=bytes(50), encrypted=True)
    trace.record(sent=False, content_type=99, body=b"", encrypted=False)
    assert [(r.content_type, r.messages) for r in trace.records] == [
        ("handshake", ()),
        ("change_cipher_spec", ()),
        ("application_data", ()),
        ("99", ()),
    ]


def test_socket_option_outcomes_are_named() -> None:
    trace = HandoffTrace()
    trace.socket_option("setsockopt(IPPROTO_TCP, TCP_ULP, b'tls')")
    trace.socket_option("setsockopt(SOL_TLS, TLS_TX, <...>)", OSError(errno.EBUSY, "busy"))
    report = trace.report()
    assert report.socket_options == (
        "setsockopt(IPPROTO_TCP, TCP_ULP, b'tls'): ok",
        "setsockopt(SOL_TLS, TLS_TX, <...>): failed with EBUSY (Device or resource busy)",
    )
    assert "failed with EBUSY" in report.format()


def _expected_key_length(cipher: str) -> int:
    return 32 if ("256" in cipher or "CHACHA" in cipher) else 16


def _handshake_messages(report: HandoffReport, *, sent: bool) -> list[str]:
    return [m for r in report.records if r.sent is sent for m in r.messages]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("mode", MODES)
async def test_report_of_a_real_connection(
    nursery: trio.Nursery, version: str, mode: KTLSMode
) -> None:
    client, server = await ktls_pair_maker(nursery, version, mode)()
    for stream in (client, server):
        info = stream.ktls_info
        assert info is not None
        report = info.handoff
        assert report is not None
        assert report.records[0].messages == ("client_hello",)
        ours = _handshake_messages(report, sent=True)
        assert ("server_hello" in ours) is stream.server_side
        assert ("client_hello" in ours) is not stream.server_side
        text = report.format()
        assert "client_hello" in text
        if mode == "off":
            assert report.socket_options == ()
            assert report.secrets == ()
            assert report.key_length is report.tx_rec_seq is report.rx_rec_seq is None
            continue
        labels = dict(report.secrets)
        if version == "TLSv1.3":
            assert labels["CLIENT_TRAFFIC_SECRET_0"] == labels["SERVER_TRAFFIC_SECRET_0"]
            assert labels["CLIENT_TRAFFIC_SECRET_0"] in (32, 48)
            assert report.iv_length == 12
            # A TLS 1.3 server's first records under the application key are its tickets.
            first = (2, 0) if stream.server_side else (0, 0)
        else:
            assert labels == {"CLIENT_RANDOM": 48}
            assert report.iv_length in (4, 12)
            first = (1, 1)
        assert report.key_length == _expected_key_length(info.cipher)
        assert (report.tx_rec_seq, report.rx_rec_seq) == first
        assert [call.split("(")[1].split(",")[1].strip() for call in report.socket_options] == [
            "TCP_ULP",
            "TLS_TX",
            "TLS_RX",
        ]
        assert all(call.endswith(": ok") for call in report.socket_options)
        assert "secrets from the key log" in text
        assert f"first sequence numbers: TX {first[0]}, RX {first[1]}" in text
    await client.aclose()
    await server.aclose()


@pytest.mark.parametrize("mode", MODES)
async def test_the_report_holds_no_secret(
    nursery: trio.Nursery, mode: KTLSMode, tmp_path: Path
) -> None:
    # The user's own key log keeps receiving the lines (as SSLKEYLOGFILE would): the
    # secrets to look for.
    keylog = tmp_path / "keylog.txt"
    client_ctx = client_context("TLSv1.3")
    client_ctx.keylog_filename = str(keylog)
    client_tcp, server_tcp = await tcp_pair()
    client = KTLSStream(
        client_tcp, client_ctx, nursery=nursery, server_hostname=HOSTNAME, ktls=mode
    )
    server = KTLSStream(
        server_tcp, server_context("TLSv1.3"), nursery=nursery, server_side=True, ktls=mode
    )
    async with trio.open_nursery() as handshakes:
        handshakes.start_soon(client.do_handshake)
        handshakes.start_soon(server.do_handshake)
    lines = keylog.read_text().splitlines()
    secrets = [line.split()[2] for line in lines if line and not line.startswith("#")]
    assert secrets
    info = client.ktls_info
    assert info is not None
    assert info.handoff is not None
    shown = repr(info) + info.handoff.format()
    for secret in secrets:
        assert secret.lower() not in shown.lower()
        assert repr(bytes.fromhex(secret))[2:-1] not in shown
    await client.aclose()
    await server.aclose()


async def _send_records(sender: KTLSStream, receiver: KTLSStream, count: int) -> None:
    for _ in range(count):
        await sender.send_all(b"x" * 100)  # one small write: one record
    await receive_exactly(receiver, 100 * count)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("mode", MODES)
async def test_record_sequence_numbers(
    nursery: trio.Nursery, version: str, mode: KTLSMode
) -> None:
    client, server = await ktls_pair_maker(nursery, version, mode)()
    await _send_records(client, server, 3)
    # Received in order after the server's tickets: once it is here, so are they.
    await _send_records(server, client, 1)
    if mode == "off":
        assert client.record_sequence_numbers() is None
        assert server.record_sequence_numbers() is None
    elif version == "TLSv1.3":
        # Client: 3 sent from 0; 2 tickets and 1 record received. Server: 2 tickets and
        # 1 record sent, 3 received.
        assert client.record_sequence_numbers() == (3, 3)
        assert server.record_sequence_numbers() == (3, 3)
    else:
        # TLS 1.2: each side's Finished was record 0 under the new keys.
        assert client.record_sequence_numbers() == (4, 2)
        assert server.record_sequence_numbers() == (2, 4)
    await client.aclose()
    await server.aclose()
    with pytest.raises(trio.ClosedResourceError):
        client.record_sequence_numbers()


async def test_record_sequence_numbers_before_the_handshake(nursery: trio.Nursery) -> None:
    client, server = await ktls_pair_maker(nursery, "TLSv1.3", "auto", handshake=False)()
    assert client.record_sequence_numbers() is None
    await client.aclose()
    await server.aclose()


@pytest.mark.ktls
async def test_a_key_update_restarts_the_transmit_count(nursery: trio.Nursery) -> None:
    client, server = await ktls_pair_maker(nursery, "TLSv1.3", "require")()
    await _send_records(client, server, 2)
    assert _tx(client) == 2
    if kernel_can_rekey():
        await client.update_keys()  # the KeyUpdate is record 2 under the old key
        await _send_records(client, server, 1)
        assert _tx(client) == 1
        # The server's receive key changed after the KeyUpdate record: one record since.
        assert server.record_sequence_numbers() == (2, 1)
    else:
        with pytest.raises(trio_ktls.KeyUpdateUnavailableError):
            await client.update_keys()
        assert _tx(client) == 2
    await client.aclose()
    await server.aclose()


def _tx(stream: KTLSStream) -> int:
    numbers = stream.record_sequence_numbers()
    assert numbers is not None
    return numbers[0]


async def test_auto_mode_reports_the_ulp_attempt(nursery: trio.Nursery) -> None:
    client, server = await ktls_pair_maker(nursery, "TLSv1.3", "auto")()
    info = client.ktls_info
    assert info is not None
    assert info.handoff is not None
    first = info.handoff.socket_options[0]
    assert first.startswith("setsockopt(IPPROTO_TCP, TCP_ULP, b'tls'): ")
    if info.tx_offload:
        assert first.endswith(": ok")
    else:  # a host without kTLS: the kernel's answer, as the probe would explain it
        assert "failed with" in first
        assert len(info.handoff.socket_options) == 1
    await client.aclose()
    await server.aclose()
