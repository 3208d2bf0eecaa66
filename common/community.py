"""Pure numerics of the distributed community market (poster; SPEC 3.3): consensus ADMM between
the peers (loads, PV, CHP, EVs) and the network agent (the DSO), all hours at once. No sockets:
the peers' local updates live here, the network agent's z-update in ``dso_service.network_agent``
and the one loop in ``coordinator.clearing``.

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
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

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
