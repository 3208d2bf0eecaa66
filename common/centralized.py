"""Centralized clearing with cvxpy: the reference every distributed result is compared with.

- ``solve_p2p``: full P2P market (thesis eqs. 3.1-3.3), all hours in one QP (the hours are
  independent); trade prices are the duals of reciprocity.
- ``solve_community``: community market with the Relaxed Branch Flow Model (poster; Farivar & Low
  2013), 24 h together coupled by the EVs' state of charge; prices are the duals of the nodal
  active-power balance (distribution locational prices).
"""

from __future__ import annotations

from dataclasses import dataclass

import cvxpy as cp
import numpy as np
import scipy.sparse as sp

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.grid import GridModel
from common.market import TradeGraph, fee_weights, peer_arrays, social_welfare_eur, trade_graph
from common.models import EVModel, HourlyPeer


class SolveError(RuntimeError):
    """The optimisation did not reach an optimal solution (infeasible, unbounded, numerical)."""


@dataclass
class P2PSolution:
    graph: TradeGraph
    p_mw: np.ndarray  # (N, H) net injections
    trades_mw: np.ndarray  # (K, H) p_nm
    prices_eur_per_mwh: np.ndarray  # (K, H) lambda_nm (same value for (n,m) and (m,n))
    social_welfare_eur: np.ndarray  # (H,)
    differentiation_cost_eur: np.ndarray  # (H,)
    status: str


# Tight tolerances: the reference must be accurate well below the 1e-3 MW used to judge ADMM
# (Clarabel's defaults leave ~1e-3 MW of slack in these degenerate markets).
CLARABEL_TIGHT = dict(tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10, tol_ktratio=1e-8)


def _solve(prob: cp.Problem, solver: str) -> None:
    try:
        prob.solve(solver=solver, **(CLARABEL_TIGHT if solver == "CLARABEL" else {}))
    except cp.error.SolverError as exc:
        raise SolveError(f"solver {solver} failed: {exc}") from None


def _check(prob: cp.Problem, what: str) -> None:
    if prob.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
        raise SolveError(f"{what}: solver status {prob.status}")


def solve_p2p(peers: list[HourlyPeer], weights_eur_per_mwh: np.ndarray | None = None, solver: str = "CLARABEL",
              graph: TradeGraph | None = None) -> P2PSolution:
    """Clear the full P2P market for every hour.

    ``weights_eur_per_mwh`` (K,) or (K, H): product-differentiation cost c_n * gamma_nm of each
    ordered trade (thesis eq. 3.3); zero in the benchmark. ``graph``: the trade graph of a market
    with restricted partners (``common.partners.scenario_graph``; peers in its order); default:
    every pair of the full market.
    """
    graph = trade_graph(peers) if graph is None else graph
    K, N = graph.n_pairs, len(peers)
    p_min, p_max, a, b = peer_arrays(peers)
    H = p_min.shape[1]
    if weights_eur_per_mwh is None:  # the peers' own fees (product differentiation as data), if any
        weights_eur_per_mwh = fee_weights(graph, peers)
    w = np.zeros((K, H)) if weights_eur_per_mwh is None else np.broadcast_to(
        np.asarray(weights_eur_per_mwh, float).reshape(K, -1), (K, H))

    A = sp.csr_matrix((np.ones(K), (graph.owner, np.arange(K))), shape=(N, K))  # P_n = sum_m p_nm
    first = np.flatnonzero(np.arange(K) < graph.reverse)
    R = sp.csr_matrix((np.ones(2 * len(first)), (np.r_[np.arange(len(first)), np.arange(len(first))],
                                                   np.r_[first, graph.reverse[first]])), shape=(len(first), K))
    X = cp.Variable((K, H))
    P = A @ X
    reciprocity = R @ X == 0
    cons = [reciprocity, P >= p_min, P <= p_max, cp.multiply(graph.sign[:, None], X) >= 0]
    obj = 0.5 * cp.sum(cp.multiply(a, cp.square(P))) + cp.sum(cp.multiply(b, P)) + cp.sum(cp.multiply(w, X))
    # a two-slope cost (an external supplier that imports at b and exports at b_neg <= b):
    # b max(P, 0) + b_neg min(P, 0) = b P + (b - b_neg) max(-P, 0), convex
    kinked = [n for n, p in enumerate(peers) if p.cost_b_neg_eur_per_mwh is not None]
    for n in kinked:
        gap = np.asarray(peers[n].cost_b_eur_per_mwh, float) - np.asarray(peers[n].cost_b_neg_eur_per_mwh, float)
        obj = obj + cp.sum(cp.multiply(gap, cp.pos(-P[n, :])))
    prob = cp.Problem(cp.Minimize(obj), cons)
    _solve(prob, solver)
    _check(prob, "full P2P market")

    x = np.asarray(X.value)
    p = np.asarray(A @ x)
    # The Lagrangian term of p_nm + p_mn = 0 is nu (p_nm + p_mn); at the optimum the seller's
    # marginal cost equals -nu, so the trade price is lambda = -nu.
    pair_price = -np.asarray(reciprocity.dual_value)
    prices = np.zeros((K, H))
    prices[first] = pair_price
    prices[graph.reverse[first]] = pair_price
    return P2PSolution(
        graph=graph, p_mw=p, trades_mw=x, prices_eur_per_mwh=prices,
        social_welfare_eur=social_welfare_eur(peers, p),
        differentiation_cost_eur=np.sum(w * x, axis=0), status=prob.status,
    )


