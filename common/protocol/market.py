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
    (default: the reciprocal of ``p_in_mw``)}}. Mesh topology with Anderson acceleration: optional
    ``aa_memory``: int, record this iteration's differences in a memory of this many (the host
    answers the sums in RESIDUALS); optional ``aa_gamma``: (h, memory), the coefficients of each open
    hour, to extrapolate the host's state from before solving; with it ``aa_rejected``: int64 (r,),
    the rows of ``aa_gamma`` whose hours take the plain step from their last accepted point;
    optional ``aa_drift``: (h,), with ``aa_gamma``: a row's m > 0 steps its hour to z + m f
    instead (``common.admm.DriftSteps``), 0 extrapolates with the coefficients.
UPDATE (peer host -> coordinator; relay topology)
    ``peers``: {peer_id: {``p_out_mw``: (n_partners, h), this peer's new trades in the hours it was
    asked to solve; ``dual_sq``: (h,), local squared dual residual per hour [MW^2]; ``solve_s``:
    float, local solve time [s]; optional ``status``: str, the solver status ("ok" when absent)}}
    (the coordinator computes the primal residual from the trades).
TRADES (peer host -> peer host; mesh topology; one per pair of hosts and iteration)
    ``from_peers``, ``to_peers``: list[str] (n,), ``p_mw``: (n, h): row i is the trades of
    ``from_peers[i]`` (hosted by the sender) towards ``to_peers[i]`` (hosted by the receiver) in
    the hours solved in this iteration.
RESIDUALS (peer host -> coordinator; mesh topology)
    ``peers``: {peer_id: {``primal_sq``, ``dual_sq``: (h,) per solved hour; ``solve_s``: float;
    optional ``status``: str}}; when the ROUND asked for them (Anderson acceleration), the host's
    sums over its peers' scaled trades and prices per solved hour: ``aa_col``: (h, memory), the new
    column of the Gram matrix of the residual differences; ``aa_rhs``: (h, memory), the differences
    times the residual; ``aa_f_sq``: (h,), the squared residual.
RESULT (peer host -> coordinator; at the end)
    ``peers``: {peer_id: {``p_mw``: (hours,), net injection; ``trades_mw``: (n_partners, hours);
    ``price_eur_per_mwh``: (n_partners, hours), the trades' prices; ``q_mvar``: (hours,);
    ``cost_masked_ueur``: int64 (hours,), the peer's share of its host's masked cost sum in
    micro-euro (only the sum over all peers means anything, ``common.secagg``);
    optional ``soc_mwh``: (hours,), EV state of charge at the end of each hour; optional
    ``diff_cost_eur``, ``flex_penalty_eur``: (hours,), and ``trade_fee_eur``: (n_partners, hours),
    what it paid for product differentiation and flexibility (outer loop)}}; optional ``traffic``:
    rows [iteration, type, count, bytes] of the messages the host sent outside the coordinator's
    sight (mesh TRADES).
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
    ``peers``: list[str], peers that have left the market, ``hosts``: list[str], their hosts (lost):
    every hosted peer stops trading with them (their rows leave its trades, prices and partners'
    trades) and the host leaves their hosts' pairs of its secure-aggregation masks; the next ROUND
    sets the state to go on from.
