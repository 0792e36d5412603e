"""One owner for an offloaded connection's keys in both directions, and its record counts.

Theory of operation
-------------------
After the handoff the kernel holds the record keys; user space keeps what it needs to
make the *next* ones. TLS 1.3 (RFC 8446 §7.2) moves each direction on independently::

    application_traffic_secret_N+1 =
        HKDF-Expand-Label(application_traffic_secret_N, "traffic upd", "", Hash.length)

and the record key and IV come from the new secret as in §7.3, with the sequence number
back at 0. `TrafficKeys.update_tx_secret` and `update_rx_secret` (named like the
functions of rustls' kernel API) do that for one direction each, the same way: advance
the secret, return the ``crypto_info`` the kernel must get next. Installing it is the
caller's business (the writer for TX, the reader for RX), because *when* it happens is
what matters: TX right after our KeyUpdate record, under the writer lock; RX right after
the kernel handed over the peer's KeyUpdate, before the reader waits for data again.

Whether this kernel can take a second key at all (Linux 6.14+, TLS 1.3 only) is asked
once per process, in a worker thread, the first time an update is wanted
(`_probe.kernel_can_rekey_tls13`).

Secrets live in bytearrays that `wipe` zeroes; the ``crypto_info`` buffers returned here
are the caller's to wipe once installed. Nothing here is ever logged or shown in a repr.

Record budgets (RFC 8446 §5.5)
------------------------------
An AEAD key may protect only so many records. The kernel numbers the records of each key
(``rec_seq``), and ``getsockopt(TLS_TX/TLS_RX)`` reads that number, but a system call and
a copy of key material per send would cost more than the check is worth. `RecordBudget`
keeps a cheap upper bound instead, charged by the caller (a send of ``n`` bytes made at
most ``ceil(n / 2^14)`` records; a receive of ``n`` bytes came from at most ``n + 1``), and
asks the kernel for the exact figure only once the bound reaches the threshold in question.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from typing import Final

from . import _kernel
from ._errors import KeyUpdateUnavailableError, KTLSRekeyFailedError
from ._kernel import CryptoInfo
from ._keyschedule import CipherSuite, tls13_next_traffic_secret, tls13_traffic_key_iv
from ._probe import kernel_can_rekey_tls13


class TrafficKeys:
    """Both directions' key material for one offloaded connection (see the module doc).

    ``tx`` and ``rx`` are the handoff's ``crypto_info``; ``tx_secret``/``rx_secret`` the
    current TLS 1.3 application traffic secrets (None for TLS 1.2, which has no updates).
    """

    def __init__(
        self,
        suite: CipherSuite,
        *,
        tx: CryptoInfo,
        rx: CryptoInfo,
        tx_secret: bytearray | None = None,
        rx_secret: bytearray | None = None,
    ) -> None:
        self.suite: Final = suite
        self.tx: Final = tx
        self.rx: Final = rx
        self._secrets = {_kernel.TLS_TX: tx_secret, _kernel.TLS_RX: rx_secret}
        self._wiped = False

    def __repr__(self) -> str:
        return f"<TrafficKeys {self.suite.name}>"

    @property
    def version(self) -> ssl.TLSVersion:
        return self.suite.tls_version

    @property
    def tx_secret(self) -> bytes | None:
        """Our current traffic secret (TLS 1.3), as a copy."""
        return self._secret_copy(_kernel.TLS_TX)

    @property
    def rx_secret(self) -> bytes | None:
        """The peer's current traffic secret (TLS 1.3), as a copy: the ticket relay
        needs generation 0."""
        return self._secret_copy(_kernel.TLS_RX)

    def _secret_copy(self, direction: int) -> bytes | None:
        secret = self._secrets[direction]
        return None if secret is None else bytes(secret)

    async def can_update(self) -> bool:
        """Whether key updates work here: TLS 1.3 on a kernel that takes a second key."""
        if self.version is not ssl.TLSVersion.TLSv1_3:
            return False
        return await kernel_can_rekey_tls13()

    def cannot_update_error(self) -> KeyUpdateUnavailableError:
        return KeyUpdateUnavailableError(f"cannot update keys: {self.cannot_update_reason()}")

    def cannot_update_reason(self) -> str:
        if self.version is not ssl.TLSVersion.TLSv1_3:
            return "TLS 1.2 has no key update"
        return (
            "this kernel cannot replace a kTLS key (TLS 1.3 rekey needs Linux 6.14 or "
            f"newer; running {os.uname().release})"
        )

    def update_tx_secret(self) -> CryptoInfo:
        """Move our sending side to its next secret; the ``crypto_info`` to install."""
        return self._update(_kernel.TLS_TX)

    def update_rx_secret(self) -> CryptoInfo:
        """Move the peer's sending side to its next secret; the ``crypto_info`` to install."""
        return self._update(_kernel.TLS_RX)

    def _update(self, direction: int) -> CryptoInfo:
        secret = self._secrets[direction]
        if secret is None:
            raise self.cannot_update_error()
        if self._wiped:
            raise KTLSRekeyFailedError("the stream was closed: its keys are gone")
        algorithm = self.suite.hash_algorithm
        secret[:] = tls13_next_traffic_secret(bytes(secret), algorithm)
        key, iv = tls13_traffic_key_iv(bytes(secret), self.suite.key_length, algorithm)
        cipher = self.tx.cipher
        return CryptoInfo(self.version, cipher, key=key, write_iv=iv, rec_seq=0)

    def wipe(self) -> None:
        self._wiped = True
        self.tx.wipe()
        self.rx.wipe()
        for secret in self._secrets.values():
            if secret is not None:
                secret[:] = bytes(len(secret))


class RecordBudget:
    """Records used under one direction's current key, as a cheap upper bound that is
    made exact (``read_exact``: the kernel's ``rec_seq``) only near a threshold."""

    def __init__(self, limit: int | None, *, first_seq: int, read_exact: Callable[[], int]):
        #: Records this key may protect; None: no limit worth enforcing (ChaCha20).
        self.limit: Final = limit
        self._bound = first_seq
        self._read_exact = read_exact

    @property
    def bound(self) -> int:
        return self._bound

    def charge(self, records: int) -> None:
        self._bound += records

    def reached(self, threshold: int) -> bool:
        """Whether at least ``threshold`` records were used (asks the kernel only when
        the bound says it may be so)."""
        if self._bound < threshold:
            return False
        self._bound = self._read_exact()
        return self._bound >= threshold

    def restart(self) -> None:
        """A new key: its records count from 0 (RFC 8446 §5.3)."""
        self._bound = 0
