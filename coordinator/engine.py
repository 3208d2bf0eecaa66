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

Any wait has a deadline (``timeout_s`` from the start of the wait; messages it refuses do not extend
it) and ends with a failure that names the silent roles. Liveness: every registered role sends a
HEARTBEAT every ``heartbeat_s`` (also while its engine computes) and gets one on every ``Tick``; a
role silent for ``liveness_misses`` intervals (or whose connection the driver reports gone,
``PeerLost``) is lost: the run fails naming it, or, with ``on_peer_loss="drop"`` during a clearing
of the full P2P market (relay), the clearing goes on without the lost host's peers, warm-started
from the last complete iteration (``dropped`` says who and when); with ``on_peer_loss="wait"`` a
lost peer host, DSO or TSO may register again within ``grace_s`` (``rejoined``,
``rejoined_services``). Every refused message is counted by reason; the other roles' counts come
with their heartbeats (``role_rejected``).

Checkpoints (where ``resume_unsupported`` is None): during a clearing, ``Checkpoint(ClearingState)``
every ``checkpoint_every`` iterations and/or ``checkpoint_s`` seconds (the shell writes it); an
engine built with ``resume=`` a checkpoint registers the roles afresh and goes on from its
iteration, trades and prices (``common.checkpoint``).

The coordinator never sees a peer's cost: welfare is the unmasked sum of the peers' masked costs
(``common.secagg``).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from common.checkpoint import HISTORY_FIELDS, CheckpointError, ClearingState, check_matches
from common.engine import (COORDINATOR, Checkpoint, Deadline, Fail, Finish, Log, Note, PeerLost, Received, Send, Started,
                           Tick)
from common.market import roster_graph
from common.partners import public_graph
from common.protocol.control import Heartbeat, Hello, Ready, Shutdown, Welcome
from common.protocol.frequency import FreqQuery, FreqRequest
from common.protocol.grid import Dispatch, GridReport, NetworkResult
from common.admm import pool_start
from common.protocol.market import (Drop, Penalty, PoolPrice, PoolQuantity, PriceProbe, QuantitySum, Residuals, Result,
                                    Update)
from common.secagg import NANO_MW_PER_MW, unmask_sum
from coordinator.clearing import AsyncP2PRounds, CommunityRounds, IterationStats, P2PRounds, RoundSettings

SERVICES = ("dso", "tso")
LOSS_POLICIES = ("abort", "drop", "wait")


def resume_unsupported(market, topology: str) -> str | None:
    """Why a clearing of this market cannot go on from the coordinator's own state (a checkpoint,
    or after a lost peer host), or None: the relay coordinator of the benchmark P2P market holds
    every trade and price; elsewhere part of the state lives only in the peers or the outer loop."""
    if market.kind != "p2p":
        return "the community market's network agent couples every peer"
    if topology != "relay":
        return "the mesh topology: the coordinator does not hold the trades to go on from"
    if market.model != "benchmark":
        return f"model {market.model}: the outer loop's plans name every peer and its state is not checkpointed"
    if market.staleness:
        return "the asynchronous mesh (market.staleness)"
    return None


def drop_unsupported(market, topology: str) -> str | None:
    """Why ``--on-peer-loss drop`` (or ``wait``) cannot apply to this market, or None."""
    why = resume_unsupported(market, topology)
    if why is not None:
        return f"{why} (use abort)"
    if market.partners is not None and market.partners.rule != "full":
        return "restricted trading partners (market.partners): the market without the lost peers is not re-planned"
    return None


class HostLost(Exception):
    """A registered peer host is gone (raised inside a clearing that can go on without it)."""

    def __init__(self, host: str, reason: str):
        super().__init__(reason)
        self.host, self.reason = host, reason


class ServiceLost(Exception):
    """Policy wait: the service being asked was lost; it is asked again once it is back."""

    def __init__(self, role: str):
        super().__init__(role)
        self.role = role


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
    dropped: list = field(default_factory=list)  # policy drop: {host, peers, iteration, reason, detected_s}


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


