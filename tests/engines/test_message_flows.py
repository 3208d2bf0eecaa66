"""Exact message flows of the real engines on the in-process driver (every message through the
codec): what each role sends per iteration, in each topology and market."""

from __future__ import annotations

import numpy as np
import pytest

from common.engine import COORDINATOR
from dso_service.network_agent import NetworkAgent
from p2pm.local import clear_community, clear_market


def _hosts(flow):
    return sorted({r[3] for r in flow.rows if r[1] == "welcome" and r[3] not in ("dso", "tso")})


def test_relay_two_hosts_exact_flow(flow, p2p_peers):
    outcome, coordinator, driver = clear_market(p2p_peers, rho=1.0, tolerance=1e-4, peers_per_process=2, trace=flow,
                                                pool_price_start=False)
    rounds = outcome.clearings[-1].rounds
    assert outcome.clearings[-1].converged
    hosts = _hosts(flow)
    assert hosts == ["h0000-g0", "h0002-l0"]
    K = rounds.iteration
    for h in hosts:
        assert flow.n(type="hello", sender=h) == 1
        assert flow.n(type="welcome", to=h) == 1
        assert flow.n(type="ready", sender=h) == 1
        for k in range(1, K):
            assert flow.n(iteration=k, type="round", to=h) == 1
            assert flow.n(iteration=k, type="update", sender=h) == 1
        # the last iteration: its ROUND, then the stop ROUND that delivers the last trades
        assert flow.n(iteration=K, type="round", to=h) == 2
        assert flow.n(iteration=K, type="update", sender=h) == 1
        assert flow.n(type="result", sender=h) == 1 and flow.n(iteration=K, type="result", sender=h) == 1
        assert flow.n(type="shutdown", to=h) == 1
    types = {r[1] for r in flow.rows}
    assert types == {"hello", "welcome", "ready", "round", "update", "result", "shutdown"}
    # nothing else travelled, and every message was counted as on the wire
    # HELLO, WELCOME, READY; ROUND and UPDATE per iteration; the stop ROUND, RESULT and SHUTDOWN
    assert driver.traffic.messages == len(flow.rows) == 3 * 2 + K * 2 * 2 + 3 * 2
    assert driver.traffic.bytes > 0 and not driver.rejected


def test_mesh_two_hosts_exact_flow(flow, p2p_peers):
    peers = p2p_peers
    outcome, coordinator, driver = clear_market(peers, rho=1.0, tolerance=1e-4, peers_per_process=2, trace=flow,
                                                topology="mesh", pool_price_start=False)
    assert outcome.clearings[-1].converged
    K = outcome.clearings[-1].rounds.iteration
    hosts = _hosts(flow)
    # each host owns 2 peers with 2 partners each, all on the other host: their 4 trades travel in
    # one TRADES per iteration
    for h in hosts:
        other = next(o for o in hosts if o != h)
        for k in range(1, K + 1):
            assert flow.n(iteration=k, type="round", to=h) == (2 if k == K else 1)
            assert flow.n(iteration=k, type="residuals", sender=h) == 1
            assert flow.n(iteration=k, type="trades", sender=h) == 1
            assert flow.n(iteration=k, type="trades", sender=h, to=other) == 1
        assert flow.n(type="update") == 0  # trades never reach the coordinator
        assert flow.n(type="result", sender=h) == 1
    assert not any(r[1] == "trades" and COORDINATOR in (r[2], r[3]) for r in flow.rows)
    trades = [m for s, to, k, m in flow.messages if type(m).__name__ == "Trades"]
    assert all(m.p_mw.shape[0] == 4 == len(m.from_peers) for m in trades)
    # the same clearing as relay, to the last digit of the residual history
    relay, _, _ = clear_market(list(peers), rho=1.0, tolerance=1e-4, peers_per_process=2, pool_price_start=False,
                               wire=False)
    h_mesh = [(s.primal_residual, s.dual_residual, s.rho) for s in outcome.clearings[-1].rounds.history]
    h_relay = [(s.primal_residual, s.dual_residual, s.rho) for s in relay.clearings[-1].rounds.history]
    np.testing.assert_allclose(h_mesh, h_relay, rtol=1e-9, atol=1e-12)


