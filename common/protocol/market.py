"""Market rounds: the terse ADMM data flow between the coordinator and the peer hosts.

A bad message here is dropped and counted, never answered. Every array is float64, hours along the
last axis, partners (the peer's trading partners, in the order the run configuration gives) along
the first. Powers in MW per hourly period; sign convention of the market (SPEC 3.1): a peer's net
injection ``p_mw`` is positive when it produces, negative when it consumes; a trade ``p_ij`` is what
peer i sells to partner j (negative: buys). The envelope's ``iteration`` is the ADMM iteration.

Per-peer bodies are maps ``peers: {peer_id: record}`` so that one process can host several peers.

ROUND (coordinator -> peer host; relay topology)
    ``rho``: float, ADMM penalty [EUR/MW^2h]; ``stop``: bool, true to end the ADMM loop (the host then
    sends RESULT); optional ``hours``: int64 (h,), the hours (0-based, increasing) still open, the
    ones to solve in this iteration (absent: every hour; per-hour stopping closes the others);
    ``peers``: {peer_id: {``p_in_mw``: (n_partners, h_prev), the partners' trades towards this peer
    at the previous iteration, in the hours solved then (the first ROUND of a clearing: every hour); optional ``price_eur_per_mwh``: (n_partners, hours), the
    prices of the peer's trades to start this iteration from (a pool-price start, an accelerated
    state), and then optional ``p_own_mw``: (n_partners, hours), its own trades to start from
    (default: the reciprocal of ``p_in_mw``)}}.
UPDATE (peer host -> coordinator; relay topology)
    ``peers``: {peer_id: {``p_out_mw``: (n_partners, h), this peer's new trades in the hours it was
    asked to solve; ``primal_sq``: (h,), local squared primal residual per hour [MW^2]; ``dual_sq``:
    (h,), local squared dual residual per hour [MW^2]; ``solve_s``: float, local solve time [s];
    optional ``status``: str, the solver status ("ok" when absent)}}.
TRADES (peer host -> peer host; mesh topology; one per pair of hosts and iteration)
    ``from_peers``, ``to_peers``: list[str] (n,), ``p_mw``: (n, h): row i is the trades of
    ``from_peers[i]`` (hosted by the sender) towards ``to_peers[i]`` (hosted by the receiver) in
    the hours solved in this iteration.
RESIDUALS (peer host -> coordinator; mesh topology)
    ``peers``: {peer_id: {``primal_sq``, ``dual_sq``: (h,) per solved hour; ``solve_s``: float;
    optional ``status``: str}}.
RESULT (peer host -> coordinator; at the end)
    ``peers``: {peer_id: {``p_mw``: (hours,), net injection; ``trades_mw``: (n_partners, hours);
    ``price_eur_per_mwh``: (n_partners, hours), the trades' prices; optional ``partner_ids``:
    list[str] (n_partners); optional ``q_mvar``: (hours,); optional ``soc_mwh``: (hours,), EV state
    of charge at the end of each hour; optional ``status``: str}}.
PRICE_PROBE (coordinator -> peer host; the pool-price start of a clearing, before the ADMM)
    ``price_eur_per_mwh``: (candidates, hours), candidate prices per hour.
QUANTITY_SUM (peer host -> coordinator; the answer to a PRICE_PROBE)
    ``q_low_masked``, ``q_high_masked``: int64 (candidates, hours), the sum over the hosted peers of
    the smallest and largest best-response injection at each candidate price, in nano-MW plus the
    peers' secure-aggregation masks (``common.secagg``): only the sum over all hosts means anything.
POOL_PRICE (coordinator -> peer host; the settled pool price)
    ``price_a_eur_per_mwh``, ``price_b_eur_per_mwh``, ``share``: (hours,). Each peer's starting
    injection is (1 - share) x its answer at price a + share x its answer at price b (at a = b: its
    smallest and largest answer; at a < b: its largest at a and its smallest at b).
POOL_QUANTITY (peer host -> coordinator; the answer to POOL_PRICE)
    ``peers``: {peer_id: (hours,)}, each hosted peer's starting injection.
PENALTY (coordinator -> peer host; between outer iterations; from the DSO or TSO service)
    ``peers``: {peer_id: {name: float64 array}}, only the hosted peers concerned, only their own
    parameters (``common.models.PARAMETERS``): ``diff_eur_per_mwh`` (n_partners, hours) the
    product-differentiation cost of each of its trades; ``tan_phi`` (hours,) reactive-power ratio
    q/p; ``flex_down_fraction``, ``flex_up_fraction`` (hours,) a load's flexibility around its
    baseline; ``res_cap_fraction`` (hours,) the share of its forecast a RES unit may produce;
    ``virtual_load_mw`` (hours,) the TSO's request (virtual load); ``beta_eur_per_mwh`` (1,) the
    price of extra flexibility. A receiver refuses (and counts) a PENALTY for a peer it does not
    host, an unknown name or a wrong shape.
DROP (coordinator -> peer host; policy ``--on-peer-loss drop``)
    ``peers``: list[str], peers that have left the market (their host was lost): every hosted peer
    stops trading with them (their rows leave its trades, prices and partners' trades, their masks
    leave its secure-aggregation set); the next ROUND sets the state to go on from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from common.protocol import (
    AnyValue,
    Array,
    Bool,
    Float,
    ListOf,
    MapOf,
    Message,
    MsgType,
    Record,
    Str,
    f64,
    float_array,
)

STATUS_OK = "ok"


# ------------------------------------------------------------------------------------------- ROUND


@dataclass(frozen=True, eq=False)
class RoundPeer:
    """What one hosted peer receives in a ROUND."""

    p_in_mw: np.ndarray
    price_eur_per_mwh: np.ndarray | None = None
    p_own_mw: np.ndarray | None = None  # the peer's own trades to start from (an accelerated state)

    def to_body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"p_in_mw": f64(self.p_in_mw)}
        if self.price_eur_per_mwh is not None:
            out["price_eur_per_mwh"] = f64(self.price_eur_per_mwh)
        if self.p_own_mw is not None:
            out["p_own_mw"] = f64(self.p_own_mw)
        return out

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> RoundPeer:
        return cls(body["p_in_mw"], body.get("price_eur_per_mwh"), body.get("p_own_mw"))


@dataclass(frozen=True, eq=False)
class Round(Message):
    """Coordinator -> peer host: start an ADMM iteration (or stop)."""

    TYPE: ClassVar[MsgType] = MsgType.ROUND
    rho: float
    stop: bool
    peers: dict[str, RoundPeer] = field(default_factory=dict)
    hours: np.ndarray | None = None  # the open hours (None: every hour)

    def to_body(self) -> dict[str, Any]:
        body = {
            "rho": float(self.rho),
            "stop": bool(self.stop),
            "peers": {k: v.to_body() for k, v in self.peers.items()},
        }
        if self.hours is not None:
            body["hours"] = np.ascontiguousarray(self.hours, dtype=np.int64)
        return body

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Round:
        peers = {k: RoundPeer.from_body(v) for k, v in body["peers"].items()}
        return cls(float(body["rho"]), body["stop"], peers, body.get("hours"))


# ------------------------------------------------------------------------------------------ UPDATE


@dataclass(frozen=True, eq=False)
class UpdatePeer:
    """One hosted peer's answer to a ROUND."""

    p_out_mw: np.ndarray
    primal_sq: np.ndarray  # (h,) per solved hour
    dual_sq: np.ndarray  # (h,) per solved hour
    solve_s: float
    status: str = STATUS_OK

    def to_body(self) -> dict[str, Any]:
        return {
            "p_out_mw": f64(self.p_out_mw),
            "primal_sq": f64(np.atleast_1d(self.primal_sq)),
            "dual_sq": f64(np.atleast_1d(self.dual_sq)),
            "solve_s": float(self.solve_s),
            "status": self.status,
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> UpdatePeer:
        return cls(
            body["p_out_mw"],
            body["primal_sq"],
            body["dual_sq"],
            float(body["solve_s"]),
            body.get("status") or STATUS_OK,
        )


@dataclass(frozen=True, eq=False)
class Update(Message):
    """Peer host -> coordinator: the hosted peers' new trades and local residuals."""

    TYPE: ClassVar[MsgType] = MsgType.UPDATE
    peers: dict[str, UpdatePeer] = field(default_factory=dict)

    def to_body(self) -> dict[str, Any]:
        return {"peers": {k: v.to_body() for k, v in self.peers.items()}}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Update:
        return cls({k: UpdatePeer.from_body(v) for k, v in body["peers"].items()})


# ------------------------------------------------------------------------------------------ TRADES


@dataclass(frozen=True, eq=False)
class Trades(Message):
    """Peer host -> peer host (mesh topology): every trade of the sender's peers towards the
    receiver's peers, row i from ``from_peers[i]`` to ``to_peers[i]``."""

    TYPE: ClassVar[MsgType] = MsgType.TRADES
    from_peers: tuple[str, ...]
    to_peers: tuple[str, ...]
    p_mw: np.ndarray  # (n, h)

    def to_body(self) -> dict[str, Any]:
        return {"from_peers": list(self.from_peers), "to_peers": list(self.to_peers), "p_mw": f64(self.p_mw)}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Trades:
        return cls(tuple(body["from_peers"]), tuple(body["to_peers"]), body["p_mw"])


# --------------------------------------------------------------------------------------- RESIDUALS


@dataclass(frozen=True, eq=False)
class ResidualsPeer:
    """One hosted peer's local residuals per solved hour (mesh topology)."""

    primal_sq: np.ndarray  # (h,)
    dual_sq: np.ndarray  # (h,)
    solve_s: float
    status: str = STATUS_OK

    def to_body(self) -> dict[str, Any]:
        return {
            "primal_sq": f64(np.atleast_1d(self.primal_sq)),
            "dual_sq": f64(np.atleast_1d(self.dual_sq)),
            "solve_s": float(self.solve_s),
            "status": self.status,
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> ResidualsPeer:
        return cls(
            body["primal_sq"],
            body["dual_sq"],
            float(body["solve_s"]),
            body.get("status") or STATUS_OK,
        )


@dataclass(frozen=True, eq=False)
class Residuals(Message):
    """Peer host -> coordinator (mesh topology): local residuals of the hosted peers."""

    TYPE: ClassVar[MsgType] = MsgType.RESIDUALS
    peers: dict[str, ResidualsPeer] = field(default_factory=dict)

    def to_body(self) -> dict[str, Any]:
        return {"peers": {k: v.to_body() for k, v in self.peers.items()}}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Residuals:
        return cls({k: ResidualsPeer.from_body(v) for k, v in body["peers"].items()})


# ------------------------------------------------------------------------------------------ RESULT


@dataclass(frozen=True, eq=False)
class ResultPeer:
    """One hosted peer's final dispatch, trades and prices."""

    p_mw: np.ndarray
    trades_mw: np.ndarray
    price_eur_per_mwh: np.ndarray
    partner_ids: tuple[str, ...] | None = None
    q_mvar: np.ndarray | None = None
    soc_mwh: np.ndarray | None = None
    status: str = STATUS_OK
    # (hours,) the peer's own cost C_n(P_n) in micro-euro plus its secure-aggregation mask (int64,
    # wrapping): only the sum over all peers means anything (common.secagg)
    cost_masked_ueur: np.ndarray | None = None
    diff_cost_eur: np.ndarray | None = None  # (hours,) product-differentiation cost it paid (outer loop)
    flex_penalty_eur: np.ndarray | None = None  # (hours,) beta times the extra flexibility it offered (outer loop)
    trade_fee_eur: np.ndarray | None = None  # (partners, hours) the differentiation fee it paid on each trade

    def to_body(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "p_mw": f64(self.p_mw),
            "trades_mw": f64(self.trades_mw),
            "price_eur_per_mwh": f64(self.price_eur_per_mwh),
            "status": self.status,
        }
        if self.partner_ids is not None:
            out["partner_ids"] = list(self.partner_ids)
        if self.q_mvar is not None:
            out["q_mvar"] = f64(self.q_mvar)
        if self.soc_mwh is not None:
            out["soc_mwh"] = f64(self.soc_mwh)
        if self.cost_masked_ueur is not None:
            out["cost_masked_ueur"] = np.ascontiguousarray(self.cost_masked_ueur, dtype=np.int64)
        for name in ("diff_cost_eur", "flex_penalty_eur", "trade_fee_eur"):
            if getattr(self, name) is not None:
                out[name] = f64(getattr(self, name))
        return out

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> ResultPeer:
        partners = body.get("partner_ids")
        return cls(
            body["p_mw"],
            body["trades_mw"],
            body["price_eur_per_mwh"],
            tuple(partners) if partners is not None else None,
            body.get("q_mvar"),
            body.get("soc_mwh"),
            body.get("status") or STATUS_OK,
            body.get("cost_masked_ueur"),
            body.get("diff_cost_eur"),
            body.get("flex_penalty_eur"),
            body.get("trade_fee_eur"),
        )


@dataclass(frozen=True, eq=False)
class Result(Message):
    """Peer host -> coordinator at the end of the run."""

    TYPE: ClassVar[MsgType] = MsgType.RESULT
    peers: dict[str, ResultPeer] = field(default_factory=dict)
    # messages the host sent outside the coordinator's sight (mesh trades): rows of
    # [iteration, type, count, bytes]
    traffic: tuple[tuple[int, str, int, int], ...] = ()

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"peers": {k: v.to_body() for k, v in self.peers.items()}}
        if self.traffic:
            body["traffic"] = [[int(i), str(t), int(c), int(b)] for i, t, c, b in self.traffic]
        return body

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Result:
        return cls({k: ResultPeer.from_body(v) for k, v in body["peers"].items()},
                   tuple(tuple(row) for row in body.get("traffic") or ()))


# ------------------------------------------------------------------------- PRICE_PROBE / QUANTITY


@dataclass(frozen=True, eq=False)
class PriceProbe(Message):
    """Coordinator -> peer host: what would your peers inject at these prices (candidates x hours)?"""

    TYPE: ClassVar[MsgType] = MsgType.PRICE_PROBE
    price_eur_per_mwh: np.ndarray

    def to_body(self) -> dict[str, Any]:
        return {"price_eur_per_mwh": f64(self.price_eur_per_mwh)}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> PriceProbe:
        return cls(body["price_eur_per_mwh"])


@dataclass(frozen=True, eq=False)
class QuantitySum(Message):
    """Peer host -> coordinator: its peers' best responses, summed and masked."""

    TYPE: ClassVar[MsgType] = MsgType.QUANTITY_SUM
    q_low_masked: np.ndarray
    q_high_masked: np.ndarray

    def to_body(self) -> dict[str, Any]:
        return {"q_low_masked": np.ascontiguousarray(self.q_low_masked, dtype=np.int64),
                "q_high_masked": np.ascontiguousarray(self.q_high_masked, dtype=np.int64)}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> QuantitySum:
        return cls(body["q_low_masked"], body["q_high_masked"])


@dataclass(frozen=True, eq=False)
class PoolPrice(Message):
    """Coordinator -> peer host: the settled pool price and how to take the starting injection."""

    TYPE: ClassVar[MsgType] = MsgType.POOL_PRICE
    price_a_eur_per_mwh: np.ndarray
    price_b_eur_per_mwh: np.ndarray
    share: np.ndarray

    def to_body(self) -> dict[str, Any]:
        return {"price_a_eur_per_mwh": f64(self.price_a_eur_per_mwh),
                "price_b_eur_per_mwh": f64(self.price_b_eur_per_mwh), "share": f64(self.share)}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> PoolPrice:
        return cls(body["price_a_eur_per_mwh"], body["price_b_eur_per_mwh"], body["share"])


@dataclass(frozen=True, eq=False)
class PoolQuantity(Message):
    """Peer host -> coordinator: each hosted peer's starting injection at the pool price."""

    TYPE: ClassVar[MsgType] = MsgType.POOL_QUANTITY
    peers: dict[str, np.ndarray] = field(default_factory=dict)

    def to_body(self) -> dict[str, Any]:
        return {"peers": {k: f64(v) for k, v in self.peers.items()}}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> PoolQuantity:
        return cls(dict(body["peers"]))


# ----------------------------------------------------------------------------------------- PENALTY


@dataclass(frozen=True, eq=False)
class Penalty(Message):
    """Coordinator -> peer host: penalty/parameter updates per hosted peer (named float64 arrays)."""

    TYPE: ClassVar[MsgType] = MsgType.PENALTY
    peers: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def to_body(self) -> dict[str, Any]:
        return {"peers": {k: {n: f64(a) for n, a in v.items()} for k, v in self.peers.items()}}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Penalty:
        return cls({k: dict(v) for k, v in body["peers"].items()})


@dataclass(frozen=True)
class Drop(Message):
    """Coordinator -> peer host: these peers have left the market (their host was lost)."""

    TYPE: ClassVar[MsgType] = MsgType.DROP
    peers: tuple[str, ...] = ()

    def to_body(self) -> dict[str, Any]:
        return {"peers": list(self.peers)}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Drop:
        return cls(tuple(body["peers"]))


# ----------------------------------------------------------------------------------------- schemas


def _check_result_peer(rec: dict[str, Any]) -> str | None:
    p, trades, price = rec["p_mw"], rec["trades_mw"], rec["price_eur_per_mwh"]
    if trades.shape != price.shape:
        return f"trades_mw {trades.shape} and price_eur_per_mwh {price.shape} differ in shape"
    if trades.shape[1] != p.shape[0]:
        return f"trades_mw has {trades.shape[1]} hours, p_mw {p.shape[0]}"
    for name in ("q_mvar", "soc_mwh"):
        a = rec.get(name)
        if a is not None and a.shape != p.shape:
            return f"{name} {a.shape} and p_mw {p.shape} differ in shape"
    partners = rec.get("partner_ids")
    if partners is not None and len(partners) != trades.shape[0]:
        return f"{len(partners)} partner_ids for {trades.shape[0]} rows of trades_mw"
    return None


def _check_round_peer(rec: dict[str, Any]) -> str | None:
    for name in ("price_eur_per_mwh", "p_own_mw"):
        a = rec.get(name)
        if a is not None and a.shape != rec["p_in_mw"].shape:
            return f"{name} {a.shape} and p_in_mw {rec['p_in_mw'].shape} differ in shape"
    if rec.get("p_own_mw") is not None and rec.get("price_eur_per_mwh") is None:
        return "p_own_mw without price_eur_per_mwh"
    return None


_RESIDUALS = {"primal_sq": float_array(1), "dual_sq": float_array(1), "solve_s": Float(min=0.0)}


def _check_residuals(rec: dict[str, Any]) -> str | None:
    if rec["primal_sq"].shape != rec["dual_sq"].shape:
        return f"primal_sq {rec['primal_sq'].shape} and dual_sq {rec['dual_sq'].shape} differ in shape"
    if np.any(rec["primal_sq"] < 0) or np.any(rec["dual_sq"] < 0):
        return "a negative squared residual"
    return None


def _check_update(rec: dict[str, Any]) -> str | None:
    if rec["p_out_mw"].shape[1:] != rec["dual_sq"].shape:
        return f"p_out_mw {rec['p_out_mw'].shape} and dual_sq {rec['dual_sq'].shape} cover different hours"
    return _check_residuals(rec)


def _check_trades(rec: dict[str, Any]) -> str | None:
    n = len(rec["from_peers"])
    if len(rec["to_peers"]) != n or rec["p_mw"].shape[0] != n or n == 0:
        return f"{n} senders, {len(rec['to_peers'])} receivers and {rec['p_mw'].shape[0]} rows of trades"
    return None


def _check_round(rec: dict[str, Any]) -> str | None:
    hours = rec.get("hours")
    if hours is not None and (hours.size == 0 or np.any(hours < 0) or np.any(np.diff(hours) <= 0)):
        return "hours must be increasing, non-negative and not empty"
    return None

SCHEMAS: dict[MsgType, Record] = {
    MsgType.ROUND: Record(
        required={
            "rho": Float(min=0.0),
            "stop": Bool(),
            "peers": MapOf(
                Record(
                    required={"p_in_mw": float_array(2)},
                    optional={"price_eur_per_mwh": float_array(2), "p_own_mw": float_array(2)},
                    check_fn=_check_round_peer,
                )
            ),
        },
        optional={"hours": Array("int64", (1,))},
        check_fn=_check_round,
    ),
    MsgType.UPDATE: Record(
        required={
            "peers": MapOf(
                Record(required={"p_out_mw": float_array(2), **_RESIDUALS}, optional={"status": Str(max_len=256)},
                       check_fn=_check_update)
            )
        }
    ),
    MsgType.TRADES: Record(
        required={"from_peers": ListOf(Str(max_len=256)), "to_peers": ListOf(Str(max_len=256)), "p_mw": float_array(2)},
        check_fn=_check_trades,
    ),
    MsgType.RESIDUALS: Record(
        required={"peers": MapOf(Record(required=dict(_RESIDUALS), optional={"status": Str(max_len=256)},
                                        check_fn=_check_residuals))}
    ),
    MsgType.RESULT: Record(
        required={
            "peers": MapOf(
                Record(
                    required={
                        "p_mw": float_array(1),
                        "trades_mw": float_array(2),
                        "price_eur_per_mwh": float_array(2),
                    },
                    optional={
                        "partner_ids": ListOf(Str(max_len=256)),
                        "q_mvar": float_array(1),
                        "soc_mwh": float_array(1),
                        "cost_masked_ueur": Array("int64", (1,)),
                        "diff_cost_eur": float_array(1),
                        "flex_penalty_eur": float_array(1),
                        "trade_fee_eur": float_array(2),
                        "status": Str(max_len=256),
                    },
                    check_fn=_check_result_peer,
                )
            )
        },
        optional={"traffic": ListOf(ListOf(AnyValue()))},
    ),
    MsgType.PENALTY: Record(required={"peers": MapOf(MapOf(Array("float64")))}),
    MsgType.DROP: Record(required={"peers": ListOf(Str(max_len=256))}),
    MsgType.PRICE_PROBE: Record(required={"price_eur_per_mwh": float_array(2)}),
    MsgType.QUANTITY_SUM: Record(required={"q_low_masked": Array("int64", (2,)), "q_high_masked": Array("int64", (2,))}),
    MsgType.POOL_PRICE: Record(required={"price_a_eur_per_mwh": float_array(1), "price_b_eur_per_mwh": float_array(1),
                                         "share": float_array(1)}),
    MsgType.POOL_QUANTITY: Record(required={"peers": MapOf(float_array(1))}),
}

MESSAGES: dict[MsgType, type[Message]] = {
    MsgType.ROUND: Round,
    MsgType.UPDATE: Update,
    MsgType.TRADES: Trades,
    MsgType.RESIDUALS: Residuals,
    MsgType.RESULT: Result,
    MsgType.PENALTY: Penalty,
    MsgType.DROP: Drop,
    MsgType.PRICE_PROBE: PriceProbe,
    MsgType.QUANTITY_SUM: QuantitySum,
    MsgType.POOL_PRICE: PoolPrice,
    MsgType.POOL_QUANTITY: PoolQuantity,
}
