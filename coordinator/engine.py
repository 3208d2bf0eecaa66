"""The coordinator engine: registry, market clearing and the TSO/DSO outer loop, as one
``handle(event) -> instructions`` object built from the public scenario only.

The run is written as one sequential procedure (a generator): it ``yield``s whenever it waits for a
message and gets the next event back, so that the order of the dialog reads top to bottom:

1. registration: every peer host says HELLO (with its peers and their public keys), gets WELCOME
   (its peers' partners, the mesh addresses, every peer's public key) and answers READY; the DSO and
   TSO services may register at any time;
2. clearing: the ADMM rounds of ``coordinator.clearing`` (P2P relay or mesh, community market), or,
   for the reference run, a centralized clearing (``CentralizedClearing``, in-process only);
3. benchmark and community: the TSO's request and the DSO's AC check; models cong, volt, freq and
   full: the outer loop (TSO first, then AC check with the DSO's plan, PENALTY to the peers
   concerned, warm re-clear) until the grid is feasible or the DSO gives up;
4. ``Finish(RunOutcome)``: everything the results need (``coordinator.results`` builds the tables).

Any wait ends on a ``Deadline`` with a failure that names the silent roles. The coordinator never
sees a peer's cost: welfare is the unmasked sum of the peers' masked costs (``common.secagg``).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from common.engine import COORDINATOR, Deadline, Fail, Finish, Log, Note, Received, Send, Started
from common.partners import public_graph
from common.protocol.control import Hello, Ready, Shutdown, Welcome
from common.protocol.frequency import FreqQuery, FreqRequest
from common.protocol.grid import Dispatch, GridReport, NetworkResult
from common.admm import pool_start
from common.protocol.market import Penalty, PoolPrice, PoolQuantity, PriceProbe, QuantitySum, Residuals, Result, Update
from common.secagg import NANO_MW_PER_MW, unmask_sum
from coordinator.clearing import AsyncP2PRounds, CommunityRounds, P2PRounds, RoundSettings

SERVICES = ("dso", "tso")


class RunFailure(RuntimeError):
    """The run cannot go on; ``role`` is to blame, the message says why."""

    def __init__(self, role: str, reason: str):
        super().__init__(reason)
        self.role = role


@dataclass
class Cleared:
    """One clearing of the market (arrays in roster order of the market's peers)."""

    p_mw: np.ndarray  # (N, H)
    q_mvar: np.ndarray  # (N, H)
    sw_eur: np.ndarray  # (H,) social welfare (peers' true costs and utilities)
    diff_eur: np.ndarray  # (H,)
    flex_eur: np.ndarray  # (H,)
    converged: bool
    rounds: object = None  # P2PRounds | CommunityRounds | None (centralized)
    trades_mw: np.ndarray | None = None  # (K, H) full P2P market
    prices_eur_per_mwh: np.ndarray | None = None  # (K, H)
    results: dict = field(default_factory=dict)  # peer id -> ResultPeer (community: SOC)
    fees_eur: np.ndarray | None = None  # (K, H) the differentiation fee paid by each trade's owner


@dataclass
class RunOutcome:
    clearings: list[Cleared]
    report: GridReport  # the last AC check
    report_initial: GridReport  # the first AC check (outer loop)
    virtual_load_mw: np.ndarray
    solver: str
    outer: dict | None = None  # status, reason, history rows, hour table, sw_before, p/q before
    penalty_log: list = field(default_factory=list)
    timing: dict = field(default_factory=dict)
    hosts: dict = field(default_factory=dict)
    services: tuple = ()
    rejected: dict = field(default_factory=dict)


class CentralizedClearing:
    """The reference clearing in place of the ADMM rounds: the centralized QP over every peer's
    model. It sees every peer's costs by definition, so it only ever runs in process."""

    def __init__(self, models: list):
        self.base = {m.id: m for m in models}
        self.params: dict[str, dict] = {m.id: {} for m in models}

    def penalize(self, peers: dict) -> None:
        for pid, params in peers.items():
            self.params[pid].update(params)

    def clear(self, graph) -> Cleared:
        from common import centralized
        from common.models import apply_parameters, flex_penalty_eur, reactive_mvar

        from common.market import fee_weights

        ids = graph.peer_ids
        models = [apply_parameters(self.base[i], self.params[i]) for i in ids]
        weights = np.zeros((graph.n_pairs, models[0].p_min_mw.shape[0]))
        base = fee_weights(graph, [self.base[i] for i in ids])  # the peers' own fees (differentiation as data)
        if base is not None:
            weights += base[:, None]
        for n, pid in enumerate(ids):
            if "diff_eur_per_mwh" in self.params[pid]:
                weights[graph.partners_of(n)] += self.params[pid]["diff_eur_per_mwh"]
        sol = centralized.solve_p2p(models, weights, graph=graph)
        sw = -np.sum([self.base[i].cost_eur(sol.p_mw[n]) for n, i in enumerate(ids)], axis=0)
        diff = np.sum(weights * sol.trades_mw, axis=0)
        flex = np.sum([flex_penalty_eur(self.base[i], self.params[i]) for i in ids], axis=0)
        q = np.vstack([reactive_mvar(models[n], sol.p_mw[n]) for n in range(len(ids))])
        return Cleared(sol.p_mw, q, sw, diff, flex, True, None, sol.trades_mw, sol.prices_eur_per_mwh,
                       fees_eur=weights * sol.trades_mw)


class CoordinatorEngine:
    def __init__(self, public, *, topology: str = "relay", clearing: CentralizedClearing | None = None,
                 timer: Callable[[], float] = time.perf_counter, progress_every_s: float = 0.25):
        self.name = COORDINATOR
        self.public = public
        self.market = public.market
        self.topology = topology
        self.central = clearing
        self.timer = timer
        self.progress_every_s = progress_every_s
        self.community = self.market.kind == "community"
        self.H = self.market.hours
        roster = public.roster
        # who registers as a peer: in the community market the external supplier is the root
        # exchange of the network agent, not a peer
        self.roster = [p for p in roster if not (self.community and p.kind == "grid")]
        self.roster_ids = [p.id for p in self.roster]
        self.graph = public_graph(public)  # every pair of the full market, or the restricted ones (market.partners)
        self.hosts: dict[str, list[str]] = {}
        self.host_info: dict[str, Hello] = {}
        self.services: dict[str, Hello] = {}
        self.run_id = ""
        self.rejected: Counter = Counter()
        self.penalty_log: list[tuple] = []
        self.timing: dict[str, float] = {}
        self.iteration = 0
        self.price_rounds = 0  # round trips of the pool-price starts (probes and the starting injections)
        self.extra_traffic: list = []  # mesh: TRADES the hosts sent outside the coordinator's sight
        # asynchronous ADMM with bounded staleness (mesh; coordinator.clearing.AsyncP2PRounds)
        self.asynchronous = topology == "mesh" and getattr(self.market, "staleness", 0) > 0 and not self.community
        self._async_tail = False  # the asynchronous iterations ended: RESIDUALS still in flight are dropped
        self._out: list = []
        self._gen = None

    # -- driver interface -----------------------------------------------------------------------
    def handle(self, event) -> list:
        self._out = []
        if self._gen is None:
            if not isinstance(event, Started):
                return []
            self._gen = self._run()
            step = lambda: next(self._gen)  # noqa: E731
        else:
            step = lambda: self._gen.send(event)  # noqa: E731
        try:
            step()
        except StopIteration as stop:
            self._shutdown("run complete")
            self._out.append(Finish(stop.value))
        except RunFailure as exc:
            self._shutdown(f"run failed: {exc}")
            self._out += [Note("failed", {"reason": str(exc)}), Fail(exc.role, str(exc), getattr(exc, "outcome", None))]
        return self._out

    def _send(self, to: str, message, iteration: int = 0) -> None:
        self._out.append(Send(to, message, iteration))

    def _note(self, event: str, **fields) -> None:
        self._out.append(Note(event, fields))

    def _log(self, text: str) -> None:
        self._out.append(Log(text))

    def _shutdown(self, reason: str) -> None:
        for to in [*self.hosts, *self.services]:
            self._send(to, Shutdown(reason=reason))

    # -- waiting --------------------------------------------------------------------------------
    def _await(self, accept: Callable[[Received], bool], silent: Callable[[float], str]):
        """The next event that ``accept`` takes; services' HELLOs are handled on the way, anything
        else is rejected and counted; a deadline is a failure (``silent(timeout_s)`` names who)."""
        while True:
            ev = yield
            if isinstance(ev, Deadline):
                raise silent(ev.timeout_s)
            if not isinstance(ev, Received):
                continue
            msg = ev.message
            if isinstance(msg, Hello) and msg.role in SERVICES:
                self._service_hello(ev.sender, msg)
                if accept(ev):
                    return ev
                continue
            if accept(ev):
                return ev
            if self._async_tail and isinstance(msg, Residuals):
                continue  # the asynchronous hosts were ahead of the stop
            if isinstance(msg, Hello):
                self.rejected["late_hello"] += 1
            else:
                self.rejected["type"] += 1

    def _service_hello(self, sender: str, hello: Hello) -> None:
        if sender != hello.role:
            self.rejected["registration"] += 1
            self._log(f"refused a {hello.role} HELLO from {sender!r}")
            return
        self.services[hello.role] = hello
        self._send(sender, Welcome(config={"run_id": self.run_id, "hours": self.H}))
        self._log(f"{hello.role} service registered (pid {hello.pid} on {hello.host})")

    def _service(self, role: str):
        if role in self.services:
            return
        yield from self._await(lambda ev: role in self.services,
                               lambda t: RunFailure(role, f"the {role} service did not register within {t:g} s"))

    # -- the run --------------------------------------------------------------------------------
    def _run(self):
        if self.central is None:
            yield from self._register()
        if self.community:
            rounds = yield from self._clear_community()
            cleared = yield from self._collect_community(rounds)
            return (yield from self._finish_single(cleared))
        if self.market.model != "benchmark":
            return (yield from self._outer_loop())
        cleared = yield from self._clear_p2p(None)
        return (yield from self._finish_single(cleared))

    def _register(self):
        expected = set(self.roster_ids)

        def registered() -> set:
            return {p for ps in self.hosts.values() for p in ps}

        def silent(t):
            missing = sorted(expected - registered())
            return RunFailure(missing[0] if missing else COORDINATOR,
                              f"registration: peer(s) {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''} "
                              f"did not register within {t:g} s")

        while registered() != expected:
            ev = yield from self._await(lambda e: isinstance(e.message, Hello) and e.message.role == "peer", silent)
            self._peer_hello(ev.sender, ev.message)
        keys = {p: k for h in self.host_info.values() for p, k in (h.public_keys or {}).items()}
        index = {pid: n for n, pid in enumerate(self.graph.peer_ids)}
        host_of = {p: h for h, ps in self.hosts.items() for p in ps}
        for host, peer_ids in self.hosts.items():
            config = {"run_id": self.run_id, "hours": self.H, "public_keys": keys}
            if self.community:
                config.update(topology="relay", market="community")
            else:
                partners = {pid: [self.graph.peer_ids[m] for m in self.graph.partner[self.graph.partners_of(index[pid])]]
                            for pid in peer_ids}
                config.update(topology=self.topology, partners=partners, market="p2p",
                              price_init_eur_per_mwh=self.market.price_init_eur_per_mwh)
                if self.asynchronous:
                    config.update(staleness=self.market.staleness, max_iterations=self.market.max_iterations)
                if self.topology == "mesh":
                    partner_hosts = {q: host_of[q] for ps in partners.values() for q in ps}
                    config["hosts"] = partner_hosts
                    config["addresses"] = {h: self.host_info[h].address for h in set(partner_hosts.values())}
            self._send(host, Welcome(config=config))
        waiting = set(self.hosts)
        while waiting:
            ev = yield from self._await(
                lambda e: isinstance(e.message, Ready) and e.sender in waiting,
                lambda t: RunFailure(sorted(waiting)[0], f"no READY within {t:g} s from {len(waiting)} peer host(s): "
                                                         f"{', '.join(sorted(waiting)[:5])}"))
            waiting.discard(ev.sender)
        self.timing["ready_s"] = ev.now_s
        self._note("ready", hosts=len(self.hosts), peers=len(expected))
        self._log(f"{len(expected)} peers in {len(self.hosts)} processes ready")

    def _peer_hello(self, name: str, hello: Hello) -> None:
        roster = set(self.roster_ids)
        taken = {p for h, ps in self.hosts.items() if h != name for p in ps}
        bad = [p for p in hello.peer_ids if p not in roster or p in taken]
        keys = hello.public_keys or {}
        if bad or not hello.peer_ids or set(keys) != set(hello.peer_ids):
            self.rejected["registration"] += 1
            reason = (f"unknown or already registered peer(s): {', '.join(bad) or '(none)'}" if bad or not hello.peer_ids
                      else "a public key for every hosted peer is required")
            self._log(f"refused {name}: {reason}")
            self._send(name, Shutdown(reason=reason))
            return
        self.hosts[name] = list(hello.peer_ids)
        self.host_info[name] = hello

    # -- clearing -------------------------------------------------------------------------------
    def _settings(self, rho: float | None = None) -> RoundSettings:
        m = self.market
        return RoundSettings(rho=m.rho if rho is None else rho, tolerance=m.tolerance, max_iterations=m.max_iterations,
                             residual_balancing=m.residual_balancing, mu=m.rb_mu, tau=m.rb_tau, every=m.rb_every,
                             until=m.rb_until, topology=self.topology, price_init_eur_per_mwh=m.price_init_eur_per_mwh,
                             acceleration=m.acceleration, aa_memory=m.aa_memory, aa_safeguard=m.aa_safeguard,
                             aa_start=m.aa_start, hour_stopping=m.hour_stopping and not self.community,
                             infeasibility_window=m.infeasibility_window)

    def _clear_p2p(self, previous: Cleared | None):
        """One clearing of the full P2P market; an outer loop re-clears warm from ``previous``."""
        if self.central is not None:
            return self.central.clear(self.graph)
        prev = previous.rounds if previous is not None else None
        warm = {} if prev is None else dict(start_iteration=prev.iteration, warm_trades_mw=prev.flat,
                                            warm_prices=prev.lam_eff)
        if prev is None and self.market.pool_price_start:
            price, q = yield from self._pool_price()
            trades, prices = pool_start(q, price, self.graph)
            warm = dict(warm_trades_mw=trades, start_prices=prices)
        if self.asynchronous:
            settings = self._settings()
            settings.hour_stopping = settings.residual_balancing = False
            rounds = AsyncP2PRounds(self.graph, self.hosts, self.H, settings, timer=self.timer, **warm)
            yield from self._drive_async(rounds)
            cleared = yield from self._collect_p2p(rounds)
            if rounds.infeasible:
                self._infeasible(rounds, rounds.infeasible_hours or [])
            return cleared
        rounds = P2PRounds(self.graph, self.hosts, self.H, self._settings(None if prev is None else prev.rho),
                           timer=self.timer, **warm)
        if self.topology == "relay":
            handlers = {Update: lambda ev: rounds.on_update(ev.sender, ev.message)}
        else:
            handlers = {Residuals: lambda ev: rounds.on_residuals(ev.sender, ev.message)}
        yield from self._drive(rounds, handlers)
        cleared = yield from self._collect_p2p(rounds)
        if rounds.infeasible:
            self._infeasible(rounds, rounds.infeasible_hours or [])
        return cleared

    def _infeasible(self, rounds, hours: list[int]) -> None:
        what = "trades cannot be matched" if not self.community else "the peers' injections do not fit the network"
        raise RunFailure(COORDINATOR, f"the market is infeasible in hour(s) {', '.join(map(str, hours)) or '(none named)'}: "
                                      f"after {rounds.iteration} ADMM iterations the primal residual has stalled at "
                                      f"{rounds.primal_residual:.4g} MW (tolerance {self.market.tolerance:g}) while the "
                                      f"iterates no longer move and the prices moved by {rounds.watch.drift:.3g} EUR/MWh "
                                      f"without a response ({what}; Boyd et al. 2011, sec. 3.3)")

    def _pool_price(self, tol_mw: float = 1e-9, width_eur_per_mwh: float = 1e-9):
        """Price rounds before the ADMM. Each round sends every host ``pool_price_points`` candidate
        prices per hour; the hosts answer their peers' best-response intervals at each candidate,
        summed and masked so that the coordinator learns only the aggregate over all peers
        (``common.secagg``). An hour is settled when the aggregate brackets zero at a candidate,
        or between two candidates closer than ``width_eur_per_mwh`` (a linear cost's slope makes
        the aggregate jump there: the jump is shared). While an hour is bracketed, the candidates
        are the regula-falsi point and equally spaced points in the bracket (it shrinks by the
        number of points each round); until then, steps that double. Then POOL_PRICE tells the
        hosts the settled price and each peer answers its starting injection.
        Returns (price (H,), injections (N, H))."""
        H, K = self.H, self.market.pool_price_points
        lo, hi = np.full(H, -np.inf), np.full(H, np.inf)  # prices with too little / too much supply
        f_lo, f_hi = np.zeros(H), np.zeros(H)  # the aggregate there (< 0, > 0)
        step = np.full(H, 8.0)
        done = np.zeros(H, dtype=bool)
        price_a, price_b, share = np.full(H, float(self.market.price_init_eur_per_mwh)), np.zeros(H), np.zeros(H)
        cand = price_a + step * (np.arange(K) - K // 2)[:, None]  # around the starting guess
        hours = np.arange(H)
        for r in range(1, self.market.pool_price_rounds + 1):
            self.price_rounds += 1
            for host in self.hosts:
                self._send(host, PriceProbe(price_eur_per_mwh=cand), self.iteration)
            SL, SH = yield from self._collect_sums(r, K)  # (K, H) each
            hit = (SL <= tol_mw) & (SH >= -tol_mw) & ~done[None, :]
            got = hit.any(axis=0)
            first = np.argmax(hit, axis=0)
            sl, sh = SL[first, hours], SH[first, hours]
            with np.errstate(divide="ignore", invalid="ignore"):
                theta = np.clip(np.where(sh > sl, -sl / (sh - sl), 0.0), 0.0, 1.0)
            c = cand[first, hours]
            price_a, price_b, share = np.where(got, c, price_a), np.where(got, c, price_b), np.where(got, theta, share)
            done |= got
            short = (SH < -tol_mw) & ~done[None, :]
            excess = (SL > tol_mw) & ~done[None, :]
            best_lo, best_hi = np.where(short, cand, -np.inf), np.where(excess, cand, np.inf)
            k_lo, k_hi = best_lo.argmax(axis=0), best_hi.argmin(axis=0)
            up, down = best_lo.max(axis=0) > lo, best_hi.min(axis=0) < hi
            lo, f_lo = np.where(up, cand[k_lo, hours], lo), np.where(up, SH[k_lo, hours], f_lo)
            hi, f_hi = np.where(down, cand[k_hi, hours], hi), np.where(down, SL[k_hi, hours], f_hi)
            narrow = ~done & np.isfinite(lo) & np.isfinite(hi) & (hi - lo <= width_eur_per_mwh * np.maximum(1.0, np.abs(lo)))
            with np.errstate(divide="ignore", invalid="ignore"):
                t = np.clip(np.where(f_hi > f_lo, -f_lo / (f_hi - f_lo), 0.5), 0.0, 1.0)
            price_a, price_b, share = np.where(narrow, lo, price_a), np.where(narrow, hi, price_b), np.where(narrow, t, share)
            done |= narrow
            if done.all():
                break
            both = np.isfinite(lo) & np.isfinite(hi)
            with np.errstate(divide="ignore", invalid="ignore"):  # the hours without a bracket are not used
                falsi = np.clip(lo - f_lo * (hi - lo) / (f_hi - f_lo), lo, hi)
                falsi = np.where(np.isfinite(falsi), falsi, 0.5 * (lo + hi))
                inner = lo + (hi - lo) * (np.arange(1, K)[:, None] / K)  # K-1 equally spaced points
            grow = step * 2.0 ** np.arange(K)[:, None]
            expanding = np.where(np.isfinite(lo), lo + grow, hi - grow)
            cand = np.where(both[None, :], np.vstack([falsi[None, :], inner]), expanding)
            cand[:, done] = price_a[done]
            step = np.where(both, step, step * 2.0 ** K)
        rest = ~done  # hours the rounds did not settle start in the middle of what is known
        # an hour still short (or in excess) of supply at every price up to astronomically high (low)
        # ones has no balancing price at all: the aggregate of the peers' bounds cannot balance
        one_sided = rest & (np.isfinite(lo) != np.isfinite(hi)) & (np.abs(np.where(np.isfinite(lo), lo, hi)) > 1e6)
        if one_sided.any():
            hours = np.flatnonzero(one_sided) + 1
            short = np.isfinite(lo[hours[0] - 1])
            raise RunFailure(COORDINATOR, f"the market is infeasible in hour(s) {', '.join(map(str, hours))}: the price "
                                          f"rounds found no balancing price (at {abs(np.where(short, lo, hi)[hours[0] - 1]):.3g} "
                                          f"EUR/MWh the {'demand still exceeds the supply' if short else 'supply still exceeds the demand'}"
                                          f" in hour {hours[0]})")
        with np.errstate(invalid="ignore"):
            mid = np.where(np.isfinite(lo) & np.isfinite(hi), 0.5 * (lo + hi), np.where(np.isfinite(lo), lo, hi))
        price_a, price_b, share = np.where(rest, mid, price_a), np.where(rest, mid, price_b), np.where(rest, 0.5, share)
        for host in self.hosts:
            self._send(host, PoolPrice(price_a_eur_per_mwh=price_a, price_b_eur_per_mwh=price_b, share=share),
                       self.iteration)
        q = yield from self._collect_pool_quantities()
        self.price_rounds += 1
        price = price_a + share * (price_b - price_a)
        self._log(f"pool price after {r} price rounds: {price.min():.2f} to {price.max():.2f} EUR/MWh, "
                  f"{int(done.sum())} of {H} hours settled")
        return price, q

    def _collect_sums(self, r: int, K: int):
        """The aggregate (over all peers) of the smallest and largest best responses of round ``r``."""
        waiting, low, high = set(self.hosts), [], []
        while waiting:
            ev = yield from self._await(
                lambda e: isinstance(e.message, QuantitySum) and e.sender in waiting,
                lambda t: RunFailure(sorted(waiting)[0], f"price round {r}: no answer within {t:g} s from "
                                                         f"{', '.join(sorted(waiting)[:5])}"))
            m = ev.message
            if m.q_low_masked.shape != (K, self.H) or m.q_high_masked.shape != (K, self.H):
                self.rejected["body"] += 1
                continue
            low.append(m.q_low_masked)
            high.append(m.q_high_masked)
            waiting.discard(ev.sender)
        return unmask_sum(low, NANO_MW_PER_MW), unmask_sum(high, NANO_MW_PER_MW)

    def _collect_pool_quantities(self):
        ids, H = self.graph.peer_ids, self.H
        q, waiting = {}, set(self.hosts)
        while waiting:
            ev = yield from self._await(
                lambda e: isinstance(e.message, PoolQuantity) and e.sender in waiting,
                lambda t: RunFailure(sorted(waiting)[0], f"pool price: no starting injections within {t:g} s from "
                                                         f"{', '.join(sorted(waiting)[:5])}"))
            peers = ev.message.peers
            if set(peers) != set(self.hosts[ev.sender]) or any(v.shape != (H,) for v in peers.values()):
                self.rejected["body"] += 1
                continue
            q.update(peers)
            waiting.discard(ev.sender)
        return np.vstack([q[i] for i in ids])

    def _clear_community(self):
        yield from self._service("dso")
        rounds = CommunityRounds(self.roster_ids, self.hosts, self.H, self._settings(), timer=self.timer)

        def on_network(ev):
            if ev.sender != "dso":
                raise ValueError(f"a network result from {ev.sender}")
            return rounds.on_network(ev.message)

        handlers = {Update: lambda ev: rounds.on_update(ev.sender, ev.message), NetworkResult: on_network}
        yield from self._drive(rounds, handlers)
        if rounds.infeasible:
            self._infeasible(rounds, rounds.infeasible_hours or [])
        return rounds

    def _drive(self, rounds, handlers: dict):
        """Send the round machine's instructions, feed it the answers of the current iteration
        (anything else is rejected and counted), until it has finished."""
        t_start = self.timer()
        last_note = -np.inf
        sends = rounds.start()
        while True:
            for dest, msg in sends:
                self._send(dest, msg, rounds.iteration)
            self.iteration = rounds.iteration
            if rounds.finished:
                break
            sends = []
            k = rounds.iteration

            def silent(t, k=k):
                pending = sorted(rounds.pending())
                who = "; ".join("the dso service (network agent)" if h == "dso" else f"{h} (peer {', '.join(self.hosts[h])})"
                                for h in pending[:5])
                return RunFailure(pending[0] if pending else COORDINATOR,
                                  f"iteration {k}: no answer within {t:g} s from {who}")

            while not sends and not rounds.finished:
                ev = yield from self._await(lambda e: type(e.message) in handlers, silent)
                if ev.iteration != k:
                    self.rejected["stale"] += 1
                    continue
                try:
                    sends = handlers[type(ev.message)](ev)
                except (ValueError, KeyError) as exc:
                    self.rejected["body"] += 1
                    self._log(f"rejected an answer from {ev.sender}: {exc}")
            now = self.timer()
            if now - last_note > self.progress_every_s or rounds.finished:
                last_note = now
                self._note("iteration", iteration=rounds.iteration, primal=rounds.primal_residual,
                           dual=rounds.dual_residual, rho=rounds.rho)
        self.timing["admm_s"] = self.timing.get("admm_s", 0.0) + self.timer() - t_start
        if rounds.statuses:
            who = ", ".join(("the dso service (network agent)" if p == "dso" else f"peer {p}") + f": {st}"
                            for p, st in rounds.statuses.items())
            role = next(iter(rounds.statuses))
            raise RunFailure(role, f"iteration {rounds.iteration}: {who}")

    def _drive_async(self, rounds: AsyncP2PRounds):
        """The asynchronous mesh: one ROUND starts the hosts; their RESIDUALS of any iteration not
        yet complete are summed until the rounds have finished; then ROUND with stop."""
        t_start = self.timer()
        last_note = -np.inf
        for dest, msg in rounds.start():
            self._send(dest, msg, rounds.iteration)

        def silent(t):
            pending = sorted(rounds.pending())
            return RunFailure(pending[0] if pending else COORDINATOR,
                              f"iteration {rounds.done_iteration + 1}: no residuals within {t:g} s from "
                              f"{', '.join(pending[:5])}")

        while not rounds.finished:
            ev = yield from self._await(lambda e: isinstance(e.message, Residuals), silent)
            try:
                sends = rounds.on_residuals_at(ev.sender, ev.iteration, ev.message)
            except ValueError as exc:
                self.rejected["body"] += 1
                self._log(f"rejected an answer from {ev.sender}: {exc}")
                continue
            for dest, msg in sends:
                self._send(dest, msg, rounds.iteration)
            self.iteration = rounds.iteration
            now = self.timer()
            if now - last_note > self.progress_every_s or rounds.finished:
                last_note = now
                self._note("iteration", iteration=rounds.iteration, primal=rounds.primal_residual,
                           dual=rounds.dual_residual, rho=rounds.rho)
        self._async_tail = True
        self.timing["admm_s"] = self.timing.get("admm_s", 0.0) + self.timer() - t_start
        if rounds.statuses:
            raise RunFailure(next(iter(rounds.statuses)), f"iteration {rounds.iteration}: " + ", ".join(
                f"peer {p}: {st}" for p, st in rounds.statuses.items()))

    def _collect(self, k: int) -> dict:
        results, waiting = {}, set(self.hosts)
        while waiting:
            ev = yield from self._await(
                lambda e: isinstance(e.message, Result),
                lambda t: RunFailure(sorted(waiting)[0], f"no RESULT within {t:g} s from {', '.join(sorted(waiting))}"))
            if ev.sender not in waiting or ev.iteration != k:
                self.rejected["duplicate" if ev.sender not in waiting else "stale"] += 1
                continue
            if set(ev.message.peers) != set(self.hosts[ev.sender]):
                self.rejected["body"] += 1
                continue
            results.update(ev.message.peers)
            self.extra_traffic += list(ev.message.traffic)
            waiting.discard(ev.sender)
        return results

    def _welfare(self, results: dict) -> np.ndarray:
        """Minus the sum of the peers' costs, from their masked reports (only the sum is known)."""
        return -unmask_sum([r.cost_masked_ueur for r in results.values()])

    def _collect_p2p(self, rounds: P2PRounds):
        results = yield from self._collect(rounds.iteration)
        ids, H, g = self.graph.peer_ids, self.H, self.graph
        trades, prices, fees = np.zeros((g.n_pairs, H)), np.zeros((g.n_pairs, H)), np.zeros((g.n_pairs, H))
        for n, pid in enumerate(ids):
            kk = g.partners_of(n)
            if results[pid].trades_mw.shape != (len(kk), H):
                raise RunFailure(pid, f"RESULT of peer {pid} has trades of shape {results[pid].trades_mw.shape}")
            trades[kk], prices[kk] = results[pid].trades_mw, results[pid].price_eur_per_mwh
            if results[pid].trade_fee_eur is not None and results[pid].trade_fee_eur.shape == (len(kk), H):
                fees[kk] = results[pid].trade_fee_eur
        zero = np.zeros(H)
        diff = np.sum([r.diff_cost_eur if r.diff_cost_eur is not None else zero for r in results.values()], axis=0)
        flex = np.sum([r.flex_penalty_eur if r.flex_penalty_eur is not None else zero for r in results.values()], axis=0)
        return Cleared(np.vstack([results[i].p_mw for i in ids]), np.vstack([results[i].q_mvar for i in ids]),
                       self._welfare(results), diff, flex, rounds.converged, rounds, trades, prices, results,
                       fees_eur=fees if fees.any() else None)

    def _collect_community(self, rounds: CommunityRounds):
        results = yield from self._collect(rounds.iteration)
        ids = self.roster_ids
        net = rounds.network.arrays
        tariff = self.public.tariff
        network_cost = (tariff.import_price_eur_per_mwh * net["import_mw"]
                        - tariff.export_price_eur_per_mwh * net["export_mw"])
        return Cleared(np.vstack([results[i].p_mw for i in ids]), np.vstack([results[i].q_mvar for i in ids]),
                       self._welfare(results) - network_cost, np.zeros(self.H), np.zeros(self.H), rounds.converged,
                       rounds, results=results)

    # -- services -------------------------------------------------------------------------------
    def _market_roster(self):
        return self.roster if self.community else self.public.roster

    def _ask_dso(self, cleared: Cleared, plan: bool = False):
        yield from self._service("dso")
        roster = self._market_roster()
        k = self.iteration
        self._send("dso", Dispatch(peer_ids=tuple(p.id for p in roster), kinds=tuple(p.kind for p in roster),
                                   buses=tuple(int(p.bus) for p in roster), p_mw=cleared.p_mw, q_mvar=cleared.q_mvar,
                                   plan=plan), k)
        t = self.timer()
        ev = yield from self._await(
            lambda e: isinstance(e.message, GridReport) and e.sender == "dso",
            lambda t: RunFailure("dso", f"the dso service did not answer the dispatch within {t:g} s"))
        self.timing["dso_s"] = self.timer() - t
        report = ev.message
        if report.status != "ok":
            raise RunFailure("dso", f"the dso service could not check the dispatch: {report.status}")
        return report

    def _ask_tso(self):
        yield from self._service("tso")
        self._send("tso", FreqQuery(hours=self.H), self.iteration)
        ev = yield from self._await(
            lambda e: isinstance(e.message, FreqRequest) and e.sender == "tso",
            lambda t: RunFailure("tso", f"the tso service did not answer within {t:g} s"))
        vl = ev.message.virtual_load_mw
        if vl.shape != (self.H,):
            raise RunFailure("tso", f"the tso service asked for a virtual load of shape {vl.shape}, expected ({self.H},)")
        return vl

    def _send_penalties(self, penalties: dict, outer: int, source: str) -> None:
        """Forward the DSO's or TSO's new parameters, each host getting only its own peers' ones."""
        if self.central is not None:
            self.central.penalize(penalties)
            for pid, params in penalties.items():
                self.penalty_log.append((outer, source, "centralized", pid, " ".join(sorted(params))))
            return
        host_of = {p: h for h, ps in self.hosts.items() for p in ps}
        by_host: dict[str, dict] = {}
        for pid, params in penalties.items():
            if pid not in host_of:
                raise RunFailure(source, f"the {source} service sent parameters for unknown peer {pid}")
            by_host.setdefault(host_of[pid], {})[pid] = params
        for host, peers in by_host.items():
            self._send(host, Penalty(peers=peers), self.iteration)
            for pid, params in peers.items():
                self.penalty_log.append((outer, source, host, pid, " ".join(sorted(params))))

    # -- endings --------------------------------------------------------------------------------
    def _outcome(self, clearings, report, report_initial, vl, outer=None) -> RunOutcome:
        return RunOutcome(clearings, report, report_initial, vl, "centralized" if self.central else "admm", outer,
                          list(self.penalty_log), dict(self.timing), dict(self.hosts), tuple(self.services),
                          dict(self.rejected))

    def _finish_single(self, cleared: Cleared):
        if getattr(self.public, "network", None) is None:  # a market without a grid: no AC check, no TSO
            return self._outcome([cleared], None, None, np.zeros(self.H))
        vl = yield from self._ask_tso()
        report = yield from self._ask_dso(cleared)
        return self._outcome([cleared], report, report, vl)

    def _outer_loop(self):
        """The TSO/DSO outer loop (models cong, volt, freq, full; thesis 3.2-3.4): clear, AC check
        with the DSO's plan, forward the new parameters to the peers concerned, re-clear
        warm-started, until the DSO finds no violation or gives up."""
        model = self.market.model
        tso_first = model in ("freq", "full")
        clearings, history = [], []
        vl = np.zeros(self.H)

        def clear_and_check(plan: bool, step: str, actions: str):
            cleared = yield from self._clear_p2p(clearings[-1] if clearings else None)
            clearings.append(cleared)
            report = yield from self._ask_dso(cleared, plan=plan)
            outer = len(clearings)
            rounds = cleared.rounds
            its = rounds.iteration - rounds.start_iteration if rounds is not None else 0
            n_viol = len(report.violations)
            history.append((outer, its, n_viol, len({int(v["hour"]) for v in report.violations}), step, actions))
            self._note("outer", outer=outer, iterations=its, violations=n_viol, step=step)
            self._log(f"outer iteration {outer}: {its} ADMM iterations, {n_viol} violation(s)")
            return cleared, report

        cleared, report = yield from clear_and_check(not tso_first, "clearing", "")
        first, report_initial = cleared, report
        if tso_first:
            vl = yield from self._ask_tso()
            vl_id = next((p.id for p in self.public.roster if p.kind == "virtual_load"), None)
            if vl_id is not None:
                self._send_penalties({vl_id: {"virtual_load_mw": vl}}, 1, "tso")
            cleared, report = yield from clear_and_check(True, "tso", f"virtual load {vl.sum():.2f} MWh")
        status, reason = report.outer_status or "feasible", report.outer_reason
        while status == "continue":
            if len(clearings) >= self.public.dso.max_outer_iterations:
                status, reason = "limit", f"no feasible dispatch after {len(clearings)} outer iterations"
                break
            self._send_penalties(report.penalties or {}, len(clearings), "dso")
            cleared, report = yield from clear_and_check(True, "dso", " | ".join(report.actions))
            status, reason = report.outer_status or "feasible", report.outer_reason
        outer = {"status": status, "reason": reason, "history": history, "sw_before": first.sw_eur,
                 "p_before": first.p_mw}
        return self._outcome(clearings, report, report_initial, vl, outer)
