"""Randomly generated degenerate markets (equal-cost producers, zero-cost producers, linear costs,
differentiation weights; 3-40 peers, 1-24 hours): every clearing variant reaches the centralized
optimum. The weights are the consumers' own data, set in their engines before the first clearing."""

from __future__ import annotations

import numpy as np
import pytest

from common.centralized import solve_p2p
from common.engine import InProcessDriver
from common.market import trade_graph
from common.models import HourlyPeer, load_utility_coefficients
from coordinator.engine import CoordinatorEngine
from p2pm.local import market_public
from peer_node.engine import PeerEngine

VARIANTS = {
    "plain": dict(pool_price_start=False, hour_stopping=False, rho=5.0),
    "pool-price start": dict(pool_price_start=True, hour_stopping=False),
    "accelerated": dict(pool_price_start=False, hour_stopping=False, acceleration=True, residual_balancing=False, rho=5.0),
    "hour stopping": dict(pool_price_start=False, hour_stopping=True, rho=5.0),
    "accelerated + hour stopping": dict(acceleration=True, residual_balancing=False, rho=5.0, hour_stopping=True),
    "mesh + hour stopping": dict(topology="mesh", hour_stopping=True, rho=5.0),
    "mesh + accelerated + hour stopping": dict(topology="mesh", acceleration=True, residual_balancing=False, rho=5.0,
                                              hour_stopping=True),
}


def random_market(seed: int):
    """Producers with equal costs, zero costs or linear costs; consumers with elastic demand; and,
    on every third seed, differentiation weights on the consumers' trades."""
    rng = np.random.default_rng(seed)
    # bounded test time: few peers over many hours, or many peers over an hour or two
    n, H = (int(rng.integers(3, 9)), int(rng.integers(6, 25))) if seed % 2 == 0 else \
        (int(rng.integers(20, 41)), int(rng.integers(1, 3)))
    n_prod = int(rng.integers(1, n))
    shared_cost = (float(rng.uniform(0.5, 2.0)), float(rng.uniform(10.0, 30.0)))
    peers = []
    for i in range(n_prod):
        kind = rng.choice(["equal", "zero", "linear", "quadratic"])
        a, b = {"equal": shared_cost, "zero": (0.0, 0.0), "linear": (0.0, float(rng.uniform(5.0, 40.0))),
                "quadratic": (float(rng.uniform(0.5, 3.0)), float(rng.uniform(5.0, 40.0)))}[kind]
        peers.append(HourlyPeer(f"g{i}", "chp", 1, np.zeros(H), rng.uniform(0.5, 3.0, H), np.full(H, a), np.full(H, b), 0.0))
    # the external supplier: enough capacity for any demand, so that every hour can balance
    peers.append(HourlyPeer("grid", "grid", 0, np.zeros(H), np.full(H, 3.0 * n), np.zeros(H),
                            np.full(H, float(rng.uniform(60.0, 90.0))), 0.0))
    for i in range(n - n_prod):
        d_min, d_max = rng.uniform(0.2, 1.0, H), rng.uniform(1.5, 3.0, H)
        a, b = load_utility_coefficients(d_min, d_max, float(rng.uniform(40.0, 80.0)), float(rng.uniform(0.0, 10.0)))
        peers.append(HourlyPeer(f"l{i}", "load", 2, -d_max, -d_min, a, b, 0.0))
    graph = trade_graph(peers)
    weights = np.zeros((graph.n_pairs, H))
    if seed % 3 == 1:
        consumer = ~np.array([peers[o].is_producer for o in graph.owner])
        weights[consumer] = rng.uniform(0.0, 3.0, (int(consumer.sum()), 1))
    return peers, graph, weights


class _WeightedPeer(PeerEngine):
    """A peer engine whose consumers start with their own differentiation weights."""

    def __init__(self, models, host_id, weights_of):
        super().__init__(models, host_id)
        self.weights_of = weights_of

    def _on_welcome(self, cfg):
        out = super()._on_welcome(cfg)
        for pid, loc in self.locals.items():
            w = self.weights_of[pid]
            if np.any(w):
                self.params[pid]["diff_eur_per_mwh"] = w
                loc.retune(loc.p_min_mw, loc.p_max_mw, loc.cost_a, loc.cost_b, w)
        return out


def _clear(peers, graph, weights, topology="relay", rho=1.0, **market):
    idx = {p.id: n for n, p in enumerate(peers)}
    weights_of = {p.id: weights[graph.partners_of(idx[p.id])] for p in peers}
    public = market_public(peers, rho=rho, tolerance=1e-5, max_iterations=30000, **market)
    coordinator = CoordinatorEngine(public, topology=topology, progress_every_s=np.inf)
    hosts = [_WeightedPeer(peers[i:i + 4], f"h{i:04d}", weights_of) for i in range(0, len(peers), 4)]
    return InProcessDriver([coordinator, *hosts], wire=False).run()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("seed", range(4))
def test_every_variant_reaches_the_centralized_optimum(seed, name):
    peers, graph, weights = random_market(seed)
    ref = solve_p2p(peers, weights)
    # the market's objective: the peers' costs plus the differentiation costs of the trades
    objective = lambda p, trades: sum(x.cost_eur(p[n]).sum() for n, x in enumerate(peers)) + np.sum(weights * trades)  # noqa: E731
    central = objective(ref.p_mw, ref.trades_mw)
    for market in (VARIANTS[name],):
        outcome = _clear(peers, graph, weights, **market)
        cleared = outcome.clearings[-1]
        assert cleared.converged, (seed, name)
        p = cleared.p_mw
        # balance per hour, bounds, and the optimal objective (the dispatch is not unique among
        # equal-cost or zero-cost producers)
        np.testing.assert_allclose(p.sum(axis=0), 0.0, atol=1e-3, err_msg=f"{name}, seed {seed}")
        lo = np.vstack([x.p_min_mw for x in peers])
        hi = np.vstack([x.p_max_mw for x in peers])
        assert np.all(p >= lo - 1e-4) and np.all(p <= hi + 1e-4), (seed, name)
        got = objective(p, cleared.trades_mw)
        assert abs(got - central) <= 1e-5 * max(abs(central), 1.0), (seed, name, got, central)
