"""The coordinator process: registration, the ADMM rounds (``coordinator.rounds``), the DSO and
TSO dialogs, and the results folder. This is the thin socket shell around the pure round logic.

It knows the roster (peer ids, kinds, buses) and the market settings, never a peer's costs.
Progress goes to stdout as JSON lines (read by the launcher); the log goes to stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from common.market import TradeGraph, trade_graph_from_roster
from common.protocol import Envelope, MsgType, ProtocolError
from common.protocol.control import Hello, Shutdown, Welcome
from common.protocol.frequency import FreqQuery, FreqRequest
from common.protocol.grid import Dispatch, GridReport, NetworkResult
from common.protocol.market import Residuals, Result, Update
from common.transport import Transport
from coordinator.rounds import CommunityRounds, P2PRounds, RoundSettings


class RunFailure(RuntimeError):
    """The run cannot go on; the message names the role and the reason."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] coordinator: {msg}", file=sys.stderr, flush=True)


def emit(event: str, **fields) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def roster_graph(scenario) -> TradeGraph:
    """The trading graph from the roster only (kinds decide producer / consumer)."""
    from common.models import PRODUCER_KINDS

    return trade_graph_from_roster([p.id for p in scenario.peers], [p.kind in PRODUCER_KINDS for p in scenario.peers])