"""


from __future__ import annotations

from typing import Annotated, ClassVar

import msgspec
import numpy as np

from common.protocol import (
    F1,
    F2,
    FN,
    I1,
    I2,
    MAX_CONTAINER_LEN,
    Arr,
    Id,
    Ids,
    Message,
    MsgType,
    NonNegFloat,
    NonNegInt,
    ProtocolError,
    Record,
    check_arrays,
)

STATUS_OK = "ok"
Status = Annotated[str, msgspec.Meta(max_length=256)]
_FLOATS = Arr("float64")
_LEN = msgspec.Meta(max_length=MAX_CONTAINER_LEN)


def _fail(text: str) -> ProtocolError:
    return ProtocolError("body", text)


def _same_shape(what: str, a: np.ndarray | None, b: np.ndarray, b_name: str) -> None:
    if a is not None and a.shape != b.shape:
        raise _fail(f"{what} {a.shape} and {b_name} {b.shape} differ in shape")


# ------------------------------------------------------------------------------------------- ROUND


class RoundPeer(Record, frozen=True):
    """What one hosted peer receives in a ROUND."""

    p_in_mw: F2
    price_eur_per_mwh: F2 | None = None
    p_own_mw: F2 | None = None  # the peer's own trades to start from (an accelerated state)

    def check(self) -> None:
        _same_shape("price_eur_per_mwh", self.price_eur_per_mwh, self.p_in_mw, "p_in_mw")
        _same_shape("p_own_mw", self.p_own_mw, self.p_in_mw, "p_in_mw")
        if self.p_own_mw is not None and self.price_eur_per_mwh is None:
            raise _fail("p_own_mw without price_eur_per_mwh")


class Round(Message, frozen=True):
    """Coordinator -> peer host: start an ADMM iteration (or stop)."""

    TYPE: ClassVar[MsgType] = MsgType.ROUND
    rho: NonNegFloat
    stop: bool
    peers: Annotated[dict[Id, RoundPeer], _LEN]
    hours: I1 | None = None  # the open hours (None: every hour)
    # mesh Anderson acceleration: record this iteration (memory size), coefficients to extrapolate with
    aa_memory: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 0
    aa_gamma: F2 | None = None  # (open hours, memory)
    aa_rejected: I1 | None = None  # rows of aa_gamma that take the plain step
    aa_drift: F1 | None = None  # (open hours,) m > 0: the row steps to z + m f (a translation)

    def check(self) -> None:
        h = self.hours
        if h is not None and (h.size == 0 or h[0] < 0 or np.any(np.diff(h) <= 0)):
            raise _fail("hours must be increasing, non-negative and not empty")
        gamma, rejected = self.aa_gamma, self.aa_rejected
        if (gamma is None) != (rejected is None):
            raise _fail("aa_gamma and aa_rejected go together")
        if gamma is not None and (np.any(rejected < 0) or np.any(rejected >= gamma.shape[0])):
            raise _fail(f"aa_rejected rows outside the {gamma.shape[0]} rows of aa_gamma")
        drift = self.aa_drift
        if drift is not None and (gamma is None or drift.shape != (gamma.shape[0],)
                                  or not (np.all(np.isfinite(drift)) and np.all(drift >= 0))):
            raise _fail("aa_drift needs aa_gamma, one non-negative multiplier per row")


# ------------------------------------------------------------------------------- UPDATE / RESIDUALS


def _check_residuals(dual_sq: np.ndarray, primal_sq: np.ndarray | None = None) -> None:
    _same_shape("primal_sq", primal_sq, dual_sq, "dual_sq")
    if np.any(dual_sq < 0) or (primal_sq is not None and np.any(primal_sq < 0)):
        raise _fail("a negative squared residual")


class UpdatePeer(Record, frozen=True):
    """One hosted peer's answer to a ROUND."""

    p_out_mw: F2
    dual_sq: F1  # (h,) per solved hour
    solve_s: NonNegFloat
    status: Status = STATUS_OK

    def check(self) -> None:
        if self.p_out_mw.shape[1:] != self.dual_sq.shape:
            raise _fail(f"p_out_mw {self.p_out_mw.shape} and dual_sq {self.dual_sq.shape} cover different hours")
        _check_residuals(self.dual_sq)


class Update(Message, frozen=True):
    """Peer host -> coordinator: the hosted peers' new trades and local residuals."""

    TYPE: ClassVar[MsgType] = MsgType.UPDATE
    peers: Annotated[dict[Id, UpdatePeer], _LEN]


class ResidualsPeer(Record, frozen=True):
    """One hosted peer's local residuals per solved hour (mesh topology)."""

    primal_sq: F1  # (h,)
    dual_sq: F1  # (h,)
    solve_s: NonNegFloat
    status: Status = STATUS_OK

    def check(self) -> None:
        _check_residuals(self.dual_sq, self.primal_sq)


class Residuals(Message, frozen=True):
    """Peer host -> coordinator (mesh topology): local residuals of the hosted peers."""

    TYPE: ClassVar[MsgType] = MsgType.RESIDUALS
    peers: Annotated[dict[Id, ResidualsPeer], _LEN]
    # Anderson acceleration (when the ROUND asked): the host's sums per solved hour
    aa_col: F2 | None = None  # (h, memory)
    aa_rhs: F2 | None = None  # (h, memory)
    aa_f_sq: F1 | None = None  # (h,)

    def check(self) -> None:
        parts = (self.aa_col, self.aa_rhs, self.aa_f_sq)
        if any(p is None for p in parts) and any(p is not None for p in parts):
            raise _fail("aa_col, aa_rhs and aa_f_sq go together")
        col, rhs, f_sq = parts
        if col is not None and (col.shape != rhs.shape or col.shape[0] != f_sq.shape[0] or np.any(f_sq < 0)):
            raise _fail(f"aa_col {col.shape}, aa_rhs {rhs.shape} and aa_f_sq {f_sq.shape} do not match")


# ------------------------------------------------------------------------------------------ TRADES


class Trades(Message, frozen=True):
    """Peer host -> peer host (mesh topology): every trade of the sender's peers towards the
    receiver's peers, row i from ``from_peers[i]`` to ``to_peers[i]``."""

    TYPE: ClassVar[MsgType] = MsgType.TRADES
    from_peers: Ids
    to_peers: Ids
    p_mw: F2  # (n, h)

    def check(self) -> None:
        n = len(self.from_peers)
        if len(self.to_peers) != n or self.p_mw.shape[0] != n or n == 0:
            raise _fail(f"{n} senders, {len(self.to_peers)} receivers and {self.p_mw.shape[0]} rows of trades")


