"""Tests for ``trio_ktls._messages``: records, alerts, handshake reassembly, KeyUpdate and
NewSessionTicket, bytes in and values (or ``TLSDecodeError``) out."""

from __future__ import annotations

import contextlib
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_ktls._errors import TLSDecodeError
from trio_ktls._messages import (
    CLOSE_NOTIFY,
    DEFAULT_MAX_HANDSHAKE_MESSAGE,
    MAX_CIPHERTEXT,
    MAX_CIPHERTEXT_TLS13,
    MAX_PLAINTEXT,
    RECORD_HEADER_LENGTH,
    Alert,
    AlertDescription,
    AlertLevel,
    ContentType,
    HandshakeReassembler,
    HandshakeType,
    NewSessionTicket,
    RecordHeader,
    encode_handshake,
    encode_key_update,
    parse_key_update,
    parse_new_session_ticket,
    parse_record_header,
)

UNEXPECTED_MESSAGE = 10
RECORD_OVERFLOW = 22
ILLEGAL_PARAMETER = 47
DECODE_ERROR = 50
PROTOCOL_VERSION = 70


def test_constants() -> None:
    assert RECORD_HEADER_LENGTH == 5
    assert MAX_PLAINTEXT == 16384
    assert MAX_CIPHERTEXT_TLS13 == 16384 + 256
    assert MAX_CIPHERTEXT == 16384 + 2048


def test_enum_values_follow_the_rfcs() -> None:
    assert [int(t) for t in ContentType] == [20, 21, 22, 23]
    assert (AlertLevel.WARNING, AlertLevel.FATAL) == (1, 2)
    # RFC 8446 §6 (plus the values it reserves from TLS 1.2 and RFC 6066).
    assert {d.name.lower(): int(d) for d in AlertDescription} == {
        "close_notify": 0,
        "unexpected_message": 10,
        "bad_record_mac": 20,
        "decryption_failed": 21,
        "record_overflow": 22,
        "decompression_failure": 30,
        "handshake_failure": 40,
        "no_certificate": 41,
        "bad_certificate": 42,
        "unsupported_certificate": 43,
        "certificate_revoked": 44,
        "certificate_expired": 45,
        "certificate_unknown": 46,
        "illegal_parameter": 47,
        "unknown_ca": 48,
        "access_denied": 49,
        "decode_error": 50,
        "decrypt_error": 51,
        "export_restriction": 60,
        "protocol_version": 70,
        "insufficient_security": 71,
        "internal_error": 80,
        "inappropriate_fallback": 86,
        "user_canceled": 90,
        "no_renegotiation": 100,
        "missing_extension": 109,
        "unsupported_extension": 110,
        "certificate_unobtainable": 111,
        "unrecognized_name": 112,
        "bad_certificate_status_response": 113,
        "bad_certificate_hash_value": 114,
        "unknown_psk_identity": 115,
        "certificate_required": 116,
        "no_application_protocol": 120,
    }
    expected_types = {
        "hello_request": 0,
        "client_hello": 1,
        "server_hello": 2,
        "new_session_ticket": 4,
        "end_of_early_data": 5,
        "encrypted_extensions": 8,
        "certificate": 11,
        "certificate_request": 13,
        "certificate_verify": 15,
        "finished": 20,
        "key_update": 24,
        "message_hash": 254,
    }
    for name, value in expected_types.items():
        assert HandshakeType[name.upper()] == value


# --- Record headers --------------------------------------------------------------------


@pytest.mark.parametrize("content_type", list(ContentType))
@pytest.mark.parametrize("version", [0x0301, 0x0302, 0x0303, 0x0300, 0x03FF])
def test_record_header_valid(content_type: ContentType, version: int) -> None:
    data = bytes((content_type,)) + version.to_bytes(2, "big") + (300).to_bytes(2, "big")
    header = parse_record_header(data)
    assert header == RecordHeader(content_type, version, 300)
    assert header.content_type is content_type
    assert header.encode() == data


@pytest.mark.parametrize("length", [0, 1, 4, 6, 10])
def test_record_header_wrong_size(length: int) -> None:
    with pytest.raises(TLSDecodeError, match=f"record header must be 5 bytes, got {length}") as e:
        parse_record_header(b"\x17\x03\x03\x00\x10\x00\x00\x00\x00\x00"[:length])
    assert e.value.alert == DECODE_ERROR