# ----------------------------------------------------------------------------------------------
# Community market with the Relaxed Branch Flow Model
# ----------------------------------------------------------------------------------------------


@dataclass
class CommunitySolution:
    peer_ids: list[str]
    p_mw: np.ndarray  # (N, H) net injections (EV: discharge - charge)
    q_mvar: np.ndarray  # (N, H)
    ev_soc_mwh: dict[str, np.ndarray]  # end-of-hour state of charge
    import_mw: np.ndarray  # (H,)
    export_mw: np.ndarray  # (H,)
    q_root_mvar: np.ndarray
    vm_pu: np.ndarray  # (n_bus, H) sqrt of the model's squared voltage
    branch_p_mw: np.ndarray  # (B, H) sending-end active flow
    branch_q_mvar: np.ndarray
    branch_loading_pct: np.ndarray  # (B, H) sending-end apparent power / rating
    losses_mw: np.ndarray  # (H,) sum r l
    max_cone_gap: float  # max over branches and hours of v_i l - P^2 - Q^2 (pu), 0 when exact
    prices_eur_per_mwh: np.ndarray  # (n_bus, H) duals of the nodal active balance
    social_welfare_eur: np.ndarray  # (H,)
    cost_eur: float  # total objective
    status: str


@dataclass
class BranchFlowModel:
    """Variables (pu, per branch or bus and hour) and constraints of the relaxed branch-flow model."""

    p: cp.Variable  # sending-end active flow
    q: cp.Variable  # sending-end reactive flow
    l: cp.Variable  # squared current
    v: cp.Variable  # squared voltage
    balance_p: cp.Constraint  # nodal active balance (its dual gives the nodal prices)
    balance_q: cp.Constraint
    constraints: list


