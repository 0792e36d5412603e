"""The transmit side of an offloaded stream: one lock, one record count, key rotation.

Theory of operation
-------------------
Every byte that reaches a kTLS socket after the handoff goes through `KernelWriter`, by
whoever holds ``lock`` (a StrictFIFOLock): the application's ``send_all``, the reader task
(alerts, KeyUpdate answers) and ``update_keys``. Holding it across the KeyUpdate record and
the ``TLS_TX`` re-install that follows means no record can slip in between and be
encrypted under a key the peer no longer expects (RFC 8446 §4.6.3: the sender switches
keys right after its KeyUpdate).

Data goes out in chunks. Between chunks the writer services *pending* work, so that a key
rotation asked for by the reader task (the peer sent KeyUpdate with update_requested, or
the peer's records near their limit) never waits behind a large ``send_all``, and the
reader never blocks on the lock (it could deadlock against a sender that waits for the
peer to read, while the peer waits for us to read).

Record accounting (RFC 8446 §5.5): the kernel numbers the records of each key epoch. A
``send`` that moved ``n`` bytes made at most ``ceil(n / 2**14)`` records, and each control
record is one; that upper bound is kept without system calls. Only when it nears
``rekey_after_records`` does the writer ask the kernel for its exact figure
(``getsockopt(TLS_TX)``) and, if the limit really is near, rotate the key first. Where the
kernel cannot rotate (before Linux 6.14, and TLS 1.2 everywhere) the writer refuses to go
past the limit: the stream then closes cleanly instead.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Final

import trio

from . import _kernel
from ._errors import KTLSRekeyUnsupportedError
from ._handoff import HandoffKeys
from ._kernel import CryptoInfo, TLSVersion
from ._keyschedule import Aead, CipherSuite, tls13_next_traffic_secret, tls13_traffic_key_iv
from ._messages import MAX_PLAINTEXT, ContentType, encode_key_update

#: Bytes per ``send`` between checks for pending work.
CHUNK: Final = 256 * 1024


class ConfidentialityLimitError(KTLSRekeyUnsupportedError):
    """The transmit key reached its record limit and this kernel cannot rotate it."""


class KernelWriter:
    """Writes to an offloaded socket; see the module docs. Methods need ``lock`` held."""

    def __init__(
        self,
        sock: trio.socket.SocketType,
        lock: trio.StrictFIFOLock,
        keys: HandoffKeys,
        suite: CipherSuite,
        *,
        first_seq: int,
        rekey_after_records: int | None,
        rekey_supported: Callable[[], bool],
    ) -> None:
        self.lock: Final = lock
        self._sock = sock
        self._keys = keys
        self._suite = suite
        self._limit = rekey_after_records
        self._rekey_supported = rekey_supported
        #: Upper bound of records sent under the current key (the kernel's rec_seq).
        self._records = first_seq
        #: None, or the update_requested flag of a KeyUpdate we owe the peer.
        self._pending: bool | None = None
        self.key_updates_sent = 0
        self.automatic_rekeys = 0

    @property
    def can_rotate(self) -> bool:
        return self._keys.version is TLSVersion.TLS1_3 and self._rekey_supported()

    def schedule_update(self, *, request_peer_update: bool) -> None:
        """Ask for a KeyUpdate at the next chance (callable without the lock)."""
        self._pending = bool(self._pending) or request_peer_update

    @property
    def update_pending(self) -> bool:
        return self._pending is not None

    async def service_pending(self) -> None:
        if self._pending is not None:
            await self.rotate(request_peer_update=self._pending)

    async def send_data(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        if not view:
            await trio.lowlevel.checkpoint()
            return
        while view:
            await self.service_pending()
            room = await self._records_left()
            chunk = view[: min(CHUNK, room * MAX_PLAINTEXT)]
            sent = await self._sock.send(chunk)
            self._records += math.ceil(sent / MAX_PLAINTEXT)
            view = view[sent:]

    async def send_control(self, content_type: int, payload: bytes) -> None:
        """One alert record through the kernel. Alerts may use the record that the limit
        keeps in reserve (for our KeyUpdate, or for close_notify when we cannot rotate)."""
        await self._sock.sendmsg([payload], _kernel.set_record_type_cmsg(content_type))
        self._records += 1

    async def _records_left(self) -> int:
        """Data records that may still be sent under this key (>= 1), rotating first if
        the limit is near. One record below the limit stays in reserve."""
        if self._limit is None:
            return 1 << 40
        last = self._limit - 1
        if self._records >= last:
            # The bound says we are there; the kernel knows exactly.
            self._records = _kernel.read_rec_seq(self._sock, _kernel.TLS_TX, self._keys.tx.cipher)
        if self._records >= last:
            if not self.can_rotate:
                raise ConfidentialityLimitError(
                    f"the transmit key has protected {self._records} records and its limit "
                    f"is {self._limit}; {_cannot_rotate_reason(self._keys.version)}"
                )
            self.automatic_rekeys += 1
            await self.rotate(request_peer_update=False)
        return last - self._records

    def cannot_rotate_error(self) -> KTLSRekeyUnsupportedError:
        return KTLSRekeyUnsupportedError(
            f"cannot update the transmit key: {_cannot_rotate_reason(self._keys.version)}"
        )

    async def rotate(self, *, request_peer_update: bool) -> None:
        """Send KeyUpdate, then install the next transmit key (RFC 8446 §4.6.3, §7.2)."""
        if not self.can_rotate:
            raise self.cannot_rotate_error()
        keys, suite = self._keys, self._suite
        assert keys.tx_secret is not None
        self._pending = None
        await self._sock.sendmsg(
            [encode_key_update(request_peer_update)],
            _kernel.set_record_type_cmsg(ContentType.HANDSHAKE),
        )
        secret = bytearray(tls13_next_traffic_secret(bytes(keys.tx_secret), suite.hash_algorithm))
        key, iv = tls13_traffic_key_iv(bytes(secret), suite.key_length, suite.hash_algorithm)
        info = CryptoInfo(keys.version, keys.tx.cipher, key=key, write_iv=iv, rec_seq=0)
        try:
            _kernel.install_key(self._sock, _kernel.TLS_TX, info)
        except OSError as exc:
            # Our KeyUpdate is on the wire: the peer expects the new key from now on.
            raise KTLSRekeyUnsupportedError(
                f"the kernel refused the next transmit key ({os.strerror(exc.errno or 0)}) "
                "after our KeyUpdate was sent; the connection cannot continue"
            ) from exc
        finally:
            info.wipe()
        keys.tx_secret[:] = secret
        secret[:] = bytes(len(secret))
        self._records = 0
        self.key_updates_sent += 1


def _cannot_rotate_reason(version: TLSVersion) -> str:
    if version is TLSVersion.TLS1_2:
        return "TLS 1.2 has no key update"
    return (
        "this kernel cannot replace a kTLS key (TLS 1.3 rekey needs Linux 6.14 or newer; "
        f"running {os.uname().release})"
    )


# RFC 8446 §5.5: AES-GCM keys must be rotated before 2**24.5 full-size records. The AEAD
# limits analysis (draft-irtf-cfrg-aead-limits) gives AES-CCM a lower bound, 2**23.5;
# ChaCha20-Poly1305's (2**62 and more) is out of reach, so there is no limit to enforce.
_TX_LIMITS: Final[dict[Aead, int | None]] = {
    Aead.AES_128_GCM: int(2**24.5),
    Aead.AES_256_GCM: int(2**24.5),
    Aead.AES_128_CCM: int(2**23.5),
    Aead.CHACHA20_POLY1305: None,
}


def record_limits(suite: CipherSuite) -> tuple[int | None, int | None]:
    """(rekey our key after, ask the peer to rekey after) records, by default.

    We rotate our own key at the limit; we ask the peer at half of it, so that a peer
    that does not track the limit itself is still well inside it.
    """
    limit = _TX_LIMITS[suite.aead]
    return limit, (None if limit is None else limit // 2)
