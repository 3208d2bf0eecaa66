"""Pure numerics of the distributed community market (poster; SPEC 3.3): consensus ADMM between
the peers (loads, PV, CHP, EVs) and the network agent (the DSO), all hours at once. No sockets:
the peer processes, the DSO service and the in-process reference loop share these functions.

Problem (the one ``common.centralized.solve_community`` solves in one piece):

    min  sum_n f_n(p_n) + g(z)   s.t.  p_n = z_n  (every peer n, every hour)

- f_n: peer n's cost over the day and its private constraints (bounds; an EV's state of charge);
- g(z): the network agent's cost, import cost minus export revenue at the root, subject to the
  relaxed branch-flow model (Farivar & Low 2013) whose bus injections are the peers' copies z_n
  (+ the root exchange), loads drawing Q = tan(phi) z_n, voltage and thermal limits.

Scaled ADMM (Boyd et al. 2011, sec. 3.1.1), vectors over the H hours:

    p_n^{k+1} = argmin f_n(p) + rho/2 ||p - (z_n^k - u_n^k)||^2            (peers, in parallel)
    z^{k+1}   = argmin g(z)  + rho/2 sum_n ||z_n - (p_n^{k+1} + u_n^k)||^2  (network agent)
    u_n^{k+1} = u_n^k + p_n^{k+1} - z_n^{k+1}

Prices. With this (standard) sign of the scaled dual, the unscaled multiplier of p_n = z_n is
y = rho u and peer n's optimality reads f_n'(p_n) = -rho u_n: the price paid to peer n per MWh
it injects is **lambda_n = -rho u_n** [EUR/MWh] (rho in EUR/(MW^2 h), u in MW). It is also
exactly the network agent's marginal value of that peer's injection after every z-update:
lambda_n = pi_P[bus] + tan(phi_n) pi_Q[bus] for a load (whose Q follows its P) and pi_P[bus] for
everybody else, where pi_P, pi_Q are the duals of the active and reactive nodal balances. At
convergence pi_P equals the centralized nodal price (``solve_community``'s prices), so an EV's or
PV unit's lambda equals the price at its bus, while a load also carries tan(phi) times the
reactive nodal price (the marginal losses its reactive draw causes).

Residuals: primal r = ||p - z|| [MW], dual s = rho ||z^{k+1} - z^k|| [EUR/MWh], both over all
peers and hours. Residual balancing: ``common.admm.RhoPolicy``; when rho changes, u is rescaled by
rho_old / rho_new so that the prices -rho u do not jump.

Settings (ieee33-ev, tolerance 1e-4, in-process; see tests/test_community_admm.py for a small
congested feeder): rho = 100-200 EUR/(MW^2 h) held constant converges in 83-88 iterations from
zero prices and in 65-67 iterations from the import price as starting price
(``initial_price_eur_per_mwh``); the poster's rho = 100 with residual balancing (mu 10, tau 2,
every 10 iterations) needs 179, because balancing lowers rho to 25 (at rho >= 100 the dual
residual, rho ||dz|| in EUR/MWh, always dominates); rho = 10 or 1 with balancing 208 / 288;
rho = 10 without balancing more than 400 from zero prices, 440 from the import price.

Peer processes import this module for ``local_update`` / ``EVLocalSolver`` only: it imports
neither cvxpy nor pandapower at module level (the network agent imports cvxpy when built).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from common.admm import RhoPolicy, converged
from common.grid import GridModel
from common.models import EVModel, HourlyPeer

# OSQP settings of the EV local problem: the ADMM tolerance is 1e-4 MW over ~1500 entries and
# rho ||dz|| <= 1e-4 with rho up to ~100, so a local solve must be accurate to ~1e-8 MW; polishing
# makes it exact on the active set. ``max_iter`` is kept low: when OSQP stalls (the targets far
# outside the car's +-7 kW, so the QP is nearly an LP: small rho, or prices far from their final
# value) the interior-point fallback (Clarabel, ~1.5 ms) is much cheaper than more OSQP iterations.
EV_OSQP_SETTINGS = dict(eps_abs=1e-9, eps_rel=1e-9, eps_prim_inf=1e-10, eps_dual_inf=1e-10, polishing=True,
                        polish_refine_iter=10, max_iter=10_000, verbose=False, warm_starting=True)
EV_CLARABEL_SETTINGS = dict(tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12, tol_ktratio=1e-10,
                            presolve_enable=False, verbose=False)


def _solve_error(message: str) -> Exception:
    # common.centralized imports cvxpy: only pay for it on the error path
    from common.centralized import SolveError

    return SolveError(message)


# ----------------------------------------------------------------------------------------------
# Peers' local updates
# ----------------------------------------------------------------------------------------------


def hourly_local_update(peer: HourlyPeer, target: np.ndarray, rho: float) -> np.ndarray:
    """argmin_p  a/2 p^2 + b p + rho/2 (p - target)^2  on [p_min, p_max], every hour (closed form)."""
    p = (rho * np.asarray(target, dtype=float) - peer.cost_b_eur_per_mwh) / (peer.cost_a_eur_per_mw2h + rho)
    return np.clip(p, peer.p_min_mw, peer.p_max_mw)


@dataclass
class EVStep:
    """Result of one EV local solve (all arrays (H,))."""

    p_mw: np.ndarray  # net injection, discharge - charge
    soc_mwh: np.ndarray  # end-of-hour state of charge
    charge_mw: np.ndarray
    discharge_mw: np.ndarray
    iterations: int
    solve_time_s: float
    backend: str = "osqp"  # "osqp", "clarabel" or "clarabel (fallback)"


class EVLocalSolver:
    """An EV's local ADMM problem, built once and re-solved with new targets and rho.

        min  deg * sum(d) + rho/2 ||d - c - target||^2
        s.t. 0 <= c <= c_max * plugged,  0 <= d <= d_max * plugged,
             soc_t = soc_0 + sum_{s<=t} (eta_c c_s - d_s / eta_d - trip_s)  in [soc_min, capacity],
             soc at the end of the last plugged hour >= soc_departure,  soc_{H} >= soc_final

    (the constraints of ``common.centralized.ev_constraints``). The objective is divided by rho,
    so the Hessian [[I, -I], [-I, I]] never changes and a new rho or target only updates q =
    [target, deg/rho - target].

    ``backend="osqp"`` (default): OSQP set up once, ``update(q=...)`` and warm start from the
    previous solution, polishing on; when OSQP does not reach "solved" within ``max_iter`` the
    same QP is solved by Clarabel (interior point, also built once; counted in ``fallbacks``).
    ``backend="clarabel"``: Clarabel only (``update(q=...)``; interior-point methods do not warm
    start, but take 10-15 iterations on this QP whatever the data). Neither imports cvxpy.
    """

    def __init__(self, ev: EVModel, hours: int, backend: str = "osqp", settings: dict | None = None,
                 fallback: bool = True):
        H = int(hours)
        if len(ev.plugged) != H:
            raise ValueError(f"EV {ev.id}: plugged mask has {len(ev.plugged)} hours, expected {H}")
        if backend not in ("osqp", "clarabel"):
            raise ValueError(f"unknown EV backend {backend!r} (osqp | clarabel)")
        self.ev, self.hours, self.backend, self.fallback = ev, H, backend, fallback
        plugged = np.asarray(ev.plugged, dtype=float)
        trip = np.zeros(H)
        trip[ev.arrival_hour - 1] = ev.trip_energy_mwh
        soc_lo = np.full(H, float(ev.soc_min_mwh))
        soc_lo[H - 1] = max(soc_lo[H - 1], ev.soc_final_mwh)
        if ev.departure_hour >= 2:
            soc_lo[ev.departure_hour - 2] = max(soc_lo[ev.departure_hour - 2], ev.soc_departure_mwh)
        soc_hi = np.full(H, float(ev.capacity_mwh))
        if np.any(soc_lo > soc_hi):
            raise ValueError(f"EV {ev.id}: required state of charge above the capacity")

        eye = sp.identity(H, format="csc")
        L = sp.csc_matrix(np.tril(np.ones((H, H))))
        self._P = sp.bmat([[eye, -eye], [None, eye]], format="csc")  # upper triangle of [[I, -I], [-I, I]]
        self._A = sp.bmat([[eye, None], [None, eye], [ev.eta_charge * L, -L / ev.eta_discharge]], format="csc")
        self._shift = ev.soc_initial_mwh - np.cumsum(trip)  # soc = shift + L (eta_c c - d / eta_d)
        self._l = np.concatenate([np.zeros(2 * H), soc_lo - self._shift])
        self._u = np.concatenate([ev.p_charge_max_mw * plugged, ev.p_discharge_max_mw * plugged, soc_hi - self._shift])
        self._L = L
        self._deg = float(ev.degradation_eur_per_mwh)
        self._settings = settings or {}
        self._osqp = self._setup_osqp() if backend == "osqp" else None
        self._clarabel = None if backend == "osqp" else self._setup_clarabel()
        self.fallbacks = 0
        self.last: EVStep | None = None

    def _setup_osqp(self):
        import osqp

        solver = osqp.OSQP()
        solver.setup(self._P, np.zeros(2 * self.hours), self._A, self._l, self._u,
                     **{**EV_OSQP_SETTINGS, **(self._settings if self.backend == "osqp" else {})})
        self._osqp_solved = osqp.SolverStatus.OSQP_SOLVED
        return solver

    def _setup_clarabel(self):
        import clarabel

        # l <= A x <= u as Clarabel cones: equalities (unplugged hours: 0 <= c <= 0) in a zero
        # cone, the rest as A x <= u and -A x <= -l in the nonnegative cone
        eq = np.flatnonzero(self._l == self._u)
        ineq = np.flatnonzero(self._l != self._u)
        A = sp.vstack([self._A[eq], self._A[ineq], -self._A[ineq]], format="csc")
        b = np.concatenate([self._u[eq], self._u[ineq], -self._l[ineq]])
        cones = ([clarabel.ZeroConeT(len(eq))] if len(eq) else []) + [clarabel.NonnegativeConeT(2 * len(ineq))]
        opts = clarabel.DefaultSettings()
        for k, v in {**EV_CLARABEL_SETTINGS, **(self._settings if self.backend == "clarabel" else {})}.items():
            setattr(opts, k, v)
        return clarabel.DefaultSolver(self._P, np.zeros(2 * self.hours), A, b, cones, opts)

    def solve(self, target: np.ndarray, rho: float) -> EVStep:
        target = np.asarray(target, dtype=float)
        if target.shape != (self.hours,) or not np.all(np.isfinite(target)) or not (np.isfinite(rho) and rho > 0):
            raise ValueError(f"EV {self.ev.id}: need a finite target of {self.hours} hours and rho > 0")
        q = np.concatenate([target, self._deg / rho - target])
        t0 = time.perf_counter()
        x, iterations, used = None, 0, self.backend
        if self._osqp is not None:
            self._osqp.update(q=q)
            res = self._osqp.solve(raise_error=False)
            iterations = int(res.info.iter)
            if res.info.status_val == self._osqp_solved:
                x = np.array(res.x, dtype=float)  # copy: OSQP reuses its buffers
            elif not self.fallback:
                raise _solve_error(f"EV {self.ev.id} local problem: OSQP status {res.info.status}")
            else:
                osqp_status = res.info.status
        if x is None:
            if self._clarabel is None:
                self._clarabel = self._setup_clarabel()
            if self._osqp is not None:
                self.fallbacks += 1
                used = "clarabel (fallback)"
            self._clarabel.update(q=q)
            sol = self._clarabel.solve()
            iterations += int(sol.iterations)
            if str(sol.status) not in ("Solved", "AlmostSolved"):
                first = f"OSQP status {osqp_status}, then " if self._osqp is not None else ""
                raise _solve_error(f"EV {self.ev.id} local problem: {first}Clarabel status {sol.status}")
            x = np.array(sol.x, dtype=float)
            if self._osqp is not None:  # give OSQP the good point to warm start from next time
                self._osqp.warm_start(x=x)
        dt = time.perf_counter() - t0
        H = self.hours
        c = np.maximum(x[:H], 0.0)
        d = np.maximum(x[H:], 0.0)
        soc = self._shift + self._L @ (self.ev.eta_charge * c - d / self.ev.eta_discharge)
        self.last = EVStep(p_mw=d - c, soc_mwh=soc, charge_mw=c, discharge_mw=d, iterations=iterations,
                           solve_time_s=dt, backend=used)
        return self.last


class HourlyLocalSolver:
    """The closed-form local update of an HourlyPeer behind the same interface as EVLocalSolver."""

    def __init__(self, peer: HourlyPeer):
        self.peer = peer

    def solve(self, target: np.ndarray, rho: float) -> np.ndarray:
        return hourly_local_update(self.peer, target, rho)


def local_solver(model, hours: int, ev_backend: str = "osqp") -> HourlyLocalSolver | EVLocalSolver:
    """The object a peer keeps for the whole run: ``solve(target, rho)``."""
    if isinstance(model, EVModel):
        return EVLocalSolver(model, hours, backend=ev_backend)
    if isinstance(model, HourlyPeer):
        return HourlyLocalSolver(model)
    raise TypeError(f"no local update for {type(model).__name__}")


def local_update(model, target: np.ndarray, rho: float) -> np.ndarray:
    """A peer's ADMM step: its new net injection p (H,) [MW] for ``target`` = z - u.

    ``model``: an HourlyPeer (closed form), an EVLocalSolver (re-solve; its ``last`` holds the
    SOC trajectory) or an EVModel (builds a one-off EVLocalSolver: slow, for tests and scripts;
    a peer process keeps an EVLocalSolver instead).
    """
    if isinstance(model, HourlyPeer):
        return hourly_local_update(model, target, rho)
    if isinstance(model, EVLocalSolver):
        return model.solve(target, rho).p_mw
    if isinstance(model, EVModel):
        return EVLocalSolver(model, len(np.atleast_1d(target))).solve(target, rho).p_mw
    if isinstance(model, HourlyLocalSolver):
        return model.solve(target, rho)
    raise TypeError(f"no local update for {type(model).__name__}")


def peer_cost_eur(model, p_mw: np.ndarray, soc_step: EVStep | None = None) -> float:
    """Peer's cost over the day at net injection p (an EV: degradation on its discharge)."""
    if isinstance(model, EVModel):
        d = soc_step.discharge_mw if soc_step is not None else np.maximum(p_mw, 0.0)
        return float(model.degradation_eur_per_mwh * np.sum(d))
    return float(np.sum(model.cost_eur(np.asarray(p_mw, dtype=float))))


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