def _report_problem(report: GridReport) -> str | None:
    """What makes a grid report unusable for the results (its tables), or None."""
    from common.report_codec import TABLES, ac_from_tables

    missing = [name for name in TABLES if name not in (report.tables or {})]
    if missing:
        return f"no {', '.join(missing)} table(s)"
    try:
        ac_from_tables(report.tables)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        return f"unreadable tables: {type(exc).__name__}: {exc}"
    return None


class CoordinatorEngine:
    def __init__(self, public, *, topology: str = "relay", clearing: CentralizedClearing | None = None,
                 timer: Callable[[], float] = time.perf_counter, progress_every_s: float = 0.25,
                 timeout_s: float | None = None, heartbeat_s: float = 1.0, liveness_misses: int = 5,
                 on_peer_loss: str = "abort", grace_s: float = 60.0, checkpoint_every: int = 0,
                 checkpoint_s: float = 0.0, resume: ClearingState | None = None):
        if on_peer_loss not in LOSS_POLICIES:
            raise ValueError(f"on_peer_loss: {on_peer_loss!r} is not one of {', '.join(LOSS_POLICIES)}")
        self.name = COORDINATOR
        self.timeout_s = timeout_s  # a wait's deadline, checked on every Tick (None: the driver's Deadline only)
        self.heartbeat_s = heartbeat_s
        self.liveness_s = liveness_misses * heartbeat_s
        self.on_peer_loss = on_peer_loss
        self.grace_s = grace_s  # policy wait: how long a lost peer host may take to come back
        # checkpoints (relay P2P market, resume_unsupported): every so many iterations and/or seconds
        # (0: never); ``resume``: the checkpoint the first clearing goes on from
        self.checkpoint_every = int(checkpoint_every)
        self.checkpoint_s = float(checkpoint_s)
        self.resume = resume
        self.resumed_from: dict | None = None
        self.rejoined: list[dict] = []
        self.rejoined_services: list[dict] = []
        self.services_lost: dict[str, tuple[float, str]] = {}  # policy wait: service -> (when, why) it was lost
        self._asking: str | None = None  # the service whose answer is awaited
        self._wait_timeout: float | None = None
        self.now_s = 0.0
        self.last_seen: dict[str, float] = {}  # registered role -> when it was last heard of
        self.role_rejected: dict[str, dict[str, int]] = {}  # role -> its refused messages by reason (heartbeats)
        self.dropped: list[dict] = []
        self._wait_since: float | None = None
        self._droppable = False
        self._done = False
        self.shutdown_sent = False
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
        # what the coordinator's own state allows (fixed for the run): checkpoints, and the policies
        # drop and wait (a lost peer host, DSO or TSO)
        no_resume = resume_unsupported(self.market, topology)
        self.checkpoints = no_resume is None and (self.checkpoint_every > 0 or self.checkpoint_s > 0)
        self.losses_survivable = drop_unsupported(self.market, topology) is None
        if resume is not None:
            if no_resume is not None:
                raise CheckpointError("checkpoint", f"a run cannot resume in {no_resume}")
            check_matches(resume, scenario=public.name, topology=topology, peer_ids=list(self.graph.peer_ids),
                          hours=self.H, pairs=self.graph.n_pairs)
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
        if self._done:
            return []
        if self._gen is None:
            if not isinstance(event, Started):
                return []
            self.now_s = event.now_s
            self._gen = self._run()
            step = lambda: next(self._gen)  # noqa: E731
        else:
            self.now_s = max(self.now_s, getattr(event, "now_s", self.now_s))
            if isinstance(event, Received):
                if event.sender in self.last_seen:
                    self.last_seen[event.sender] = event.now_s
                if isinstance(event.message, Heartbeat):
                    if event.sender not in self.last_seen:  # not a role of the run: refused like its other messages
                        self.rejected["type"] += 1
                    elif event.message.rejected is not None:
                        self.role_rejected[event.sender] = dict(event.message.rejected)
                    return self._out
            elif isinstance(event, Tick):
                event = self._on_tick(event.now_s)
                if event is None:
                    return self._out
            elif isinstance(event, PeerLost) and event.host not in self.last_seen:
                return self._out  # not a role of the run (a refused stranger), or already handled
            step = lambda: self._gen.send(event)  # noqa: E731
        try:
            step()
        except StopIteration as stop:
            self._done = True
            self._shutdown("run complete")
            self._out.append(Finish(stop.value))
        except RunFailure as exc:
            self._done = True
            self._shutdown(f"run failed: {exc}")
            self._out += [Note("failed", {"reason": str(exc), "role": exc.role}),
                          Fail(exc.role, str(exc), getattr(exc, "outcome", None))]
        return self._out

    def _on_tick(self, now_s: float):
        """Heartbeats to every registered role; the first role silent for too long (a ``PeerLost``),
        or the current wait's deadline (a ``Deadline``), or None."""
        for role in self.last_seen:
            self._send(role, Heartbeat())
        if self.last_seen:  # the longest silent first: a host stuck behind a lost one is silent for less
            role, seen = min(self.last_seen.items(), key=lambda item: item[1])
            if now_s - seen > self.liveness_s:
                return PeerLost(role, now_s, f"no message or heartbeat for {now_s - seen:.1f} s "
                                             f"(heartbeat every {self.heartbeat_s:g} s)")
        timeout = self._wait_timeout if self._wait_timeout is not None else self.timeout_s
        if timeout is not None and self._wait_since is not None and now_s - self._wait_since > timeout:
            return Deadline(timeout, now_s)
        return None

    def _describe(self, role: str) -> str:
        if role in SERVICES:
            return f"the {role} service"
        peers = self.hosts.get(role, [])
        return f"peer host {role} (peer{'s' if len(peers) > 1 else ''} {', '.join(peers[:5])}{' ...' if len(peers) > 5 else ''})"

    def _lost(self, ev: PeerLost) -> None:
        """A registered role is gone: fail naming it, or (policy drop, in a clearing) ``HostLost``."""
        role = ev.host
        seen = self.last_seen.pop(role, None)
        if seen is None:
            return
        where = f" at iteration {self.iteration}" if self.iteration else ""
        detail = f"{self._describe(role)} lost{where}: {ev.reason or 'gone'}"
        if role in SERVICES and self.on_peer_loss == "wait" and self.losses_survivable:
            self.services.pop(role, None)
            self.services_lost[role] = (self.now_s, ev.reason or "gone")
            self._log(f"{detail}; waiting up to {self.grace_s:g} s for it to come back")
            self._note("waiting", host=role, peers=[], iteration=int(self.iteration), grace_s=self.grace_s)
            if self._asking == role:
                raise ServiceLost(role)
            return
        self._log(detail)
        if role in self.hosts and self._droppable:
            raise HostLost(role, ev.reason or "gone")
        raise RunFailure(role, detail)

    def _send(self, to: str, message, iteration: int = 0) -> None:
        self._out.append(Send(to, message, iteration))

    def _note(self, event: str, **fields) -> None:
        self._out.append(Note(event, fields))

    def _log(self, text: str) -> None:
        self._out.append(Log(text))

    def _shutdown(self, reason: str) -> None:
        self.shutdown_sent = True
        for to in [*self.hosts, *self.services]:
            self._send(to, Shutdown(reason=reason))

    # -- waiting --------------------------------------------------------------------------------
    def _await(self, accept: Callable[[Received], bool], silent: Callable[[float], str], since: float | None = None,
               timeout_s: float | None = None):
        """The next event that ``accept`` takes; services' HELLOs are handled on the way, anything
        else is rejected and counted; a deadline is a failure (``silent(timeout_s)`` names who). The
        deadline counts from ``since`` (default: the start of this wait; a caller that collects several
        answers, or refuses some itself, gives the start of the whole wait): refused messages never
        extend it."""
        self._wait_since = self.now_s if since is None else since
        self._wait_timeout = timeout_s  # None: the run's timeout_s
        while True:
            ev = yield
            if isinstance(ev, Deadline):
                raise silent(ev.timeout_s)
            if isinstance(ev, PeerLost):
                self._lost(ev)
                continue
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
        self.last_seen[sender] = self.now_s
        self._send(sender, Welcome(config={"run_id": self.run_id, "hours": self.H, "heartbeat_s": self.heartbeat_s}))
        self._log(f"{hello.role} service registered (pid {hello.pid} on {hello.host})")
        lost = self.services_lost.pop(hello.role, None)
        if lost is not None:
            self.rejoined_services.append({"role": hello.role, "iteration": int(self.iteration), "reason": lost[1],
                                           "lost_s": round(float(lost[0]), 3), "back_s": round(float(self.now_s), 3)})
            self._note("rejoined", host=hello.role, iteration=int(self.iteration))

    def _service(self, role: str):
        if role in self.services:
            return
        lost = self.services_lost.get(role)
        if lost is None:
            yield from self._await(lambda ev: role in self.services,
                                   lambda t: RunFailure(role, f"the {role} service did not register within {t:g} s"))
            return
        self._log(f"waiting for the {role} service, lost at {lost[0]:.1f} s ({lost[1]}), to come back")
        yield from self._await(lambda ev: role in self.services,
                               lambda t: RunFailure(role, f"the {role} service, lost ({lost[1]}), did not come back "
                                                          f"within {t:g} s"), lost[0], self.grace_s)

    def _ask(self, role: str, request, accept: Callable[[Received], bool], silent: Callable[[float], RunFailure]):
        """Send ``request`` to a service and return its accepted answer; policy wait: a service lost
        meanwhile is asked again once it is back. The deadline counts from the (last) request."""
        while True:
            yield from self._service(role)
            self._send(role, request, self.iteration)
            since = self.now_s
            self._asking = role
            try:
                while True:
                    ev = yield from self._await(accept, silent, since)
                    if self._answer_problem(role, ev) is None:
                        return ev
            except ServiceLost:
                continue
            finally:
                self._asking = None

    def _answer_problem(self, role: str, ev) -> str | None:
        """Why a service's answer is refused (counted; the wait goes on, its deadline unchanged), or None."""
        if not isinstance(ev.message, GridReport):
            return None
        if ev.message.status != "ok":
            raise RunFailure("dso", f"the dso service could not check the dispatch: {ev.message.status}")
        problem = _report_problem(ev.message)
        if problem is not None:
            self.rejected["body"] += 1
            self._log(f"refused a grid report: {problem}")
        return problem

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
        shared = self._welcome_shared()
        for host in self.hosts:  # a host beats once welcomed: its liveness counts from now
            self._send(host, Welcome(config=self._welcome_config(host, shared)))
            self.last_seen[host] = self.now_s
        waiting, since = set(self.hosts), self.now_s
        while waiting:
            ev = yield from self._await(
                lambda e: isinstance(e.message, Ready) and e.sender in waiting,
                lambda t: RunFailure(sorted(waiting)[0], f"no READY within {t:g} s from {len(waiting)} peer host(s): "
                                                         f"{', '.join(sorted(waiting)[:5])}"), since)
            waiting.discard(ev.sender)
        self.timing["ready_s"] = ev.now_s
        self._note("ready", hosts=len(self.hosts), peers=len(expected))
        self._log(f"{len(expected)} peers in {len(self.hosts)} processes ready")

    def _welcome_shared(self) -> tuple[dict, dict, dict]:
        """What every host's settings draw on: (every host's public key, each peer's index in the
        trade graph, each peer's host)."""
        keys = {h: k for info in self.host_info.values() for h, k in (info.public_keys or {}).items()}
        index = {pid: n for n, pid in enumerate(self.graph.peer_ids)}
        host_of = {p: h for h, ps in self.hosts.items() for p in ps}
        return keys, index, host_of

    def _welcome_config(self, host: str, shared: tuple[dict, dict, dict] | None = None) -> dict:
        """The run settings of one peer host: its peers' partners, every host's public key, the
        mesh addresses (``shared``: :meth:`_welcome_shared`, computed once for all hosts)."""
        keys, index, host_of = shared if shared is not None else self._welcome_shared()
        config = {"run_id": self.run_id, "hours": self.H, "public_keys": keys, "heartbeat_s": self.heartbeat_s}
        if self.on_peer_loss == "wait" and self.losses_survivable:
            config["rejoin"] = True  # a host that loses its coordinator (it was stopped, say) registers again
        if self.community:
            config.update(topology="relay", market="community")
            return config
        partners = {pid: [self.graph.peer_ids[m] for m in self.graph.partner[self.graph.partners_of(index[pid])]]
                    for pid in self.hosts[host]}
        config.update(topology=self.topology, partners=partners, market="p2p",
                      price_init_eur_per_mwh=self.market.price_init_eur_per_mwh)
        if self.asynchronous:
            config.update(staleness=self.market.staleness, max_iterations=self.market.max_iterations)
        if self.topology == "mesh":
            partner_hosts = {q: host_of[q] for ps in partners.values() for q in ps}
            config["hosts"] = partner_hosts
            config["addresses"] = {h: self.host_info[h].address for h in set(partner_hosts.values())}
        return config

    def _peer_hello(self, name: str, hello: Hello) -> None:
        roster = set(self.roster_ids)
        taken = {p for h, ps in self.hosts.items() if h != name for p in ps}
        bad = [p for p in hello.peer_ids if p not in roster or p in taken]
        keys = hello.public_keys or {}
        if bad or not hello.peer_ids or set(keys) != {name}:
            self.rejected["registration"] += 1
            reason = (f"unknown or already registered peer(s): {', '.join(bad) or '(none)'}" if bad or not hello.peer_ids
                      else "the host's public key (one, under its own name) is required")
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
        rounds = None
        if prev is None and self.resume is not None:  # a resumed run: from its checkpoint, no price rounds
            rounds, self.resume = self._resumed_rounds(self.resume), None
        elif prev is None and self.market.pool_price_start:
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
        if rounds is None:
            rounds = P2PRounds(self.graph, self.hosts, self.H, self._settings(None if prev is None else prev.rho),
                               timer=self.timer, **warm)
        self._droppable = self.on_peer_loss in ("drop", "wait") and self.losses_survivable
        try:
            while True:
                if self.topology == "relay":
                    handlers = {Update: lambda ev, r=rounds: r.on_update(ev.sender, ev.message)}
                else:
                    handlers = {Residuals: lambda ev, r=rounds: r.on_residuals(ev.sender, ev.message)}
                try:
                    yield from self._drive(rounds, handlers)
                    cleared = yield from self._collect_p2p(rounds)
                    break
                except HostLost as lost:
                    if self.on_peer_loss == "drop":
                        rounds = self._drop(lost, rounds)
                    else:
                        rounds = yield from self._wait_for(lost, rounds)
        finally:
            self._droppable = False
        if rounds.infeasible:
            self._infeasible(rounds, rounds.infeasible_hours or [])
        return cleared

    def _drop(self, lost: HostLost, rounds: P2PRounds) -> P2PRounds:
        """Policy drop: the market goes on without the lost host's peers. The remaining hosts learn
        who left (DROP); the next clearing starts from the state of the last complete iteration
        (trades and prices, restricted to the remaining pairs) and keeps counting iterations."""
        host, k = lost.host, rounds.iteration
        described = self._describe(host)
        gone = self.hosts.pop(host)
        self.host_info.pop(host, None)
        gone_set = set(gone)
        roster = [p for p in self.roster if p.id not in gone_set]
        graph = roster_graph(roster)
        lonely = [pid for n, pid in enumerate(graph.peer_ids) if len(graph.partners_of(n)) == 0]
        if not self.hosts or lonely:
            why = (f"peer(s) {', '.join(lonely[:5])} would have no trading partner left" if lonely
                   else "no peer host is left")
            raise RunFailure(host, f"{described} lost at iteration {k}: {lost.reason}; the market cannot go on "
                                   f"without it: {why}")
        old = self.graph
        index = {(old.peer_ids[o], old.peer_ids[m]): kk for kk, (o, m) in enumerate(zip(old.owner, old.partner))}
        kept = np.array([index[(graph.peer_ids[o], graph.peer_ids[m])] for o, m in zip(graph.owner, graph.partner)],
                        dtype=int)
        self.roster, self.roster_ids, self.graph = roster, [p.id for p in roster], graph
        self.dropped.append({"host": host, "peers": list(gone), "iteration": int(k), "reason": lost.reason,
                             "detected_s": round(float(self.now_s), 3)})
        self._note("dropped", host=host, peers=list(gone), iteration=int(k))
        self._log(f"dropped {described} at iteration {k} ({lost.reason}); {len(roster)} peers in "
                  f"{len(self.hosts)} processes clear on, warm-started")
        for h in self.hosts:
            self._send(h, Drop(peers=tuple(gone), hosts=(host,)), k)
        return P2PRounds(graph, self.hosts, self.H, self._settings(rounds.rho), timer=self.timer, start_iteration=k,
                         warm_trades_mw=rounds.x_state[kept], start_prices=rounds.lam_eff[kept], start_own=True,
                         history=rounds.history)

    def _wait_for(self, lost: HostLost, rounds: P2PRounds):
        """Policy wait: the lost host may come back (``p2pm peer`` started again with the same host
        id and peers) within ``grace_s``: it is welcomed again, every other host learns its peers'
        new public keys (WELCOME with ``rekey``), and the clearing goes on from the state of the
        last complete iteration, which the first ROUND hands to every peer (the returning ones too)."""
        host, k = lost.host, rounds.iteration
        described = self._describe(host)
        peers = list(self.hosts[host])
        self._log(f"{described} lost at iteration {k} ({lost.reason}); waiting up to {self.grace_s:g} s for it to "
                  f"come back")
        self._note("waiting", host=host, peers=peers, iteration=int(k), grace_s=self.grace_s)
        since = self.now_s

        def gone(t):
            return RunFailure(host, f"{described} lost at iteration {k} ({lost.reason}) did not come back within "
                                    f"{t:g} s")

        while True:
            ev = yield from self._await(lambda e: isinstance(e.message, Hello) and e.message.role == "peer"
                                        and e.sender == host, gone, since, self.grace_s)
            hello = ev.message
            if list(hello.peer_ids) == peers and set(hello.public_keys or {}) == {host}:
                break
            self.rejected["registration"] += 1
            self._log(f"refused a HELLO of {host} for peers {', '.join(hello.peer_ids)}: it hosted {', '.join(peers)}")
        self.host_info[host] = hello
        self.last_seen[host] = self.now_s
        self._send(host, Welcome(config=self._welcome_config(host)))
        for other in self.hosts:
            if other != host:
                self._send(other, Welcome(config={"run_id": self.run_id, "rekey": True,
                                                  "public_keys": dict(hello.public_keys)}))
        yield from self._await(lambda e: isinstance(e.message, Ready) and e.sender == host,
                               lambda t: RunFailure(host, f"{described} came back but was not ready within {t:g} s"))
        self.rejoined.append({"host": host, "peers": peers, "iteration": int(k), "reason": lost.reason,
                              "lost_s": round(float(since), 3), "back_s": round(float(self.now_s), 3)})
        self._note("rejoined", host=host, iteration=int(k))
        self._log(f"{described} is back after {self.now_s - since:.1f} s; the clearing goes on from iteration {k}")
        return P2PRounds(self.graph, self.hosts, self.H, self._settings(rounds.rho), timer=self.timer,
                         start_iteration=k, warm_trades_mw=rounds.x_state.copy(), start_prices=rounds.lam_eff.copy(),
                         start_own=True, history=rounds.history)

    def _resumed_rounds(self, state: ClearingState) -> P2PRounds:
        """The clearing of a resumed run: from the checkpoint's iteration, rho, trades and prices,
        which the first ROUND hands to every (newly registered) peer, as after a lost host."""
        history = [IterationStats(**{f: (int(v) if f in ("iteration", "open_hours") else float(v))
                                     for f, v in zip(HISTORY_FIELDS, row)}) for row in state.history]
        self.price_rounds = state.price_rounds
        self.resumed_from = {"run_id": state.run_id, "iteration": int(state.iteration),
                             "written_s": round(float(state.written_s), 3)}
        self._note("resumed", iteration=int(state.iteration), run_id=state.run_id)
        self._log(f"resuming run {state.run_id} from its checkpoint at iteration {state.iteration} (rho {state.rho:g})")
        return P2PRounds(self.graph, self.hosts, self.H, self._settings(state.rho), timer=self.timer,
                         start_iteration=state.iteration, warm_trades_mw=state.trades_mw.copy(),
                         start_prices=state.prices_eur_per_mwh.copy(), start_own=True, history=history)

    def _checkpoint_due(self, rounds, last: tuple[int, float]) -> bool:
        if not self.checkpoints or self.central is not None or not isinstance(rounds, P2PRounds) or rounds.finished:
            return False
        k, t = last
        return ((self.checkpoint_every > 0 and rounds.iteration - 1 - k >= self.checkpoint_every)
                or (self.checkpoint_s > 0 and self.now_s - t >= self.checkpoint_s))

    def _checkpoint(self, rounds: P2PRounds) -> None:
        """The state the ROUND just sent starts from, after ``rounds.iteration - 1`` complete
        iterations: a run resumed from it sends that ROUND again (same number, same state)."""
        history = np.array([[getattr(h, f) for f in HISTORY_FIELDS] for h in rounds.history], dtype=float)
        state = ClearingState(run_id=self.run_id, scenario=self.public.name, topology=self.topology,
                              peer_ids=list(self.graph.peer_ids), hours=self.H, iteration=int(rounds.iteration) - 1,
                              rho=float(rounds.rho), trades_mw=rounds.x_state.copy(),
                              prices_eur_per_mwh=rounds.lam_eff.copy(),
                              history=history.reshape(-1, len(HISTORY_FIELDS)), price_rounds=self.price_rounds,
                              written_s=float(self.now_s))
        self._out.append(Checkpoint(state))

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
        waiting, low, high, since = set(self.hosts), [], [], self.now_s
        while waiting:
            ev = yield from self._await(
                lambda e: isinstance(e.message, QuantitySum) and e.sender in waiting,
                lambda t: RunFailure(sorted(waiting)[0], f"price round {r}: no answer within {t:g} s from "
                                                         f"{', '.join(sorted(waiting)[:5])}"), since)
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
        q, waiting, since = {}, set(self.hosts), self.now_s
        while waiting:
            ev = yield from self._await(
                lambda e: isinstance(e.message, PoolQuantity) and e.sender in waiting,
                lambda t: RunFailure(sorted(waiting)[0], f"pool price: no starting injections within {t:g} s from "
                                                         f"{', '.join(sorted(waiting)[:5])}"), since)
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
        last_checkpoint = (rounds.iteration - 1, self.now_s)  # (iterations complete, when)
        while True:
            for dest, msg in sends:
                self._send(dest, msg, rounds.iteration)
            self.iteration = rounds.iteration
            if rounds.finished:
                break
            if self._checkpoint_due(rounds, last_checkpoint):
                self._checkpoint(rounds)
                last_checkpoint = (rounds.iteration - 1, self.now_s)
            sends = []
            k = rounds.iteration

            def silent(t, k=k):
                pending = sorted(rounds.pending())
                who = "; ".join("the dso service (network agent)" if h == "dso" else f"{h} (peer {', '.join(self.hosts[h])})"
                                for h in pending[:5])
                return RunFailure(pending[0] if pending else COORDINATOR,
                                  f"iteration {k}: no answer within {t:g} s from {who}")

            since = self.now_s  # the round's deadline counts from its sending
            while not sends and not rounds.finished:
                ev = yield from self._await(lambda e: type(e.message) in handlers, silent, since)
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
        results, waiting, since = {}, set(self.hosts), self.now_s
        while waiting:
            ev = yield from self._await(
                lambda e: isinstance(e.message, Result),
                lambda t: RunFailure(sorted(waiting)[0], f"no RESULT within {t:g} s from {', '.join(sorted(waiting))}"),
                since)
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
        return self.roster  # p2p: the public roster, less any peers dropped

    def _ask_dso(self, cleared: Cleared, plan: bool = False):
        roster = self._market_roster()
        dispatch = Dispatch(peer_ids=tuple(p.id for p in roster), kinds=tuple(p.kind for p in roster),
                            buses=tuple(int(p.bus) for p in roster), p_mw=cleared.p_mw, q_mvar=cleared.q_mvar, plan=plan)
        t = self.timer()
        ev = yield from self._ask(
            "dso", dispatch, lambda e: isinstance(e.message, GridReport) and e.sender == "dso",
            lambda t: RunFailure("dso", f"the dso service did not answer the dispatch within {t:g} s"))
        self.timing["dso_s"] = self.timer() - t
        return ev.message

    def _ask_tso(self):
        ev = yield from self._ask(
            "tso", FreqQuery(hours=self.H), lambda e: isinstance(e.message, FreqRequest) and e.sender == "tso",
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
                          dict(self.rejected), list(self.dropped))

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
            history.append((outer, its, n_viol, len({v.hour for v in report.violations}), step, actions))
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
