"""The network agent of the community market (the DSO's side of the consensus ADMM; the math is
in ``common.community``'s module docstring): the z-update over the relaxed branch-flow model, built
once as a DPP cvxpy problem and re-solved with new parameters every iteration."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from common.community import _solve_error
from common.grid import GridModel
from common.models import HourlyPeer

# ----------------------------------------------------------------------------------------------
# Network agent
# ----------------------------------------------------------------------------------------------

# Clarabel settings of the network agent. Tolerances 1e-8: on ieee33-ev Clarabel stops after the
# same 13 interior-point iterations as with the centralized reference's 1e-10 (which it cannot
# reach and reports "almost solved" from the same iterate), so tighter settings buy nothing.
# Presolve and chordal decomposition off, so that cvxpy hands new parameter values to the same
# Clarabel solver (``update``, no reallocation) instead of building a new one every iteration.
# Iterative refinement off: ~35 % faster per solve (ieee33-ev: ~48 instead of ~72 ms), z within
# ~2e-7 MW and prices within ~4e-6 EUR/MWh of the refined solve, the same ADMM iterations.
# ``AGENT_CLARABEL_REFINED`` turns it back on, for badly conditioned networks.
AGENT_CLARABEL = dict(tol_gap_abs=1e-8, tol_gap_rel=1e-8, tol_feas=1e-8, tol_ktratio=1e-6,
                      presolve_enable=False, chordal_decomposition_enable=False, iterative_refinement_enable=False)
AGENT_CLARABEL_REFINED = dict(AGENT_CLARABEL, iterative_refinement_enable=True)


@dataclass
class NetworkSolution:
    z_mw: np.ndarray  # (N, H) the agent's copy of the peers' injections
    import_mw: np.ndarray  # (H,)
    export_mw: np.ndarray  # (H,)
    q_root_mvar: np.ndarray  # (H,)
    vm_pu: np.ndarray  # (n_bus, H)
    branch_p_mw: np.ndarray  # (B, H) sending end
    branch_q_mvar: np.ndarray  # (B, H)
    branch_loading_pct: np.ndarray  # (B, H), NaN where unrated
    losses_mw: np.ndarray  # (H,)
    prices_eur_per_mwh: np.ndarray  # (n_bus, H) pi_P: -dual of the active nodal balance / base
    q_prices_eur_per_mvarh: np.ndarray  # (n_bus, H) pi_Q: -dual of the reactive nodal balance / base
    peer_prices_eur_per_mwh: np.ndarray  # (N, H) pi_P[bus] + tan(phi) pi_Q[bus] (loads), pi_P[bus] (others)
    network_cost_eur: float  # import cost - export revenue
    max_cone_gap: float  # max of v_i l - P^2 - Q^2 (pu)
    status: str
    solve_time_s: float  # wall time of problem.solve (cvxpy parameter update + Clarabel)
    solver_time_s: float  # Clarabel's own time


class NetworkAgent:
    """The network agent's z-update, built once as a DPP cvxpy problem and re-solved with new
    parameters (Clarabel's data-update path, no re-canonicalisation):

        min  c_imp' imp - c_exp' exp + ||c z - w||^2,   c = sqrt(rho/2),  w = c v
        s.t. relaxed branch-flow model with bus injections M z (+ imp - exp at the root),
             loads' Q = tan(phi) z, V_root = 1, voltage limits, thermal limits.

    ``peer_buses`` (N,): bus of every peer; ``peer_is_load_tanphi`` (N,): tan(phi) for loads and
    0 for peers at unity power factor (EVs, PV, CHP as in ``solve_community``).
    """

    def __init__(self, grid: GridModel, peer_buses, peer_is_load_tanphi, import_price, export_price,
                 p_import_max: float, p_export_max: float, solver_opts: dict | None = None):
        import cvxpy as cp

        from common.centralized import branch_flow_model

        self.grid = grid
        self.peer_buses = np.asarray(peer_buses, dtype=int).reshape(-1)
        self.tan_phi = np.asarray(peer_is_load_tanphi, dtype=float).reshape(-1)
        self.import_price = np.asarray(import_price, dtype=float).reshape(-1)
        self.export_price = np.asarray(export_price, dtype=float).reshape(-1)
        N, H = len(self.peer_buses), len(self.import_price)
        if self.tan_phi.shape != (N,):
            raise ValueError("peer_is_load_tanphi needs one value per peer")
        if self.export_price.shape != (H,):
            raise ValueError("import and export prices need the same number of hours")
        if np.any((self.peer_buses < 0) | (self.peer_buses >= grid.n_bus)):
            raise ValueError("a peer sits at an unknown bus")
        self.n_peers, self.hours = N, H
        nb, base = grid.n_bus, grid.base_mva

        self._c = cp.Parameter(nonneg=True, name="sqrt_half_rho", value=1.0)
        self._w = cp.Parameter((N, H), name="sqrt_half_rho_v", value=np.zeros((N, H)))
        Z = cp.Variable((N, H), name="z")
        imp, exp_, qroot = cp.Variable(H, name="import"), cp.Variable(H, name="export"), cp.Variable(H, name="q_root")
        M = sp.csr_matrix((np.ones(N), (self.peer_buses, np.arange(N))), shape=(nb, N))
        Mq = sp.csr_matrix((self.tan_phi, (self.peer_buses, np.arange(N))), shape=(nb, N))
        root = sp.csr_matrix(([1.0], ([grid.root], [0])), shape=(nb, 1))
        p_bus = (M @ Z + root @ cp.reshape(imp - exp_, (1, H), order="F")) / base
        q_bus = (Mq @ Z + root @ cp.reshape(qroot, (1, H), order="F")) / base

        bfm = branch_flow_model(grid, p_bus, q_bus, H)
        Pf, Qf, L, V, balance_p, balance_q = bfm.p, bfm.q, bfm.l, bfm.v, bfm.balance_p, bfm.balance_q
        cons = [imp >= 0, imp <= p_import_max, exp_ >= 0, exp_ <= p_export_max, *bfm.constraints]
        network_cost = self.import_price @ imp - self.export_price @ exp_
        self.problem = cp.Problem(cp.Minimize(network_cost + cp.sum_squares(self._c * Z - self._w)), cons)
        self._vars = dict(Z=Z, imp=imp, exp=exp_, qroot=qroot, Pf=Pf, Qf=Qf, L=L, V=V)
        self._balance_p, self._balance_q = balance_p, balance_q
        self._network_cost = network_cost
        self.solver_opts = dict(AGENT_CLARABEL)
        self.solver_opts.update(solver_opts or {})
        self.solve_times_s: list[float] = []

    @classmethod
    def from_models(cls, grid: GridModel, models: list, import_price, export_price, p_import_max: float,
                    p_export_max: float, **kw) -> NetworkAgent:
        """Peer buses and loads' tan(phi) taken from the peers' models (as ``solve_community``)."""
        buses = [m.bus for m in models]
        tanphi = [m.tan_phi if isinstance(m, HourlyPeer) and m.kind == "load" else 0.0 for m in models]
        return cls(grid, buses, tanphi, import_price, export_price, p_import_max, p_export_max, **kw)

    def is_dpp(self) -> bool:
        return self.problem.is_dpp()

    def solve(self, v: np.ndarray, rho: float) -> NetworkSolution:
        """z-update for the consensus targets v = p + u (N, H) [MW] and penalty rho."""
        import cvxpy as cp

        v = np.asarray(v, dtype=float)
        if v.shape != (self.n_peers, self.hours) or not np.all(np.isfinite(v)):
            raise ValueError(f"v must be a finite ({self.n_peers}, {self.hours}) array")
        if not (np.isfinite(rho) and rho > 0):
            raise ValueError("rho must be positive")
        c = float(np.sqrt(rho / 2.0))
        self._c.value = c
        self._w.value = c * v
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                # "Solution may be inaccurate": the status says so, and is checked below
                warnings.filterwarnings("ignore", message="Solution may be inaccurate", category=UserWarning)
                self.problem.solve(solver="CLARABEL", warm_start=True, **self.solver_opts)
        except cp.error.SolverError as exc:
            raise _solve_error(f"network agent SOCP: solver CLARABEL failed: {exc}") from None
        dt = time.perf_counter() - t0
        self.solve_times_s.append(dt)
        status = self.problem.status
        if status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
            raise _solve_error(f"network agent SOCP (relaxed branch-flow model): solver status {status}"
                               + (" - the voltage/thermal limits cannot be met" if "infeasible" in str(status) else ""))
        return self._solution(status, dt)

    def _solution(self, status: str, dt: float) -> NetworkSolution:
        g, base, var = self.grid, self.grid.base_mva, self._vars
        pf, qf, lv, vv = (np.asarray(var[k].value) for k in ("Pf", "Qf", "L", "V"))
        gap = float(np.max(vv[g.from_bus] * lv - pf**2 - qf**2)) if g.n_branch else 0.0
        with np.errstate(divide="ignore", invalid="ignore"):
            loading = np.where(np.isfinite(g.s_max_pu)[:, None], 100 * np.hypot(pf, qf) / g.s_max_pu[:, None], np.nan)
        pi_p = -np.asarray(self._balance_p.dual_value) / base
        pi_q = -np.asarray(self._balance_q.dual_value) / base
        stats = self.problem.solver_stats
        return NetworkSolution(
            z_mw=np.array(var["Z"].value), import_mw=np.array(var["imp"].value), export_mw=np.array(var["exp"].value),
            q_root_mvar=np.array(var["qroot"].value), vm_pu=np.sqrt(np.maximum(vv, 0.0)), branch_p_mw=pf * base,
            branch_q_mvar=qf * base, branch_loading_pct=loading, losses_mw=np.sum(g.r_pu[:, None] * lv, axis=0) * base,
            prices_eur_per_mwh=pi_p, q_prices_eur_per_mvarh=pi_q,
            peer_prices_eur_per_mwh=pi_p[self.peer_buses] + self.tan_phi[:, None] * pi_q[self.peer_buses],
            network_cost_eur=float(self._network_cost.value), max_cone_gap=gap, status=status, solve_time_s=dt,
            solver_time_s=float(stats.solve_time or 0.0) if stats is not None else float("nan"),
        )