# ----------------------------------------------------------------------------------------------
# In-process reference loop
# ----------------------------------------------------------------------------------------------


@dataclass
class CommunityADMMResult:
    peer_ids: list[str]
    p_mw: np.ndarray  # (N, H) peers' injections
    z_mw: np.ndarray  # (N, H) network agent's copy
    u: np.ndarray  # (N, H) scaled duals [MW]
    rho: float  # final rho
    prices_eur_per_mwh: np.ndarray  # (N, H) price paid to each peer, -rho u
    iterations: int
    converged: bool
    primal_residual: float
    dual_residual: float
    history: list[tuple[int, float, float, float]]  # (iteration, primal, dual, rho used)
    network: NetworkSolution  # last z-update
    ev_soc_mwh: dict[str, np.ndarray]
    cost_eur: float  # sum of peers' costs at p + network cost (comparable with solve_community)
    wall_time_s: float
    network_solve_s: list[float] = field(default_factory=list)
    ev_solve_s: list[float] = field(default_factory=list)  # every EV solve
    ev_fallbacks: int = 0  # EV solves OSQP left to Clarabel


def run_community_admm(models: list, agent: NetworkAgent, rho: float, tolerance: float = 1e-4,
                       max_iterations: int = 2000, policy: RhoPolicy | None = None, residual_balancing: bool = True,
                       mu: float = 10.0, tau: float = 2.0, every: int = 10, until: int = 2000,
                       initial_price_eur_per_mwh=None, initial_z_mw: np.ndarray | None = None,
                       solvers: list | None = None, ev_backend: str = "osqp") -> CommunityADMMResult:
    """The distributed loop with the same numerics, in one process.

    ``policy``: a RhoPolicy (its rho overrides ``rho``); otherwise one is made from
    residual_balancing / mu / tau / every / until. ``initial_price_eur_per_mwh``: starting prices
    (scalar, (H,) or (N, H)), e.g. the import price: u^0 = -price / rho. ``initial_z_mw``: z^0
    (default zeros). ``solvers``: prebuilt local solvers (``local_solver``), one per model;
    otherwise built here with ``ev_backend`` for the EVs.
    """
    t_start = time.perf_counter()
    N, H = len(models), agent.hours
    if N != agent.n_peers:
        raise ValueError(f"{N} models but the network agent was built for {agent.n_peers} peers")
    if policy is None:
        policy = RhoPolicy(rho, residual_balancing, mu, tau, every, until)
    rho = policy.rho
    locals_ = solvers if solvers is not None else [local_solver(m, H, ev_backend) for m in models]
    z = np.zeros((N, H)) if initial_z_mw is None else np.array(initial_z_mw, dtype=float)
    u = np.zeros((N, H))
    if initial_price_eur_per_mwh is not None:
        u = -np.broadcast_to(np.asarray(initial_price_eur_per_mwh, dtype=float), (N, H)) / rho
    p = np.zeros((N, H))
    history: list[tuple[int, float, float, float]] = []
    ev_times: list[float] = []
    r = s = np.inf
    ok = False
    it = 0
    net = None
    for it in range(1, max_iterations + 1):
        target = z - u
        for n, loc in enumerate(locals_):
            if isinstance(loc, EVLocalSolver):
                step = loc.solve(target[n], rho)
                p[n] = step.p_mw
                ev_times.append(step.solve_time_s)
            else:
                p[n] = loc.solve(target[n], rho)
        net = agent.solve(p + u, rho)
        z_new = net.z_mw
        u += p - z_new
        r = float(np.linalg.norm(p - z_new))
        s = float(rho * np.linalg.norm(z_new - z))
        z = z_new
        history.append((it, r, s, rho))
        if converged(r, s, tolerance):
            ok = True
            break
        new_rho = policy.update(it, r, s)
        if new_rho != rho:
            u *= rho / new_rho
            rho = new_rho

    ev_soc = {loc.ev.id: loc.last.soc_mwh.copy() for loc in locals_ if isinstance(loc, EVLocalSolver) and loc.last}
    cost = sum(peer_cost_eur(m, p[n], locals_[n].last if isinstance(locals_[n], EVLocalSolver) else None)
               for n, m in enumerate(models)) + net.network_cost_eur
    return CommunityADMMResult(
        peer_ids=[m.id for m in models], p_mw=p.copy(), z_mw=z.copy(), u=u.copy(), rho=rho,
        prices_eur_per_mwh=-rho * u, iterations=it, converged=ok, primal_residual=r, dual_residual=s,
        history=history, network=net, ev_soc_mwh=ev_soc, cost_eur=float(cost),
        wall_time_s=time.perf_counter() - t_start, network_solve_s=list(agent.solve_times_s[-it:]), ev_solve_s=ev_times,
        ev_fallbacks=sum(loc.fallbacks for loc in locals_ if isinstance(loc, EVLocalSolver)),
    )
