"""Market mathematics: hand-computed equilibrium, the exact local ADMM step, residual balancing,
in-process ADMM against the centralized reference, uniform price intervals and the community
market with the relaxed branch-flow model (common.admm, common.market, common.centralized)."""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest

from common.admm import LocalP2P, converged, residual_balance, solve_local
from common.centralized import CLARABEL_TIGHT, solve_community, solve_p2p
from common.grid import GridModel
from common.market import social_welfare_eur, trade_graph, uniform_price_interval
from common.models import EVModel, HourlyPeer, ev_plugged_mask, load_utility_coefficients
from p2pm.local import clear_market


def _peer(pid: str, kind: str, lo, hi, a, b, H: int = 1, bus: int = 0) -> HourlyPeer:
    def arr(v):
        return np.broadcast_to(np.asarray(v, float), (H,)).copy()

    return HourlyPeer(pid, kind, bus, arr(lo), arr(hi), arr(a), arr(b), 0.3 if kind == "load" else 0.0)


def _admm(peers: list[HourlyPeer], rho: float = 1.0, tolerance: float = 1e-7, max_iterations: int = 20000, history=None,
          **kw):
    """The distributed clearing with the real coordinator and peer engines, in process."""
    outcome, coordinator, _ = clear_market(peers, rho=rho, tolerance=tolerance, max_iterations=max_iterations, **kw)
    cleared = outcome.clearings[-1]
    if history is not None:
        history += [(s.iteration, s.primal_residual, s.dual_residual, s.rho) for s in cleared.rounds.history]
    return (coordinator.graph, cleared.p_mw, cleared.trades_mw, cleared.prices_eur_per_mwh, cleared.rounds.iteration,
            cleared.converged)


# ----------------------------------------------------------------------------------------------
# (a) a two-peer market solved by hand
# ----------------------------------------------------------------------------------------------
# Producer C(p) = p^2 + 10 p on [0, 10]: marginal cost 2 p + 10.
# Consumer with demand d = -p in [2, 8], utility U(d) = 50 d - 2 d^2: marginal utility 50 - 4 d.
# 2 p + 10 = 50 - 4 p  ->  p = 20/3 MW, price 70/3 EUR/MWh;
# SW = U(20/3) - C(20/3) = (333.33 - 88.89) - (44.44 + 66.67) = 400/3 EUR.
P_STAR = 20.0 / 3.0
PRICE_STAR = 70.0 / 3.0
SW_STAR = 400.0 / 3.0


def _two_peers(H: int = 1) -> list[HourlyPeer]:
    # consumer from its utility line: marginal utility 42 at d_min = 2, 18 at d_max = 8
    a, b = load_utility_coefficients(np.full(H, 2.0), np.full(H, 8.0), 42.0, 18.0)
    np.testing.assert_allclose(a, 4.0)
    np.testing.assert_allclose(b, 50.0)
    return [_peer("chp", "chp", 0.0, 10.0, 2.0, 10.0, H), _peer("load", "load", -8.0, -2.0, a, b, H)]


def test_two_peer_market_centralized_matches_hand_computation():
    peers = _two_peers()
    sol = solve_p2p(peers)
    np.testing.assert_allclose(sol.p_mw[:, 0], [P_STAR, -P_STAR], atol=1e-6)
    np.testing.assert_allclose(sol.trades_mw[:, 0], [P_STAR, -P_STAR], atol=1e-6)
    # dual of reciprocity: positive and the same number on both sides of the pair
    assert np.all(sol.prices_eur_per_mwh > 0)
    assert sol.prices_eur_per_mwh[0, 0] == sol.prices_eur_per_mwh[sol.graph.reverse[0], 0]
    np.testing.assert_allclose(sol.prices_eur_per_mwh[:, 0], PRICE_STAR, atol=1e-5)
    np.testing.assert_allclose(sol.social_welfare_eur, [SW_STAR], rtol=1e-7)
    np.testing.assert_allclose(social_welfare_eur(peers, sol.p_mw), [SW_STAR], rtol=1e-7)
    np.testing.assert_allclose(sol.differentiation_cost_eur, 0.0, atol=1e-12)


