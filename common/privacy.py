"""What the coordinator can learn about the peers' private costs in the relay topology.

In relay, every trade iterate passes through the coordinator: it chooses rho_k, it receives every
peer's new trades x^k (UPDATE) and forwards them (ROUND), and it knows the public starting price
lambda^0 (``market.price_init_eur_per_mwh``) and the differentiation weights w it set itself. That
is everything a peer's local update uses except the peer's own cost and bounds, so the
coordinator can replay each peer's prices and the input of its local problem exactly:

    lambda^1 = lambda^0,    lambda^k = lambda^{k-1} - rho_{k-1}/2 (x^{k-1} + y^{k-1})   (k >= 2)
    beta^k   = rho_k/2 (x^{k-1} - y^{k-1}) + lambda^k - w                                (x^0 = y^0 = 0)

with y the partners' trades towards the peer (``flat[reverse]``). The local problem
(``common.admm._solve_producer``) is  min C(P) + sum_m [-beta_m x_m + rho/2 x_m^2], P = sum_m x_m,
C(P) = a P^2/2 + b P, p_min <= P <= p_max, sign * x_m >= 0. With nu the multiplier of P = sum x,
every active trade (sign * x_m > 0) has rho x_m = beta_m - nu, and where P is strictly inside its
bounds nu = C'(P) = a P + b. A consumer is solved mirrored (x -> -x, beta -> -beta, b -> -b,
bounds -> -bounds); undoing the mirror gives the same relation in the consumer's own variables:

    a_t P^k_t + b_t = nu^k_t = beta^k_{m,t} - rho_k x^k_{m,t}     for every active trade m,

with P the (negative) net injection and a, b the consumer's cost coefficients (C = -U). Each
(iteration, hour) where the peer trades thus gives one point (P, nu) of its marginal-cost line
for that hour; two points with different P give a_t and b_t. This module replays a relay trace
and fits those lines (``recover_costs_relay``), and scores a recovery against the truth
(``score_recovery``). Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from common.market import TradeGraph


@dataclass(frozen=True)
class Recovery:
    """The coordinator's estimate of one peer's cost per hour; NaN where not identifiable."""

    peer_id: str
    a: np.ndarray  # (H,) EUR/MW^2h
    b: np.ndarray  # (H,) EUR/MWh
    iterations_used: np.ndarray = field(repr=False)  # (H,) iterations whose points the line fits (0: none)

    @property
    def identified(self) -> np.ndarray:
        return np.isfinite(self.a) & np.isfinite(self.b)

    @property
    def hours_identified(self) -> int:
        return int(self.identified.sum())


def recover_costs_relay(graph: TradeGraph, trace, lam0, weights=None, *, fit_tol: float = 1e-9,
                        p_tol: float = 1e-9, min_distinct: int = 3) -> dict[str, Recovery]:
    """Each peer's cost line per hour, from what the coordinator holds in the relay topology.

    ``trace`` is a list (or any iterable, read once) of ``(rho_k, X_k)`` for iterations
    k = 1..n of a cold-started clearing (x^0 = 0, lambda^1 = lam0), X_k the (K, H) matrix of all
    trades after iteration k in ``graph``'s ordering; ``lam0`` the starting price (scalar, (H,)
    or (K, H)); ``weights`` the differentiation weights (K, H) (None: zero, the benchmark model).
    (A warm-started clearing of the outer loop starts from the previous clearing's trades and
    prices instead, which this replay does not model.)

    For each peer, iteration and hour where the peer has an active trade, the replay gives one
    point (P, nu) (module docstring). The coordinator does not know the bounds, so it cannot tell
    directly which points are interior (nu = a P + b) and which sit at a bound (there nu differs
    from the marginal cost by the bound's multiplier). The rule, per hour:

    * a point at a bound has P equal to that bound, and every P the peer takes lies within its
      bounds, so bound points can only be at the largest or the smallest P observed in the hour.
      Points are grouped by P (equal within ``p_tol`` relative to the largest |P|);
    * candidate point sets, in this order: all points; all but the largest-P group; all but the
      smallest-P group; all but both. The first candidate accepted gives the hour's line;
    * a candidate is accepted when its points span at least ``min_distinct`` distinct P values
      and the least-squares line (over all its (iteration, trade) points) explains every point
      to ``fit_tol`` relative to the largest |nu|. The default of three distinct P makes the line
      over-determined, so the fit check means something: two points always lie on a line, and
      one interior point plus one bound point would give a wrong line that nothing contradicts.
      With three or more distinct P, two interior P fix the true line, and a bound point on it
      is a bound whose multiplier is zero, where nu = a P + b holds anyway; a wrong line would
      need one interior P and points at both bounds to line up by chance (and each bound
      group to hold a single nu: a peer at a bound for several iterations shows the same P
      with different nu, which no line fits);
    * an hour without an accepted candidate (the peer never traded, stayed at a bound, or took
      fewer than ``min_distinct`` distinct interior P) is NaN.

    Identification needs the peer to trade with a P strictly inside its bounds at several
    iterations; a peer with fixed demand (p_min = p_max), a producer whose marginal cost stays
    below the prices (always at p_max) or above them (no trade) reveals nothing of its cost.
    """
    K, N = graph.n_pairs, len(graph.peer_ids)
    rev, sign = graph.reverse, graph.sign[:, None]
    # each peer's trades as one contiguous block, for the per-peer reductions
    order = np.argsort(graph.owner, kind="stable")
    n_trades = np.bincount(graph.owner, minlength=N)
    starts = np.concatenate([[0], np.cumsum(n_trades)[:-1]])
    trading = (n_trades > 0)[:, None]
    starts = np.minimum(starts, K - 1)  # a peer without trades: any index, masked by ``trading``

    def per_peer(ufunc, v):
        return np.where(trading, ufunc.reduceat(v[order], starts, axis=0), 0.0)

    # one entry per (iteration, peer, hour): P, and the sum, min and max of nu over the active
    # trades with their count (the least squares over every (iteration, trade) point only needs
    # the sum, its residuals only the extremes), so that a long trace is never held twice
    P, S, LO, HI, C = [], [], [], [], []
    lam = x_prev = rho_prev = w = None
    H = 0
    for k, (rho, X) in enumerate(trace):
        X = np.asarray(X, dtype=float)
        if k == 0:
            H = X.shape[1]
            w = np.zeros((K, H)) if weights is None else np.broadcast_to(np.asarray(weights, dtype=float), (K, H))
            lam = np.array(np.broadcast_to(np.asarray(lam0, dtype=float), (K, H)))
            x_prev = np.zeros((K, H))
        if X.shape != (K, H):
            raise ValueError(f"trace entry {k + 1}: trades of shape {X.shape}, expected {(K, H)}")
        y_prev = x_prev[rev]
        if rho_prev is not None:  # the price update with the partners' trades of k-1, at rho_{k-1}
            lam = lam - 0.5 * rho_prev * (x_prev + y_prev)
        beta = 0.5 * rho * (x_prev - y_prev) + lam - w
        nu = beta - rho * X  # = nu of the peer's local problem on its active trades
        act = sign * X > 0
        P.append(per_peer(np.add, X))
        S.append(per_peer(np.add, np.where(act, nu, 0.0)))
        LO.append(per_peer(np.minimum, np.where(act, nu, np.inf)))
        HI.append(per_peer(np.maximum, np.where(act, nu, -np.inf)))
        C.append(per_peer(np.add, act.astype(float)))
        x_prev, rho_prev = X, float(rho)
    if not P:
        return {pid: Recovery(pid, np.zeros(0), np.zeros(0), np.zeros(0, dtype=int)) for pid in graph.peer_ids}
    P, S, LO, HI, C = (np.stack(v) for v in (P, S, LO, HI, C))  # (n_iterations, N, H)
    out = {}
    for n, pid in enumerate(graph.peer_ids):
        a, b, used = np.full(H, np.nan), np.full(H, np.nan), np.zeros(H, dtype=int)
        for t in range(H):
            its = np.flatnonzero(C[:, n, t])
            if len(its) == 0:
                continue
            fit = _fit_hour(P[its, n, t], S[its, n, t], LO[its, n, t], HI[its, n, t], C[its, n, t],
                            fit_tol, p_tol, min_distinct)
            if fit is not None:
                a[t], b[t], used[t] = fit
        out[pid] = Recovery(pid, a, b, used)
    return out


def _fit_hour(p, nu_sum, nu_min, nu_max, count, fit_tol, p_tol, min_distinct):
    """(a, b, iterations used) of the first accepted candidate set of points, or None. One entry
    per iteration: P, and the sum, min and max of nu over its ``count`` active trades."""
    ptol = p_tol * max(1.0, float(np.max(np.abs(p))))
    ntol = fit_tol * max(1.0, float(np.max(np.abs(nu_min))), float(np.max(np.abs(nu_max))))
    at_max = p >= p.max() - ptol
    at_min = p <= p.min() + ptol
    for keep in (np.ones_like(at_max), ~at_max, ~at_min, ~at_max & ~at_min):
        if _distinct(p[keep], ptol) < min_distinct:
            continue
        pk, ck, sk = p[keep], count[keep], nu_sum[keep]
        # least squares over every (iteration, trade) point, centred on the weighted means
        pm, nm = np.sum(ck * pk) / np.sum(ck), np.sum(sk) / np.sum(ck)
        ca = np.sum((pk - pm) * (sk - ck * nm)) / np.sum(ck * (pk - pm) ** 2)
        cb = nm - ca * pm
        line = ca * pk + cb
        if max(np.max(np.abs(nu_min[keep] - line)), np.max(np.abs(nu_max[keep] - line))) <= ntol:
            return float(ca), float(cb), int(keep.sum())
    return None


def _distinct(p, ptol) -> int:
    if len(p) == 0:
        return 0
    s = np.sort(p)
    return 1 + int(np.sum(np.diff(s) > ptol))


@dataclass(frozen=True)
class RecoveryScore:
    exact: tuple[str, ...]  # every identified hour right, and at least one identified
    wrong: tuple[str, ...]  # some identified hour off by more than the tolerance
    unidentified: tuple[str, ...]  # no hour identified
    n_peers: int

    @property
    def n_exact(self) -> int:
        return len(self.exact)


def score_recovery(recovered: dict[str, Recovery], truth: dict, rtol: float = 1e-6) -> RecoveryScore:
    """Compare a recovery with the true costs ``truth[peer_id] = (a, b)`` (arrays of shape (H,)).

    A coefficient is right when |estimate - true| <= rtol * max(|true|, 1e-3): relative error,
    with a floor so that a true zero (a linear cost, a = 0) is judged against 1e-3 * rtol instead
    of zero. A peer counts as exact when it has at least one identified hour and its (a, b) are
    right in every identified hour."""
    exact, wrong, none = [], [], []
    for pid, (a_true, b_true) in truth.items():
        rec = recovered.get(pid)
        if rec is None or rec.hours_identified == 0:
            none.append(pid)
            continue
        h = rec.identified
        ok = all(np.all(np.abs(est[h] - tru[h]) <= rtol * np.maximum(np.abs(tru[h]), 1e-3))
                 for est, tru in ((rec.a, np.broadcast_to(np.asarray(a_true, float), rec.a.shape)),
                                  (rec.b, np.broadcast_to(np.asarray(b_true, float), rec.b.shape))))
        (exact if ok else wrong).append(pid)
    return RecoveryScore(tuple(exact), tuple(wrong), tuple(none), len(truth))
