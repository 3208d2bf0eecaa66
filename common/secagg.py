"""Secure aggregation of the peers' costs (pairwise masks that cancel in the sum).

Welfare needs the sum of the peers' costs per hour, never one peer's cost. Every peer host (the
process that holds one or several peers' private files) makes an X25519 key pair and announces the
public key in its HELLO; the coordinator only relays the public keys (WELCOME). Each pair of hosts
(i, j) derives the same secret from its own private key and the other's public key (hashed with
BLAKE2b); from it, SHAKE-256 keyed by that secret gives one 64-bit mask per value and report. Host i
adds the masks of its pairs with j > i and subtracts those with j < i, on values in fixed point
(costs in micro-euro, quantities in nano-MW; int64 arithmetic modulo 2^64), so that the masks cancel
exactly in the sum over all hosts and the coordinator learns the total only. A host masks the sum
of its peers' values; where a report is per peer, the host splits its masked sum into per-peer
shares with fresh local randomness (:func:`split_shares`: each share alone is uniformly random).
Every report (each clearing of an outer loop) uses fresh masks: the label includes the run id and
the iteration.

Cost: one key agreement per pair of hosts (H-1 per host) and one hash per pair of hosts and report:
with 50 peers per host, 1 000 peers need 19 agreements per host instead of 999 per peer.
"""

from __future__ import annotations

import hashlib

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

MICRO_EUR_PER_EUR = 1_000_000
NANO_MW_PER_MW = 1_000_000_000


class MaskKeys:
    """One peer host's key pair and, once the others' public keys are known, its pairwise secrets."""

    def __init__(self, peer_id: str):
        self.peer_id = peer_id  # the host's name (the key set's member id)
        self._private = X25519PrivateKey.generate()
        self.public_hex = self._private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
        self._secrets: dict[str, bytes] = {}

    def agree(self, public_keys: dict[str, str]) -> None:
        """Derive the pairwise secrets with every other member of ``public_keys`` (id -> hex key)."""
        for other, key_hex in public_keys.items():
            if other != self.peer_id:
                shared = self._private.exchange(X25519PublicKey.from_public_bytes(bytes.fromhex(key_hex)))
                self._secrets[other] = hashlib.blake2b(shared, digest_size=32, person=b"p2pm-secagg").digest()

    def forget(self, members) -> None:
        """Leave the pairs with ``members`` (hosts whose peers left the market): the masks then
        cancel in the sum over the members that remain."""
        for other in members:
            self._secrets.pop(other, None)

    def mask(self, label: str, size: int) -> np.ndarray:
        """This member's total mask (int64, ``size`` values) for the report ``label``."""
        others = list(self._secrets)
        if not others:
            return np.zeros(size, dtype=np.int64)
        tag = label.encode()
        # SHAKE-256 keyed by the pair's secret (a prefix key is a sound PRF for SHA-3), as long as
        # needed; one row per pair, added (j > i) or subtracted (j < i) modulo 2^64
        rows = b"".join(hashlib.shake_256(self._secrets[other] + tag).digest(8 * size) for other in others)
        masks = np.frombuffer(rows, dtype="<i8").reshape(len(others), size)
        signs = np.fromiter((1 if self.peer_id < other else -1 for other in others), dtype=np.int64, count=len(others))
        return (masks * signs[:, None]).sum(axis=0, dtype=np.int64)  # int64 arrays wrap silently

    def masked(self, values: np.ndarray, label: str, scale: float = MICRO_EUR_PER_EUR) -> np.ndarray:
        """``values`` in fixed point (``scale`` units per unit: micro-euro by default) plus this
        member's mask (int64, wrapping), in the shape of ``values``."""
        return self.masked_fixed(to_fixed(values, scale), label)

    def masked_fixed(self, fixed: np.ndarray, label: str) -> np.ndarray:
        """Fixed-point values (int64) plus this member's mask (wrapping)."""
        with np.errstate(over="ignore"):
            return fixed + self.mask(label, fixed.size).reshape(fixed.shape)


def to_fixed(values: np.ndarray, scale: float = MICRO_EUR_PER_EUR) -> np.ndarray:
    """``values`` in fixed point: int64 in ``1/scale`` units."""
    return np.rint(np.asarray(values, dtype=float) * scale).astype(np.int64)


def split_shares(total: np.ndarray, n: int, rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """``n`` int64 arrays that add up (wrapping) to ``total``: n-1 uniformly random, the last the rest."""
    rng = rng if rng is not None else np.random.default_rng()
    shares = [rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, size=total.shape, dtype=np.int64,
                           endpoint=True) for _ in range(n - 1)]
    with np.errstate(over="ignore"):
        last = total.astype(np.int64) - (add_masked(shares) if shares else 0)
    return shares + [last]


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