def test_two_peer_market_admm_matches_hand_computation():
    peers = _two_peers(H=2)
    graph, p, trades, prices, it, ok = _admm(peers, rho=1.0, tolerance=1e-8)
    assert ok and it < 20000
    np.testing.assert_allclose(p, [[P_STAR, P_STAR], [-P_STAR, -P_STAR]], atol=1e-4)
    np.testing.assert_allclose(trades[0] + trades[graph.reverse[0]], 0.0, atol=1e-4)
    np.testing.assert_allclose(prices, PRICE_STAR, atol=1e-2)
    # both sides computed the same price without sharing it
    np.testing.assert_allclose(prices[0], prices[graph.reverse[0]], atol=1e-12)
    np.testing.assert_allclose(social_welfare_eur(peers, p), SW_STAR, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# (b) the exact local step against a generic solver
# ----------------------------------------------------------------------------------------------


def _local_objective(x, tau, w, rho, a, b):
    s = x.sum(axis=0)
    return float(np.sum(0.5 * a * s**2 + b * s) + np.sum(w * x + 0.5 * rho * (x - tau) ** 2))


def _random_local_instance(rng: np.random.Generator, case: int):
    M = int(rng.integers(1, 5))
    H = int(rng.integers(1, 4))
    sign = 1.0 if case % 2 == 0 else -1.0
    rho = float(rng.choice([0.1, 1.0, 10.0, 100.0])) * rng.uniform(0.5, 2.0)
    tau = rng.normal(0.0, 3.0, (M, H))
    w = rng.uniform(-5.0, 5.0, (M, H)) * (case % 3 != 0)  # a third of the cases without weights
    a = np.where(rng.random(H) < 0.4, 0.0, rng.uniform(0.0, 5.0, H))  # a = 0 and a > 0
    b = rng.normal(0.0, 30.0, H)
    # bounds of a producer (mirrored for a consumer): 0 <= lo <= hi, some lo == hi, some lo == 0
    lo = np.where(rng.random(H) < 0.4, 0.0, rng.uniform(0.0, 3.0, H))
    hi = lo + rng.uniform(0.0, 5.0, H)
    equal = rng.random(H) < 0.25
    hi = np.where(equal, lo, hi)
    if sign < 0:
        lo, hi = -hi, -lo
    return tau, w, rho, a, b, lo, hi, sign


def _cvxpy_local(tau, w, rho, a, b, lo, hi, sign):
    M, H = tau.shape
    x = cp.Variable((M, H))
    s = cp.sum(x, axis=0)
    obj = 0.5 * cp.sum(cp.multiply(a, cp.square(s))) + b @ s + cp.sum(cp.multiply(w, x)) \
        + 0.5 * rho * cp.sum_squares(x - tau)
    prob = cp.Problem(cp.Minimize(obj), [s >= lo, s <= hi, sign * x >= 0])
    prob.solve(solver="CLARABEL", **CLARABEL_TIGHT)
    assert prob.status == cp.OPTIMAL
    return np.asarray(x.value), float(prob.value)


def test_solve_local_matches_cvxpy_on_random_instances():
    rng = np.random.default_rng(20240716)
    for case in range(100):
        tau, w, rho, a, b, lo, hi, sign = _random_local_instance(rng, case)
        x = solve_local(tau, w, rho, a, b, lo, hi, sign)
        assert x.shape == tau.shape
        assert np.all(np.isfinite(x))
        # feasibility
        s = x.sum(axis=0)
        assert np.all(sign * x >= -1e-12), f"case {case}: wrong-sign trade"
        assert np.all(s >= lo - 1e-9) and np.all(s <= hi + 1e-9), f"case {case}: bounds violated"
        # optimality: no worse than the generic solver
        x_ref, f_ref = _cvxpy_local(tau, w, rho, a, b, lo, hi, sign)
        f = _local_objective(x, tau, w, rho, a, b)
        assert f <= f_ref + 1e-6, f"case {case}: {f} > cvxpy {f_ref}"
        # strictly convex in x (rho > 0): the minimiser is unique
        np.testing.assert_allclose(x, x_ref, atol=1e-4, err_msg=f"case {case}")


def test_solve_local_no_trade_and_fixed_injection():
    tau = np.array([[-1.0], [-2.0]])
    # a producer whose partners offer nothing worth its cost does not trade
    x = solve_local(tau, np.zeros((2, 1)), 1.0, 0.0, 10.0, 0.0, 5.0, 1.0)
    np.testing.assert_array_equal(x, 0.0)
    # lo == hi: the injection is fixed whatever the prices
    x = solve_local(tau, np.zeros((2, 1)), 1.0, 0.0, 10.0, 3.0, 3.0, 1.0)
    assert x.sum() == pytest.approx(3.0, abs=1e-12)
    assert np.all(x >= 0)
    # a consumer is the mirror image of a producer
    x_c = solve_local(-tau, np.zeros((2, 1)), 1.0, 0.0, -10.0, -3.0, -3.0, -1.0)
    np.testing.assert_allclose(x_c, -x, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# (c) residual balancing
# ----------------------------------------------------------------------------------------------


def test_residual_balance():
    assert residual_balance(1.0, primal=11.0, dual=1.0) == 2.0  # primal too large: raise rho
    assert residual_balance(1.0, primal=1.0, dual=11.0) == 0.5  # dual too large: lower rho
    assert residual_balance(1.0, primal=5.0, dual=1.0) == 1.0  # within a factor mu: keep
    assert residual_balance(1.0, primal=1.0, dual=5.0) == 1.0
    assert residual_balance(1.0, primal=10.0, dual=1.0) == 1.0  # the bounds themselves keep rho
    assert residual_balance(1.0, primal=1.0, dual=10.0) == 1.0
    assert residual_balance(3.0, primal=0.0, dual=0.0) == 3.0
    assert residual_balance(4.0, primal=1.0, dual=0.0) == 8.0  # defaults mu = 10, tau = 2
    assert residual_balance(4.0, primal=1.0, dual=0.0, mu=2.0, tau=3.0) == 12.0
    assert residual_balance(4.0, primal=0.0, dual=1.0, mu=2.0, tau=4.0) == 1.0
    assert residual_balance(4.0, primal=3.0, dual=1.0, mu=2.0, tau=3.0) == 12.0
    assert residual_balance(4.0, primal=1.5, dual=1.0, mu=2.0, tau=3.0) == 4.0
    assert converged(1e-5, 1e-5, 1e-4) and not converged(1e-3, 1e-5, 1e-4) and not converged(1e-5, 1e-3, 1e-4)


def test_residual_balancing_in_the_loop():
    """rho only changes by the factor tau, only every 10th iteration (the default cadence), and only
    in the direction the residuals ask for."""
    history: list = []
    _admm(_two_peers(H=1), rho=1000.0, tolerance=1e-8, history=history, pool_price_start=False)
    for (it, r, s, rho), (_, _, _, rho_next) in zip(history, history[1:]):
        if it % 10:
            assert rho_next == rho
        elif r > 10 * s:
            assert rho_next == pytest.approx(2 * rho)
        elif s > 10 * r:
            assert rho_next == pytest.approx(rho / 2)
        else:
            assert rho_next == rho
    # starting far too high, rho has been lowered
    assert history[-1][3] < 1000.0
    # without residual balancing rho stays put
    hist2: list = []
    _admm(_two_peers(), rho=7.0, tolerance=1e-6, max_iterations=50, history=hist2, residual_balancing=False,
          pool_price_start=False)
    assert {h[3] for h in hist2} == {7.0}


# ----------------------------------------------------------------------------------------------
# (d) a random 3 x 3 market over 4 hours, and (e) uniform price intervals
# ----------------------------------------------------------------------------------------------


def _random_market(seed: int, H: int = 4) -> list[HourlyPeer]:
    rng = np.random.default_rng(seed)
    peers = []
    for i in range(3):
        lo = rng.uniform(0.0, 1.0, H) * (rng.random(H) < 0.5)
        hi = lo + rng.uniform(1.0, 6.0, H)
        peers.append(_peer(f"g{i}", ["chp", "pv", "grid"][i], lo, hi, rng.uniform(0.5, 3.0, H), rng.uniform(5.0, 40.0, H), H))
    for i in range(3):
        d_min = rng.uniform(0.5, 2.0, H)
        d_max = d_min + rng.uniform(0.5, 4.0, H)
        a, b = load_utility_coefficients(d_min, d_max, rng.uniform(40.0, 80.0), rng.uniform(0.0, 20.0))
        peers.append(_peer(f"l{i}", "load", -d_max, -d_min, a, b, H))
    return peers


@pytest.mark.parametrize("seed", [1, 2])
def test_random_market_admm_matches_centralized(seed):
    peers = _random_market(seed)
    ref = solve_p2p(peers)
    graph, p, trades, prices, it, ok = _admm(peers, rho=1.0, tolerance=1e-6)
    assert ok
    np.testing.assert_allclose(p, ref.p_mw, atol=1e-3)
    sw, sw_ref = social_welfare_eur(peers, p).sum(), ref.social_welfare_eur.sum()
    assert abs(sw - sw_ref) <= 1e-3 * abs(sw_ref)
    # bounds and reciprocity of the ADMM result
    for n, peer in enumerate(peers):
        assert np.all(p[n] >= peer.p_min_mw - 1e-4) and np.all(p[n] <= peer.p_max_mw + 1e-4)
    np.testing.assert_allclose(trades + trades[graph.reverse], 0.0, atol=1e-4)
    assert np.all(graph.sign[:, None] * trades >= -1e-9)
    # on traded pairs, the ADMM prices are the centralized ones
    traded = np.abs(ref.trades_mw) > 1e-2
    np.testing.assert_allclose(prices[traded], ref.prices_eur_per_mwh[traded], atol=0.05)


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_uniform_price_interval_brackets_centralized_price(seed):
    peers = _random_market(seed)
    sol = solve_p2p(peers)
    lo, hi = uniform_price_interval(peers, sol.p_mw)
    assert np.all(lo <= hi + 1e-3)
    traded = np.abs(sol.trades_mw) > 1e-4
    assert traded.any()
    for k, t in zip(*np.nonzero(traded)):
        price = sol.prices_eur_per_mwh[k, t]
        assert lo[t] - 1e-3 <= price <= hi[t] + 1e-3, (k, t, lo[t], price, hi[t])


def test_uniform_price_interval_two_peers():
    peers = _two_peers()
    lo, hi = uniform_price_interval(peers, np.array([[P_STAR], [-P_STAR]]))
    np.testing.assert_allclose([lo[0], hi[0]], [PRICE_STAR, PRICE_STAR], atol=1e-3)
    # the producer at its upper bound only bounds the price from below
    lo, hi = uniform_price_interval([_peer("g", "chp", 0, 5, 2, 10), _peer("l", "load", -5, -5, 0, 60)],
                                    np.array([[5.0], [-5.0]]))
    assert lo[0] == pytest.approx(20.0) and hi[0] == np.inf


# ----------------------------------------------------------------------------------------------
# (f) community market on a 3-bus radial feeder with the relaxed branch-flow model
# ----------------------------------------------------------------------------------------------

H24 = 24
IMPORT = 60.0 + 30.0 * np.sin(np.arange(H24) / 24 * 2 * np.pi)  # EUR/MWh
EXPORT = 0.8 * IMPORT


def _grid3() -> GridModel:
    return GridModel(
        n_bus=3, root=0, base_mva=1.0, base_kv=np.full(3, 12.66),
        from_bus=[0, 1], to_bus=[1, 2], r_pu=[0.02, 0.03], x_pu=[0.01, 0.02], s_max_pu=[np.inf, np.inf],
        branch_kind=("line", "line"), branch_name=("l01", "l12"), vm_min_pu=0.9, vm_max_pu=1.1,
    )


def _ev(pid: str, bus: int, arrival: int, departure: int, **kw) -> EVModel:
    args = dict(capacity_mwh=0.06, soc_initial_mwh=0.02, soc_min_mwh=0.006, soc_departure_mwh=0.05,
                soc_final_mwh=0.02, trip_energy_mwh=0.01, p_charge_max_mw=0.011, p_discharge_max_mw=0.011,
                eta_charge=0.95, eta_discharge=0.95, degradation_eur_per_mwh=2.0)
    args.update(kw)
    return EVModel(id=pid, bus=bus, arrival_hour=arrival, departure_hour=departure,
                   plugged=ev_plugged_mask(arrival, departure, H24), **args)


def _community_models():
    t = np.arange(H24)
    base = 0.4 + 0.2 * np.sin((t - 6) / 24 * 2 * np.pi) ** 2
    d_min, d_max = 0.9 * base, 1.1 * base
    a, b = load_utility_coefficients(d_min, d_max, 150.0, 40.0)
    load = HourlyPeer("load", "load", 2, -d_max, -d_min, a, b, 0.3)
    pv_fc = 0.3 * np.clip(np.sin((t - 6) / 12 * np.pi), 0.0, None)
    pv = HourlyPeer("pv", "pv", 1, np.zeros(H24), pv_fc, np.full(H24, 0.5), np.full(H24, 4.0), 0.4)
    ev_home = _ev("ev_home", 2, arrival=18, departure=8)  # plugged overnight
    ev_work = _ev("ev_work", 1, arrival=9, departure=17, soc_departure_mwh=0.04, soc_initial_mwh=0.03,
                  soc_final_mwh=0.03)  # plugged during the day, trip energy taken on arrival
    return [load, pv, ev_home, ev_work]


def test_community_market_on_a_three_bus_feeder():
    models = _community_models()
    grid = _grid3()
    sol = solve_community(models, grid, IMPORT, EXPORT, p_import_max_mw=5.0, p_export_max_mw=5.0)
    assert sol.status == "optimal"
    assert sol.prices_eur_per_mwh.shape == (3, H24)

    # the relaxation is exact
    assert sol.max_cone_gap < 1e-6
    # voltages inside the limits
    assert np.all(sol.vm_pu >= 0.9 - 1e-6) and np.all(sol.vm_pu <= 1.1 + 1e-6)

    # root price = import price in the hours the community imports (unrated branches: no
    # congestion) and the voltage limits are not binding
    inside = (sol.vm_pu.min(axis=0) > 0.9 + 1e-3) & (sol.vm_pu.max(axis=0) < 1.1 - 1e-3)
    importing = (sol.import_mw > 1e-3) & (sol.import_mw < 5.0 - 1e-3) & (sol.export_mw < 1e-6)
    hours = np.flatnonzero(inside & importing)
    assert len(hours) >= 6
    np.testing.assert_allclose(sol.prices_eur_per_mwh[grid.root, hours], IMPORT[hours], rtol=1e-5, atol=1e-4)
    # downstream of an importing root the price rises with the marginal losses
    down = hours[(sol.branch_p_mw[0, hours] > 1e-3) & (sol.branch_p_mw[1, hours] > 1e-3)]
    assert len(down)
    assert np.all(sol.prices_eur_per_mwh[1, down] >= sol.prices_eur_per_mwh[0, down] - 1e-6)
    assert np.all(sol.prices_eur_per_mwh[2, down] >= sol.prices_eur_per_mwh[1, down] - 1e-6)

    # active power balance of the whole feeder: import - export + injections = losses
    balance = sol.import_mw - sol.export_mw + sol.p_mw.sum(axis=0)
    np.testing.assert_allclose(balance, sol.losses_mw, atol=1e-6)
    assert np.all(sol.losses_mw >= -1e-9)

    # peers' bounds
    for i, m in enumerate(models[:2]):
        assert np.all(sol.p_mw[i] >= m.p_min_mw - 1e-6) and np.all(sol.p_mw[i] <= m.p_max_mw + 1e-6)

    # EVs: state of charge within [soc_min, capacity], departure energy met, no power when away
    for i, ev in enumerate(models[2:], start=2):
        soc = sol.ev_soc_mwh[ev.id]
        assert soc.shape == (H24,)
        assert np.all(soc >= ev.soc_min_mwh - 1e-6), ev.id
        assert np.all(soc <= ev.capacity_mwh + 1e-6), ev.id
        assert soc[ev.departure_hour - 2] >= ev.soc_departure_mwh - 1e-6, ev.id
        assert soc[-1] >= ev.soc_final_mwh - 1e-6, ev.id
        np.testing.assert_allclose(sol.p_mw[i, ~ev.plugged], 0.0, atol=1e-7)
        assert np.all(np.abs(sol.p_mw[i]) <= max(ev.p_charge_max_mw, ev.p_discharge_max_mw) + 1e-6)
        # end-of-hour energy follows the charging with the trip taken on arrival (no discharge
        # assumed where the net injection is negative)
        net = -sol.p_mw[i]
        charge, discharge = np.clip(net, 0, None), np.clip(-net, 0, None)
        trip = np.zeros(H24)
        trip[ev.arrival_hour - 1] = ev.trip_energy_mwh
        expected = ev.soc_initial_mwh + np.cumsum(ev.eta_charge * charge - discharge / ev.eta_discharge - trip)
        np.testing.assert_allclose(soc, expected, atol=1e-6)

    # plugged masks: overnight and daytime cars
    assert models[2].plugged[:7].all() and not models[2].plugged[7:17].any() and models[2].plugged[17:].all()
    assert models[3].plugged[8:16].all() and not models[3].plugged[:8].any() and not models[3].plugged[16:].any()


def test_a_uniform_price_interval_applies_only_without_fees_and_restrictions():
    from dataclasses import replace

    from p2pm.compare import has_uniform_price

    peers = [_peer("g1", "chp", 0, 5, 2, 10), _peer("g2", "pv", 0, 1, 0, 0), _peer("l1", "load", -5, 0, 0, 60),
             _peer("l2", "load", -3, 0, 0, 50)]
    assert has_uniform_price(peers, trade_graph(peers))
    fees = [replace(p, trade_weights={"g1": 2.0}) if p.id == "l1" else p for p in peers]
    assert not has_uniform_price(fees, trade_graph(fees))
    allowed = np.ones((4, 4), dtype=bool)
    allowed[1, 3] = allowed[3, 1] = False  # g2 and l2 do not trade
    assert not has_uniform_price(peers, trade_graph(peers, allowed))
