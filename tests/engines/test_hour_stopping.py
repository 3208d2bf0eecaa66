"""Per-hour stopping: an hour whose residuals are below tolerance / sqrt(H) closes; ROUNDs, UPDATEs
and mesh trades carry the open hours only; the clearing reaches the same optimum with fewer local
solves and bytes; a warm re-clear opens every hour again."""

from __future__ import annotations

import numpy as np

from common.centralized import solve_p2p
from engines.conftest import small_p2p
from p2pm.local import clear_market

H = 12


def _clear(peers, trace=None, **kw):
    kw = {"rho": 1.0, **kw}
    outcome, coordinator, driver = clear_market(peers, tolerance=1e-5, pool_price_start=False,
                                                peers_per_process=2, max_iterations=20000, trace=trace, **kw)
    cleared = outcome.clearings[-1]
    return cleared, cleared.rounds, driver


def test_hours_close_one_by_one_and_the_optimum_is_the_same(flow):
    peers = small_p2p(H, seed=5)
    ref = solve_p2p(peers)
    plain, r_plain, d_plain = _clear(peers, hour_stopping=False)
    fast, r_fast, d_fast = _clear(peers, trace=flow, hour_stopping=True)
    assert plain.converged and fast.converged
    np.testing.assert_allclose(fast.p_mw, ref.p_mw, atol=1e-3)
    assert abs(fast.sw_eur.sum() - ref.social_welfare_eur.sum()) <= 1e-6 * abs(ref.social_welfare_eur.sum())
    # the final residuals of the whole day are within tolerance, as without stopping
    assert r_fast.primal_residual <= 1e-5 and r_fast.dual_residual <= 1e-5
    open_hours = [s.open_hours for s in r_fast.history]
    assert open_hours[0] == H and open_hours == sorted(open_hours, reverse=True) and min(open_hours) < H
    assert sum(open_hours) < 0.8 * H * len(r_plain.history)
    # what travels: the ROUND names the open hours, and every array covers the hours solved last
    rounds = [(k, m) for s, to, k, m in flow.messages if type(m).__name__ == "Round" and not m.stop]
    updates = [(k, m) for s, to, k, m in flow.messages if type(m).__name__ == "Update"]
    hours_of = {k: (H if m.hours is None else len(m.hours)) for k, m in rounds}
    assert any(m.hours is not None for _, m in rounds)
    for k, m in updates:
        for rec in m.peers.values():
            assert rec.p_out_mw.shape[1] == rec.dual_sq.shape[0] == hours_of[k]
    assert d_fast.traffic.bytes < d_plain.traffic.bytes


def test_mesh_closes_the_same_hours_as_relay(flow):
    peers = small_p2p(H, seed=5)
    relay, r_relay, _ = _clear(peers, hour_stopping=True)
    mesh, r_mesh, _ = _clear(peers, trace=flow, hour_stopping=True, topology="mesh")
    assert mesh.converged
    assert [s.open_hours for s in r_mesh.history] == [s.open_hours for s in r_relay.history]
    np.testing.assert_allclose([s.primal_residual for s in r_mesh.history],
                               [s.primal_residual for s in r_relay.history], rtol=1e-9, atol=1e-12)
    trades = [m for s, to, k, m in flow.messages if type(m).__name__ == "Trades"]
    assert min(m.p_mw.shape[1] for m in trades) < H  # closed hours are not sent peer to peer


def test_acceleration_with_hour_stopping():
    peers = small_p2p(H, seed=5)
    ref = solve_p2p(peers)
    fast, r_fast, _ = _clear(peers, hour_stopping=True, acceleration=True, residual_balancing=False, rho=5.0)
    assert fast.converged
    np.testing.assert_allclose(fast.p_mw, ref.p_mw, atol=1e-3)
    assert min(s.open_hours for s in r_fast.history) < H
