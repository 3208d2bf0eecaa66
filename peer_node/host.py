"""A peer process: holds one (or several) peers' private models and solves their local ADMM
updates when the coordinator asks. Costs and bounds never leave this process; only trades,
residual sums and (at the end) the cleared result do.

Light by design: numpy, pyzmq and msgpack only (no cvxpy, no pandapower, no pandas).
"""

from __future__ import annotations

import os
import socket
import sys
import time

import numpy as np
import zmq

from common.admm import LocalP2P
from common.models import PARAMETERS, EVModel, HourlyPeer, apply_parameters, flex_penalty_eur, peer_model_from_dict, peer_models, reactive_mvar
from common.protocol import ANY_RUN, Envelope, MsgType, ProtocolError
from common.protocol.control import Hello, Ready
from common.protocol.market import Penalty, Residuals, ResidualsPeer, Result, ResultPeer, Round, Trades, Update, UpdatePeer
from common.transport import Transport


class PeerFailure(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class PeerHost:
    def __init__(self, models: list, coordinator: str, host_id: str, timeout_s: float = 30.0,
                 bind_host: str = "127.0.0.1", advertise_host: str | None = None):
        self.models = {m.id: m for m in models}  # the market model now (after the DSO's/TSO's parameters)
        self.base_models = dict(self.models)  # the peer's own model: its true costs, for welfare
        self.params: dict[str, dict[str, np.ndarray]] = {m.id: {} for m in models}
        self.solved_since_receive: dict[str, bool] = {}
        self.peer_ids = list(self.models)
        self.host_id = host_id
        self.coordinator = coordinator
        self.timeout_s = timeout_s
        self.transport = Transport(validate_outgoing=False)
        self.dealer = self.transport.dealer(coordinator, identity=host_id)
        self.mesh_in = self.transport.router(f"tcp://{bind_host}:*")
        endpoint = self.mesh_in.getsockopt(zmq.LAST_ENDPOINT).decode()
        if advertise_host:
            endpoint = endpoint.rsplit(":", 1)
            endpoint = f"tcp://{advertise_host}:{endpoint[1]}"
        self.mesh_address = endpoint
        self.run_id = None
        self.locals: dict[str, LocalP2P] = {}
        self.partners: dict[str, list[str]] = {}
        self.rho_prev: dict[str, float] = {}
        self.mesh_out = {}  # partner peer id -> dealer socket
        self.early_trades: list[Trades] = []
        self.p_last: dict[str, np.ndarray] = {}  # community market: the last injection of each hosted peer

    # -- setup ----------------------------------------------------------------------------
    def register(self) -> None:
        log(f"pid {os.getpid()} hosting {', '.join(self.peer_ids)}; mesh socket {self.mesh_address}")
        hello = Hello(role="peer", peer_ids=tuple(self.peer_ids), pid=os.getpid(), host=socket.gethostname(),
                      address=self.mesh_address)
        self.transport.send(self.dealer, hello.envelope(run_id=ANY_RUN, sender=self.host_id))
        _, env = self.transport.recv(self.dealer, self.timeout_s, waiting_for="WELCOME from the coordinator",
                                     check=_only(MsgType.WELCOME, MsgType.SHUTDOWN))
        if env.type == MsgType.SHUTDOWN:
            raise PeerFailure(f"coordinator refused registration: {env.body.get('reason')}")
        cfg = env.body["config"]
        self.run_id = cfg["run_id"]
        self.transport.run_id = self.run_id
        self.topology = cfg["topology"]
        self.market = cfg.get("market", "p2p")
        hours = int(cfg["hours"])
        if self.market == "community":
            from common.community import local_solver

            self.solvers = {pid: local_solver(self.models[pid], hours) for pid in self.peer_ids}
            self.targets = {pid: np.zeros(hours) for pid in self.peer_ids}
            self.transport.send(self.dealer, Ready().envelope(run_id=self.run_id, sender=self.host_id))
            return
        lam0 = float(cfg.get("price_init_eur_per_mwh", 0.0))
        for pid in self.peer_ids:
            m = self.models[pid]
            partners = list(cfg["partners"][pid])
            self.partners[pid] = partners
            self.locals[pid] = LocalP2P(m.p_min_mw, m.p_max_mw, m.cost_a_eur_per_mw2h, m.cost_b_eur_per_mwh,
                                        1.0 if m.is_producer else -1.0, np.zeros((len(partners), hours)),
                                        lam=np.full((len(partners), hours), lam0))
        self.partner_slot = {pid: {partner: j for j, partner in enumerate(self.partners[pid])} for pid in self.peer_ids}
        if self.topology == "mesh":
            addresses = cfg["addresses"]
            by_address = {}
            for pid in self.peer_ids:
                for partner in self.partners[pid]:
                    addr = addresses[partner]
                    if addr not in by_address:
                        by_address[addr] = self.transport.dealer(addr, identity=self.host_id)
                    self.mesh_out[partner] = by_address[addr]
        self.transport.send(self.dealer, Ready().envelope(run_id=self.run_id, sender=self.host_id))

    # -- rounds ---------------------------------------------------------------------------
    def serve(self) -> None:
        handlers = {MsgType.ROUND: self.on_round, MsgType.SHUTDOWN: self.on_shutdown, MsgType.PENALTY: self.on_penalty}
        self.iteration = 0
        while True:
            _, env = self.transport.recv(self.dealer, 2 * self.timeout_s + 5,
                                         waiting_for=f"the next ROUND from the coordinator (after iteration {self.iteration})",
                                         check=self._check_control)
            try:
                if handlers[env.type](env):
                    return
            except ProtocolError as exc:  # a bad penalty is refused and counted; the peer goes on
                self.transport.rejected[exc.reason] += 1
                log(f"rejected a {env.type} from the coordinator: {exc}")

    def _check_control(self, env: Envelope) -> None:
        if env.type not in (MsgType.ROUND, MsgType.SHUTDOWN, MsgType.PENALTY):
            raise ProtocolError("type", f"unexpected {env.type} from the coordinator")
        if env.type in (MsgType.ROUND, MsgType.PENALTY) and env.iteration < self.iteration:
            raise ProtocolError("stale", f"iteration {env.iteration} < {self.iteration}")

    def on_shutdown(self, env: Envelope) -> bool:
        log(f"shutdown: {env.body.get('reason', '')}")
        return True

    def on_round(self, env: Envelope) -> bool:
        msg = Round.from_envelope(env)
        k = env.iteration
        if self.market == "community":
            return self.on_community_round(msg, k)
        if self.topology == "relay":
            for pid, loc in self.locals.items():
                if self.solved_since_receive.get(pid):
                    loc.receive(msg.peers[pid].p_in_mw, self.rho_prev.get(pid, msg.rho))
                    self.solved_since_receive[pid] = False
        if msg.stop:
            self.send_result(k)
            return False
        self.iteration = k
        records = {}
        for pid, loc in self.locals.items():
            t = time.perf_counter()
            x, dx = loc.step(msg.rho)
            self.rho_prev[pid] = msg.rho
            self.solved_since_receive[pid] = True
            records[pid] = (x, dx, time.perf_counter() - t)
        if self.topology == "relay":
            upd = Update(peers={pid: UpdatePeer(p_out_mw=x, primal_sq=0.0, dual_sq=dx, solve_s=s)
                                for pid, (x, dx, s) in records.items()})
            self.transport.send(self.dealer, upd.envelope(run_id=self.run_id, sender=self.host_id, iteration=k))
            return False
        # mesh: trades go straight to the partners, residual sums to the coordinator
        for pid, (x, _, _) in records.items():
            for j, partner in enumerate(self.partners[pid]):
                tr = Trades(from_peer=pid, to_peer=partner, p_mw=x[j])
                self.transport.send(self.mesh_out[partner], tr.envelope(run_id=self.run_id, sender=self.host_id, iteration=k))
        incoming = self.collect_trades(k)
        res = {}
        for pid, loc in self.locals.items():
            primal_sq = loc.receive(incoming[pid], msg.rho)
            self.solved_since_receive[pid] = False
            x, dx, s = records[pid]
            res[pid] = ResidualsPeer(primal_sq=primal_sq, dual_sq=dx, solve_s=s)
        self.transport.send(self.dealer, Residuals(peers=res).envelope(run_id=self.run_id, sender=self.host_id, iteration=k))
        return False

    def on_community_round(self, msg: Round, k: int) -> bool:
        """Community market: solve p = argmin f(p) + rho/2 ||p - target||^2 for the target
        z - u the coordinator sends (this peer's own, nothing of the others')."""
        if msg.stop:
            peers = {}
            for pid, solver in self.solvers.items():
                model = self.models[pid]
                last = getattr(solver, "last", None)
                p = self.p_last[pid]
                if isinstance(model, EVModel):
                    cost = model.degradation_eur_per_mwh * last.discharge_mw
                    soc = last.soc_mwh
                else:
                    cost, soc = model.cost_eur(p), None
                peers[pid] = ResultPeer(p_mw=p, trades_mw=np.zeros((0, len(p))), price_eur_per_mwh=np.zeros((0, len(p))),
                                        q_mvar=reactive_mvar(model, p, "community"), soc_mwh=soc, cost_eur=cost)
            self.transport.send(self.dealer, Result(peers=peers).envelope(run_id=self.run_id, sender=self.host_id, iteration=k))
            return False
        self.iteration = k
        records = {}
        for pid, solver in self.solvers.items():
            t = time.perf_counter()
            status = "ok"
            try:
                p = solver.solve(msg.peers[pid].p_in_mw[0], msg.rho)
                p = p.p_mw if hasattr(p, "p_mw") else p
            except Exception as exc:  # noqa: BLE001 - a failed local solve is an outcome, reported
                p, status = self.p_last.get(pid, np.zeros(msg.peers[pid].p_in_mw.shape[1])), f"local solve failed: {exc}"
            dx = float(np.sum((p - self.p_last.get(pid, 0.0)) ** 2))
            self.p_last[pid] = p
            records[pid] = UpdatePeer(p_out_mw=p[None, :], primal_sq=0.0, dual_sq=dx, solve_s=time.perf_counter() - t,
                                      status=status)
        self.transport.send(self.dealer, Update(peers=records).envelope(run_id=self.run_id, sender=self.host_id, iteration=k))
        return False

    def collect_trades(self, k: int) -> dict[str, np.ndarray]:
        """Wait for every partner's trade of iteration k (trades of k+1 that arrive early are kept)."""
        incoming = {pid: np.full(loc.x.shape, np.nan) for pid, loc in self.locals.items()}
        slot = self.partner_slot
        missing = {(pid, partner) for pid in self.locals for partner in self.partners[pid]}

        def take(tr: Trades) -> None:
            key = (tr.to_peer, tr.from_peer)
            if key in missing:
                incoming[tr.to_peer][slot[tr.to_peer][tr.from_peer]] = tr.p_mw
                missing.discard(key)

        keep = []
        for tr_k, tr in self.early_trades:
            (take(tr) if tr_k == k else keep.append((tr_k, tr)))
        self.early_trades = keep

        def check(env: Envelope) -> None:
            if env.type != MsgType.TRADES:
                raise ProtocolError("type", f"unexpected {env.type} on the mesh socket")
            if env.iteration not in (k, k + 1):
                raise ProtocolError("stale", f"trades of iteration {env.iteration} during {k}")
            if env.body["to_peer"] not in self.locals:
                raise ProtocolError("body", f"trades for {env.body['to_peer']}, not hosted here")

        deadline = time.monotonic() + self.timeout_s
        while missing:
            left = deadline - time.monotonic()
            if left <= 0:
                names = sorted({p for _, p in missing})
                raise TimeoutError(f"no trades of iteration {k} from partner(s) {', '.join(names[:8])} within {self.timeout_s:g} s")
            _, env = self.transport.recv(self.mesh_in, left, check=check,
                                         waiting_for=f"trades of iteration {k} from {len(missing)} partner(s)")
            tr = Trades.from_envelope(env)
            if env.iteration == k:
                take(tr)
            else:
                self.early_trades.append((env.iteration, tr))
        return incoming

    def on_penalty(self, env: Envelope) -> bool:
        """New parameters from the DSO or TSO (through the coordinator) for hosted peers: the next
        clearing starts from the current ADMM state with the retuned local problems."""
        if self.market != "p2p":
            raise ProtocolError("type", "a penalty in the community market")
        msg = Penalty.from_envelope(env)
        H = next(iter(self.locals.values())).x.shape[1]
        for pid, params in msg.peers.items():
            if pid not in self.locals:
                raise ProtocolError("body", f"penalty for {pid}, not hosted here")
            for name, arr in params.items():
                if name not in PARAMETERS:
                    raise ProtocolError("body", f"penalty parameter {name!r} unknown")
                want = (self.locals[pid].x.shape if name == "diff_eur_per_mwh" else (1,) if name == "beta_eur_per_mwh" else (H,))
                if arr.shape != want:
                    raise ProtocolError("body", f"penalty {name} for {pid} has shape {arr.shape}, expected {want}")
        for pid, params in msg.peers.items():
            self.params[pid].update(params)
            model = apply_parameters(self.base_models[pid], self.params[pid])
            self.models[pid] = model
            self.locals[pid].retune(model.p_min_mw, model.p_max_mw, model.cost_a_eur_per_mw2h, model.cost_b_eur_per_mwh,
                                    params.get("diff_eur_per_mwh"))
            log(f"{pid}: new {', '.join(sorted(params))} (iteration {env.iteration})")
        return False

    def send_result(self, k: int) -> None:
        peers = {}
        for pid, loc in self.locals.items():
            model, base = self.models[pid], self.base_models[pid]
            p = loc.p_mw
            outer = bool(self.params[pid])
            peers[pid] = ResultPeer(p_mw=p, trades_mw=loc.x, price_eur_per_mwh=loc.lam, partner_ids=tuple(self.partners[pid]),
                                    q_mvar=reactive_mvar(model, p), cost_eur=base.cost_eur(p),
                                    diff_cost_eur=np.sum(loc.weights * loc.x, axis=0) if outer else None,
                                    flex_penalty_eur=flex_penalty_eur(base, self.params[pid]) if outer else None)
        traffic = tuple(r for r in self.transport.sent.rows() if r[1] == MsgType.TRADES.value)
        self.transport.send(self.dealer, Result(peers=peers, traffic=traffic)
                            .envelope(run_id=self.run_id, sender=self.host_id, iteration=k))

    def close(self) -> None:
        self.transport.close()


def _only(*types):
    def check(env: Envelope) -> None:
        if env.type not in types:
            raise ProtocolError("type", f"unexpected {env.type}")
    return check


def load_models(scenario_path: str | None, peer_ids: list[str], model_files: list[str]) -> list[HourlyPeer]:
    """The hosted peers' private models: from single-peer model files (JSON, what the launcher
    writes for each peer) or from a scenario file and peer ids."""
    import json

    models = [peer_model_from_dict(json.loads(open(f).read())) for f in model_files]
    if peer_ids:
        from common.scenario import load_scenario

        scenario = load_scenario(scenario_path)
        by_id = {m.id: m for m in peer_models(scenario)}
        unknown = [pid for pid in peer_ids if pid not in by_id]
        if unknown:
            raise ValueError(f"unknown peer id(s) {', '.join(unknown)} in {scenario_path}")
        models += [by_id[pid] for pid in peer_ids]
    if not models:
        raise ValueError("no peer to host: give --model FILE or --scenario FILE --peer-id ID")
    return models


def main(models: list[HourlyPeer], coordinator: str, host_id: str | None, timeout_s: float,
         bind_host: str = "127.0.0.1", advertise_host: str | None = None) -> int:
    names = ", ".join(m.id for m in models)
    host = PeerHost(models, coordinator, host_id or f"host-{models[0].id}", timeout_s, bind_host, advertise_host)
    try:
        host.register()
        host.serve()
        return 0
    except (TimeoutError, PeerFailure, ConnectionError) as exc:
        log(f"peer(s) {names} stopped: {exc}")
        return 1
    finally:
        if host.transport.rejected:
            log(f"rejected messages: {dict(host.transport.rejected)}")
        host.close()


def child_main(model_dicts: list[dict], coordinator: str, host_id: str, timeout_s: float, log_path: str) -> None:
    """Entry point of a peer process forked by ``peer_node.zygote``: logs to ``log_path``."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    code = 1
    try:
        code = main([peer_model_from_dict(d) for d in model_dicts], coordinator, host_id, timeout_s)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