def branch_flow_model(grid: "GridModel", p_bus, q_bus, H: int) -> BranchFlowModel:
    """The relaxed branch-flow model (Farivar & Low 2013) of a radial network over H hours, for
    bus injections ``p_bus``, ``q_bus`` (pu, (n_bus, H) expressions): DistFlow balance at every
    bus, voltage drop, the relaxed cone P^2 + Q^2 <= v l, voltage limits, thermal limits on the
    sending end, the root held at 1.0 pu."""
    B, nb = len(grid.from_bus), grid.n_bus
    Pf, Qf = cp.Variable((B, H), name="P"), cp.Variable((B, H), name="Q")
    L, V = cp.Variable((B, H), nonneg=True, name="l"), cp.Variable((nb, H), name="v")
    Cf = sp.csr_matrix((np.ones(B), (grid.from_bus, np.arange(B))), shape=(nb, B))
    Ct = sp.csr_matrix((np.ones(B), (grid.to_bus, np.arange(B))), shape=(nb, B))
    r, x = grid.r_pu[:, None], grid.x_pu[:, None]
    balance_p = Ct @ (Pf - cp.multiply(r, L)) + p_bus == Cf @ Pf
    balance_q = Ct @ (Qf - cp.multiply(x, L)) + q_bus == Cf @ Qf
    Vf = Cf.T @ V
    cons = [
        balance_p, balance_q,
        Ct.T @ V == Vf - 2 * (cp.multiply(r, Pf) + cp.multiply(x, Qf)) + cp.multiply(r**2 + x**2, L),
        V[grid.root, :] == 1.0,
        V >= grid.vm_min_pu**2, V <= grid.vm_max_pu**2,
        cp.SOC(cp.vec(Vf + L, order="F"),
               cp.vstack([cp.vec(2 * Pf, order="F"), cp.vec(2 * Qf, order="F"), cp.vec(Vf - L, order="F")]), axis=0),
    ]
    rated = np.flatnonzero(np.isfinite(grid.s_max_pu))
    if len(rated):
        s = grid.s_max_pu[rated]
        cons.append(cp.SOC(cp.vec(np.repeat(s[:, None], H, axis=1), order="F"),
                           cp.vstack([cp.vec(Pf[rated, :], order="F"), cp.vec(Qf[rated, :], order="F")]), axis=0))
    return BranchFlowModel(Pf, Qf, L, V, balance_p, balance_q, cons)


def community_injection_matrix(models: list, n_bus: int) -> np.ndarray:
    """(n_bus, N) 0/1 matrix placing every peer at its bus."""
    M = np.zeros((n_bus, len(models)))
    for i, m in enumerate(models):
        M[m.bus, i] = 1.0
    return M


def ev_soc_expression(ev: EVModel, charge, discharge, H: int):
    """End-of-hour state of charge (MWh) as an affine cvxpy expression."""
    trip = np.zeros(H)
    trip[ev.arrival_hour - 1] = ev.trip_energy_mwh
    net = ev.eta_charge * charge - discharge / ev.eta_discharge - trip
    return ev.soc_initial_mwh + cp.cumsum(net)


def ev_constraints(ev: EVModel, charge, discharge, soc, H: int) -> list:
    cons = [charge >= 0, discharge >= 0,
            charge <= ev.p_charge_max_mw * ev.plugged, discharge <= ev.p_discharge_max_mw * ev.plugged,
            soc >= ev.soc_min_mwh, soc <= ev.capacity_mwh, soc[H - 1] >= ev.soc_final_mwh]
    if ev.departure_hour >= 2:
        cons.append(soc[ev.departure_hour - 2] >= ev.soc_departure_mwh)
    return cons