@pytest.mark.parametrize("type_byte", [0, 19, 24, 25, 0x80, 255])
def test_record_header_unknown_type(type_byte: int) -> None:
    with pytest.raises(TLSDecodeError, match=f"unknown content type {type_byte}") as e:
        parse_record_header(bytes((type_byte, 3, 3, 0, 5)))
    assert e.value.alert == UNEXPECTED_MESSAGE


@pytest.mark.parametrize("version", [0x0000, 0x0203, 0x0403, 0xFEFD, 0x1603])
def test_record_header_not_tls(version: int) -> None:
    data = b"\x16" + version.to_bytes(2, "big") + b"\x00\x05"
    with pytest.raises(TLSDecodeError, match=f"record version 0x{version:04x} is not TLS") as e:
        parse_record_header(data)
    assert e.value.alert == DECODE_ERROR


def test_http_is_not_a_record() -> None:
    with pytest.raises(TLSDecodeError):
        parse_record_header(b"GET /")


@pytest.mark.parametrize(
    "max_length", [None, MAX_CIPHERTEXT, MAX_CIPHERTEXT_TLS13, MAX_PLAINTEXT, 0]
)
def test_record_header_length_limit(max_length: int | None) -> None:
    limit = MAX_CIPHERTEXT if max_length is None else max_length
    kwargs = {} if max_length is None else {"max_length": max_length}

    def header(length: int) -> bytes:
        return b"\x17\x03\x03" + length.to_bytes(2, "big")

    assert parse_record_header(header(limit), **kwargs).length == limit
    with pytest.raises(TLSDecodeError, match=f"exceeds the limit of {limit}") as e:
        parse_record_header(header(limit + 1), **kwargs)
    assert e.value.alert == RECORD_OVERFLOW
    with pytest.raises(TLSDecodeError) as e:
        parse_record_header(header(0xFFFF), **kwargs)
    assert e.value.alert == RECORD_OVERFLOW
    assert "application_data record of 65535 bytes" in str(e.value)


# --- Alerts ----------------------------------------------------------------------------


@pytest.mark.parametrize("level", list(AlertLevel))
@pytest.mark.parametrize("description", list(AlertDescription))
def test_alert_round_trip(level: AlertLevel, description: AlertDescription) -> None:
    data = bytes((level, description))
    alert = Alert.parse(data)
    assert alert == Alert(level, description)
    assert alert.description is description
    assert alert.encode() == data


def test_alert_unknown_description_is_kept() -> None:
    alert = Alert.parse(b"\x02\xc8")
    assert alert == Alert(AlertLevel.FATAL, 200)
    assert type(alert.description) is int
    assert alert.encode() == b"\x02\xc8"
    assert str(alert) == "fatal alert unknown (200)"


def test_alert_str() -> None:
    assert str(Alert.parse(b"\x02\x14")) == "fatal alert bad_record_mac (20)"
    assert str(CLOSE_NOTIFY) == "warning alert close_notify (0)"
    assert str(Alert(AlertLevel.WARNING, AlertDescription.NO_RENEGOTIATION)) == (
        "warning alert no_renegotiation (100)"
    )


def test_close_notify() -> None:
    assert CLOSE_NOTIFY.encode() == b"\x01\x00"
    assert Alert.parse(b"\x01\x00") == CLOSE_NOTIFY


@pytest.mark.parametrize("data", [b"", b"\x02", b"\x02\x14\x00", b"\x01\x00\x01\x00"])
def test_alert_wrong_length(data: bytes) -> None:
    with pytest.raises(TLSDecodeError, match=f"alert must be 2 bytes, got {len(data)}") as e:
        Alert.parse(data)
    assert e.value.alert == DECODE_ERROR


@pytest.mark.parametrize("level", [0, 3, 255])
def test_alert_unknown_level(level: int) -> None:
    with pytest.raises(TLSDecodeError, match=f"unknown level {level}") as e:
        Alert.parse(bytes((level, 0)))
    assert e.value.alert == ILLEGAL_PARAMETER


# --- Handshake messages and reassembly ------------------------------------------------


