"""What the coordinator learns of the peers' private costs in the relay topology
(common.privacy): it replays every peer's local problem from the trades it relays and recovers
the cost lines of the peers whose net injection moves inside its bounds."""

from __future__ import annotations

import numpy as np

from common.admm import LocalP2P, RhoPolicy
from common.market import trade_graph
from common.models import HourlyPeer, peer_models
from common.privacy import recover_costs_relay, score_recovery
from common.scenario import load_scenario


# ----------------------------------------------------------------------------------------------
# TRACE BUILDER: a stand-in for the in-process driver's message log. It runs the relay order with
# the real LocalP2P objects and returns what the coordinator holds, [(rho_k, X_k)] for k = 1..n:
# in iteration k every peer first updates its prices with its partners' trades of k-1 (at the
# rho it solved with), then solves with rho_k; the coordinator collects all trades (UPDATE) and
# chooses rho_{k+1} by residual balancing, as coordinator.rounds.P2PRounds does.
# ----------------------------------------------------------------------------------------------
def relay_trace(peers, graph, lam0: float, policy: RhoPolicy, iterations: int, weights=None):
    H = len(peers[0].p_min_mw)
    index = [graph.partners_of(n) for n in range(len(peers))]
    w = np.zeros((graph.n_pairs, H)) if weights is None else weights
    locs = [LocalP2P(p.p_min_mw, p.p_max_mw, p.cost_a_eur_per_mw2h, p.cost_b_eur_per_mwh,
                     1.0 if p.is_producer else -1.0, w[index[n]].copy(), lam=np.full((len(index[n]), H), lam0))
            for n, p in enumerate(peers)]
    flat, rho, rho_prev, trace = np.zeros((graph.n_pairs, H)), policy.rho, None, []
    for k in range(1, iterations + 1):
        if rho_prev is not None:
            for n, loc in enumerate(locs):
                loc.receive(flat[graph.reverse[index[n]]], rho_prev)
        dual_sq = 0.0
        for n, loc in enumerate(locs):
            x, dx = loc.step(rho)
            flat[index[n]] = x
            dual_sq += dx
        trace.append((rho, flat.copy()))
        primal = float(np.sqrt(np.sum((flat + flat[graph.reverse]) ** 2)))
        rho_prev, rho = rho, policy.update(k, primal, rho * float(np.sqrt(dual_sq)))
    return trace


def _truth(peers):
    return {p.id: (p.cost_a_eur_per_mw2h, p.cost_b_eur_per_mwh) for p in peers}


def test_mv37_costs_recovered_from_the_relayed_trades():
    sc = load_scenario("mv37")
    m = sc.market
    peers = peer_models(sc)
    graph = trade_graph(peers)
    policy = RhoPolicy(m.rho, m.residual_balancing, m.rb_mu, m.rb_tau, m.rb_every, m.rb_until)
    trace = relay_trace(peers, graph, m.price_init_eur_per_mwh, policy, 150)
    truth, N = _truth(peers), len(peers)
    loads = [p.id for p in peers if p.kind == "load"]
    figures = {}
    for n in (5, 10, 20, 60, 100, 110, 150):
        rec = recover_costs_relay(graph, trace[:n], m.price_init_eur_per_mwh)
        score = score_recovery(rec, truth)
        assert score.wrong == (), f"after {n} iterations a wrong cost line was accepted for {score.wrong}"
        figures[n] = score
        hours = sum(r.hours_identified for r in rec.values())
        print(f"mv37 relay, {n:3d} iterations observed: {score.n_exact}/{N} peers' costs recovered exactly "
              f"({hours} peer-hours); not identified: {', '.join(score.unidentified) or 'none'}")
        if n == 60:
            # the loads move inside their flexibility range from the first iterations: all 24 hours
            assert all(rec[pid].hours_identified == 24 for pid in loads)
    # measured: 22/50 (the loads) up to iteration 100, while prices keep RES at their forecast,
    # the CHPs at p_min and the grid out; 49/50 after 110 iterations, 50/50 from 140 on
    assert figures[5].n_exact >= len(loads) == 22
    assert figures[60].n_exact >= 22
    assert figures[110].n_exact >= N - 1
    assert figures[150].n_exact >= N


def _peer(pid, kind, lo, hi, a, b, H=3):
    scale = 1.0 + 0.1 * np.arange(H)  # costs that differ by hour

    def arr(v):
        return np.broadcast_to(np.asarray(v, float), (H,)).copy()

    return HourlyPeer(pid, kind, 0, arr(lo), arr(hi), arr(a) * scale, arr(b) * scale, 0.0)


def test_consumers_weights_and_unidentifiable_peers():
    """Consumers (mirrored solve), differentiation weights, a varying rho and costs that differ by
    hour are replayed exactly; a fixed demand and a producer pinned at its capacity reveal nothing."""
    peers = [_peer("g0", "chp", 0.0, 10.0, 2.0, 10.0), _peer("g1", "pv", 0.0, 0.5, 0.1, 1.0),
             _peer("c0", "load", -8.0, -1.0, 3.0, 40.0), _peer("c1", "load", -2.0, -2.0, 0.0, 30.0)]
    graph = trade_graph(peers)
    weights = np.random.default_rng(3).uniform(0.0, 3.0, (graph.n_pairs, 3))
    trace = relay_trace(peers, graph, 20.0, RhoPolicy(1.0, every=3, mu=1.5), 40, weights)
    assert len({rho for rho, _ in trace}) > 1
    rec = recover_costs_relay(graph, trace, 20.0, weights)
    score = score_recovery(rec, _truth(peers))
    assert set(score.exact) == {"g0", "c0"} and score.wrong == ()
    assert rec["g0"].hours_identified == rec["c0"].hours_identified == 3
    assert rec["c1"].hours_identified == rec["g1"].hours_identified == 0
    # the replay needs the weights: without them the points no longer lie on a line
    blind = recover_costs_relay(graph, trace, 20.0)
    assert score_recovery(blind, _truth(peers)).n_exact < 2
