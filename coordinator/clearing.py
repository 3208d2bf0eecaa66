"""The coordinator's side of each market's ADMM: pure state machines (no sockets, no clock).

This is the one implementation of the clearing loops; the coordinator engine
(``coordinator.engine``) drives it with the messages of whichever driver runs it. Timings come from
the ``timer`` handed in (``time.perf_counter`` in both drivers).

Events in: ``on_update(host, Update)`` (relay topology: the hosts' new trades) or
``on_residuals(host, Residuals)`` (mesh topology: trades went peer to peer, only residual sums
come here). When every host has answered the current iteration the machine computes the
residuals, adapts rho (residual balancing), decides convergence and returns the instructions:
a list of ``(host, Round)`` to send. ``finished`` tells when the loop is over.

Iteration k (k = 1, 2, ...):
  ROUND(k) carries rho_k and, in relay, every peer's partners' trades of iteration k-1;
  each peer first updates its prices with the partners' trades (using the rho it solved with),
  then solves its local problem with rho_k and answers UPDATE(k) with its new trades (relay),
  or sends them to its partners and answers RESIDUALS(k) (mesh).
  The final ROUND has ``stop`` set: peers do the last price update and answer RESULT.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from common.admm import Anderson, AndersonCoefficients, BlockAnderson, InfeasibilityWatch, RhoPolicy, converged, infeasible_hours
from common.market import TradeGraph
from common.protocol.grid import NetworkUpdate
from common.protocol.market import ResidualsPeer, Round, RoundPeer


@dataclass
class RoundSettings:
    rho: float
    tolerance: float
    max_iterations: int
    residual_balancing: bool = True
    mu: float = 10.0
    tau: float = 2.0
    every: int = 10
    until: int = 2000
    topology: str = "relay"
    # Anderson acceleration of the P2P relay loop (rho frozen from ``aa_start`` on)
    acceleration: bool = False
    aa_memory: int = 20
    aa_safeguard: float = 1.0
    aa_start: int = 0
    price_init_eur_per_mwh: float = 0.0
    # per-hour stopping (full P2P market): an hour whose residuals are below tolerance / sqrt(hours)
    # closes (its trades and prices are final); rounds and answers carry the open hours only
    hour_stopping: bool = False
    infeasibility_window: int = 50  # common.admm.InfeasibilityWatch; 0: off


@dataclass
class IterationStats:
    iteration: int
    primal_residual: float
    dual_residual: float
    rho: float
    solve_s_max: float  # slowest host's local solves (critical path)
    solve_s_sum: float  # all local solves (CPU)
    coordinator_s: float
    wall_s: float
    network_s: float = 0.0  # the network agent's update (community market), on the critical path
    open_hours: int = 0  # hours solved in this iteration (per-hour stopping)


@dataclass
class P2PRounds:
    graph: TradeGraph
    hosts: dict[str, list[str]]  # host id -> hosted peer ids
    hours: int
    settings: RoundSettings
    history: list[IterationStats] = field(default_factory=list)
    # an outer loop re-clears warm-started: iterations keep counting from ``start_iteration`` and
    # the trades start from ``warm_trades_mw`` (K, H), the previous clearing's
    start_iteration: int = 0
    warm_trades_mw: np.ndarray | None = None
    timer: Callable[[], float] = time.perf_counter
    # a clearing from a pool price starts from these trade prices (K, H), with ``warm_trades_mw``
    # the matching trades: the first ROUND hands every peer its start (both topologies)
    start_prices: np.ndarray | None = None
    # the prices the peers hold when this clearing starts (K, H): the previous clearing's, or the
    # public starting price; the coordinator mirrors them to accelerate (relay)
    warm_prices: np.ndarray | None = None
    # the first ROUND of a clearing from ``start_prices`` also sets each peer's own trades (from
    # ``warm_trades_mw``) instead of the reciprocal of its partners' ones: a clearing that goes on
    # from a running one (a peer host dropped)
    start_own: bool = False

    def __post_init__(self):
        index = {pid: n for n, pid in enumerate(self.graph.peer_ids)}
        self.peer_trades = {pid: self.graph.partners_of(index[pid]) for pid in self.graph.peer_ids}
        # where each peer's partners' trades towards it sit in the flat trade matrix (fixed per run)
        self.peer_incoming = {pid: self.graph.reverse[k] for pid, k in self.peer_trades.items()}
        self.flat = (np.zeros((self.graph.n_pairs, self.hours)) if self.warm_trades_mw is None
                     else np.array(self.warm_trades_mw, dtype=float))
        st = self.settings
        self.policy = RhoPolicy(st.rho, st.residual_balancing, st.mu, st.tau, st.every, st.until)
        self.rho = st.rho
        self.iteration = self.start_iteration
        self.finished = False
        self.converged = False
        self._waiting: set[str] = set()
        self._dual_sq = self._primal_sq = self._solve_max = self._solve_sum = 0.0
        self._t_sent = self.timer()
        self.statuses: dict[str, str] = {}
        # the state the peers start the iteration from: their trades and their (updated) prices
        self.x_state = self.flat.copy()
        self.lam_eff = (self.start_prices.copy() if self.start_prices is not None
                        else np.array(self.warm_prices, dtype=float) if self.warm_prices is not None
                        else np.full(self.flat.shape, float(st.price_init_eur_per_mwh)))
        # the hours are independent problems: each extrapolates with its own coefficients; relay:
        # the coordinator holds the whole state; mesh: each host holds its peers' part and answers
        # the sums the coefficients need (AndersonMemory in the peers), the coordinator the rest
        relay = st.topology == "relay"
        self.anderson = BlockAnderson(st.aa_memory, st.aa_safeguard) if st.acceleration and relay else None
        self.aa_coef = AndersonCoefficients(st.aa_memory, st.aa_safeguard) if st.acceleration and not relay else None
        self._aa_sums: list | None = None  # mesh: the hosts' summed (col, rhs, f_sq) of this iteration
        self._aa_next: tuple | None = None  # mesh: (gamma, rejected rows) for the next ROUND
        self._override = False
        # per-hour stopping: the hours still open, the ones being solved (None: every hour) and the
        # ones the ROUND's arrays cover (solved in the previous iteration); per-hour residuals
        H = self.hours
        self.open = np.ones(H, dtype=bool)
        self.solving: np.ndarray | None = None
        self.prev: np.ndarray | None = None
        self.primal_h = np.zeros(H)
        self.dual_h = np.zeros(H)
        self._aa_cols: np.ndarray | None = None
        self.watch = InfeasibilityWatch(st.tolerance, st.infeasibility_window)
        self.infeasible = False
        self.infeasible_hours: list[int] | None = None  # named from the per-hour primal residuals

    # -- instructions ----------------------------------------------------------------------
    def start(self) -> list[tuple[str, Round]]:
        return self._next_round(stop=False)

    def pending(self) -> set[str]:
        """Hosts that have not answered the current iteration."""
        return set(self._waiting)

    @staticmethod
    def _cols(hours: np.ndarray | None):
        return slice(None) if hours is None else hours

    def _round_for(self, host: str, stop: bool) -> Round:
        """The ROUND of one host: its peers' arrays in the hours solved in the previous iteration
        (every hour at the start), and the hours to solve now."""
        peers = {}
        c = self._cols(self.prev)
        first = self.start_prices is not None and self.iteration == self.start_iteration + 1 and not stop
        if first:
            for pid in self.hosts[host]:
                peers[pid] = RoundPeer(p_in_mw=self.flat[self.peer_incoming[pid]],
                                       price_eur_per_mwh=self.start_prices[self.peer_trades[pid]],
                                       p_own_mw=self.flat[self.peer_trades[pid]] if self.start_own else None)
        elif self._override and not stop:  # an accelerated point: every peer's state is set
            for pid in self.hosts[host]:
                own = self.peer_trades[pid]
                peers[pid] = RoundPeer(p_in_mw=self.flat[self.peer_incoming[pid]][:, c],
                                       price_eur_per_mwh=self.lam_eff[own][:, c], p_own_mw=self.flat[own][:, c])
        elif self.settings.topology == "relay":
            for pid in self.hosts[host]:
                peers[pid] = RoundPeer(p_in_mw=self.flat[self.peer_incoming[pid]][:, c])
        if self.aa_coef is not None and not stop:
            gamma, rejected, drift = self._aa_next if self._aa_next is not None else (None, None, None)
            return Round(rho=self.rho, stop=stop, peers=peers, hours=self.solving,
                         aa_memory=self.settings.aa_memory if self._aa_recording() else 0, aa_gamma=gamma,
                         aa_rejected=rejected, aa_drift=drift)
        return Round(rho=self.rho, stop=stop, peers=peers, hours=None if stop else self.solving)

    def _aa_recording(self) -> bool:
        """Mesh acceleration: whether the hosts record the differences of the current iteration."""
        return self.aa_coef is not None and self.iteration - self.start_iteration >= self.settings.aa_start

    def _next_round(self, stop: bool) -> list[tuple[str, Round]]:
        self.prev = self.solving
        if not stop:
            self.iteration += 1
            self.solving = None if self.open.all() else np.flatnonzero(self.open)
        n = self.hours if self.solving is None else len(self.solving)
        self._waiting = set(self.hosts) if not stop else set()
        self._dual_sq = np.zeros(n)
        self._primal_sq = np.zeros(n)
        self._solve_max = self._solve_sum = 0.0
        out = [(host, self._round_for(host, stop)) for host in self.hosts]
        self._aa_next = None
        self._aa_sums = [np.zeros((n, self.settings.aa_memory)), np.zeros((n, self.settings.aa_memory)), np.zeros(n)] \
            if self._aa_recording() and not stop else None
        self._t_sent = self.timer()
        return out

    # -- events ----------------------------------------------------------------------------
    def _account(self, host: str, records: dict) -> None:
        if host not in self._waiting:
            raise ValueError(f"host {host} answered iteration {self.iteration} twice or was not asked")
        unknown = set(records) - set(self.hosts[host])
        if unknown or len(records) != len(self.hosts[host]):
            raise ValueError(f"host {host} answered for peers {sorted(records)}, expected {self.hosts[host]}")
        n = len(self._dual_sq)
        for pid, rec in records.items():  # refuse a bad answer whole, before anything is counted
            if rec.dual_sq.shape != (n,):
                raise ValueError(f"peer {pid} sent residuals of {rec.dual_sq.shape[0]} hours, expected {n}")
        self._waiting.discard(host)
        host_solve = 0.0
        for pid, rec in records.items():
            self._dual_sq += rec.dual_sq
            if isinstance(rec, ResidualsPeer):  # mesh; in the relay topology the trades give the primal residual
                self._primal_sq += rec.primal_sq
            host_solve += rec.solve_s
            if rec.status != "ok":
                self.statuses[pid] = rec.status
        self._solve_max = max(self._solve_max, host_solve)
        self._solve_sum += host_solve

    def on_update(self, host: str, update) -> list[tuple[str, Round]]:
        n = self.hours if self.solving is None else len(self.solving)
        for pid, rec in update.peers.items():  # refuse a bad answer whole, before anything is counted
            k = self.peer_trades.get(pid)
            if k is not None and rec.p_out_mw.shape != (len(k), n):
                raise ValueError(f"peer {pid} sent trades of shape {rec.p_out_mw.shape}, expected {(len(k), n)}")
        self._account(host, update.peers)
        for pid, rec in update.peers.items():
            if self.solving is None:
                self.flat[self.peer_trades[pid]] = rec.p_out_mw
            else:
                self.flat[np.ix_(self.peer_trades[pid], self.solving)] = rec.p_out_mw
        return self._maybe_complete()

    def _accelerate(self, lam_new: np.ndarray) -> None:
        """The next state from Anderson acceleration of (trades, prices) -> (trades, prices) at a
        fixed rho, hour by hour, in the scaled variables (sqrt(rho) x, lam / sqrt(rho)), over the
        open hours (an hour that has just closed keeps the plain step and leaves the memory)."""
        cols = np.flatnonzero(self.open)
        if self._aa_cols is not None and len(cols) != len(self._aa_cols):
            self.anderson.keep(np.isin(self._aa_cols, cols))
        self._aa_cols = cols
        s = np.sqrt(self.rho)
        pack = lambda x, lam: np.concatenate([s * x[:, cols].T, lam[:, cols].T / s], axis=1)  # noqa: E731
        z = pack(self.x_state, self.lam_eff)
        t = pack(self.flat, lam_new)
        nxt = self.anderson.step(z, t)
        K = len(self.flat)
        x_next, lam_next = self.flat.copy(), lam_new.copy()
        x_next[:, cols] = nxt[:, :K].T / s
        lam_next[:, cols] = nxt[:, K:].T * s
        self._override = not np.array_equal(nxt, t)  # else the peers' own plain step is the same state
        self.flat, self.x_state, self.lam_eff = x_next, x_next.copy(), lam_next

    def on_residuals(self, host: str, residuals) -> list[tuple[str, Round]]:
        sums = (residuals.aa_col, residuals.aa_rhs, residuals.aa_f_sq)
        if self._aa_sums is not None:  # refuse a bad answer whole, before anything is counted
            if any(a is None or a.shape != b.shape for a, b in zip(sums, self._aa_sums)):
                raise ValueError(f"host {host} sent acceleration sums of shapes "
                                 f"{[None if a is None else a.shape for a in sums]}, expected {[b.shape for b in self._aa_sums]}")
        elif residuals.aa_col is not None:
            raise ValueError(f"host {host} sent acceleration sums that were not asked for")
        self._account(host, residuals.peers)
        if self._aa_sums is not None:
            for total, part in zip(self._aa_sums, sums):
                total += part
        return self._maybe_complete()

    def _accelerate_mesh(self) -> None:
        """Mesh: the coefficients of the open hours from the hosts' sums (the hosts extrapolate)."""
        cols = np.flatnonzero(self.open)
        if self._aa_cols is not None and len(cols) != len(self._aa_cols):
            self.aa_coef.keep(np.isin(self._aa_cols, cols))
        self._aa_cols = cols
        solved = np.arange(self.hours) if self.solving is None else self.solving
        rows = np.isin(solved, cols)
        gamma, reject = self.aa_coef.step(*(a[rows] for a in self._aa_sums))
        self._aa_next = (gamma, np.flatnonzero(reject), self.aa_coef.drift_m)

    def _maybe_complete(self) -> list[tuple[str, Round]]:
        if self._waiting:
            return []
        t0 = self.timer()
        wall = t0 - self._t_sent
        c = self._cols(self.solving)
        mismatch = None
        if self.settings.topology == "relay":  # p_nm + p_mn of the hours just solved
            solved = self.flat[:, c]
            mismatch = solved + solved[self.graph.reverse]
            self.primal_h[c] = np.sqrt(np.sum(mismatch**2, axis=0))
        else:
            self.primal_h[c] = np.sqrt(self._primal_sq)
        # a closed hour's state is frozen: its primal residual stays, its dual residual is zero
        self.dual_h[~self.open] = 0.0
        self.dual_h[c] = self.rho * np.sqrt(self._dual_sq)
        primal = float(np.sqrt(np.sum(self.primal_h**2)))
        dual = float(np.sqrt(np.sum(self.dual_h**2)))
        rho_used = self.rho
        n_solved = self.hours if self.solving is None else len(self.solving)
        st = self.settings
        if st.hour_stopping:
            tol_h = st.tolerance / np.sqrt(self.hours)  # all hours closed: the day within tolerance
            self.open &= ~((self.primal_h <= tol_h) & (self.dual_h <= tol_h))
        done = converged(primal, dual, st.tolerance) or not self.open.any()
        if self.statuses:
            done = True  # a peer could not solve: stop and report
        local = self.iteration - self.start_iteration
        out_of_iterations = local >= st.max_iterations
        if not done and self.watch.observe(primal, dual / rho_used, rho_used):
            self.infeasible = out_of_iterations = True
            self.infeasible_hours = infeasible_hours(self.primal_h, st.tolerance)
        relay = self.settings.topology == "relay"
        if relay:  # mirror the state the peers hold (the acceleration, and a clearing going on after a drop)
            lam_new = self.lam_eff.copy()
            lam_new[:, c] -= 0.5 * rho_used * mismatch
        accelerated = False
        if done or out_of_iterations:
            self.finished = True
            self.converged = done and not self.statuses
        elif self.anderson is not None and local >= st.aa_start:
            self._accelerate(lam_new)
            accelerated = True
        elif self._aa_sums is not None:
            self._accelerate_mesh()
        else:
            self.rho = self.policy.update(local, primal, dual)
        if relay and not accelerated:  # the plain step: the peers update themselves
            self.x_state, self.lam_eff, self._override = self.flat.copy(), lam_new, False
        self.primal_residual, self.dual_residual = primal, dual
        self.history.append(IterationStats(self.iteration, primal, dual, rho_used, self._solve_max, self._solve_sum,
                                           self.timer() - t0, wall, open_hours=n_solved))
        return self._next_round(stop=self.finished)