def solve_community(models: list, grid: GridModel, import_price_eur_per_mwh: np.ndarray,
                    export_price_eur_per_mwh: np.ndarray, p_import_max_mw: float, p_export_max_mw: float,
                    solver: str = "CLARABEL") -> CommunitySolution:
    """Clear the community market over all hours with the SOCP branch-flow network model.

    ``models``: HourlyPeer (loads, PV, wind, CHP; the grid peer is *not* among them, its import
    and export are the root exchange) and EVModel entries.
    """
    H = len(import_price_eur_per_mwh)
    B, nb = len(grid.from_bus), grid.n_bus
    base = grid.base_mva

    p_cols, q_cols, cons, cost, soc_exprs = [], [], [], 0, {}
    for m in models:
        if isinstance(m, EVModel):
            ch, dis = cp.Variable(H), cp.Variable(H)
            soc = ev_soc_expression(m, ch, dis, H)
            cons += ev_constraints(m, ch, dis, soc, H)
            cost += m.degradation_eur_per_mwh * cp.sum(dis)
            soc_exprs[m.id] = soc
            p_cols.append(dis - ch)
            q_cols.append(np.zeros(H))
        else:
            p = cp.Variable(H)
            cons += [p >= m.p_min_mw, p <= m.p_max_mw]
            cost += 0.5 * cp.sum(cp.multiply(m.cost_a_eur_per_mw2h, cp.square(p))) + m.cost_b_eur_per_mwh @ p
            p_cols.append(p)
            # loads draw Q = P tan(phi); generators and EVs run at unity power factor
            q_cols.append(m.tan_phi * p if m.kind == "load" else np.zeros(H))
    Pn = cp.vstack(p_cols)  # (N, H) MW
    Qn = cp.vstack([cp.reshape(q, (1, H), order="F") if not isinstance(q, np.ndarray) else q[None, :] for q in q_cols])

    imp, exp_, qroot = cp.Variable(H), cp.Variable(H), cp.Variable(H)
    cons += [imp >= 0, imp <= p_import_max_mw, exp_ >= 0, exp_ <= p_export_max_mw]
    cost += import_price_eur_per_mwh @ imp - export_price_eur_per_mwh @ exp_

    M = community_injection_matrix(models, nb)
    root = np.zeros((nb, 1))
    root[grid.root, 0] = 1.0
    p_bus = (M @ Pn + root @ cp.reshape(imp - exp_, (1, H), order="F")) / base  # (nb, H) pu
    q_bus = (M @ Qn + root @ cp.reshape(qroot, (1, H), order="F")) / base

    bfm = branch_flow_model(grid, p_bus, q_bus, H)
    cons += bfm.constraints
    Pf, Qf, L, V, balance_p = bfm.p, bfm.q, bfm.l, bfm.v, bfm.balance_p

    prob = cp.Problem(cp.Minimize(cost), cons)
    _solve(prob, solver)
    _check(prob, "community market (branch-flow model)")

    p = np.asarray(Pn.value)
    q = np.vstack([np.asarray(getattr(qc, "value", qc)) for qc in q_cols])
    pf, qf, lv, vv = Pf.value, Qf.value, L.value, V.value
    vfrom = vv[grid.from_bus]
    gap = float(np.max(vfrom * lv - pf**2 - qf**2)) if B else 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        loading = np.where(np.isfinite(grid.s_max_pu)[:, None], 100 * np.hypot(pf, qf) / grid.s_max_pu[:, None], np.nan)
    # The dual of the pu balance is EUR per pu; cvxpy's sign convention makes the cost of one
    # more MW of demand at a bus -dual / base (checked: the root price equals the import price).
    prices = -np.asarray(balance_p.dual_value) / base
    sw = -np.array([sum(_hour_cost(m, p[i], t) for i, m in enumerate(models)) for t in range(H)])
    sw -= import_price_eur_per_mwh * imp.value - export_price_eur_per_mwh * exp_.value
    return CommunitySolution(
        peer_ids=[m.id for m in models], p_mw=p, q_mvar=q,
        ev_soc_mwh={k: np.asarray(v.value) for k, v in soc_exprs.items()},
        import_mw=np.asarray(imp.value), export_mw=np.asarray(exp_.value), q_root_mvar=np.asarray(qroot.value) ,
        vm_pu=np.sqrt(np.maximum(vv, 0)), branch_p_mw=pf * base, branch_q_mvar=qf * base,
        branch_loading_pct=loading, losses_mw=np.sum(grid.r_pu[:, None] * lv, axis=0) * base,
        max_cone_gap=gap, prices_eur_per_mwh=prices, social_welfare_eur=sw, cost_eur=float(prob.value),
        status=prob.status,
    )


def _hour_cost(model, p_t: np.ndarray, t: int) -> float:
    if isinstance(model, EVModel):
        return model.degradation_eur_per_mwh * max(p_t[t], 0.0)
    return float(0.5 * model.cost_a_eur_per_mw2h[t] * p_t[t] ** 2 + model.cost_b_eur_per_mwh[t] * p_t[t])
