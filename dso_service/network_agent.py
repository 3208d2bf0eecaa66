"""The network agent of the community market (the DSO's side of the consensus ADMM; the math is
in ``common.community``'s module docstring): the z-update over the relaxed branch-flow model, built
once as DPP cvxpy problems (one per group of hours, solved in parallel) and re-solved with new
parameters every iteration."""

from __future__ import annotations

import dataclasses
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
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
    solve_time_s: float  # wall time of the z-update (cvxpy parameter updates + Clarabel, all hour groups)
    solver_time_s: float  # Clarabel's own time (the slowest hour group's)


# The network agent's problem has no coupling across hours (storage sits with the peers), so its
# hours are solved as independent groups on as many threads: Clarabel releases the GIL while it
# iterates, and the peers wait for the z-update, so a second core is idle meanwhile. ieee33-ev
# (24 h, after warm-up, idle 2-core machine): 38.7 ms per z-update in one piece, 38.1 ms in two
# groups one after the other, 25.2-27.5 ms in two groups on two threads; three groups 30.9 ms,
# four 35.2 ms (cvxpy's parameter update holds the GIL). z agrees with the one-piece solve to
# ~1e-7 MW (the solver tolerance).
AGENT_HOUR_GROUPS = 2
_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=AGENT_HOUR_GROUPS, thread_name_prefix="network-agent")
    return _POOL


class NetworkAgent:
    """The network agent's z-update, built once as DPP cvxpy problems and re-solved with new
    parameters (Clarabel's data-update path, no re-canonicalisation):

        min  c_imp' imp - c_exp' exp + ||c z - w||^2,   c = sqrt(rho/2),  w = c v
        s.t. relaxed branch-flow model with bus injections M z (+ imp - exp at the root),
             loads' Q = tan(phi) z, V_root = 1, voltage limits, thermal limits.

    Separable by hour: ``hour_groups`` consecutive groups of hours, one problem each, solved in
    parallel (``AGENT_HOUR_GROUPS``). ``peer_buses`` (N,): bus of every peer;
    ``peer_is_load_tanphi`` (N,): tan(phi) for loads and 0 for peers at unity power factor (EVs,
    PV, CHP as in ``solve_community``).
    """

    def __init__(self, grid: GridModel, peer_buses, peer_is_load_tanphi, import_price, export_price,
                 p_import_max: float, p_export_max: float, solver_opts: dict | None = None,
                 hour_groups: int = AGENT_HOUR_GROUPS):
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
        if hour_groups < 1:
            raise ValueError("hour_groups must be at least 1")
        self.n_peers, self.hours = N, H
        opts = dict(AGENT_CLARABEL)
        opts.update(solver_opts or {})
        self.groups = [_HourGroup(self, hours, p_import_max, p_export_max, opts)
                       for hours in np.array_split(np.arange(H), min(hour_groups, H))]
        self.solve_times_s: list[float] = []

    @classmethod
    def from_models(cls, grid: GridModel, models: list, import_price, export_price, p_import_max: float,
                    p_export_max: float, **kw) -> NetworkAgent:
        """Peer buses and loads' tan(phi) taken from the peers' models (as ``solve_community``)."""
        buses = [m.bus for m in models]
        tanphi = [m.tan_phi if isinstance(m, HourlyPeer) and m.kind == "load" else 0.0 for m in models]
        return cls(grid, buses, tanphi, import_price, export_price, p_import_max, p_export_max, **kw)

    @property
    def problems(self) -> list:
        return [g.problem for g in self.groups]

    def is_dpp(self) -> bool:
        return all(p.is_dpp() for p in self.problems)

    def solve(self, v: np.ndarray, rho: float) -> NetworkSolution:
        """z-update for the consensus targets v = p + u (N, H) [MW] and penalty rho."""
        v = np.asarray(v, dtype=float)
        if v.shape != (self.n_peers, self.hours) or not np.all(np.isfinite(v)):
            raise ValueError(f"v must be a finite ({self.n_peers}, {self.hours}) array")
        if not (np.isfinite(rho) and rho > 0):
            raise ValueError("rho must be positive")
        c = float(np.sqrt(rho / 2.0))
        t0 = time.perf_counter()
        if len(self.groups) == 1:
            parts = [self.groups[0].solve(v, c)]
        else:
            parts = list(_pool().map(lambda g: g.solve(v[:, g.hours], c), self.groups))
        dt = time.perf_counter() - t0
        self.solve_times_s.append(dt)
        return _joined(parts, dt)