class CoordinatorServer:
    def __init__(self, scenario, bind: str, run_id: str, topology: str, out_dir: Path, timeout_s: float, t0: float,
                 ready_file: Path | None = None, processes: int = 0):
        self.scenario = scenario
        self.run_id = run_id
        self.topology = topology
        self.out_dir = Path(out_dir)
        self.timeout_s = timeout_s
        self.t0 = t0
        self.processes = processes
        self.transport = Transport(run_id=run_id, validate_outgoing=False)
        self.router = self.transport.router(bind)
        import zmq

        self.address = self.router.getsockopt(zmq.LAST_ENDPOINT).decode()
        log(f"pid {os.getpid()} listening on {self.address}, run {run_id}")
        if ready_file:
            Path(ready_file).write_text(self.address)
        self.community = scenario.market.kind == "community"
        self.graph = roster_graph(scenario)
        # who registers as a peer: in the community market the external supplier is the root
        # exchange of the network agent, not a peer
        self.roster_ids = [p.id for p in scenario.peers if not (self.community and p.kind == "grid")]
        self.hosts: dict[str, list[str]] = {}  # host identity -> peer ids
        self.host_info: dict[str, Hello] = {}
        self.services: dict[str, Hello] = {}
        self.extra_traffic: list[tuple[int, str, int, int]] = []
        self.penalty_log: list[tuple] = []  # outer, source, host, peer, parameters: every PENALTY sent
        self.timing: dict[str, float] = {}

    # -- control dialog --------------------------------------------------------------------
    def _hello(self, ident: bytes, env: Envelope) -> None:
        hello = Hello.from_envelope(env)
        name = ident.decode()
        if hello.role in ("dso", "tso"):
            self.services[hello.role] = hello
            self._welcome(ident, {"run_id": self.run_id, "hours": self.scenario.market.hours})
            log(f"{hello.role} service registered (pid {hello.pid} on {hello.host})")
            return
        roster = set(self.roster_ids)
        taken = {p for h, ps in self.hosts.items() if h != name for p in ps}
        bad = [p for p in hello.peer_ids if p not in roster or p in taken]
        if bad or not hello.peer_ids:
            self.transport.rejected["registration"] += 1
            reason = f"unknown or already registered peer(s): {', '.join(bad) or '(none)'}"
            log(f"refused {name}: {reason}")
            self.transport.send(self.router, Shutdown(reason=reason).envelope(run_id=self.run_id, sender="coordinator"), to=ident)
            return
        self.hosts[name] = list(hello.peer_ids)
        self.host_info[name] = hello

    def _welcome(self, ident, config: dict) -> None:
        self.transport.send(self.router, Welcome(config=config).envelope(run_id=self.run_id, sender="coordinator"), to=ident)

    def _recv(self, timeout_s: float, waiting_for: str, types: tuple) -> tuple[bytes, Envelope]:
        """Receive one message of the given types; HELLOs of services are handled on the way."""

        def check(env: Envelope) -> None:
            if env.type not in types and env.type != MsgType.HELLO:
                raise ProtocolError("type", f"unexpected {env.type}")

        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {waiting_for} within {timeout_s:g} s")
            ident, env = self.transport.recv(self.router, left, check=check, waiting_for=waiting_for)
            if env.type == MsgType.HELLO and MsgType.HELLO not in types:
                hello = Hello.from_envelope(env)
                if hello.role in ("dso", "tso"):
                    self._hello(ident, env)
                else:
                    self.transport.rejected["late_hello"] += 1
                continue
            return ident, env

    def register(self) -> None:
        expected = set(self.roster_ids)
        deadline = time.monotonic() + self.timeout_s
        while {p for ps in self.hosts.values() for p in ps} != expected:
            left = deadline - time.monotonic()
            missing = sorted(expected - {p for ps in self.hosts.values() for p in ps})
            if left <= 0:
                raise RunFailure(f"registration: peer(s) {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''} "
                                 f"did not register within {self.timeout_s:g} s")
            try:
                ident, env = self._recv(left, f"HELLO from peer(s) {', '.join(missing[:5])}", (MsgType.HELLO,))
            except TimeoutError:
                continue
            self._hello(ident, env)
        addresses = {p: self.host_info[h].address for h, ps in self.hosts.items() for p in ps}
        index = {pid: n for n, pid in enumerate(self.graph.peer_ids)}
        market = self.scenario.market
        for host, peer_ids in self.hosts.items():
            if self.community:
                self._welcome(host.encode(), {"run_id": self.run_id, "topology": "relay", "market": "community",
                                              "hours": market.hours})
                continue
            partners = {pid: [self.graph.peer_ids[m] for m in self.graph.partner[self.graph.partners_of(index[pid])]]
                        for pid in peer_ids}
            config = {"run_id": self.run_id, "topology": self.topology, "hours": market.hours, "partners": partners,
                      "price_init_eur_per_mwh": market.price_init_eur_per_mwh, "market": "p2p"}
            if self.topology == "mesh":
                config["addresses"] = {q: addresses[q] for ps in partners.values() for q in ps}
            self._welcome(host.encode(), config)
        waiting = set(self.hosts)
        while waiting:
            ident, env = self._recv(self.timeout_s, f"READY from {len(waiting)} peer host(s): {', '.join(sorted(waiting)[:5])}",
                                    (MsgType.READY,))
            waiting.discard(ident.decode())
        self.timing["startup_s"] = time.time() - self.t0
        emit("ready", hosts=len(self.hosts), peers=len(expected), startup_s=self.timing["startup_s"])
        log(f"{len(expected)} peers in {len(self.hosts)} processes ready after {self.timing['startup_s']:.2f} s")

    # -- ADMM ------------------------------------------------------------------------------
    def clear_market(self, previous: P2PRounds | None = None) -> P2PRounds:
        """ADMM among the peer processes (full P2P market); warm-started from ``previous`` (outer loop)."""
        warm = {} if previous is None else dict(start_iteration=previous.iteration, warm_trades_mw=previous.flat)
        rounds = P2PRounds(self.graph, self.hosts, self.scenario.market.hours,
                           self._settings(None if previous is None else previous.rho), **warm)
        if self.topology == "relay":
            handlers = {MsgType.UPDATE: lambda ident, env: rounds.on_update(ident.decode(), Update.from_envelope(env))}
        else:
            handlers = {MsgType.RESIDUALS: lambda ident, env: rounds.on_residuals(ident.decode(), Residuals.from_envelope(env))}
        return self._drive(rounds, handlers)

    def clear_community(self) -> CommunityRounds:
        """ADMM between the peer processes and the DSO's network agent (community market)."""
        self._service("dso")
        rounds = CommunityRounds(self.roster_ids, self.hosts, self.scenario.market.hours, self._settings())

        def on_network(ident, env):
            if ident != b"dso":
                raise ValueError(f"a network result from {ident.decode()}")
            return rounds.on_network(NetworkResult.from_envelope(env))

        handlers = {MsgType.UPDATE: lambda ident, env: rounds.on_update(ident.decode(), Update.from_envelope(env)),
                    MsgType.NETWORK_RESULT: on_network}
        return self._drive(rounds, handlers)

    def _settings(self, rho: float | None = None) -> RoundSettings:
        m = self.scenario.market
        return RoundSettings(rho=m.rho if rho is None else rho, tolerance=m.tolerance, max_iterations=m.max_iterations,
                             residual_balancing=m.residual_balancing, mu=m.rb_mu, tau=m.rb_tau, every=m.rb_every,
                             until=m.rb_until, topology=self.topology, price_init_eur_per_mwh=m.price_init_eur_per_mwh)

    def _drive(self, rounds, handlers: dict):
        """The socket shell around a round state machine: send its instructions, feed it the
        answers of the current iteration (anything else is rejected and counted), stop on a
        deadline naming the silent roles."""
        t_start = time.perf_counter()
        last_emit = 0.0
        sends = rounds.start()
        while True:
            for dest, msg in sends:
                self.transport.send(self.router, msg.envelope(run_id=self.run_id, sender="coordinator",
                                                              iteration=rounds.iteration), to=dest)
            if rounds.finished:
                break
            sends = []
            k = rounds.iteration
            while not sends and not rounds.finished:
                try:
                    ident, env = self._recv(self.timeout_s, f"answers to iteration {k}", tuple(handlers))
                except TimeoutError:
                    who = "; ".join("the dso service (network agent)" if h == "dso" else f"{h} (peer {', '.join(self.hosts[h])})"
                                    for h in sorted(rounds.pending())[:5])
                    raise RunFailure(f"iteration {k}: no answer within {self.timeout_s:g} s from {who}") from None
                if env.iteration != k:
                    self.transport.rejected["stale"] += 1
                    continue
                try:
                    sends = handlers[env.type](ident, env)
                except (ValueError, KeyError) as exc:
                    self.transport.rejected["body"] += 1
                    log(f"rejected an answer from {ident.decode()}: {exc}")
            now = time.perf_counter()
            if now - last_emit > 0.25 or rounds.finished:
                last_emit = now
                emit("iteration", iteration=rounds.iteration, primal=rounds.primal_residual, dual=rounds.dual_residual,
                     rho=rounds.rho)
        self.timing["admm_s"] = time.perf_counter() - t_start
        if rounds.statuses:
            who = ", ".join(("the dso service (network agent)" if p == "dso" else f"peer {p}") + f": {st}"
                            for p, st in rounds.statuses.items())
            raise RunFailure(f"iteration {rounds.iteration}: {who}")
        return rounds

    def collect_results(self, k: int) -> dict[str, object]:
        results, waiting = {}, set(self.hosts)
        while waiting:
            try:
                ident, env = self._recv(self.timeout_s, "RESULT", (MsgType.RESULT,))
            except TimeoutError:
                raise RunFailure(f"no RESULT within {self.timeout_s:g} s from {', '.join(sorted(waiting))}") from None
            host = ident.decode()
            if host not in waiting:
                self.transport.rejected["duplicate"] += 1
                continue
            msg = Result.from_envelope(env)
            results.update(msg.peers)
            self.extra_traffic.extend(msg.traffic)
            waiting.discard(host)
        return results

    # -- services --------------------------------------------------------------------------
    def _service(self, role: str) -> None:
        deadline = time.monotonic() + self.timeout_s
        while role not in self.services:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RunFailure(f"the {role} service did not register within {self.timeout_s:g} s")
            try:
                ident, env = self._recv(left, f"HELLO from the {role} service", (MsgType.HELLO,))
                self._hello(ident, env)
            except TimeoutError:
                continue

    def ask_dso(self, dispatch_df, k: int, plan: bool = False) -> GridReport:
        self._service("dso")
        peers = list(dict.fromkeys(dispatch_df["peer"]))
        H = self.scenario.market.hours
        first = dispatch_df.drop_duplicates("peer").set_index("peer").loc[peers]
        msg = Dispatch(peer_ids=tuple(peers), kinds=tuple(first["kind"]), buses=tuple(int(b) for b in first["bus"]),
                       p_mw=dispatch_df["p_mw"].to_numpy().reshape(len(peers), H),
                       q_mvar=dispatch_df["q_mvar"].to_numpy().reshape(len(peers), H), plan=plan)
        self.transport.send(self.router, msg.envelope(run_id=self.run_id, sender="coordinator", iteration=k), to=b"dso")
        t = time.perf_counter()
        try:
            _, env = self._recv(self.timeout_s, "GRID_REPORT from the dso service", (MsgType.GRID_REPORT,))
        except TimeoutError:
            raise RunFailure(f"the dso service did not answer the dispatch within {self.timeout_s:g} s") from None
        self.timing["dso_s"] = time.perf_counter() - t
        return GridReport.from_envelope(env)

    def ask_tso(self, k: int) -> np.ndarray:
        self._service("tso")
        H = self.scenario.market.hours
        self.transport.send(self.router, FreqQuery(hours=H).envelope(run_id=self.run_id, sender="coordinator", iteration=k), to=b"tso")
        try:
            _, env = self._recv(self.timeout_s, "FREQ_REQUEST from the tso service", (MsgType.FREQ_REQUEST,))
        except TimeoutError:
            raise RunFailure(f"the tso service did not answer within {self.timeout_s:g} s") from None
        return FreqRequest.from_envelope(env).virtual_load_mw

    def shutdown(self, reason: str) -> None:
        for ident in [*self.hosts, *self.services]:
            try:
                self.transport.send(self.router, Shutdown(reason=reason).envelope(run_id=self.run_id, sender="coordinator"),
                                    to=ident.encode())
            except (ConnectionError, TimeoutError):
                pass

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> dict:
        self.register()
        if self.community:
            rounds = self.clear_community()
            result = self.community_result(rounds, self.collect_results(rounds.iteration))
            return self.finish(rounds, result)
        if self.scenario.market.model != "benchmark":
            return self.run_outer()
        rounds = self.clear_market()
        return self.finish(rounds, self.p2p_outcome(rounds))

    def p2p_outcome(self, rounds: P2PRounds):
        """Collect the peers' RESULTs after a clearing into a RunResult."""
        import pandas as pd

        from common.clearing import p2p_result

        k = rounds.iteration
        results = self.collect_results(k)
        H = self.scenario.market.hours
        ids = self.graph.peer_ids
        p_mw = np.vstack([results[pid].p_mw for pid in ids])
        trades = np.zeros((self.graph.n_pairs, H))
        prices = np.zeros((self.graph.n_pairs, H))
        for n, pid in enumerate(ids):
            kk = self.graph.partners_of(n)
            trades[kk] = results[pid].trades_mw
            prices[kk] = results[pid].price_eur_per_mwh
        # each peer discloses its own cost of the cleared dispatch (never its cost function)
        sw = -np.sum([results[pid].cost_eur for pid in ids], axis=0)
        zero = np.zeros(H)
        diff = np.sum([results[pid].diff_cost_eur if results[pid].diff_cost_eur is not None else zero for pid in ids], axis=0)
        flex = np.sum([results[pid].flex_penalty_eur if results[pid].flex_penalty_eur is not None else zero for pid in ids],
                      axis=0)
        roster = {p.id: p for p in self.scenario.peers}
        dispatch = pd.DataFrame({
            "peer": np.repeat(ids, H), "kind": np.repeat([roster[i].kind for i in ids], H),
            "bus": np.repeat([roster[i].bus for i in ids], H), "hour": np.tile(np.arange(1, H + 1), len(ids)),
            "p_mw": p_mw.reshape(-1), "q_mvar": np.vstack([results[pid].q_mvar for pid in ids]).reshape(-1)})
        result = p2p_result(self.scenario, self.graph, dispatch, trades, prices, sw, diff, "admm",
                            converged=rounds.converged)
        result.economics["flex_penalty_eur"] = flex
        return result

    def send_penalties(self, penalties: dict, k: int, outer: int, source: str) -> None:
        """Forward the DSO's or TSO's new parameters, each host getting only its own peers' ones."""
        from common.protocol.market import Penalty

        host_of = {p: h for h, ps in self.hosts.items() for p in ps}
        by_host: dict[str, dict] = {}
        for pid, params in penalties.items():
            if pid not in host_of:
                raise RunFailure(f"the {source} service sent parameters for unknown peer {pid}")
            by_host.setdefault(host_of[pid], {})[pid] = params
        for host, peers in by_host.items():
            self.transport.send(self.router, Penalty(peers=peers).envelope(run_id=self.run_id, sender="coordinator",
                                                                         iteration=k), to=host.encode())
            for pid, params in peers.items():
                self.penalty_log.append((outer, source, host, pid, " ".join(sorted(params))))

    def run_outer(self) -> dict:
        """The TSO/DSO outer loop (models cong, volt, freq, full; common.outer_loop): clear, AC
        check with the DSO's plan, forward the new parameters to the peers concerned, re-clear
        warm-started, until the DSO finds no violation or gives up."""
        import pandas as pd

        from common.outer_loop import finish_outer, history_row, virtual_load_id
        from dso_service.report_codec import ac_from_tables, frames_from_tables

        sc = self.scenario
        model, H = sc.market.model, sc.market.hours
        tso_first = model in ("freq", "full")
        all_rounds, history = [], []
        vl = np.zeros(H)

        def clear_and_check(plan: bool, step: str, actions: str):
            rounds = self.clear_market(all_rounds[-1] if all_rounds else None)
            all_rounds.append(rounds)
            result = self.p2p_outcome(rounds)
            report = self.ask_dso(result.dispatch, rounds.iteration, plan=plan)
            ac = ac_from_tables(report.tables)
            outer = len(all_rounds)
            its = rounds.iteration - rounds.start_iteration
            history.append(history_row(outer, its, ac, step, actions))
            emit("outer", outer=outer, iterations=its, violations=len(ac.violations), step=step)
            log(f"outer iteration {outer}: {its} ADMM iterations, {len(ac.violations)} violation(s)")
            return rounds, result, report, ac

        rounds, result, report, ac = clear_and_check(not tso_first, "clearing", "")
        ac_initial, sw_before, dispatch_before = ac, result.economics["social_welfare_eur"].to_numpy(), result.dispatch
        if tso_first:
            vl = self.ask_tso(rounds.iteration)
            vl_id = virtual_load_id(sc)
            self.send_penalties({vl_id: {"virtual_load_mw": vl}}, rounds.iteration, 1, "tso")
            rounds, result, report, ac = clear_and_check(True, "tso", f"virtual load {vl.sum():.2f} MWh")
        status, reason = report.outer_status or "feasible", report.outer_reason
        while status == "continue":
            if len(all_rounds) >= sc.dso.max_outer_iterations:
                status, reason = "limit", f"no feasible dispatch after {len(all_rounds)} outer iterations"
                break
            self.send_penalties(report.penalties or {}, rounds.iteration, len(all_rounds), "dso")
            rounds, result, report, ac = clear_and_check(True, "dso", " | ".join(report.actions))
            status, reason = report.outer_status or "feasible", report.outer_reason
        result.ac, result.ac_initial = ac, ac_initial
        result.outer_iterations = len(all_rounds)

        # the last check always planned, so the DSO's per-hour record came with it
        hours = frames_from_tables(report.tables, ["outer_hours"])["outer_hours"]
        finish_outer(result, hours.to_dict("records"), sw_before, vl, history, status, reason, dispatch_before)
        result.converged = result.converged and all(r.converged for r in all_rounds)
        result.penalties = pd.DataFrame(self.penalty_log, columns=["outer", "source", "host", "peer", "parameters"])
        summary = self.finish(all_rounds, result, ac=ac)
        if status != "feasible":
            raise RunFailure(f"outer loop ({model}) ended without a feasible grid: {reason} "
                             f"(results written to {self.out_dir})")
        return summary

    def community_result(self, rounds: CommunityRounds, results: dict):
        """The community market's results from the peers' RESULTs and the network agent's last answer."""
        from types import SimpleNamespace

        from common.clearing import community_result

        sc = self.scenario
        roster = {p.id: p for p in sc.peers}
        grid_peer = next(p for p in sc.peers if p.kind == "grid")
        net = rounds.network.arrays
        ids = self.roster_ids
        models = [SimpleNamespace(id=i, kind=roster[i].kind, bus=roster[i].bus) for i in ids]
        imp, exp_ = net["import_mw"], net["export_mw"]
        network_cost = sc.hourly(grid_peer, "import_price_eur_per_mwh") * imp - sc.hourly(grid_peer, "export_price_eur_per_mwh") * exp_
        sol = SimpleNamespace(
            p_mw=np.vstack([results[i].p_mw for i in ids]), q_mvar=np.vstack([results[i].q_mvar for i in ids]),
            ev_soc_mwh={i: results[i].soc_mwh for i in ids if results[i].soc_mwh is not None},
            import_mw=imp, export_mw=exp_, prices_eur_per_mwh=net["prices_eur_per_mwh"],
            social_welfare_eur=-np.sum([results[i].cost_eur for i in ids], axis=0) - network_cost,
            losses_mw=net["losses_mw"], vm_pu=net["vm_pu"], max_cone_gap=float(net["cone_gap"][0]))
        result = community_result(sc, models, sol, "admm", converged=rounds.converged)
        result.extra["peer_prices_max_abs_eur_per_mwh"] = float(np.abs(rounds.prices_eur_per_mwh).max())
        self._community_sol = sol
        return result

    def finish(self, rounds, result, ac=None) -> dict:
        """AC check and TSO request (unless an outer loop did them), results folder. ``rounds``:
        the clearing, or the list of an outer loop's clearings."""
        import pandas as pd

        clearings = rounds if isinstance(rounds, list) else [rounds]
        rounds = clearings[-1]
        k = rounds.iteration
        if ac is None:
            virtual_load = self.ask_tso(k)
            report = self.ask_dso(result.dispatch, k)
            from dso_service.report_codec import ac_from_tables

            result.ac = ac_from_tables(report.tables)
        else:
            virtual_load = result.outer_hours["virtual_load_mw"].to_numpy() if result.outer_hours is not None else np.zeros(1)
        if self.community:
            from common.clearing import relaxation_frame

            result.relaxation = relaxation_frame(self._community_sol, result.ac)
            result.extra["relaxation_max_vm_gap_pu"] = float(result.relaxation["max_vm_gap_pu"].max())
        self.shutdown("run complete")
        result.iterations = k
        result.outer_iterations = len(clearings)
        result.primal_residual = rounds.primal_residual
        result.dual_residual = rounds.dual_residual
        result.processes = self.processes or (len(self.hosts) + 1 + len(self.services))
        result.admm_history = pd.DataFrame([(o, s.iteration, s.primal_residual, s.dual_residual, s.rho)
                                            for o, r in enumerate(clearings, start=1) for s in r.history],
                                           columns=["outer", "iteration", "primal_residual", "dual_residual", "rho"])
        rows = self.transport.traffic_rows() + list(self.extra_traffic)
        msgs = pd.DataFrame(rows, columns=["iteration", "type", "count", "bytes"])
        result.messages = msgs.groupby(["iteration", "type"], as_index=False)[["count", "bytes"]].sum()
        hist = [s for r in clearings for s in r.history]
        n = max(len(hist), 1)
        if self.community:
            result.extra["network_agent_ms_per_iteration"] = 1e3 * sum(s.network_s for s in hist) / n
        result.extra.update({
            "topology": self.topology,
            "peer_processes": len(self.hosts),
            "startup_s": self.timing.get("startup_s"),
            "admm_s": self.timing.get("admm_s"),
            "time_per_iteration_ms": 1e3 * sum(s.wall_s for s in hist) / n,
            "local_solve_ms_per_iteration": 1e3 * sum(s.solve_s_max for s in hist) / n,
            "local_solve_cpu_ms_per_iteration": 1e3 * sum(s.solve_s_sum for s in hist) / n,
            "coordinator_ms_per_iteration": 1e3 * sum(s.coordinator_s for s in hist) / n,
            "dso_s": self.timing.get("dso_s"),
            "rejected_messages": int(self.transport.rejected_total()),
            "tso_virtual_load_mwh": float(np.sum(virtual_load)),
        })
        result.extra["messaging_ms_per_iteration"] = max(
            0.0, result.extra["time_per_iteration_ms"] - result.extra["local_solve_ms_per_iteration"]
            - result.extra["coordinator_ms_per_iteration"] - result.extra.get("network_agent_ms_per_iteration", 0.0))
        from common.report import build_summary, write_results

        result.wall_s = time.time() - self.t0
        write_results(result, self.out_dir, self.scenario)
        result.wall_s = time.time() - self.t0
        summary = build_summary(result)
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False))
        emit("done", out=str(self.out_dir), converged=result.converged, iterations=k)
        return summary

    def close(self) -> None:
        self.transport.close()


def main(scenario_path: str, bind: str, run_id: str, topology: str, out_dir: str, timeout_s: float, t0: float,
         ready_file: str | None, overrides: dict, processes: int = 0) -> int:
    from common.scenario import ScenarioError, load_scenario

    try:
        scenario = load_scenario(scenario_path, **overrides)
    except ScenarioError as exc:
        log(f"bad scenario: {exc}")
        return 2
    if scenario.market.kind == "community" and topology != "relay":
        log("the community market runs in the relay topology (the network agent couples every peer)")
        return 2
    server = CoordinatorServer(scenario, bind, run_id, topology, Path(out_dir), timeout_s, t0,
                               Path(ready_file) if ready_file else None, processes)
    try:
        server.run()
        return 0
    except (RunFailure, TimeoutError, ConnectionError) as exc:
        log(f"run failed: {exc}")
        emit("failed", reason=str(exc))
        server.shutdown(f"run failed: {exc}")
        return 1
    finally:
        if server.transport.rejected:
            log(f"rejected messages: {dict(server.transport.rejected)}")
        server.close()