# ------------------------------------------------------------------------------------------ RESULT


class ResultPeer(Record, frozen=True):
    """One hosted peer's final dispatch, trades and prices."""

    p_mw: F1
    trades_mw: F2
    price_eur_per_mwh: F2
    q_mvar: F1
    # (hours,) the peer's own cost C_n(P_n) in micro-euro plus its secure-aggregation mask (int64,
    # wrapping): only the sum over all peers means anything (common.secagg)
    cost_masked_ueur: I1
    soc_mwh: F1 | None = None  # (hours,) EV state of charge at the end of each hour
    diff_cost_eur: F1 | None = None  # (hours,) product-differentiation cost it paid (outer loop)
    flex_penalty_eur: F1 | None = None  # (hours,) beta times the extra flexibility it offered (outer loop)
    trade_fee_eur: F2 | None = None  # (partners, hours) the differentiation fee it paid on each trade

    def check(self) -> None:
        p, trades = self.p_mw, self.trades_mw
        _same_shape("trades_mw", trades, self.price_eur_per_mwh, "price_eur_per_mwh")
        _same_shape("trade_fee_eur", self.trade_fee_eur, trades, "trades_mw")
        if trades.shape[1] != p.shape[0]:
            raise _fail(f"trades_mw has {trades.shape[1]} hours, p_mw {p.shape[0]}")
        for name in ("q_mvar", "cost_masked_ueur", "soc_mwh", "diff_cost_eur", "flex_penalty_eur"):
            _same_shape(name, getattr(self, name), p, "p_mw")


TrafficRow = tuple[NonNegInt, Annotated[str, msgspec.Meta(max_length=64)], NonNegInt, NonNegInt]


class Result(Message, frozen=True):
    """Peer host -> coordinator at the end of the run."""

    TYPE: ClassVar[MsgType] = MsgType.RESULT
    peers: Annotated[dict[Id, ResultPeer], _LEN]
    # messages the host sent outside the coordinator's sight (mesh trades): rows of
    # [iteration, type, count, bytes]
    traffic: Annotated[tuple[TrafficRow, ...], _LEN] = ()


# ------------------------------------------------------------------------- PRICE_PROBE / QUANTITY


class PriceProbe(Message, frozen=True):
    """Coordinator -> peer host: what would your peers inject at these prices (candidates x hours)?"""

    TYPE: ClassVar[MsgType] = MsgType.PRICE_PROBE
    price_eur_per_mwh: F2


class QuantitySum(Message, frozen=True):
    """Peer host -> coordinator: its peers' best responses, summed and masked."""

    TYPE: ClassVar[MsgType] = MsgType.QUANTITY_SUM
    q_low_masked: I2
    q_high_masked: I2

    def check(self) -> None:
        _same_shape("q_low_masked", self.q_low_masked, self.q_high_masked, "q_high_masked")


class PoolPrice(Message, frozen=True):
    """Coordinator -> peer host: the settled pool price and how to take the starting injection."""

    TYPE: ClassVar[MsgType] = MsgType.POOL_PRICE
    price_a_eur_per_mwh: F1
    price_b_eur_per_mwh: F1
    share: F1

    def check(self) -> None:
        _same_shape("price_a_eur_per_mwh", self.price_a_eur_per_mwh, self.share, "share")
        _same_shape("price_b_eur_per_mwh", self.price_b_eur_per_mwh, self.share, "share")


class PoolQuantity(Message, frozen=True):
    """Peer host -> coordinator: each hosted peer's starting injection at the pool price."""

    TYPE: ClassVar[MsgType] = MsgType.POOL_QUANTITY
    peers: Annotated[dict[Id, F1], _LEN]

    def check(self) -> None:
        check_arrays("peers", self.peers, F1.__metadata__[0])


# ----------------------------------------------------------------------------------------- PENALTY

Parameters = Annotated[dict[Id, Annotated[dict[Id, FN], _LEN]], _LEN]
"""{peer_id: {parameter name: float64 array}}"""


def check_parameters(name: str, peers: dict) -> None:
    for pid, params in peers.items():
        check_arrays(f"{name}.{pid}", params, _FLOATS)


class Penalty(Message, frozen=True):
    """Coordinator -> peer host: penalty/parameter updates per hosted peer (named float64 arrays)."""

    TYPE: ClassVar[MsgType] = MsgType.PENALTY
    peers: Parameters

    def check(self) -> None:
        check_parameters("peers", self.peers)


class Drop(Message, frozen=True):
    """Coordinator -> peer host: these peers have left the market (their host was lost)."""

    TYPE: ClassVar[MsgType] = MsgType.DROP
    peers: Ids = ()
    hosts: Ids = ()  # their hosts (their masks leave the secure-aggregation set)
