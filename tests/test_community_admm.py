"""Distributed community market numerics (common.community): the peers' local updates (closed
form, EV QP with OSQP), the network agent's DPP SOCP, and the in-process consensus ADMM against
the centralized reference ``solve_community``."""

from __future__ import annotations

import subprocess
import sys

import cvxpy as cp
import numpy as np
import pytest

from common.engine import RunFailed

from common.centralized import CLARABEL_TIGHT, SolveError, ev_constraints, ev_soc_expression, solve_community
from common.community import EVLocalSolver, hourly_local_update, local_solver, local_update
from dso_service.network_agent import NetworkAgent
from p2pm.local import clear_community
from common.grid import GridModel
from common.models import EVModel, HourlyPeer, ev_plugged_mask, load_utility_coefficients

H = 24
T = np.arange(H)
IMPORT = 80.0 + 40.0 * np.sin((T - 9) / 24 * 2 * np.pi)  # EUR/MWh, peak in the evening
EXPORT = 0.7 * IMPORT


def _grid4(vm_min: float = 0.95, vm_max: float = 1.05, s_max_01: float = np.inf) -> GridModel:
    """Radial 4-bus feeder: 0 (root) - 1, then 1 - 2 and 1 - 3."""
    return GridModel(
        n_bus=4, root=0, base_mva=1.0, base_kv=np.full(4, 12.66),
        from_bus=[0, 1, 1], to_bus=[1, 2, 3], r_pu=[0.02, 0.03, 0.04], x_pu=[0.015, 0.02, 0.03],
        s_max_pu=[s_max_01, np.inf, np.inf], branch_kind=("line",) * 3, branch_name=("l01", "l12", "l13"),
        vm_min_pu=vm_min, vm_max_pu=vm_max,
    )


def _ev(pid: str, bus: int, arrival: int, departure: int, **kw) -> EVModel:
    args = dict(capacity_mwh=0.06, soc_initial_mwh=0.03, soc_min_mwh=0.006, soc_departure_mwh=0.05,
                soc_final_mwh=0.03, trip_energy_mwh=0.015, p_charge_max_mw=0.011, p_discharge_max_mw=0.011,
                eta_charge=0.95, eta_discharge=0.95, degradation_eur_per_mwh=3.0)
    args.update(kw)
    return EVModel(id=pid, bus=bus, arrival_hour=arrival, departure_hour=departure,
                   plugged=ev_plugged_mask(arrival, departure, H), **args)


def _models(scale: float = 1.0) -> list:
    base = scale * (0.3 + 0.15 * np.sin((T - 6) / 24 * 2 * np.pi) ** 2)
    a, b = load_utility_coefficients(0.9 * base, 1.1 * base, 150.0, 40.0)
    load2 = HourlyPeer("load2", "load", 2, -1.1 * base, -0.9 * base, a, b, 0.4)
    a3, b3 = load_utility_coefficients(0.7 * base, 1.2 * base, 130.0, 50.0)
    load3 = HourlyPeer("load3", "load", 3, -1.2 * base, -0.7 * base, a3, b3, 0.0)  # unity power factor
    pv_fc = 0.35 * np.clip(np.sin((T - 6) / 12 * np.pi), 0.0, None)
    pv = HourlyPeer("pv1", "pv", 1, np.zeros(H), pv_fc, np.full(H, 1.0), np.full(H, 4.0), 0.4)
    return [load2, load3, pv, _ev("ev_home", 2, arrival=18, departure=8),
            _ev("ev_work", 3, arrival=9, departure=17, soc_departure_mwh=0.045, degradation_eur_per_mwh=0.0)]


def _agent(models, grid) -> NetworkAgent:
    return NetworkAgent.from_models(grid, models, IMPORT, EXPORT, p_import_max=5.0, p_export_max=5.0)


# ----------------------------------------------------------------------------------------------
# (a) the network agent's problem is built once and is DPP
# ----------------------------------------------------------------------------------------------