def test_encode_handshake() -> None:
    assert encode_handshake(HandshakeType.FINISHED, b"abc") == b"\x14\x00\x00\x03abc"
    assert encode_handshake(99, b"") == b"\x63\x00\x00\x00"
    assert encode_handshake(HandshakeType.KEY_UPDATE, bytes(0x10203))[:4] == b"\x18\x01\x02\x03"
    with pytest.raises(ValueError, match="handshake type must be"):
        encode_handshake(256, b"")
    with pytest.raises(ValueError, match="handshake type must be"):
        encode_handshake(-1, b"")
    with pytest.raises(ValueError, match="24 bits"):
        encode_handshake(HandshakeType.CERTIFICATE, bytes(2**24))


MESSAGES: list[tuple[HandshakeType | int, bytes]] = [
    (HandshakeType.KEY_UPDATE, b"\x01"),
    (HandshakeType.NEW_SESSION_TICKET, bytes(range(200))),
    (HandshakeType.HELLO_REQUEST, b""),  # an empty body
    (99, b"unknown type"),
    (HandshakeType.KEY_UPDATE, b"\x00"),
]
STREAM = b"".join(encode_handshake(t, body) for t, body in MESSAGES)


def _drain(reassembler: HandshakeReassembler) -> list[tuple[HandshakeType | int, bytes]]:
    return list(iter(reassembler.next_message, None))


def test_reassembler_whole_stream_in_one_record() -> None:
    reassembler = HandshakeReassembler()
    reassembler.feed(STREAM)
    assert reassembler.pending == len(STREAM)
    messages = _drain(reassembler)
    assert messages == MESSAGES
    assert isinstance(messages[0][0], HandshakeType)
    assert type(messages[3][0]) is int
    assert reassembler.pending == 0
    assert reassembler.next_message() is None


def test_reassembler_every_single_split() -> None:
    for split in range(1, len(STREAM)):
        reassembler = HandshakeReassembler()
        reassembler.feed(STREAM[:split])
        first = _drain(reassembler)
        reassembler.feed(STREAM[split:])
        assert first + _drain(reassembler) == MESSAGES, split
        assert reassembler.pending == 0


def test_reassembler_every_pair_of_splits() -> None:
    for i, j in itertools.combinations(range(1, len(STREAM)), 2):
        reassembler = HandshakeReassembler()
        messages = []
        for chunk in (STREAM[:i], STREAM[i:j], STREAM[j:]):
            reassembler.feed(chunk)
            messages += _drain(reassembler)
        assert messages == MESSAGES, (i, j)
        assert reassembler.pending == 0


def test_reassembler_byte_by_byte() -> None:
    reassembler = HandshakeReassembler()
    messages = []
    for index in range(len(STREAM)):
        reassembler.feed(STREAM[index : index + 1])
        messages += _drain(reassembler)
    assert messages == MESSAGES


def test_reassembler_pending_counts_partial_and_untaken_bytes() -> None:
    key_update = encode_key_update(False)
    reassembler = HandshakeReassembler()
    reassembler.feed(key_update[:3])  # part of the header
    assert reassembler.pending == 3
    assert reassembler.next_message() is None
    reassembler.feed(key_update[3:] + key_update[:2])  # one message, then a partial one
    assert reassembler.pending == len(key_update) + 2
    assert reassembler.next_message() == (HandshakeType.KEY_UPDATE, b"\x00")
    # RFC 8446 §5.1: these 2 bytes would span the key change: the stream must refuse.
    assert reassembler.pending == 2
    assert reassembler.next_message() is None
    reassembler.feed(key_update[2:])
    assert reassembler.pending == len(key_update)
    assert reassembler.next_message() == (HandshakeType.KEY_UPDATE, b"\x00")
    assert reassembler.pending == 0


def test_reassembler_refuses_oversized_message_at_its_header() -> None:
    reassembler = HandshakeReassembler(max_message_size=100)
    reassembler.feed(encode_handshake(HandshakeType.NEW_SESSION_TICKET, bytes(100)))
    assert reassembler.next_message() == (HandshakeType.NEW_SESSION_TICKET, bytes(100))
    with pytest.raises(TLSDecodeError) as e:
        reassembler.feed(b"\x04\x00\x00\x65")  # header only: 101 bytes announced
    assert e.value.alert == DECODE_ERROR
    assert str(e.value) == (
        "handshake message new_session_ticket of 101 bytes exceeds the limit of 100"
    )