@dataclass
class CommunityRounds:
    """Consensus ADMM of the community market (SPEC 3.3), scaled form, all hours at once:

    ROUND(k) to every peer host with its peers' targets z - u (and rho); UPDATE(k) back with the
    peers' new injections p; then NETWORK_UPDATE(k) to the DSO's network agent with v = p + u;
    NETWORK_RESULT(k) with z; then u += p - z, residuals (primal ||p - z||, dual rho ||dz||),
    rho policy (u rescaled when rho changes), convergence. Prices paid to the peers: -rho u.
    Instructions are ``(destination, message)`` with destination a host id or ``"dso"``.
    """

    peer_ids: list[str]
    hosts: dict[str, list[str]]
    hours: int
    settings: RoundSettings
    history: list[IterationStats] = field(default_factory=list)
    timer: Callable[[], float] = time.perf_counter

    def __post_init__(self):
        N, H = len(self.peer_ids), self.hours
        self.index = {pid: n for n, pid in enumerate(self.peer_ids)}
        self.p = np.zeros((N, H))
        self.z = np.zeros((N, H))
        st = self.settings
        # a public starting price (e.g. the tariff): the price paid to a peer is -rho u
        self.u = np.full((N, H), -st.price_init_eur_per_mwh / st.rho)
        self.policy = RhoPolicy(st.rho, st.residual_balancing, st.mu, st.tau, st.every, st.until)
        self.rho = st.rho
        self.iteration = 0
        self.finished = self.converged = False
        self.statuses: dict[str, str] = {}
        self.primal_residual = self.dual_residual = float("nan")
        self._waiting: set[str] = set()
        self._solve_max = self._solve_sum = 0.0
        self.network_s = 0.0
        self.network = None  # last NetworkResult
        # Anderson acceleration of the map (z, u) -> (z, u): the coordinator holds the whole state
        self.anderson = Anderson(st.aa_memory, st.aa_safeguard) if st.acceleration else None
        self.watch = InfeasibilityWatch(st.tolerance, st.infeasibility_window)
        self.infeasible = False
        self.infeasible_hours: list[int] | None = None

    def pending(self) -> set[str]:
        return set(self._waiting)

    def start(self):
        return self._next_round(stop=False)

    def _next_round(self, stop: bool):
        if not stop:
            self.iteration += 1
        self._waiting = set() if stop else set(self.hosts)
        self._solve_max = self._solve_sum = 0.0
        self._t_sent = self.timer()
        target = self.z - self.u
        return [(host, Round(rho=self.rho, stop=stop,
                             peers={pid: RoundPeer(p_in_mw=target[self.index[pid]][None, :]) for pid in peers}))
                for host, peers in self.hosts.items()]

    def on_update(self, host: str, update):
        if host not in self._waiting:
            raise ValueError(f"host {host} answered iteration {self.iteration} twice or was not asked")
        if set(update.peers) != set(self.hosts[host]):
            raise ValueError(f"host {host} answered for peers {sorted(update.peers)}, expected {self.hosts[host]}")
        for pid, rec in update.peers.items():  # refuse a bad answer whole, before anything is counted
            if rec.p_out_mw.shape != (1, self.hours):
                raise ValueError(f"peer {pid} sent an injection of shape {rec.p_out_mw.shape}, expected {(1, self.hours)}")
        self._waiting.discard(host)
        host_solve = 0.0
        for pid, rec in update.peers.items():
            self.p[self.index[pid]] = rec.p_out_mw[0]
            host_solve += rec.solve_s
            if rec.status != "ok":
                self.statuses[pid] = rec.status
        self._solve_max = max(self._solve_max, host_solve)
        self._solve_sum += host_solve
        if self._waiting:
            return []
        if self.statuses:
            self.finished = True
            return []
        self._waiting = {"dso"}
        self._t_network = self.timer()
        return [("dso", NetworkUpdate(rho=self.rho, arrays={"v_mw": self.p + self.u}))]

    def on_network(self, result):
        if "dso" not in self._waiting:
            raise ValueError("a network result that was not asked for")
        if result.status != "ok":
            self.statuses["dso"] = result.status
            self.finished = True
            return []
        z_new = result.arrays["z_mw"]
        if z_new.shape != self.z.shape:
            raise ValueError(f"network agent sent z of shape {z_new.shape}, expected {self.z.shape}")
        t0 = self.timer()
        self.network_s = t0 - self._t_network
        self.network = result
        wall = t0 - self._t_sent
        dual = self.rho * float(np.linalg.norm(z_new - self.z))
        z_old, u_old = self.z, self.u
        self.z = z_new
        self.u = self.u + self.p - self.z
        primal = float(np.linalg.norm(self.p - self.z))
        rho_used = self.rho
        self.primal_residual, self.dual_residual = primal, dual
        if converged(primal, dual, self.settings.tolerance):
            self.finished = self.converged = True
        elif self.iteration >= self.settings.max_iterations:
            self.finished = True
        elif self.watch.observe(primal, dual / rho_used, rho_used):
            self.finished = self.infeasible = True
            self.infeasible_hours = infeasible_hours(np.linalg.norm(self.p - self.z, axis=0), self.settings.tolerance)
        elif self.anderson is not None and self.iteration > self.settings.aa_start:
            # rho frozen: the next point extrapolated from the last (z, u) -> (z+, u+) steps; the
            # peers and the network agent are memoryless, so the next ROUND's targets carry it
            nxt = self.anderson.step(np.concatenate([z_old.ravel(), u_old.ravel()]),
                                     np.concatenate([self.z.ravel(), self.u.ravel()]))
            n = self.z.size
            self.z, self.u = nxt[:n].reshape(self.z.shape), nxt[n:].reshape(self.u.shape)
        else:
            new_rho = self.policy.update(self.iteration, primal, dual)
            if new_rho != self.rho:
                self.u *= self.rho / new_rho
                self.rho = new_rho
        self.history.append(IterationStats(self.iteration, primal, dual, rho_used, self._solve_max, self._solve_sum,
                                           self.timer() - t0, wall, self.network_s))
        return self._next_round(stop=self.finished)

    @property
    def prices_eur_per_mwh(self) -> np.ndarray:
        """The price paid to each peer per MWh it injects, per hour (-rho u)."""
        return -self.rho * self.u