def test_network_agent_problem_is_dpp():
    models = _models()
    agent = _agent(models, _grid4(s_max_01=0.8))
    assert agent.is_dpp()
    assert all(p.is_dcp() for p in agent.problems)
    problems = agent.problems
    v = np.array([m.p_min_mw if isinstance(m, HourlyPeer) else np.zeros(H) for m in models])
    first = agent.solve(v, 100.0)
    second = agent.solve(v, 10.0)  # rho changes only parameter values: same problem object
    assert all(a is b for a, b in zip(agent.problems, problems))
    assert first.z_mw.shape == (len(models), H) and second.status in ("optimal", "optimal_inaccurate")
    assert first.max_cone_gap < 1e-6
    # a smaller rho lets the agent move further from the targets (towards cheaper injections)
    assert np.linalg.norm(second.z_mw - v) >= np.linalg.norm(first.z_mw - v) - 1e-9


def test_network_agent_hour_groups_give_the_one_piece_solution():
    """The hours are independent in the agent's problem: solved as groups on threads, they give the
    solution of the one problem over all hours (to the solver's tolerance), hour by hour."""
    models = _models()
    grid = _grid4(s_max_01=0.8)
    one = NetworkAgent.from_models(grid, models, IMPORT, EXPORT, p_import_max=5.0, p_export_max=5.0, hour_groups=1)
    split = NetworkAgent.from_models(grid, models, IMPORT, EXPORT, p_import_max=5.0, p_export_max=5.0, hour_groups=3)
    assert len(one.groups) == 1 and [len(g.hours) for g in split.groups] == [len(h) for h in np.array_split(range(H), 3)]
    v = np.array([m.p_min_mw if isinstance(m, HourlyPeer) else np.zeros(H) for m in models])
    a, b = one.solve(v, 50.0), split.solve(v, 50.0)
    # MW and pu to 1e-5, prices to 1e-3 EUR/MWh (the two solves stop at different interior points)
    for name in ("z_mw", "import_mw", "export_mw", "vm_pu", "losses_mw", "prices_eur_per_mwh", "peer_prices_eur_per_mwh"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape, name
        np.testing.assert_allclose(y, x, atol=1e-3 if "prices" in name else 1e-5, err_msg=name)
    assert b.network_cost_eur == pytest.approx(a.network_cost_eur, rel=1e-6)
    assert b.status in ("optimal", "optimal_inaccurate")


def test_peer_side_imports_no_cvxpy():
    code = ("import sys; import common.community as c; "
            "assert 'cvxpy' not in sys.modules, 'cvxpy imported'; assert 'pandapower' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ----------------------------------------------------------------------------------------------
# (b) local updates
# ----------------------------------------------------------------------------------------------


def test_hourly_local_update_closed_form():
    rng = np.random.default_rng(3)
    lo, hi = -rng.uniform(0.5, 1.0, H), rng.uniform(0.0, 1.0, H)
    a, b = rng.uniform(0.0, 50.0, H), rng.uniform(-50.0, 100.0, H)
    peer = HourlyPeer("x", "chp", 0, lo, hi, a, b, 0.0)
    target, rho = rng.normal(0.0, 1.0, H), 7.0
    p = hourly_local_update(peer, target, rho)
    grid = np.linspace(lo, hi, 20001)  # brute force per hour
    obj = 0.5 * a * grid**2 + b * grid + 0.5 * rho * (grid - target) ** 2
    best = grid[np.argmin(obj, axis=0), np.arange(H)]
    np.testing.assert_allclose(p, best, atol=2e-4)
    np.testing.assert_array_equal(local_update(peer, target, rho), p)


def _ev_cvxpy(ev: EVModel, target: np.ndarray, rho: float):
    ch, dis = cp.Variable(H), cp.Variable(H)
    soc = ev_soc_expression(ev, ch, dis, H)
    obj = ev.degradation_eur_per_mwh * cp.sum(dis) + rho / 2 * cp.sum_squares(dis - ch - target)
    prob = cp.Problem(cp.Minimize(obj), ev_constraints(ev, ch, dis, soc, H))
    prob.solve(solver="CLARABEL", **CLARABEL_TIGHT)
    assert prob.status == cp.OPTIMAL
    return dis.value - ch.value, prob.value


@pytest.mark.parametrize("ev", [_ev("home", 2, 18, 8), _ev("work", 3, 9, 17, soc_departure_mwh=0.045, degradation_eur_per_mwh=0.0),
                                _ev("tight", 1, 20, 7, soc_departure_mwh=0.058, degradation_eur_per_mwh=8.0)],
                         ids=lambda e: e.id)
def test_ev_local_solver_equals_cvxpy(ev):
    solver = EVLocalSolver(ev, H)
    rng = np.random.default_rng(11)
    # the same solver object throughout: rho and the target change only the QP's vector q
    for rho in (100.0, 10.0, 1.0):
        for _ in range(3):
            target = rng.normal(0.0, 0.012, H) + rng.choice([-0.01, 0.0, 0.01])
            step = solver.solve(target, rho)
            p_ref, obj_ref = _ev_cvxpy(ev, target, rho)
            # the reference is an interior-point solution: with rho = 1 the objective is so flat
            # near the optimum that it is only determined to ~1e-6 MW
            np.testing.assert_allclose(step.p_mw, p_ref, atol=1e-6 if rho >= 10 else 1e-5)
            obj = ev.degradation_eur_per_mwh * step.discharge_mw.sum() + rho / 2 * np.sum((step.p_mw - target) ** 2)
            assert obj == pytest.approx(obj_ref, rel=1e-6, abs=1e-9)
            # the SOC trajectory it reports is the model's, and feasible
            assert np.all(step.soc_mwh >= ev.soc_min_mwh - 1e-8) and np.all(step.soc_mwh <= ev.capacity_mwh + 1e-8)
            assert step.soc_mwh[ev.departure_hour - 2] >= ev.soc_departure_mwh - 1e-8
            assert step.soc_mwh[-1] >= ev.soc_final_mwh - 1e-8
            np.testing.assert_allclose(step.p_mw[~ev.plugged], 0.0, atol=1e-9)
    np.testing.assert_allclose(local_update(solver, target, rho), step.p_mw, atol=1e-9)
    # the interior-point backend (OSQP's fallback) solves the same QP
    ipm = EVLocalSolver(ev, H, backend="clarabel").solve(target, rho)
    assert ipm.backend == "clarabel"
    np.testing.assert_allclose(ipm.p_mw, step.p_mw, atol=1e-6)


def test_ev_local_solver_far_targets_fall_back_to_clarabel():
    # targets of +-10 MW for a 7 kW car (rho small, prices far from their final value): OSQP
    # stalls on this nearly-linear program and Clarabel takes over
    ev = _ev("far", 2, arrival=18, departure=8, soc_departure_mwh=0.058)
    target = 10.0 + np.sin(T / 3.0)
    p_ref, _ = _ev_cvxpy(ev, target, 10.0)
    step = EVLocalSolver(ev, H).solve(target, 10.0)
    np.testing.assert_allclose(step.p_mw, p_ref, atol=1e-6)


def test_ev_local_solver_infeasible_raises():
    # 2 plugged hours at 11 kW cannot lift the battery from 30 to 58 kWh
    ev = _ev("short", 2, arrival=5, departure=7, soc_departure_mwh=0.058)
    with pytest.raises(SolveError, match="short"):
        EVLocalSolver(ev, H).solve(np.zeros(H), 10.0)


# ----------------------------------------------------------------------------------------------
# (c) in-process ADMM = centralized clearing
# ----------------------------------------------------------------------------------------------


def run_community_admm(models, agent, *, rho, tolerance=1e-4, max_iterations=2000, residual_balancing=True,
                       initial_price_eur_per_mwh=0.0, **market):
    """The community market cleared by the real coordinator, peer and DSO engines in process."""
    from types import SimpleNamespace

    outcome, coordinator, dso, _ = clear_community(models, agent, IMPORT, EXPORT, 5.0, 5.0, rho=rho,
                                                   tolerance=tolerance, max_iterations=max_iterations,
                                                   residual_balancing=residual_balancing,
                                                   price_init_eur_per_mwh=initial_price_eur_per_mwh, **market)
    c = outcome.clearings[-1]
    r = c.rounds
    return SimpleNamespace(converged=c.converged, history=[(s.iteration, s.primal_residual, s.dual_residual, s.rho)
                                                           for s in r.history],
                           iterations=r.iteration, primal_residual=r.primal_residual, dual_residual=r.dual_residual,
                           p_mw=c.p_mw, cost_eur=-float(np.sum(c.sw_eur)), network=dso.last_network,
                           prices_eur_per_mwh=r.prices_eur_per_mwh, rho=r.rho, u=r.u, anderson=r.anderson,
                           ev_soc_mwh={i: v.soc_mwh for i, v in c.results.items() if v.soc_mwh is not None})


@pytest.fixture(scope="module")
def small_case():
    models = _models()
    grid = _grid4(s_max_01=0.85)  # the feeder head congests in the evening peak
    sol = solve_community(models, grid, IMPORT, EXPORT, p_import_max_mw=5.0, p_export_max_mw=5.0)
    agent = _agent(models, grid)
    # ~150 iterations (with rho = 10 and residual balancing: ~900, prices within ~0.045)
    res = run_community_admm(models, agent, rho=100.0, tolerance=1e-4, max_iterations=1500,
                             residual_balancing=False)
    return models, grid, sol, res


def test_admm_dispatch_and_cost_equal_centralized(small_case):
    models, grid, sol, res = small_case
    assert res.converged, res.history[-1]
    assert res.primal_residual <= 1e-4 and res.dual_residual <= 1e-4
    # the case is not trivial: the feeder head is congested in some hours
    assert np.nanmax(sol.branch_loading_pct[0]) > 99.9
    np.testing.assert_allclose(res.p_mw, sol.p_mw, atol=1e-3)
    assert res.cost_eur == pytest.approx(sol.cost_eur, rel=1e-3)
    np.testing.assert_allclose(res.network.import_mw, sol.import_mw, atol=1e-3)
    for ev_id, soc in sol.ev_soc_mwh.items():
        np.testing.assert_allclose(res.ev_soc_mwh[ev_id], soc, atol=1e-3)
    assert [h[0] for h in res.history] == list(range(1, res.iterations + 1))


def test_admm_prices_equal_centralized_nodal_prices(small_case):
    models, grid, sol, res = small_case
    bus = np.array([m.bus for m in models])
    central = sol.prices_eur_per_mwh[bus]
    # the network agent's active-power nodal prices are the centralized ones
    np.testing.assert_allclose(res.network.prices_eur_per_mwh, sol.prices_eur_per_mwh, atol=0.05)
    # price paid to a peer = -rho u = the agent's marginal value of its injection
    np.testing.assert_allclose(res.prices_eur_per_mwh, res.network.peer_prices_eur_per_mwh, atol=0.05)
    # peers at unity power factor (EVs, PV here, the load at bus 3): the nodal price at their bus
    unity = np.array([not (m.kind == "load" and m.tan_phi != 0) for m in models])
    np.testing.assert_allclose(res.prices_eur_per_mwh[unity], central[unity], atol=0.05)
    # a load whose Q follows its P is also paid tan(phi) times the reactive nodal price
    tanphi = np.array([m.tan_phi if m.kind == "load" else 0.0 for m in models])
    expected = central + tanphi[:, None] * res.network.q_prices_eur_per_mvarh[bus]
    np.testing.assert_allclose(res.prices_eur_per_mwh, expected, atol=0.05)
    # congestion separates the prices downstream of the feeder head from the root price
    assert np.max(sol.prices_eur_per_mwh[1] - sol.prices_eur_per_mwh[0]) > 5.0


def test_anderson_acceleration_reaches_the_same_optimum_in_fewer_iterations(small_case):
    """Acceleration of the map (z, u) -> (z, u) held by the coordinator: the congested case clears to
    the centralized optimum, in fewer iterations than the plain ADMM."""
    models, grid, sol, plain = small_case
    fast = run_community_admm(models, _agent(models, grid), rho=100.0, tolerance=1e-4, max_iterations=1500,
                              residual_balancing=False, acceleration=True)
    assert fast.converged, fast.history[-1]
    assert fast.iterations < 0.7 * plain.iterations, (fast.iterations, plain.iterations)
    assert fast.anderson.accepted > 0
    np.testing.assert_allclose(fast.p_mw, sol.p_mw, atol=1e-3)
    assert fast.cost_eur == pytest.approx(sol.cost_eur, rel=1e-3)
    np.testing.assert_allclose(fast.prices_eur_per_mwh, fast.network.peer_prices_eur_per_mwh, atol=0.05)


def test_community_acceleration_falls_back_when_every_point_is_rejected(small_case):
    models, grid, sol, plain = small_case
    res = run_community_admm(models, _agent(models, grid), rho=100.0, tolerance=1e-4, max_iterations=1500,
                             residual_balancing=False, acceleration=True, aa_safeguard=1e-9)
    assert res.anderson.rejected > 5
    assert res.converged
    np.testing.assert_allclose(res.p_mw, sol.p_mw, atol=1e-3)


def test_admm_with_balancing_and_a_starting_price_uncongested():
    models = _models()
    grid = _grid4()
    sol = solve_community(models, grid, IMPORT, EXPORT, p_import_max_mw=5.0, p_export_max_mw=5.0)
    res = run_community_admm(models, _agent(models, grid), rho=10.0, tolerance=1e-4, max_iterations=1500,
                             initial_price_eur_per_mwh=float(np.mean(IMPORT)))
    assert res.converged and res.iterations < 300
    np.testing.assert_allclose(res.p_mw, sol.p_mw, atol=1e-3)
    assert res.cost_eur == pytest.approx(sol.cost_eur, rel=1e-3)
    unity = np.array([not (m.kind == "load" and m.tan_phi != 0) for m in models])
    bus = np.array([m.bus for m in models])
    np.testing.assert_allclose(res.prices_eur_per_mwh[unity], sol.prices_eur_per_mwh[bus][unity], atol=0.05)


def test_rho_change_rescales_u_so_prices_do_not_jump():
    models = _models()
    agent = _agent(models, _grid4())
    res = run_community_admm(models, agent, rho=1000.0, tolerance=1e-4, max_iterations=40, rb_every=1,
                             initial_price_eur_per_mwh=float(np.mean(IMPORT)))
    assert res.rho < 1000.0  # residual balancing lowered rho
    np.testing.assert_allclose(res.prices_eur_per_mwh, -res.rho * res.u)
    np.testing.assert_allclose(res.prices_eur_per_mwh, res.network.peer_prices_eur_per_mwh, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# (d) an infeasible network problem raises
# ----------------------------------------------------------------------------------------------


def test_infeasible_network_agent_raises_solve_error():
    models = _models(scale=3.0)
    # the agent's copies z are free, so heavy load alone never makes its SOCP infeasible (z = 0
    # is feasible); a voltage band that excludes the root's 1.0 pu does
    agent = _agent(models, _grid4(vm_min=1.001, vm_max=1.05))
    v = np.array([m.p_min_mw if isinstance(m, HourlyPeer) else np.zeros(H) for m in models])
    with pytest.raises(SolveError, match="infeasible"):
        agent.solve(v, 10.0)
    # in the market, the DSO reports the failure and the coordinator ends the run naming it
    with pytest.raises(RunFailed, match="network agent"):
        run_community_admm(models, agent, rho=10.0, max_iterations=5)


def test_local_solver_dispatch():
    models = _models()
    assert isinstance(local_solver(models[3], H), EVLocalSolver)
    with pytest.raises(TypeError):
        local_solver(object(), H)
