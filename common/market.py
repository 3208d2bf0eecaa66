"""Structure of the full P2P market shared by the centralized and the distributed clearing.

Trading partners (thesis 3.1.1): every producer trades with every consumer. Trades are indexed
as *ordered* pairs k = (n, m) with ``p_nm`` the power peer n sells to m (positive for a
producer's trade, negative for a consumer's). ``reverse[k]`` is the index of (m, n). Reciprocity
is ``p_nm + p_mn = 0`` and its multiplier is the trade price lambda_nm (EUR/MWh), the same number
on both sides of a pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.models import HourlyPeer


@dataclass(frozen=True)
class TradeGraph:
    peer_ids: tuple[str, ...]
    owner: np.ndarray  # (K,) index of n in pair k = (n, m)
    partner: np.ndarray  # (K,) index of m
    reverse: np.ndarray  # (K,) index of (m, n)
    sign: np.ndarray  # (K,) +1 for a producer's trade (p_nm >= 0), -1 for a consumer's (p_nm <= 0)

    @property
    def n_pairs(self) -> int:
        return len(self.owner)

    def partners_of(self, n: int) -> np.ndarray:
        """Indices k of the trades owned by peer n, in the order its partners are listed."""
        return np.flatnonzero(self.owner == n)

    def pair_index(self) -> dict[tuple[int, int], int]:
        return {(int(n), int(m)): k for k, (n, m) in enumerate(zip(self.owner, self.partner))}


def trade_graph(peers: list[HourlyPeer], allowed: np.ndarray | None = None) -> TradeGraph:
    """Full P2P trading graph: producers <-> consumers, and every two-way peer (prosumer, a
    supplier that may export) <-> everybody; ordered by owner then partner. ``allowed`` (N, N),
    symmetric: the pairs a restricted market keeps (``common.partners``); None: every pair."""
    return trade_graph_from_roster([p.id for p in peers], [p.is_producer for p in peers], [p.two_way for p in peers],
                                   allowed)


def trade_graph_from_roster(ids: list[str], producer: list[bool], two_way: list[bool] | None = None,
                            allowed: np.ndarray | None = None) -> TradeGraph:
    """The same graph from public facts only (ids, whether each peer sells, and whether it trades
    both ways): what the coordinator knows. ``sign`` is 0 for a two-way peer's trades (free sign).
    ``allowed``: the mask of a restricted market (``common.partners.partner_mask``).
    Built with numpy (1 000 peers in well under a second)."""
    from common.partners import eligible_pairs

    prod = np.asarray(producer, dtype=bool).reshape(-1)
    n = len(prod)
    tw = np.zeros(n, dtype=bool) if two_way is None else np.asarray(two_way, dtype=bool).reshape(-1)
    pairs = eligible_pairs(prod, tw)
    if allowed is not None:
        pairs &= np.asarray(allowed, dtype=bool)
    owner, partner = np.nonzero(pairs)  # row-major: by owner, then partner
    owner, partner = owner.astype(np.int64), partner.astype(np.int64)
    index = np.full((n, n), -1, dtype=np.int64)
    index[owner, partner] = np.arange(len(owner), dtype=np.int64)
    reverse = index[partner, owner]
    sign = np.where(tw[owner], 0.0, np.where(prod[owner], 1.0, -1.0))
    return TradeGraph(tuple(ids), owner, partner, reverse, sign)


def roster_graph(roster, allowed: np.ndarray | None = None) -> TradeGraph:
    """The trade graph of a public roster (``common.public.RosterEntry``); ``allowed``: the mask of
    a restricted market (``common.partners.roster_mask``)."""
    from common.models import PRODUCER_KINDS

    two_way = [bool(getattr(p, "two_way", False)) for p in roster]
    return trade_graph_from_roster([p.id for p in roster], [p.kind in PRODUCER_KINDS and not w for p, w in zip(roster, two_way)],
                                   two_way, allowed)


def fee_weights(graph: TradeGraph, peers: list[HourlyPeer]) -> np.ndarray | None:
    """(K,) the product-differentiation weight of every trade from the peers' own fees
    (``HourlyPeer.trade_weights``); None when no peer has any."""
    if not any(getattr(p, "trade_weights", None) for p in peers):
        return None
    w = np.zeros(graph.n_pairs)
    for k in range(graph.n_pairs):
        own = peers[int(graph.owner[k])].trade_weights or {}
        w[k] = own.get(graph.peer_ids[int(graph.partner[k])], 0.0)
    return w


def peer_arrays(peers: list[HourlyPeer]):
    """Stack bounds and costs: (N, H) arrays p_min, p_max, a, b."""
    return (
        np.vstack([p.p_min_mw for p in peers]),
        np.vstack([p.p_max_mw for p in peers]),
        np.vstack([p.cost_a_eur_per_mw2h for p in peers]),
        np.vstack([p.cost_b_eur_per_mwh for p in peers]),
    )


def social_welfare_eur(peers: list[HourlyPeer], p_mw: np.ndarray) -> np.ndarray:
    """SW per hour = -sum_n C_n(P_n) (thesis eq. 3.2 sign convention; loads' C = -U)."""
    return -np.sum([peer.cost_eur(p_mw[i]) for i, peer in enumerate(peers)], axis=0)


def uniform_price_interval(peers: list[HourlyPeer], p_mw: np.ndarray, tol_mw: float = 1e-4):
    """For a market without differentiation: the interval [lo, hi] (per hour) of uniform prices
    that support the dispatch ``p_mw`` (N, H) as every peer's own optimum.

    A peer strictly inside its bounds pins the price to its marginal cost; a peer at its upper
    bound only says price >= marginal cost, at its lower bound price <= marginal cost. Where
    lo < hi the dual of the hour is not unique.
    """
    lo = np.full(p_mw.shape[1], -np.inf)
    hi = np.full(p_mw.shape[1], np.inf)
    for i, peer in enumerate(peers):
        mc = peer.marginal_cost_eur_per_mwh(p_mw[i])
        at_max = p_mw[i] >= peer.p_max_mw - tol_mw
        at_min = p_mw[i] <= peer.p_min_mw + tol_mw
        fixed = at_max & at_min
        lo = np.where(at_max & ~fixed, np.maximum(lo, mc), lo)
        hi = np.where(at_min & ~fixed, np.minimum(hi, mc), hi)
        if peer.cost_b_neg_eur_per_mwh is not None:  # at the kink of a two-slope cost: any price between the slopes
            kink = ~at_max & ~at_min & (np.abs(p_mw[i]) <= tol_mw)
            lo = np.where(kink, np.maximum(lo, peer.cost_b_neg_eur_per_mwh), lo)
            hi = np.where(kink, np.minimum(hi, peer.cost_b_eur_per_mwh), hi)
            at_max, at_min = at_max | kink, at_min | kink
        inner = ~at_max & ~at_min
        lo = np.where(inner, np.maximum(lo, mc), lo)
        hi = np.where(inner, np.minimum(hi, mc), hi)
    return lo, hi