def test_reassembler_default_limit() -> None:
    reassembler = HandshakeReassembler()
    assert reassembler.max_message_size == DEFAULT_MAX_HANDSHAKE_MESSAGE == 65536
    with pytest.raises(TLSDecodeError, match="type 99 of 16777215 bytes"):
        reassembler.feed(b"\x63\xff\xff\xff")


def test_reassembler_zero_limit_allows_empty_bodies() -> None:
    reassembler = HandshakeReassembler(max_message_size=0)
    reassembler.feed(b"\x00\x00\x00\x00")
    assert reassembler.next_message() == (HandshakeType.HELLO_REQUEST, b"")
    with pytest.raises(TLSDecodeError):
        reassembler.feed(b"\x18\x00\x00\x01\x00")


@pytest.mark.parametrize("limit", [-1, 2**24])
def test_reassembler_bad_limit(limit: int) -> None:
    with pytest.raises(ValueError, match="max_message_size"):
        HandshakeReassembler(max_message_size=limit)


def test_reassembler_refuses_empty_record() -> None:
    reassembler = HandshakeReassembler()
    with pytest.raises(TLSDecodeError, match="empty handshake record") as e:
        reassembler.feed(b"")
    assert e.value.alert == UNEXPECTED_MESSAGE


# --- KeyUpdate -------------------------------------------------------------------------


def test_key_update_round_trip() -> None:
    assert encode_key_update(False) == b"\x18\x00\x00\x01\x00"
    assert encode_key_update(True) == b"\x18\x00\x00\x01\x01"
    for requested in (False, True):
        reassembler = HandshakeReassembler()
        reassembler.feed(encode_key_update(requested))
        message = reassembler.next_message()
        assert message is not None
        assert message[0] is HandshakeType.KEY_UPDATE
        assert parse_key_update(message[1]) is requested


@pytest.mark.parametrize("value", [2, 3, 0x80, 255])
def test_key_update_illegal_value(value: int) -> None:
    with pytest.raises(TLSDecodeError, match=f"request_update is {value}, must be 0 or 1") as e:
        parse_key_update(bytes((value,)))
    assert e.value.alert == ILLEGAL_PARAMETER


@pytest.mark.parametrize("body", [b"", b"\x00\x00", b"\x01\x00", b"\x01" * 10])
def test_key_update_wrong_length(body: bytes) -> None:
    with pytest.raises(
        TLSDecodeError, match=f"KeyUpdate body must be 1 byte, got {len(body)}"
    ) as e:
        parse_key_update(body)
    assert e.value.alert == DECODE_ERROR


# --- NewSessionTicket ------------------------------------------------------------------


def ticket_body(
    lifetime: int = 7200,
    age_add: int = 0x01020304,
    nonce: bytes = b"\x00" * 8,
    ticket: bytes = b"T" * 40,
    extensions: bytes = b"",
) -> bytes:
    return (
        lifetime.to_bytes(4, "big")
        + age_add.to_bytes(4, "big")
        + len(nonce).to_bytes(1, "big")
        + nonce
        + len(ticket).to_bytes(2, "big")
        + ticket
        + len(extensions).to_bytes(2, "big")
        + extensions
    )


def test_new_session_ticket_valid() -> None:
    early_data = b"\x00\x2a\x00\x04\x00\x00\x40\x00"
    body = ticket_body(nonce=b"\x07", extensions=early_data)
    assert parse_new_session_ticket(body) == NewSessionTicket(
        lifetime=7200, age_add=0x01020304, nonce=b"\x07", ticket=b"T" * 40, extensions=early_data
    )


@pytest.mark.parametrize(
    ("body", "field", "value"),
    [
        (ticket_body(lifetime=0), "lifetime", 0),
        (ticket_body(lifetime=604800), "lifetime", 604800),
        (ticket_body(age_add=0xFFFFFFFF), "age_add", 0xFFFFFFFF),
        (ticket_body(nonce=b""), "nonce", b""),
        (ticket_body(nonce=bytes(255)), "nonce", bytes(255)),
        (ticket_body(ticket=b"x"), "ticket", b"x"),
        (ticket_body(ticket=bytes(65535)), "ticket", bytes(65535)),
        (ticket_body(extensions=bytes(65534)), "extensions", bytes(65534)),
    ],
    ids=[
        "lifetime-0",
        "lifetime-7-days",
        "age-add-max",
        "nonce-empty",
        "nonce-255",
        "ticket-1",
        "ticket-65535",
        "extensions-65534",
    ],
)
def test_new_session_ticket_boundaries(body: bytes, field: str, value: int | bytes) -> None:
    assert getattr(parse_new_session_ticket(body), field) == value


