"""The pool-price start: price rounds find each hour's uniform price from masked aggregate answers,
and the ADMM started there reaches the centralized optimum, also on degenerate markets (equal
costs, zero costs, linear costs whose slope is the price)."""

from __future__ import annotations

import numpy as np
import pytest

from common.centralized import solve_p2p
from common.models import HourlyPeer, load_utility_coefficients
from common.protocol.market import QuantitySum
from common.scenario import load_scenario
from common.models import peer_models
from p2pm.local import clear_market


def degenerate_market(seed: int) -> list[HourlyPeer]:
    rng = np.random.default_rng(seed)
    H = int(rng.integers(1, 25))
    n_prod, n_cons = int(rng.integers(2, 20)), int(rng.integers(1, 20))
    peers = []
    twin = (rng.uniform(0.5, 2.0), rng.uniform(10.0, 40.0))  # producers with equal costs
    for i in range(n_prod):
        hi = rng.uniform(0.5, 3.0, H)
        kind = rng.choice(["twin", "free", "linear", "quadratic"])
        a, b = {"twin": twin, "free": (0.0, 0.0), "linear": (0.0, rng.choice([30.0, 58.0])),
                "quadratic": (rng.uniform(0.1, 3.0), rng.uniform(0.0, 50.0))}[kind]
        peers.append(HourlyPeer(f"g{i}", "grid" if kind == "linear" else "chp", 1, np.zeros(H), hi, np.full(H, a),
                                np.full(H, b), 0.0))
    for i in range(n_cons):
        d_min = rng.uniform(0.1, 1.0, H)
        d_max = d_min + rng.uniform(0.0, 2.0, H)
        a, b = load_utility_coefficients(d_min, np.maximum(d_max, d_min + 1e-3), rng.uniform(40.0, 90.0),
                                         rng.uniform(0.0, 20.0))
        peers.append(HourlyPeer(f"l{i}", "load", 2, -np.maximum(d_max, d_min + 1e-3), -d_min, a, b, 0.3))
    return peers


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("topology", ["relay", "mesh"])
def test_pool_start_reaches_the_centralized_optimum_on_degenerate_markets(seed, topology):
    peers = degenerate_market(seed)
    ref = solve_p2p(peers)
    outcome, coordinator, _ = clear_market(peers, rho=1.0, tolerance=1e-6, max_iterations=20000, topology=topology,
                                           peers_per_process=3)
    cleared = outcome.clearings[-1]
    assert cleared.converged
    # equal and linear costs leave the dispatch of some peers open: the optimum is the welfare,
    # reached by a balanced dispatch within every peer's bounds
    sw, sw_ref = cleared.sw_eur.sum(), ref.social_welfare_eur.sum()
    assert abs(sw - sw_ref) <= 1e-6 * max(1.0, abs(sw_ref)), (sw, sw_ref)
    np.testing.assert_allclose(cleared.p_mw.sum(axis=0), 0.0, atol=1e-3)
    for n, peer in enumerate(peers):
        assert np.all(cleared.p_mw[n] >= peer.p_min_mw - 1e-4) and np.all(cleared.p_mw[n] <= peer.p_max_mw + 1e-4)

    assert coordinator.price_rounds <= coordinator.public.market.pool_price_rounds + 1


def test_mv37_settles_in_a_few_price_rounds_and_one_admm_iteration():
    sc = load_scenario("mv37")
    m = sc.market
    outcome, coordinator, _ = clear_market(peer_models(sc), rho=m.rho, tolerance=m.tolerance, peers_per_process=10,
                                           price_init_eur_per_mwh=m.price_init_eur_per_mwh, wire=False)
    assert outcome.clearings[-1].converged and coordinator.iteration <= 2
    assert coordinator.price_rounds <= 12
    ref = solve_p2p(peer_models(sc))
    assert abs(outcome.clearings[-1].sw_eur.sum() - ref.social_welfare_eur.sum()) <= 1e-6 * ref.social_welfare_eur.sum()


def test_the_coordinator_learns_only_aggregates_in_the_price_rounds():
    peers = degenerate_market(3)
    sums = []

    def record(now_s, sender, to, k, message):
        if isinstance(message, QuantitySum):
            sums.append(message.q_low_masked)

    clear_market(peers, peers_per_process=4, trace=record)
    # one host's masked answer is nowhere near its peers' quantities (those are a few MW at most)
    assert sums and all(np.abs(s / 1e9).max() > 1e6 for s in sums)


def test_the_plain_start_is_still_there(p2p_peers):
    outcome, coordinator, _ = clear_market(p2p_peers, tolerance=1e-6, pool_price_start=False, max_iterations=20000)
    assert coordinator.price_rounds == 0 and outcome.clearings[-1].converged