class _HourGroup:
    """One group of consecutive hours of the network agent: its own DPP problem."""

    def __init__(self, agent: NetworkAgent, hours: np.ndarray, p_import_max: float, p_export_max: float,
                 solver_opts: dict):
        import cvxpy as cp

        from common.centralized import branch_flow_model

        grid, N, H = agent.grid, agent.n_peers, len(hours)
        self.agent, self.hours, self.solver_opts = agent, hours, solver_opts
        nb, base = grid.n_bus, grid.base_mva
        self._c = cp.Parameter(nonneg=True, name="sqrt_half_rho", value=1.0)
        self._w = cp.Parameter((N, H), name="sqrt_half_rho_v", value=np.zeros((N, H)))
        Z = cp.Variable((N, H), name="z")
        imp, exp_, qroot = cp.Variable(H, name="import"), cp.Variable(H, name="export"), cp.Variable(H, name="q_root")
        M = sp.csr_matrix((np.ones(N), (agent.peer_buses, np.arange(N))), shape=(nb, N))
        Mq = sp.csr_matrix((agent.tan_phi, (agent.peer_buses, np.arange(N))), shape=(nb, N))
        root = sp.csr_matrix(([1.0], ([grid.root], [0])), shape=(nb, 1))
        p_bus = (M @ Z + root @ cp.reshape(imp - exp_, (1, H), order="F")) / base
        q_bus = (Mq @ Z + root @ cp.reshape(qroot, (1, H), order="F")) / base

        bfm = branch_flow_model(grid, p_bus, q_bus, H)
        Pf, Qf, L, V, balance_p, balance_q = bfm.p, bfm.q, bfm.l, bfm.v, bfm.balance_p, bfm.balance_q
        cons = [imp >= 0, imp <= p_import_max, exp_ >= 0, exp_ <= p_export_max, *bfm.constraints]
        network_cost = agent.import_price[hours] @ imp - agent.export_price[hours] @ exp_
        self.problem = cp.Problem(cp.Minimize(network_cost + cp.sum_squares(self._c * Z - self._w)), cons)
        self._vars = dict(Z=Z, imp=imp, exp=exp_, qroot=qroot, Pf=Pf, Qf=Qf, L=L, V=V)
        self._balance_p, self._balance_q = balance_p, balance_q
        self._network_cost = network_cost

    def solve(self, v: np.ndarray, c: float) -> NetworkSolution:
        import cvxpy as cp

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
        status = self.problem.status
        if status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
            raise _solve_error(f"network agent SOCP (relaxed branch-flow model): solver status {status}"
                               + (" - the voltage/thermal limits cannot be met" if "infeasible" in str(status) else ""))
        return self._solution(status, time.perf_counter() - t0)

    def _solution(self, status: str, dt: float) -> NetworkSolution:
        g, base, var, agent = self.agent.grid, self.agent.grid.base_mva, self._vars, self.agent
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
            peer_prices_eur_per_mwh=pi_p[agent.peer_buses] + agent.tan_phi[:, None] * pi_q[agent.peer_buses],
            network_cost_eur=float(self._network_cost.value), max_cone_gap=gap, status=status, solve_time_s=dt,
            solver_time_s=float(stats.solve_time or 0.0) if stats is not None else float("nan"),
        )


def _joined(parts: list[NetworkSolution], dt: float) -> NetworkSolution:
    """The solutions of consecutive hour groups as one (hours along the last axis)."""
    if len(parts) == 1:
        return dataclasses.replace(parts[0], solve_time_s=dt)
    arrays = {f.name: np.concatenate([getattr(p, f.name) for p in parts], axis=-1)
              for f in dataclasses.fields(NetworkSolution) if isinstance(getattr(parts[0], f.name), np.ndarray)}
    return NetworkSolution(**arrays, network_cost_eur=sum(p.network_cost_eur for p in parts),
                           max_cone_gap=max(p.max_cone_gap for p in parts),
                           status=next((p.status for p in parts if p.status != "optimal"), "optimal"), solve_time_s=dt,
                           solver_time_s=max(p.solver_time_s for p in parts))
