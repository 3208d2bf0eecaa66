"""Secure aggregation of the peers' costs (pairwise masks that cancel in the sum).

Welfare needs the sum of the peers' costs per hour, never one peer's cost. Every peer makes an
X25519 key pair and announces the public key in its HELLO; the coordinator only relays the public
keys (WELCOME). Each pair (i, j) derives the same secret from its own private key and the other's
public key (hashed with BLAKE2b); from it, SHAKE-256 keyed by that secret gives one 64-bit mask per
value and report. Peer i adds the masks of its pairs with j > i and subtracts those with j < i, on
values in fixed point (costs in micro-euro, quantities in nano-MW; int64 arithmetic modulo 2^64), so
that the masks cancel exactly in the sum over all peers and the coordinator learns the total only. Every report (each clearing of an outer loop) uses fresh masks:
the label includes the run id and the iteration.

Cost: one key agreement per pair (N-1 per peer) and one hash per pair and report.
"""

from __future__ import annotations

import hashlib

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

MICRO_EUR_PER_EUR = 1_000_000
NANO_MW_PER_MW = 1_000_000_000


class MaskKeys:
    """One peer's key pair and, once the others' public keys are known, its pairwise secrets."""

    def __init__(self, peer_id: str):
        self.peer_id = peer_id
        self._private = X25519PrivateKey.generate()
        self.public_hex = self._private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
        self._secrets: dict[str, bytes] = {}

    def agree(self, public_keys: dict[str, str]) -> None:
        """Derive the pairwise secrets with every other peer of ``public_keys`` (id -> hex key)."""
        for other, key_hex in public_keys.items():
            if other != self.peer_id:
                shared = self._private.exchange(X25519PublicKey.from_public_bytes(bytes.fromhex(key_hex)))
                self._secrets[other] = hashlib.blake2b(shared, digest_size=32, person=b"p2pm-secagg").digest()

    def forget(self, peer_ids) -> None:
        """Leave the pairs with ``peer_ids`` (peers that left the market): the masks then cancel in
        the sum over the peers that remain."""
        for other in peer_ids:
            self._secrets.pop(other, None)

    def mask(self, label: str, size: int) -> np.ndarray:
        """This peer's total mask (int64, ``size`` values) for the report ``label``."""
        total = np.zeros(size, dtype=np.int64)
        tag = label.encode()
        for other, secret in self._secrets.items():
            # SHAKE-256 keyed by the pair's secret (a prefix key is a sound PRF for SHA-3), as long as needed
            m = np.frombuffer(hashlib.shake_256(secret + tag).digest(8 * size), dtype="<i8").astype(np.int64)
            with np.errstate(over="ignore"):
                total = total + m if self.peer_id < other else total - m
        return total

    def masked(self, values: np.ndarray, label: str, scale: float = MICRO_EUR_PER_EUR) -> np.ndarray:
        """``values`` in fixed point (``scale`` units per unit: micro-euro by default) plus this
        peer's mask (int64, wrapping), in the shape of ``values``."""
        values = np.asarray(values, dtype=float)
        fixed = np.rint(values * scale).astype(np.int64)
        with np.errstate(over="ignore"):
            return fixed + self.mask(label, fixed.size).reshape(fixed.shape)


def add_masked(masked: list[np.ndarray]) -> np.ndarray:
    """The wrapping int64 sum of masked reports (a host may add its peers' before sending)."""
    total = np.zeros_like(masked[0], dtype=np.int64)
    with np.errstate(over="ignore"):
        for m in masked:
            total = total + m.astype(np.int64)
    return total


def unmask_sum(masked: list[np.ndarray], scale: float = MICRO_EUR_PER_EUR) -> np.ndarray:
    """The sum of the peers' masked reports in units (exact when every peer of the key set reported)."""
    return add_masked(masked).astype(float) / scale


def mask_label(run_id: str, iteration: int, what: str = "cost") -> str:
    return f"{run_id}/{what}/{iteration}"