@dataclass
class AsyncP2PRounds(P2PRounds):
    """The coordinator's side of the asynchronous mesh (``market.staleness`` S >= 1;
    ``peer_node.engine.AsyncMesh``): one ROUND starts every host's own iterations; RESIDUALS(i)
    come from each host once its partners' trades of iteration i are in, at most S + 1 iterations
    apart, and are summed per iteration. Iteration i is complete when every host has answered it:
    residuals (the synchronous definitions), convergence, the infeasibility watch and the cap on
    iterations as in the synchronous rounds; rho stays fixed (residual balancing would need every
    peer to change it at the same iteration) and every hour stays open. When it is over, ROUND
    with ``stop`` to every host."""

    def __post_init__(self):
        super().__post_init__()
        self._acc: dict[int, list] = {}  # iteration -> [hosts waiting, primal_sq, dual_sq, solve max, solve sum]
        self._t_last = self.timer()

    def start(self) -> list[tuple[str, Round]]:
        out = super().start()  # ROUND(start + 1): the start (pool price) or just rho
        self.done_iteration = self.start_iteration
        self._t_last = self.timer()
        return out

    def pending(self) -> set[str]:
        acc = self._acc.get(self.done_iteration + 1)
        return set(self.hosts) if acc is None else set(acc[0])

    def on_residuals_at(self, host: str, iteration: int, residuals) -> list[tuple[str, Round]]:
        if self.finished:
            return []
        if iteration <= self.done_iteration or iteration > self.start_iteration + self.settings.max_iterations:
            raise ValueError(f"residuals of iteration {iteration} from {host} (complete up to {self.done_iteration})")
        recs = residuals.peers
        if set(recs) != set(self.hosts.get(host, ())):
            raise ValueError(f"host {host} answered for peers {sorted(recs)}, expected {self.hosts.get(host)}")
        for pid, rec in recs.items():
            if rec.dual_sq.shape != (self.hours,) or rec.primal_sq.shape != (self.hours,):
                raise ValueError(f"peer {pid} sent residuals of {rec.dual_sq.shape[0]} hours, expected {self.hours}")
        H = self.hours
        acc = self._acc.setdefault(iteration, [set(self.hosts), np.zeros(H), np.zeros(H), 0.0, 0.0])
        if host not in acc[0]:
            raise ValueError(f"host {host} answered iteration {iteration} twice")
        acc[0].discard(host)
        solve = 0.0
        for pid, rec in recs.items():
            acc[1] += rec.primal_sq
            acc[2] += rec.dual_sq
            solve += rec.solve_s
            if rec.status != "ok":
                self.statuses[pid] = rec.status
        acc[3], acc[4] = max(acc[3], solve), acc[4] + solve
        while not self.finished and self.done_iteration + 1 in self._acc and not self._acc[self.done_iteration + 1][0]:
            self._complete(self._acc.pop(self.done_iteration + 1))
        return self._next_round(stop=True) if self.finished else []

    def _complete(self, acc) -> None:
        t0 = self.timer()
        self.done_iteration += 1
        self.iteration = self.done_iteration
        self.primal_h = np.sqrt(acc[1])
        self.dual_h = self.rho * np.sqrt(acc[2])
        primal, dual = float(np.sqrt(acc[1].sum())), float(self.rho * np.sqrt(acc[2].sum()))
        st = self.settings
        done = converged(primal, dual, st.tolerance) or bool(self.statuses)
        local = self.iteration - self.start_iteration
        if done or local >= st.max_iterations:
            self.finished = True
            self.converged = done and not self.statuses
        elif self.watch.observe(primal, dual / self.rho, self.rho):
            self.finished = self.infeasible = True
            self.infeasible_hours = infeasible_hours(self.primal_h, st.tolerance)
        self.primal_residual, self.dual_residual = primal, dual
        self.history.append(IterationStats(self.iteration, primal, dual, self.rho, acc[3], acc[4], self.timer() - t0,
                                           t0 - self._t_last, open_hours=self.hours))
        self._t_last = t0