def test_community_exact_flow(flow, community_case):
    models, grid = community_case
    H = len(models[0].p_min_mw)
    price = np.full(H, 60.0)
    agent = NetworkAgent.from_models(grid, models, price, 0.5 * price, 5.0, 5.0)
    outcome, coordinator, dso, driver = clear_community(models, agent, price, 0.5 * price, 5.0, 5.0, rho=100.0,
                                                        tolerance=1e-4, residual_balancing=False, trace=flow)
    assert outcome.clearings[-1].converged
    K = outcome.clearings[-1].rounds.iteration
    hosts = _hosts(flow)
    assert len(hosts) == 3
    for k in range(1, K + 1):
        for h in hosts:
            assert flow.n(iteration=k, type="round", to=h) == (2 if k == K else 1)
            assert flow.n(iteration=k, type="update", sender=h) == 1
        assert flow.n(iteration=k, type="network_update", to="dso") == 1
        assert flow.n(iteration=k, type="network_result", sender="dso") == 1
    assert flow.n(type="result") == 3 and flow.n(type="hello", sender="dso") == 1


def test_pool_price_start_exact_flow(flow, p2p_peers):
    """Price rounds (one PRICE_PROBE and one QUANTITY_SUM per host each), one POOL_PRICE and one
    POOL_QUANTITY per host, then the ADMM from the pool price."""
    outcome, coordinator, driver = clear_market(p2p_peers, rho=1.0, tolerance=1e-4, peers_per_process=2, trace=flow)
    assert outcome.clearings[-1].converged
    R = coordinator.price_rounds - 1  # the last round trip is POOL_PRICE / POOL_QUANTITY
    assert R >= 1
    for h in _hosts(flow):
        assert flow.n(type="price_probe", to=h) == flow.n(type="quantity_sum", sender=h) == R
        assert flow.n(type="pool_price", to=h) == flow.n(type="pool_quantity", sender=h) == 1
    # the probes all come before the first ROUND, which carries every peer's start
    first_round = next(i for i, r in enumerate(flow.rows) if r[1] == "round")
    assert all(r[1] not in ("price_probe", "pool_price") for r in flow.rows[first_round:])
    start = [m for s, to, k, m in flow.messages if type(m).__name__ == "Round"][0]
    assert all(rec.price_eur_per_mwh is not None for rec in start.peers.values())


def test_mesh_routes_check_each_new_list_of_pairs_once_and_keep_the_first_of_repeated_pairs():
    from common.protocol import ProtocolError
    from common.protocol.market import Trades
    from peer_node.engine import MeshRoutes

    # this host holds l0 (partners g0 on host A, g1 on host B) and l1 (partner g0)
    partners = {"l0": ["g0", "g1"], "l1": ["g0"]}
    slot = {p: {q: j for j, q in enumerate(qs)} for p, qs in partners.items()}
    routes = MeshRoutes(partners, slot, {"g0": "A", "g1": "B"})
    assert routes.n_rows == 3 and routes.offset == {"l0": 0, "l1": 2}
    frm, to, rows = routes.send["A"]
    assert (frm, to, rows.tolist()) == (("l0", "l1"), ("g0", "g0"), [0, 2])
    assert routes.send["B"][2].tolist() == [1]

    checked = []

    def check(sender, tr):
        checked.append(sender)
        if any(f != "g0" for f in tr.from_peers):
            raise ProtocolError("body", "not from its host")

    tr = Trades(from_peers=("g0", "g0"), to_peers=("l1", "l0"), p_mw=np.zeros((2, 3)))
    places, which = routes.rows_of("A", tr, check)
    assert places.tolist() == [2, 0] and which is None and checked == ["A"]
    routes.rows_of("A", Trades(from_peers=("g0", "g0"), to_peers=("l1", "l0"), p_mw=np.ones((2, 3))), check)
    assert checked == ["A"]  # the same list of pairs: recognised, not checked again
    forged = Trades(from_peers=("g0", "g1"), to_peers=("l1", "l0"), p_mw=np.zeros((2, 3)))
    with pytest.raises(ProtocolError):  # a new list of pairs is checked
        routes.rows_of("A", forged, check)
    assert checked == ["A", "A"]
    twice = Trades(from_peers=("g0", "g0", "g0"), to_peers=("l0", "l1", "l0"), p_mw=np.zeros((3, 3)))
    places, which = routes.rows_of("A", twice, check)
    assert places.tolist() == [0, 2] and which.tolist() == [0, 1]  # the repeated pair: its first row
    with pytest.raises(ProtocolError, match="no host named for partner"):  # a WELCOME without g1's host
        MeshRoutes({"l0": ["g0", "g1"]}, {"l0": {"g0": 0, "g1": 1}}, {"g0": "A"})