@pytest.mark.parametrize("lifetime", [604801, 0xFFFFFFFF])
def test_new_session_ticket_lifetime_over_seven_days(lifetime: int) -> None:
    with pytest.raises(TLSDecodeError, match=f"lifetime {lifetime} s exceeds 7 days") as e:
        parse_new_session_ticket(ticket_body(lifetime=lifetime))
    assert e.value.alert == ILLEGAL_PARAMETER


def test_new_session_ticket_empty_ticket() -> None:
    with pytest.raises(TLSDecodeError, match="empty ticket") as e:
        parse_new_session_ticket(ticket_body(ticket=b""))
    assert e.value.alert == DECODE_ERROR


def test_new_session_ticket_extensions_too_long() -> None:
    with pytest.raises(TLSDecodeError, match="extensions are 65535 bytes") as e:
        parse_new_session_ticket(ticket_body(extensions=bytes(65535)))
    assert e.value.alert == DECODE_ERROR


def test_new_session_ticket_every_truncation() -> None:
    body = ticket_body(nonce=b"\x01\x02", extensions=b"\x00\x2a\x00\x04\x00\x00\x40\x00")
    for length in range(len(body)):
        with pytest.raises(TLSDecodeError, match="NewSessionTicket truncated in") as e:
            parse_new_session_ticket(body[:length])
        assert e.value.alert == DECODE_ERROR


@pytest.mark.parametrize(
    ("length", "field"),
    [
        (0, "ticket_lifetime"),
        (6, "ticket_age_add"),
        (8, "ticket_nonce length"),
        (10, "ticket_nonce"),
    ],
)
def test_new_session_ticket_truncation_names_the_field(length: int, field: str) -> None:
    body = ticket_body(nonce=b"\x01\x02")
    with pytest.raises(TLSDecodeError, match=f"truncated in {field}:"):
        parse_new_session_ticket(body[:length])


@pytest.mark.parametrize("extra", [b"\x00", b"\x00\x00\x00"])
def test_new_session_ticket_trailing_bytes(extra: bytes) -> None:
    with pytest.raises(TLSDecodeError, match=f"{len(extra)} trailing bytes") as e:
        parse_new_session_ticket(ticket_body() + extra)
    assert e.value.alert == DECODE_ERROR


def test_new_session_ticket_length_overruns() -> None:
    body = bytearray(ticket_body(nonce=b"", ticket=b"abc"))
    body[9:11] = (4).to_bytes(2, "big")  # ticket length one more than there is
    with pytest.raises(TLSDecodeError, match="truncated in"):
        parse_new_session_ticket(bytes(body))


# -- any bytes at all: a value or TLSDecodeError, never another exception ---------------

_ANY_BYTES = st.binary(max_size=600)


@given(_ANY_BYTES)
def test_any_record_header(data: bytes) -> None:
    try:
        header = parse_record_header(data)
    except TLSDecodeError:
        return
    assert header.length <= MAX_CIPHERTEXT


@given(_ANY_BYTES)
def test_any_alert(data: bytes) -> None:
    try:
        alert = Alert.parse(data)
    except TLSDecodeError:
        return
    assert alert.encode() == data


@given(st.lists(_ANY_BYTES, max_size=8))
def test_any_handshake_records(records: list[bytes]) -> None:
    reassembler = HandshakeReassembler(max_message_size=1024)
    try:
        for record in records:
            reassembler.feed(record)
            while (message := reassembler.next_message()) is not None:
                msg_type, body = message
                assert len(body) <= 1024
                if msg_type == HandshakeType.KEY_UPDATE:
                    parse_key_update(body)
                elif msg_type == HandshakeType.NEW_SESSION_TICKET:
                    parse_new_session_ticket(body)
    except TLSDecodeError:
        pass


@given(_ANY_BYTES)
def test_any_key_update_and_ticket_body(body: bytes) -> None:
    for parse in (parse_key_update, parse_new_session_ticket):
        with contextlib.suppress(TLSDecodeError):
            parse(body)
