"""The ticket relay's record protection, against RFC 8448's published ticket record."""

from __future__ import annotations

import ssl

from trio_ktls._keyschedule import lookup_suite
from trio_ktls._ticket_relay import TicketRelay

from .helpers import RFC8448_TICKET, RFC8448_TICKET_RECORD, S_AP_TRAFFIC, client_context


def test_relay_reproduces_rfc8448_ticket_record() -> None:
    # RFC 8448 §3: the server's NewSessionTicket is the first record under
    # server_application_traffic_secret_0 (sequence 0), with no padding.
    suite = lookup_suite("TLS_AES_128_GCM_SHA256", ssl.TLSVersion.TLSv1_3)
    assert suite is not None
    incoming = ssl.MemoryBIO()
    outgoing = ssl.MemoryBIO()
    ssl_object = client_context("TLSv1.3").wrap_bio(incoming, outgoing)
    relay = TicketRelay(suite, S_AP_TRAFFIC, ssl_object, incoming, outgoing)
    assert relay.seal(RFC8448_TICKET) == RFC8448_TICKET_RECORD
    # The next one uses sequence 1: same length, different bytes.
    second = relay.seal(RFC8448_TICKET)
    assert len(second) == len(RFC8448_TICKET_RECORD)
    assert second != RFC8448_TICKET_RECORD
