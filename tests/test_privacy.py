"""What the coordinator learns of the peers' private costs in the relay topology
(common.privacy): it replays every peer's local problem from the trades it relays and recovers
the cost lines of the peers whose net injection moves inside its bounds."""

from __future__ import annotations

import numpy as np

from common.market import trade_graph
from common.models import HourlyPeer, peer_models
from common.privacy import recover_costs_relay, score_recovery
from common.protocol.market import Round, Update
from common.scenario import load_scenario
from p2pm.local import clear_market


def coordinator_view(peers, max_iterations: int, **market):
    """What the coordinator holds in the relay topology, [(rho_k, X_k)] for k = 1..n: the real
    coordinator and peer engines clear the market in process, and every ROUND (rho_k) and UPDATE
    (each peer's trades of iteration k) it sends and receives is recorded from the driver's log."""
    graph = trade_graph(peers)
    H = len(peers[0].p_min_mw)
    index = {pid: graph.partners_of(n) for n, pid in enumerate(graph.peer_ids)}
    rho, trades = {}, {}

    def record(now_s, sender, to, k, message):
        if isinstance(message, Round) and not message.stop:
            rho[k] = message.rho
        elif isinstance(message, Update):
            X = trades.setdefault(k, np.zeros((graph.n_pairs, H)))
            for pid, rec in message.peers.items():
                X[index[pid]] = rec.p_out_mw

    clear_market(peers, max_iterations=max_iterations, trace=record, wire=False, pool_price_start=False, **market)
    return graph, [(rho[k], trades[k]) for k in sorted(trades)]


def _truth(peers):
    return {p.id: (p.cost_a_eur_per_mw2h, p.cost_b_eur_per_mwh) for p in peers}


def test_mv37_costs_recovered_from_the_relayed_trades():
    sc = load_scenario("mv37")
    m = sc.market
    peers = peer_models(sc)
    graph, trace = coordinator_view(peers, 150, rho=m.rho, tolerance=m.tolerance, price_init_eur_per_mwh=m.price_init_eur_per_mwh,
                                    residual_balancing=m.residual_balancing, rb_mu=m.rb_mu, rb_tau=m.rb_tau,
                                    rb_every=m.rb_every, rb_until=m.rb_until)
    assert len(trace) == 150
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


def test_consumers_and_unidentifiable_peers():
    """Consumers (mirrored solve), a varying rho and costs that differ by hour are replayed exactly;
    a fixed demand and a producer pinned at its capacity reveal nothing."""
    peers = [_peer("g0", "chp", 0.0, 10.0, 2.0, 10.0), _peer("g1", "pv", 0.0, 0.5, 0.1, 1.0),
             _peer("c0", "load", -8.0, -1.0, 3.0, 40.0), _peer("c1", "load", -2.0, -2.0, 0.0, 30.0)]
    graph, trace = coordinator_view(peers, 40, rho=1.0, rb_every=3, rb_mu=1.5, price_init_eur_per_mwh=20.0,
                                    tolerance=1e-12)
    assert len({rho for rho, _ in trace}) > 1
    rec = recover_costs_relay(graph, trace, 20.0)
    score = score_recovery(rec, _truth(peers))
    assert set(score.exact) == {"g0", "c0"} and score.wrong == ()
    assert rec["g0"].hours_identified == rec["c0"].hours_identified == 3
    assert rec["c1"].hours_identified == rec["g1"].hours_identified == 0
    # the replay needs the right starting price: with another one the points no longer lie on a line
    blind = recover_costs_relay(graph, trace, 25.0)
    assert score_recovery(blind, _truth(peers)).n_exact < 2
