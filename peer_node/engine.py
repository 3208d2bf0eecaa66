"""The peer engine: one peer host (one or several peers) as ``handle(event) -> instructions``.

Built only from the hosted peers' own private models. Costs and bounds never leave it: it sends
trades (P2P), injections (community), residual sums, and at the end its dispatch and a masked cost
(``common.secagg``) whose masks cancel only in the sum over all peers.

Full P2P market, iteration k (``common.admm`` has the numerics):
- relay: ROUND(k) carries rho_k and the partners' trades of k-1; each peer first applies the price
  update of k-1 (with the rho it solved with), then solves with rho_k and answers UPDATE(k);
- mesh: ROUND(k) carries rho_k only; each peer solves, sends TRADES(k) to every partner's host,
  and once every partner's trades of k are in, applies the price update and answers RESIDUALS(k);
- ROUND with ``stop``: the last price update (relay), then RESULT.
Asynchronous mesh (``market.staleness`` S >= 1, :class:`AsyncMesh`): the first ROUND(k) starts the
host iterating on its own: it computes iteration j as soon as every partner's latest trades are
at most S iterations old (from iteration j - 1 - S or later), sends TRADES(j), and answers
RESIDUALS(i) once every partner's trades of iteration i are in; ROUND with ``stop`` ends it.
Community market: ROUND(k) carries each peer's target z - u; the peer answers its new injection.
PENALTY (outer loop): new parameters for hosted peers; the next clearing starts warm.
DROP (a peer host was lost, policy drop): the named peers leave every hosted peer's trades, prices
and secure-aggregation pairs; the coordinator's next ROUND sets the state to go on from.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from common.admm import AndersonMemory, LocalP2P, best_response
from common.engine import COORDINATOR, Finish, Log, Received, Send, Started
from common.models import PARAMETERS, EVModel, apply_parameters, flex_penalty_eur, reactive_mvar
from common.protocol import ProtocolError
from common.protocol.control import Hello, Ready, Shutdown, Welcome
from common.protocol.market import (Drop, Penalty, PoolPrice, PoolQuantity, PriceProbe, QuantitySum, Residuals, ResidualsPeer,
                                    Result, ResultPeer, Round, Trades, Update, UpdatePeer)
from common.secagg import NANO_MW_PER_MW, MaskKeys, add_masked, mask_label, split_shares, to_fixed


class PeerEngine:
    def __init__(self, models: list, host_id: str, *, address: str | None = None, pid: int = 0, host: str = "",
                 timer: Callable[[], float] = time.perf_counter):
        self.name = host_id
        self.models = {m.id: m for m in models}  # the market model now (after the DSO's/TSO's parameters)
        self.base_models = dict(self.models)  # the peer's own model: its true costs, for welfare
        self.params: dict[str, dict[str, np.ndarray]] = {m.id: {} for m in models}
        self.base_weights: dict[str, np.ndarray] = {}  # (partners, hours) fees from the peer's own data
        self.peer_ids = list(self.models)
        self.address, self.pid, self.host = address, pid, host
        self.timer = timer
        self.keys = MaskKeys(host_id)  # one key pair per host: masks cancel in the sum over hosts
        self.probes = 0  # price probes answered (each gets fresh masks)
        self.run_id = ""
        self.market = "p2p"
        self.topology = "relay"
        self.iteration = 0
        self.locals: dict[str, LocalP2P] = {}
        self.partners: dict[str, list[str]] = {}
        self.rho_prev: dict[str, float] = {}
        self.solved_since_receive: dict[str, bool] = {}
        self.partner_host: dict[str, str] = {}  # mesh: partner peer id -> its host id
        self.rejected: dict[str, int] = {}
        # mesh: the layout of the exchange, the trades of the current iteration as they arrive (rows
        # of ``routes``, ``_have`` marks the arrived ones) and early ones of the next
        self.routes: MeshRoutes | None = None
        self._in = np.zeros((0, 0))
        self._have = np.zeros(0, dtype=bool)
        self._incoming: dict[str, np.ndarray] = {}  # views into ``_in``, one per hosted peer
        self._n_missing = 0
        self._ahead: list[tuple[int, Trades, tuple]] = []  # synchronous: TRADES of the next iteration, their rows
        self._early: list[tuple[int, Trades]] = []  # asynchronous: TRADES before this host's first ROUND
        self._records: dict[str, tuple] = {}
        self._mesh_rho = 0.0
        self.solved: np.ndarray | None = None  # the hours solved in the last iteration (None: every hour)
        self.p_last: dict[str, np.ndarray] = {}  # community market: the last injection of each hosted peer
        # mesh Anderson acceleration: this host's part of the state's differences (one memory per clearing)
        self.aa: AndersonMemory | None = None
        self._aa_z: np.ndarray | None = None  # the state this iteration started from, (hours, n)
        self._aa_hours: np.ndarray | None = None  # the hours of the recorded blocks
        self.staleness = 0  # mesh: 0 synchronous rounds, S >= 1 asynchronous iterations (AsyncMesh)
        self.max_iterations = 0
        self.async_mesh: AsyncMesh | None = None  # while the asynchronous iterations run
        self.async_done = False  # they ended: late TRADES are dropped
        self.rejoin = False

    # -- events ---------------------------------------------------------------------------------
    def handle(self, event) -> list:
        if isinstance(event, Started):
            return [Send(COORDINATOR, Hello(role="peer", peer_ids=tuple(self.peer_ids), pid=self.pid, host=self.host,
                                            address=self.address,
                                            public_keys={self.name: self.keys.public_hex}))]
        if not isinstance(event, Received):
            return []  # a deadline: the shell reports the silence; nothing to decide here
        msg, k = event.message, event.iteration
        try:
            if isinstance(msg, Trades):
                if self.staleness > 0 and not self.async_done:
                    self._check_trades(event.sender, msg)
                    if self.async_mesh is None:  # a partner's host started before this one got its ROUND
                        self._early.append((k, msg))
                        return []
                    return self.async_mesh.on_trades(msg, k)
                if self.async_done:
                    return []  # sent before the partner learnt that the iterations ended
                return self._on_trades(event.sender, msg, k)
            if event.sender != COORDINATOR:
                raise ProtocolError("type", f"{msg.TYPE.value} from {event.sender}, not from the coordinator")
            if isinstance(msg, Welcome):
                return self._on_welcome(msg.config)
            if isinstance(msg, Shutdown):
                return [Log(f"shutdown: {msg.reason}"), Finish()]
            if isinstance(msg, Round) and msg.stop and self.async_mesh is not None:
                self.async_mesh = None  # the hosts went on at their own pace: the stop may name an earlier iteration
                self.async_done = True
                return [self._result(k)]
            if k < self.iteration:
                raise ProtocolError("stale", f"{msg.TYPE.value} of iteration {k} < {self.iteration}")
            if isinstance(msg, Round):
                return self._on_round(msg, k)
            if isinstance(msg, Penalty):
                return self._on_penalty(msg, k)
            if isinstance(msg, PriceProbe):
                return self._on_probe(msg, k)
            if isinstance(msg, PoolPrice):
                return self._on_pool_price(msg, k)
            if isinstance(msg, Drop):
                return self._on_drop(msg, k)
            raise ProtocolError("type", f"unexpected {msg.TYPE.value} from the coordinator")
        except ProtocolError as exc:  # refused and counted; the peer goes on
            self.rejected[exc.reason] = self.rejected.get(exc.reason, 0) + 1
            return [Log(f"rejected a {msg.TYPE.value} from {event.sender}: {exc}", "warning")]

    # -- setup ----------------------------------------------------------------------------------
    def _on_welcome(self, cfg: dict) -> list:
        if cfg.get("rekey"):  # a peer host came back with new keys: only the pairs with its peers change
            if not self.locals:
                raise ProtocolError("body", "new public keys before the run's settings")
            self.keys.agree({h: k for h, k in (cfg.get("public_keys") or {}).items() if h != self.name})
            self.solved = None  # the clearing goes on as a fresh one: the next ROUND sets every hour
            return [Log(f"new public key of peer host(s) {', '.join(sorted(cfg.get('public_keys') or {}))}")]
        self.run_id = cfg["run_id"]
        self.topology = cfg.get("topology", "relay")
        self.market = cfg.get("market", "p2p")
        self.hours = int(cfg["hours"])
        self.rejoin = bool(cfg.get("rejoin"))  # policy wait: a host that lost its coordinator registers again
        self.keys.agree(cfg.get("public_keys") or {})
        if self.market == "community":
            from common.community import local_solver

            self.solvers = {pid: local_solver(self.models[pid], self.hours) for pid in self.peer_ids}
            return [Send(COORDINATOR, Ready())]
        lam0 = float(cfg.get("price_init_eur_per_mwh", 0.0))
        for pid in self.peer_ids:
            m = self.models[pid]
            partners = list(cfg["partners"][pid])
            self.partners[pid] = partners
            fees = m.trade_weights or {}  # product differentiation as data: this peer's own fees
            self.base_weights[pid] = np.repeat(np.array([[fees.get(q, 0.0)] for q in partners]).reshape(-1, 1),
                                               self.hours, axis=1)
            self.locals[pid] = LocalP2P(m.p_min_mw, m.p_max_mw, m.cost_a_eur_per_mw2h, m.cost_b_eur_per_mwh,
                                        m.trade_sign, self.base_weights[pid].copy(),
                                        lam=np.full((len(partners), self.hours), lam0), cost_b_neg=m.cost_b_neg_eur_per_mwh)
        self.partner_slot = {pid: {q: j for j, q in enumerate(self.partners[pid])} for pid in self.peer_ids}
        self.partner_host = dict(cfg.get("hosts") or {})
        self.staleness = int(cfg.get("staleness", 0)) if self.topology == "mesh" else 0
        self.routes = MeshRoutes(self.partners, self.partner_slot, self.partner_host) if self.topology == "mesh" else None
        self.max_iterations = int(cfg.get("max_iterations", 0))
        return [Send(COORDINATOR, Ready())]

    # -- rounds ---------------------------------------------------------------------------------
    def _best_responses(self, price: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        out = {}
        for pid in self.peer_ids:
            m = self.models[pid]
            out[pid] = best_response(m.cost_a_eur_per_mw2h, m.cost_b_eur_per_mwh, m.p_min_mw, m.p_max_mw, price,
                                     m.cost_b_neg_eur_per_mwh)
        return out

    def _on_probe(self, msg: PriceProbe, k: int) -> list:
        """Pool-price start: the hosted peers' best responses to candidate prices, summed over the
        host and masked, so that the coordinator learns only the sum over all peers."""
        price = msg.price_eur_per_mwh
        if self.market != "p2p" or price.ndim != 2 or price.shape[1] != self.hours:
            raise ProtocolError("body", f"a price probe of shape {price.shape} in the {self.market} market")
        self.probes += 1
        answers = self._best_responses(price)
        masked = {side: self.keys.masked_fixed(add_masked([to_fixed(answers[pid][j], NANO_MW_PER_MW) for pid in self.peer_ids]),
                                               mask_label(self.run_id, k, f"probe{self.probes}{side}"))
                  for j, side in enumerate(("low", "high"))}
        return [Send(COORDINATOR, QuantitySum(q_low_masked=masked["low"], q_high_masked=masked["high"]), k)]

    def _on_pool_price(self, msg: PoolPrice, k: int) -> list:
        """The settled pool price: each hosted peer's starting injection there."""
        a, b, share = msg.price_a_eur_per_mwh, msg.price_b_eur_per_mwh, msg.share
        if any(v.shape != (self.hours,) for v in (a, b, share)) or np.any((share < 0) | (share > 1)) or np.any(a > b):
            raise ProtocolError("body", "a pool price of the wrong shape or with a share outside [0, 1]")
        at_a, at_b = self._best_responses(a), self._best_responses(b)
        same = a == b
        q = {pid: (1 - share) * np.where(same, at_a[pid][0], at_a[pid][1]) + share * np.where(same, at_b[pid][1], at_b[pid][0])
             for pid in self.peer_ids}
        return [Send(COORDINATOR, PoolQuantity(peers=q), k)]

    def _cols(self, hours: np.ndarray | None):
        return slice(None) if hours is None else hours

    def _start_from(self, msg: Round) -> None:
        """A ROUND that sets the state to start from (a pool-price start, an accelerated point), in
        the hours solved last (every hour at the start of a clearing): the partners' trades towards
        each peer, the prices of its trades, and its own trades (by default the reciprocal ones); a
        pending price update is replaced by these prices."""
        for pid in self.locals:
            rec = msg.peers.get(pid)
            if rec is None or rec.price_eur_per_mwh is None:
                raise ProtocolError("body", f"a starting ROUND without the start of peer {pid}")
        cols = self._cols(self.solved)
        for pid, loc in self.locals.items():
            rec = msg.peers[pid]
            own = -rec.p_in_mw if rec.p_own_mw is None else rec.p_own_mw
            loc.y[:, cols], loc.x[:, cols], loc.lam[:, cols] = rec.p_in_mw, own, rec.price_eur_per_mwh
            self.solved_since_receive[pid] = False

    def _check_round(self, msg: Round) -> None:
        """Refuse a ROUND whole before anything changes: open hours within the day, every hosted
        peer's arrays covering the hours it solved last."""
        if msg.hours is not None and msg.hours[-1] >= self.hours:
            raise ProtocolError("body", f"open hours {msg.hours.tolist()} outside the day of {self.hours} hours")
        if self.topology == "mesh" and not any(rec.price_eur_per_mwh is not None for rec in msg.peers.values()):
            return
        n = self.hours if self.solved is None else len(self.solved)
        for pid, loc in self.locals.items():
            rec = msg.peers.get(pid)
            if rec is None:
                raise ProtocolError("body", f"a ROUND without peer {pid}")
            if rec.p_in_mw.shape != (loc.x.shape[0], n):
                raise ProtocolError("body", f"trades of shape {rec.p_in_mw.shape} for {pid}, expected {(loc.x.shape[0], n)}")

    def _on_round(self, msg: Round, k: int) -> list:
        if self.market == "community":
            return self._on_community_round(msg, k)
        self._check_round(msg)
        if any(rec.price_eur_per_mwh is not None for rec in msg.peers.values()):
            self._start_from(msg)
        elif self.topology == "relay":
            for pid, loc in self.locals.items():
                if self.solved_since_receive.get(pid):
                    loc.receive(msg.peers[pid].p_in_mw, self.rho_prev.get(pid, msg.rho), self.solved)
                    self.solved_since_receive[pid] = False
        if msg.stop:
            self.solved = None  # the next clearing starts with every hour open
            self.aa = self._aa_z = None
            return [self._result(k)]
        if self.staleness > 0:  # asynchronous: this ROUND starts the host's own iterations
            self.iteration = k
            self.async_done = False
            self.async_mesh = AsyncMesh(self, start=k - 1, rho=msg.rho)
            early, self._early = self._early, []
            out = []
            for tr_k, tr in early:
                out += self.async_mesh.on_trades(tr, tr_k)
            return out + self.async_mesh.advance()
        if msg.aa_gamma is not None:
            self._aa_extrapolate(msg)
        self.iteration = k
        self.solved = msg.hours
        if msg.aa_memory:
            if self.aa is None or self.aa.memory != msg.aa_memory:
                self.aa = AndersonMemory(msg.aa_memory)
            self._aa_z = self._aa_pack(msg.rho)
        else:
            self._aa_z = None
        records = {}
        for pid, loc in self.locals.items():
            t = self.timer()
            x, dx = loc.step(msg.rho, msg.hours)
            self.rho_prev[pid] = msg.rho
            self.solved_since_receive[pid] = True
            records[pid] = (x, dx, self.timer() - t)
        if self.topology == "relay":
            return [Send(COORDINATOR, Update(peers={pid: UpdatePeer(p_out_mw=x, dual_sq=dx, solve_s=s)
                                                    for pid, (x, dx, s) in records.items()}), k)]
        # mesh: trades go straight to the partners' hosts, residual sums to the coordinator: one
        # TRADES per partner host, every trade of this host's peers towards that host's peers
        routes = self.routes
        x_all = np.concatenate([records[pid][0] for pid in routes.pids])
        out = [Send(host, Trades(from_peers=frm, to_peers=to, p_mw=x_all[rows]), k)
               for host, (frm, to, rows) in routes.send.items()]
        self._records, self._mesh_rho = records, msg.rho
        self._in = np.full(x_all.shape, np.nan)
        self._have = np.zeros(routes.n_rows, dtype=bool)
        self._n_missing = routes.n_rows
        self._incoming = {pid: self._in[routes.offset[pid]:routes.offset[pid] + len(self.partners[pid])]
                          for pid in routes.pids}
        ahead, self._ahead = self._ahead, []
        for tr_k, tr, rows in ahead:
            if tr_k == k:
                self._take(tr, rows)
            else:
                self._ahead.append((tr_k, tr, rows))
        return out + self._maybe_residuals(k)

    def _take(self, tr: Trades, rows: tuple[np.ndarray, np.ndarray | None]) -> None:
        """Keep the rows of ``tr`` not yet received in this iteration (``rows``: their places, and
        which rows of ``tr`` to read, None for all; ``MeshRoutes.rows_of``)."""
        if tr.p_mw.shape[1:] != self._in.shape[1:]:  # an early one is checked here, once its
            self.rejected["body"] = self.rejected.get("body", 0) + 1  # iteration's hours are known
            return
        places, which = rows
        p_mw = tr.p_mw if which is None else tr.p_mw[which]
        new = ~self._have[places]
        self._in[places[new]] = p_mw[new]
        self._have[places] = True
        self._n_missing -= int(new.sum())

    def _refuse_outside_mesh(self) -> None:
        if self.topology != "mesh" or self.market != "p2p":
            raise ProtocolError("type", "trades outside the mesh topology")

    def _check_senders(self, sender: str, tr: Trades) -> None:
        """Every row of a TRADES goes to a hosted peer from one of its partners, sent by that
        partner's own host."""
        for frm, to in zip(tr.from_peers, tr.to_peers):
            if to not in self.locals:
                raise ProtocolError("body", f"trades for {to}, not hosted here")
            if frm not in self.partner_slot[to]:
                raise ProtocolError("body", f"trades from {frm}, not a partner of {to}")
            if self.partner_host.get(frm) != sender:
                raise ProtocolError("body", f"trades of {frm} sent by {sender}, not by its host")

    def _check_trades(self, sender: str, tr: Trades) -> None:
        """The asynchronous mesh: every hour, every row."""
        self._refuse_outside_mesh()
        self._check_senders(sender, tr)
        if tr.p_mw.ndim != 2 or tr.p_mw.shape != (len(tr.from_peers), self.hours):
            raise ProtocolError("body", f"trades of shape {tr.p_mw.shape}, expected {(len(tr.from_peers), self.hours)}")

    def _on_trades(self, sender: str, tr: Trades, k: int) -> list:
        self._refuse_outside_mesh()
        if self.routes is None:  # its WELCOME was refused
            raise ProtocolError("body", "trades before this host has the run's settings")
        rows = self.routes.rows_of(sender, tr, self._check_senders)
        if k == self.iteration + 1 or (k == self.iteration and not self._n_missing):
            self._ahead.append((k, tr, rows))  # the partner is one round ahead
            return []
        if k != self.iteration:
            raise ProtocolError("stale", f"trades of iteration {k} during {self.iteration}")
        want = self._in.shape[1:]
        if tr.p_mw.shape[1:] != want:
            raise ProtocolError("body", f"trades of {tr.p_mw.shape[1]} hours, expected {want[0]}")
        self._take(tr, rows)
        return self._maybe_residuals(k)

    def _maybe_residuals(self, k: int) -> list:
        if self._n_missing or not self._records:
            return []
        res = {}
        for pid, loc in self.locals.items():
            primal_sq = loc.receive(self._incoming[pid], self._mesh_rho, self.solved)
            self.solved_since_receive[pid] = False
            _, dx, s = self._records[pid]
            res[pid] = ResidualsPeer(primal_sq=primal_sq, dual_sq=dx, solve_s=s)
        self._records = {}
        if self._aa_z is None:
            return [Send(COORDINATOR, Residuals(peers=res), k)]
        self._aa_hours = np.arange(self.hours) if self.solved is None else self.solved
        col, rhs, f_sq = self.aa.record(self._aa_z, self._aa_pack(self._mesh_rho), counted=2 * self._aa_rows())
        return [Send(COORDINATOR, Residuals(peers=res, aa_col=col, aa_rhs=rhs, aa_f_sq=f_sq), k)]

    # -- mesh Anderson acceleration ------------------------------------------------------------
    def _aa_rows(self) -> int:
        return sum(loc.x.shape[0] for loc in self.locals.values())

    def _aa_pack(self, rho: float) -> np.ndarray:
        """This host's part of the state in the solved hours, one row per hour: its peers' scaled
        trades and prices (counted in the sums, as in the relay's ``P2PRounds._accelerate``), then
        their partners' scaled trades (mirrored: extrapolated with the same coefficients)."""
        c, sq = self._cols(self.solved), np.sqrt(rho)
        locs = self.locals.values()
        return np.concatenate([sq * np.concatenate([loc.x[:, c] for loc in locs]),
                               np.concatenate([loc.lam[:, c] for loc in locs]) / sq,
                               sq * np.concatenate([loc.y[:, c] for loc in locs])]).T

    def _aa_extrapolate(self, msg: Round) -> None:
        """Set the hosted peers' state of the open hours to the extrapolated point."""
        if self.aa is None or self._aa_hours is None:
            raise ProtocolError("body", "acceleration coefficients without recorded differences")
        hours = np.arange(self.hours) if msg.hours is None else msg.hours
        keep = np.isin(self._aa_hours, hours)
        if keep.sum() != len(hours) or msg.aa_gamma.shape != (len(hours), self.aa.memory):
            raise ProtocolError("body", f"acceleration coefficients of shape {msg.aa_gamma.shape} for {len(hours)} hours")
        self.aa.keep(keep)
        self._aa_hours = hours
        reject = np.zeros(len(hours), dtype=bool)
        reject[msg.aa_rejected] = True
        out = self.aa.extrapolate(msg.aa_gamma, reject, msg.aa_drift).T
        sq, K, row = np.sqrt(msg.rho), self._aa_rows(), 0
        for loc in self.locals.values():
            m = loc.x.shape[0]
            loc.x[:, hours] = out[row:row + m] / sq
            loc.lam[:, hours] = out[K + row:K + row + m] * sq
            loc.y[:, hours] = out[2 * K + row:2 * K + row + m] / sq
            row += m

    def _on_community_round(self, msg: Round, k: int) -> list:
        """Community market: p = argmin f(p) + rho/2 ||p - target||^2 for this peer's own target z - u."""
        if msg.stop:
            return [self._community_result(k)]
        self.iteration = k
        records = {}
        for pid, solver in self.solvers.items():
            t = self.timer()
            status = "ok"
            try:
                p = solver.solve(msg.peers[pid].p_in_mw[0], msg.rho)
                p = p.p_mw if hasattr(p, "p_mw") else p
            except Exception as exc:  # noqa: BLE001 - a failed local solve is an outcome, reported
                p, status = self.p_last.get(pid, np.zeros(msg.peers[pid].p_in_mw.shape[1])), f"local solve failed: {exc}"
            dx = (p - self.p_last.get(pid, 0.0)) ** 2
            self.p_last[pid] = p
            records[pid] = UpdatePeer(p_out_mw=p[None, :], dual_sq=dx, solve_s=self.timer() - t,
                                      status=status)
        return [Send(COORDINATOR, Update(peers=records), k)]

    def _on_drop(self, msg: Drop, k: int) -> list:
        """Peers that left the market: their rows leave each hosted peer's state and partners, their
        pairs leave the masks; the state is set again by the next ROUND (every hour)."""
        if self.market != "p2p":
            raise ProtocolError("type", "a drop in the community market")
        gone = set(msg.peers)
        if gone & set(self.peer_ids):
            raise ProtocolError("body", f"a drop of hosted peer(s) {', '.join(sorted(gone & set(self.peer_ids)))}")
        for pid, loc in self.locals.items():
            keep = [j for j, q in enumerate(self.partners[pid]) if q not in gone]
            self.partners[pid] = [self.partners[pid][j] for j in keep]
            self.base_weights[pid] = self.base_weights[pid][keep]
            loc.x, loc.y, loc.lam, loc.weights = loc.x[keep], loc.y[keep], loc.lam[keep], loc.weights[keep]
            self.solved_since_receive[pid] = False
        self.keys.forget(msg.hosts)
        self.partner_slot = {pid: {q: j for j, q in enumerate(self.partners[pid])} for pid in self.peer_ids}
        for q in gone:
            self.partner_host.pop(q, None)
        if self.routes is not None:
            self.routes = MeshRoutes(self.partners, self.partner_slot, self.partner_host)
        self.solved = None
        self.iteration = k
        return [Log(f"peer(s) {', '.join(sorted(gone))} left the market at iteration {k}")]

    # -- outer loop -----------------------------------------------------------------------------
    def _on_penalty(self, msg: Penalty, k: int) -> list:
        """New parameters from the DSO or TSO (through the coordinator) for hosted peers: the next
        clearing starts from the current ADMM state with the retuned local problems."""
        if self.market != "p2p":
            raise ProtocolError("type", "a penalty in the community market")
        H = self.hours
        for pid, params in msg.peers.items():
            if pid not in self.locals:
                raise ProtocolError("body", f"penalty for {pid}, not hosted here")
            for name, arr in params.items():
                if name not in PARAMETERS:
                    raise ProtocolError("body", f"penalty parameter {name!r} unknown")
                want = (self.locals[pid].x.shape if name == "diff_eur_per_mwh" else (1,) if name == "beta_eur_per_mwh" else (H,))
                if arr.shape != want:
                    raise ProtocolError("body", f"penalty {name} for {pid} has shape {arr.shape}, expected {want}")
        out = []
        for pid, params in msg.peers.items():
            self.params[pid].update(params)
            model = apply_parameters(self.base_models[pid], self.params[pid])
            self.models[pid] = model
            diff = params.get("diff_eur_per_mwh")
            self.locals[pid].retune(model.p_min_mw, model.p_max_mw, model.cost_a_eur_per_mw2h, model.cost_b_eur_per_mwh,
                                    None if diff is None else self.base_weights[pid] + diff)
            out.append(Log(f"{pid}: new {', '.join(sorted(params))} (iteration {k})"))
        return out

    # -- results --------------------------------------------------------------------------------
    def _masked_costs(self, cost_eur: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
        """Each hosted peer's share of the host's masked cost sum (alone, a share is random)."""
        total = self.keys.masked_fixed(add_masked([to_fixed(cost_eur[pid]) for pid in self.peer_ids]),
                                       mask_label(self.run_id, k))
        return dict(zip(self.peer_ids, split_shares(total, len(self.peer_ids))))

    def _result(self, k: int) -> Send:
        peers = {}
        masked = self._masked_costs({pid: self.base_models[pid].cost_eur(loc.p_mw) for pid, loc in self.locals.items()}, k)
        for pid, loc in self.locals.items():
            model, base = self.models[pid], self.base_models[pid]
            p = loc.p_mw
            outer = bool(self.params[pid])
            fees = bool(self.models[pid].trade_weights) or outer
            peers[pid] = ResultPeer(p_mw=p, trades_mw=loc.x, price_eur_per_mwh=loc.lam,
                                    q_mvar=reactive_mvar(model, p), cost_masked_ueur=masked[pid],
                                    diff_cost_eur=np.sum(loc.weights * loc.x, axis=0) if fees else None,
                                    flex_penalty_eur=flex_penalty_eur(base, self.params[pid]) if outer else None,
                                    trade_fee_eur=loc.weights * loc.x if fees else None)
        return Send(COORDINATOR, Result(peers=peers), k)

    def _community_result(self, k: int) -> Send:
        costs, socs = {}, {}
        for pid, solver in self.solvers.items():
            model, p = self.models[pid], self.p_last[pid]
            if isinstance(model, EVModel):
                costs[pid], socs[pid] = model.degradation_eur_per_mwh * solver.last.discharge_mw, solver.last.soc_mwh
            else:
                costs[pid], socs[pid] = model.cost_eur(p), None
        masked = self._masked_costs(costs, k)
        peers = {}
        for pid in self.solvers:
            p = self.p_last[pid]
            peers[pid] = ResultPeer(p_mw=p, trades_mw=np.zeros((0, len(p))), price_eur_per_mwh=np.zeros((0, len(p))),
                                    q_mvar=reactive_mvar(self.models[pid], p, "community"), soc_mwh=socs[pid],
                                    cost_masked_ueur=masked[pid])
        return Send(COORDINATOR, Result(peers=peers), k)


class MeshRoutes:
    """The layout of one peer host's synchronous mesh exchange, fixed while the partners are: the
    hosted peers' trades as consecutive rows of one array (hosted peers in order, each one's
    partners in order), the rows each partner host gets (one TRADES per host and iteration), and,
    per sending host, where the rows of its TRADES land. A sender's list of pairs is checked row by
    row the first time it comes, and recognised by the lists alone afterwards."""

    def __init__(self, partners: dict[str, list[str]], partner_slot: dict[str, dict[str, int]],
                 partner_host: dict[str, str]):
        """``partner_slot``: the host's {peer: {partner: row in that peer's trades}}."""
        self.pids = list(partners)
        self.partner_slot = partner_slot
        sizes = [len(partners[p]) for p in self.pids]
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        self.offset = {p: int(starts[i]) for i, p in enumerate(self.pids)}
        self.n_rows = int(starts[-1])
        missing = sorted({q for p in self.pids for q in partners[p] if q not in partner_host})
        if missing:
            raise ProtocolError("body", f"no host named for partner(s) {', '.join(missing[:5])}")
        send: dict[str, tuple[list, list, list]] = {}
        for p in self.pids:
            for j, q in enumerate(partners[p]):
                frm, to, rows = send.setdefault(partner_host[q], ([], [], []))
                frm.append(p)
                to.append(q)
                rows.append(self.offset[p] + j)
        self.send = {h: (tuple(frm), tuple(to), np.array(rows, dtype=np.intp)) for h, (frm, to, rows) in send.items()}
        self._known: dict[str, tuple[tuple, tuple, tuple]] = {}

    def rows_of(self, sender: str, tr: Trades, check) -> tuple[np.ndarray, np.ndarray | None]:
        """Where the rows of ``tr`` land, and which of its rows to read (the first of repeated
        pairs; None: all); ``check(sender, tr)`` refuses a list of pairs not seen before."""
        known = self._known.get(sender)
        if known is not None and known[0] == tr.from_peers and known[1] == tr.to_peers:
            return known[2]
        check(sender, tr)
        places = np.array([self.offset[to] + self.partner_slot[to][frm] for frm, to in zip(tr.from_peers, tr.to_peers)],
                          dtype=np.intp)
        first = np.unique(places, return_index=True)[1]
        rows = (places, None) if len(first) == len(places) else (places[np.sort(first)], np.sort(first))
        self._known[sender] = (tr.from_peers, tr.to_peers, rows)
        return rows


class AsyncMesh:
    """Asynchronous consensus ADMM with bounded staleness S (mesh topology) of one peer host, in the
    manner of the bounded-delay asynchronous ADMM (Zhang & Kwok 2014, ICML, "Asynchronous
    distributed ADMM for consensus optimization"; Chang, Hong, Liao & Wang 2016, IEEE TSP 64(12),
    "Asynchronous distributed ADMM for large-scale optimization", part I: a proximal term and a
    bounded delay make it converge), without a master: each pair of peers is its own consensus, as
    in the P2P market's ADMM of ``common.admm``.

    Iteration j of a hosted peer solves its local problem (``LocalP2P.step``, rho fixed) as soon as
    every partner's latest trades are from iteration j - 1 - S or later (the host waits only for
    partners more than S iterations behind), with the partners' trades of the last iteration
    whose price update is applied and the pair's price after it. The price update of iteration i,
    lambda_nm -= gamma rho/2 (p_nm^(i) + p_mn^(i)), is applied once the partner's trades of
    iteration i are in, in the order of the iterations, on both sides of the pair: the two sides
    compute the same sequence of prices, only at different times, so the prices stay private to
    the pair and agree without being exchanged. Against the delays: the local problem has the
    proximal term S rho/2 ||x - x^(j-1)||^2, and gamma = 1/(1 + S) (a delayed price step must be
    shorter, as for delayed gradient steps); both vanish with S = 0, which is the synchronous
    iteration. Neither changes the fixed point (reciprocal trades, the same price on both sides:
    the optimum). The constants are the ones found to converge on the test markets at S <= 5, not
    a bound from the theory. RESIDUALS(i) (the primal mismatch and the change of the trades of
    iteration i, the synchronous definitions) go to the coordinator once every partner's trades of
    iteration i are in; it decides convergence and sends the stop. The host computes at most up to
    iteration start + max_iterations."""

    def __init__(self, engine: PeerEngine, start: int, rho: float):
        self.e = engine
        self.S = engine.staleness
        self.rho = rho
        # damping for the delays: a proximal term S rho/2 ||x - x_last||^2 in the local problem
        # and a price step shortened to 1/(1 + S) (module docstring)
        self.prox = self.S * rho
        self.dual_step = 1.0 / (1.0 + self.S)
        self.it = start  # the last iteration computed
        self.until = start + max(engine.max_iterations, 1)
        self.reported = start  # the last iteration whose residuals went to the coordinator
        self.x_hist: dict[str, dict[int, np.ndarray]] = {}
        self.matched: dict[str, np.ndarray] = {}  # per partner: the last iteration whose price update is applied
        self.latest: dict[str, np.ndarray] = {}  # per partner: the iteration of its latest trades
        self.inbox: dict[str, list[list]] = {}  # per partner: [(iteration, trades)] not yet applied, in order
        self.records: dict[int, dict] = {}  # iteration -> {pid: [primal_sq, slots matched, dual_sq, solve_s]}
        for pid, loc in engine.locals.items():
            M = loc.x.shape[0]
            self.x_hist[pid] = {start: loc.x.copy()}
            self.matched[pid] = np.full(M, start)
            self.latest[pid] = np.full(M, start)
            self.inbox[pid] = [[] for _ in range(M)]
        engine.solved = None

    def on_trades(self, tr: Trades, k: int) -> list:
        slot = self.e.partner_slot
        for i, (frm, to) in enumerate(zip(tr.from_peers, tr.to_peers)):
            j = slot[to][frm]
            if k <= self.latest[to][j]:
                self.e.rejected["stale"] = self.e.rejected.get("stale", 0) + 1
                continue
            self.latest[to][j] = k
            self.inbox[to][j].append((k, tr.p_mw[i]))
        return self.advance()

    def _match(self) -> None:
        """Apply every price update whose two sides are known (partner's trades in, own computed)."""
        for pid, loc in self.e.locals.items():
            hist, matched = self.x_hist[pid], self.matched[pid]
            for j, box in enumerate(self.inbox[pid]):
                while box and box[0][0] <= self.it:
                    i, row = box.pop(0)
                    mismatch = hist[i][j] + row
                    loc.lam[j] -= self.dual_step * 0.5 * self.rho * mismatch
                    loc.y[j] = row
                    matched[j] = i
                    rec = self.records[i][pid]
                    rec[0] += mismatch**2
                    rec[1] += 1
            low = int(matched.min()) if len(matched) else self.it
            for i in [i for i in hist if i < low]:  # no longer needed by any price update
                del hist[i]

    def _ready(self) -> bool:
        if self.it >= self.until:
            return False
        need = self.it - self.S  # partners' trades of iteration >= (it + 1) - 1 - S
        return all(len(v) == 0 or int(v.min()) >= need for v in self.latest.values())

    def advance(self) -> list:
        out = []
        e = self.e
        while True:
            self._match()
            if not self._ready():
                break
            self.it += 1
            e.iteration = self.it
            rows: dict[str, list] = {}
            self.records[self.it] = {}
            for pid, loc in e.locals.items():
                t = e.timer()
                hist = self.x_hist[pid]
                x, dx = loc.step(self.rho, prox=self.prox)
                hist[self.it] = x.copy()
                self.records[self.it][pid] = [np.zeros(e.hours), 0, dx, e.timer() - t]
                for j, partner in enumerate(e.partners[pid]):
                    rows.setdefault(e.partner_host[partner], []).append((pid, partner, x[j]))
            out += [Send(host, Trades(from_peers=tuple(r[0] for r in rs), to_peers=tuple(r[1] for r in rs),
                                      p_mw=np.stack([r[2] for r in rs])), self.it)
                    for host, rs in rows.items()]
        # residuals of every iteration whose partners' trades are all in, in order
        while self.reported < self.it:
            i = self.reported + 1
            recs = self.records[i]
            if any(rec[1] < e.locals[pid].x.shape[0] for pid, rec in recs.items()):
                break
            out.append(Send(COORDINATOR, Residuals(peers={pid: ResidualsPeer(primal_sq=rec[0], dual_sq=rec[2], solve_s=rec[3])
                                                          for pid, rec in recs.items()}), i))
            del self.records[i]
            self.reported = i
        return out
