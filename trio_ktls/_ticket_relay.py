"""Giving post-handoff TLS 1.3 session tickets back to OpenSSL.

After the handoff the kernel decrypts everything the server sends, so the
NewSessionTicket messages (RFC 8446 §4.6.1) that a TLS 1.3 server sends after its
handshake reach the reader task, not OpenSSL; ``SSLObject.session`` would never hold a
ticket and the next connection could not resume.

OpenSSL's own receive state stopped at the handoff: it expects the next record to be
protected with the first server application traffic secret at sequence number 0, 1, ...
So `TicketRelay` protects each ticket message exactly so (RFC 8446 §5.2: inner plaintext
= message || content type 22, nonce = IV XOR sequence number, additional data = the
record header) and the stream feeds the record to the ``SSLObject``, which then parses the
ticket itself. Whatever key updates the kernel has followed since do not matter: OpenSSL
never saw them.
"""

from __future__ import annotations

import logging
import ssl
from typing import Final

from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM, ChaCha20Poly1305

from ._keyschedule import Aead, CipherSuite, tls13_traffic_key_iv
from ._messages import ContentType

_LEGACY_VERSION: Final = b"\x03\x03"
_TAG_LENGTH: Final = 16

logger: Final = logging.getLogger("trio_ktls")


def seal_tls13_record(
    suite: CipherSuite, key: bytes, iv: bytes, seq: int, content_type: int, payload: bytes
) -> bytes:
    """One TLS 1.3 protected record (RFC 8446 §5.2, §5.3), without padding."""
    inner = payload + bytes([content_type])
    header = bytes([ContentType.APPLICATION_DATA]) + _LEGACY_VERSION
    header += (len(inner) + _TAG_LENGTH).to_bytes(2, "big")
    nonce = (int.from_bytes(iv, "big") ^ seq).to_bytes(len(iv), "big")
    aead: AESGCM | AESCCM | ChaCha20Poly1305
    if suite.aead in (Aead.AES_128_GCM, Aead.AES_256_GCM):
        aead = AESGCM(key)
    elif suite.aead is Aead.AES_128_CCM:
        aead = AESCCM(key, tag_length=_TAG_LENGTH)
    else:
        aead = ChaCha20Poly1305(key)
    return header + aead.encrypt(nonce, inner, header)


class TicketRelay:
    """Re-protects ticket messages for a TLS 1.3 client's ``SSLObject`` and feeds them to
    it (see above)."""

    def __init__(
        self,
        suite: CipherSuite,
        server_traffic_secret_0: bytes,
        ssl_object: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
    ) -> None:
        self._suite = suite
        self._key, self._iv = tls13_traffic_key_iv(
            server_traffic_secret_0, suite.key_length, suite.hash_algorithm
        )
        self._seq = 0
        self._ssl = ssl_object
        self._incoming = incoming
        self._outgoing = outgoing
        self._broken = False
        #: Tickets that arrived after the handoff (relayed or not).
        self.relayed = 0

    def __repr__(self) -> str:
        return f"<TicketRelay {self._suite.name}, {self.relayed} relayed>"

    def seal(self, handshake_message: bytes) -> bytes:
        record = seal_tls13_record(
            self._suite, self._key, self._iv, self._seq, ContentType.HANDSHAKE, handshake_message
        )
        self._seq += 1
        return record

    def relay(self, handshake_message: bytes) -> None:
        """Give one NewSessionTicket message to OpenSSL, so ``session`` can resume."""
        self.relayed += 1
        if self._broken:
            return
        self._incoming.write(self.seal(handshake_message))
        try:
            self._ssl.read(1)
        except ssl.SSLWantReadError:
            pass  # the expected outcome: the ticket was consumed, no data followed
        except ssl.SSLError as exc:
            # Resumption will not work, but this connection is unharmed.
            logger.warning("OpenSSL refused a relayed session ticket: %s", exc)
            self._broken = True
        self._outgoing.read()  # OpenSSL writes nothing here; TX is the kernel's anyway
