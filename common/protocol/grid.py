"""Grid checks: the coordinator and the DSO service.

Arrays are float64 with hours along the last axis. Powers in the market's convention (SPEC 3.1):
``p_mw``/``q_mvar`` are net injections, positive when the peer produces, negative when it consumes.
The envelope's ``iteration`` is the ADMM iteration whose dispatch is checked; the DSO answers with
the same iteration.

DISPATCH (coordinator -> DSO)
    ``peer_ids``: list[str] (n_peers); ``kinds``: list[str] (n_peers; "pv", "wind", "chp", "load",
    "ev", "grid", ...); ``buses``: list[int] (n_peers; pandapower bus index); ``p_mw``: (n_peers,
    hours); ``q_mvar``: (n_peers, hours); optional ``virtual_load_mw``: (hours,), the TSO's request at
    the transformer's primary (positive: consume more); optional ``plan``: bool, outer loop: the DSO
    also decides the next parameters of the peers concerned.
GRID_REPORT (DSO -> coordinator)
    ``vm_pu``: (n_bus, hours); ``loading_percent``: (n_branch, hours) line loadings;
    ``losses_mw``: (hours,); ``violations``: list of records {``kind``: str ("vm_min", "vm_max",
    "line_loading", "trafo_loading", ...), ``element``: int|str (bus, line or trafo), ``hour``: int
    (0-based index), ``value``: float, ``limit``: float (same unit as value), optional ``text``: str};
    ``converged``: list[bool] (hours), whether the AC power flow converged; optional: ``bus_ids``:
    list[int] (n_bus), ``line_ids``: list[int] (n_branch), ``trafo_loading_percent``: (n_trafo,
    hours), ``p_grid_mw``: (hours,) import through the external grid, ``penalties``: {peer_id: {name:
    array}} as in PENALTY (common.protocol.market), only the peers concerned and only what changed;
    ``outer_status``: str ("feasible", "continue", "exhausted", "unhandled"), ``outer_reason``: str,
    ``actions``: list[str] (one line per hour acted on); ``tables`` then also carries ``outer_hours``.
NETWORK_UPDATE (coordinator -> DSO network agent; community market)
    ``rho``: float, ADMM penalty; ``arrays``: {name: float64 array}, e.g. ``p_mw`` (n_bus, hours) the
    peers' injections aggregated per bus and the matching duals ``price_eur_per_mwh``.
NETWORK_RESULT (DSO network agent -> coordinator; community market)
    ``arrays``: {name: float64 array}, the network agent's new iterate; optional ``primal_sq``,
    ``dual_sq`` [MW^2], ``solve_s`` [s]: float; optional ``status``: str ("ok" when absent).
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
    Int,
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


@dataclass(frozen=True, eq=False)
class Dispatch(Message):
    """Coordinator -> DSO: the dispatch to validate with an AC power flow."""

    TYPE: ClassVar[MsgType] = MsgType.DISPATCH
    peer_ids: tuple[str, ...]
    kinds: tuple[str, ...]
    buses: tuple[int, ...]
    p_mw: np.ndarray
    q_mvar: np.ndarray
    virtual_load_mw: np.ndarray | None = None
    plan: bool = False  # outer loop: the DSO also decides the next parameters (GRID_REPORT penalties)

    def to_body(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "plan": bool(self.plan),
            "peer_ids": list(self.peer_ids),
            "kinds": list(self.kinds),
            "buses": [int(b) for b in self.buses],
            "p_mw": f64(self.p_mw),
            "q_mvar": f64(self.q_mvar),
        }
        if self.virtual_load_mw is not None:
            out["virtual_load_mw"] = f64(self.virtual_load_mw)
        return out

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Dispatch:
        return cls(
            tuple(body["peer_ids"]),
            tuple(body["kinds"]),
            tuple(body["buses"]),
            body["p_mw"],
            body["q_mvar"],
            body.get("virtual_load_mw"),
            bool(body.get("plan", False)),
        )


@dataclass(frozen=True, eq=False)
class GridReport(Message):
    """DSO -> coordinator: the AC power flow's outcome for a dispatch."""

    TYPE: ClassVar[MsgType] = MsgType.GRID_REPORT
    vm_pu: np.ndarray
    loading_percent: np.ndarray
    losses_mw: np.ndarray
    violations: tuple[dict[str, Any], ...] = ()
    converged: tuple[bool, ...] = ()
    bus_ids: tuple[int, ...] | None = None
    line_ids: tuple[int, ...] | None = None
    trafo_loading_percent: np.ndarray | None = None
    p_grid_mw: np.ndarray | None = None
    penalties: dict[str, dict[str, np.ndarray]] | None = None
    tables: dict[str, dict[str, Any]] | None = None  # the AC report's tables, column by column
    outer_status: str | None = None  # "feasible" | "continue" | "exhausted" | "unhandled" (outer loop)
    outer_reason: str = ""
    actions: tuple[str, ...] = ()
    status: str = STATUS_OK  # anything else: the DSO could not check the dispatch, and says why

    def to_body(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "status": self.status,
            "vm_pu": f64(self.vm_pu),
            "loading_percent": f64(self.loading_percent),
            "losses_mw": f64(self.losses_mw),
            "violations": [dict(v) for v in self.violations],
            "converged": [bool(c) for c in self.converged],
        }
        if self.bus_ids is not None:
            out["bus_ids"] = [int(b) for b in self.bus_ids]
        if self.line_ids is not None:
            out["line_ids"] = [int(b) for b in self.line_ids]
        if self.trafo_loading_percent is not None:
            out["trafo_loading_percent"] = f64(self.trafo_loading_percent)
        if self.p_grid_mw is not None:
            out["p_grid_mw"] = f64(self.p_grid_mw)
        if self.penalties is not None:
            out["penalties"] = {k: {n: f64(a) for n, a in v.items()} for k, v in self.penalties.items()}
        if self.tables is not None:
            out["tables"] = self.tables
        if self.outer_status is not None:
            out.update(outer_status=self.outer_status, outer_reason=self.outer_reason, actions=list(self.actions))
        return out

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> GridReport:
        def opt_tuple(name: str) -> tuple[Any, ...] | None:
            v = body.get(name)
            return tuple(v) if v is not None else None

        return cls(
            body["vm_pu"],
            body["loading_percent"],
            body["losses_mw"],
            tuple(body["violations"]),
            tuple(body["converged"]),
            opt_tuple("bus_ids"),
            opt_tuple("line_ids"),
            body.get("trafo_loading_percent"),
            body.get("p_grid_mw"),
            body.get("penalties"),
            body.get("tables"),
            body.get("outer_status"),
            body.get("outer_reason") or "",
            tuple(body.get("actions") or ()),
            body.get("status") or STATUS_OK,
        )


@dataclass(frozen=True, eq=False)
class NetworkUpdate(Message):
    """Coordinator -> DSO network agent (community market): the peers' side of the ADMM iterate."""

    TYPE: ClassVar[MsgType] = MsgType.NETWORK_UPDATE
    rho: float
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def to_body(self) -> dict[str, Any]:
        return {"rho": float(self.rho), "arrays": {k: f64(v) for k, v in self.arrays.items()}}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> NetworkUpdate:
        return cls(float(body["rho"]), dict(body["arrays"]))


@dataclass(frozen=True, eq=False)
class NetworkResult(Message):
    """DSO network agent -> coordinator (community market): the network's side of the iterate."""

    TYPE: ClassVar[MsgType] = MsgType.NETWORK_RESULT
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    primal_sq: float | None = None
    dual_sq: float | None = None
    solve_s: float | None = None
    status: str = STATUS_OK

    def to_body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"arrays": {k: f64(v) for k, v in self.arrays.items()}, "status": self.status}
        for name in ("primal_sq", "dual_sq", "solve_s"):
            value = getattr(self, name)
            if value is not None:
                out[name] = float(value)
        return out

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> NetworkResult:
        def opt_float(name: str) -> float | None:
            v = body.get(name)
            return float(v) if v is not None else None

        return cls(
            dict(body["arrays"]),
            opt_float("primal_sq"),
            opt_float("dual_sq"),
            opt_float("solve_s"),
            body.get("status") or STATUS_OK,
        )


def _check_dispatch(body: dict[str, Any]) -> str | None:
    n = len(body["peer_ids"])
    if len(body["kinds"]) != n or len(body["buses"]) != n:
        return f"{n} peer_ids, {len(body['kinds'])} kinds, {len(body['buses'])} buses"
    p, q = body["p_mw"], body["q_mvar"]
    if p.shape != q.shape or p.shape[0] != n:
        return f"p_mw {p.shape} and q_mvar {q.shape} must both be ({n}, hours)"
    vl = body.get("virtual_load_mw")
    if vl is not None and vl.shape != (p.shape[1],):
        return f"virtual_load_mw {vl.shape} must be ({p.shape[1]},)"
    return None


def _check_grid_report(body: dict[str, Any]) -> str | None:
    hours = body["losses_mw"].shape[0]
    for name in ("vm_pu", "loading_percent", "trafo_loading_percent"):
        a = body.get(name)
        if a is not None and a.shape[1] != hours:
            return f"{name} has {a.shape[1]} hours, losses_mw {hours}"
    pg = body.get("p_grid_mw")
    if pg is not None and pg.shape != (hours,):
        return f"p_grid_mw {pg.shape} must be ({hours},)"
    if len(body["converged"]) != hours:
        return f"{len(body['converged'])} converged flags for {hours} hours"
    if body.get("bus_ids") is not None and len(body["bus_ids"]) != body["vm_pu"].shape[0]:
        return "bus_ids and vm_pu rows differ"
    if body.get("line_ids") is not None and len(body["line_ids"]) != body["loading_percent"].shape[0]:
        return "line_ids and loading_percent rows differ"
    return None


VIOLATION = Record(
    required={"kind": Str(max_len=64), "element": AnyValue(), "hour": Int(min=0), "value": Float(), "limit": Float()},
    optional={"text": Str()},
)

SCHEMAS: dict[MsgType, Record] = {
    MsgType.DISPATCH: Record(
        required={
            "peer_ids": ListOf(Str(max_len=256)),
            "kinds": ListOf(Str(max_len=64)),
            "buses": ListOf(Int(min=0)),
            "p_mw": float_array(2),
            "q_mvar": float_array(2),
        },
        optional={"virtual_load_mw": float_array(1), "plan": Bool()},
        check_fn=_check_dispatch,
    ),
    MsgType.GRID_REPORT: Record(
        required={
            "vm_pu": float_array(2),
            "loading_percent": float_array(2),
            "losses_mw": float_array(1),
            "violations": ListOf(VIOLATION),
            "converged": ListOf(Bool()),
        },
        optional={
            "status": Str(max_len=4096),
            "bus_ids": ListOf(Int()),
            "line_ids": ListOf(Int()),
            "trafo_loading_percent": float_array(2),
            "p_grid_mw": float_array(1),
            "penalties": MapOf(MapOf(Array("float64"))),
            "tables": MapOf(MapOf(AnyValue())),
            "outer_status": Str(max_len=32),
            "outer_reason": Str(),
            "actions": ListOf(Str()),
        },
        check_fn=_check_grid_report,
    ),
    MsgType.NETWORK_UPDATE: Record(required={"rho": Float(min=0.0), "arrays": MapOf(Array("float64"))}),
    MsgType.NETWORK_RESULT: Record(
        required={"arrays": MapOf(Array("float64"))},
        optional={
            "primal_sq": Float(min=0.0),
            "dual_sq": Float(min=0.0),
            "solve_s": Float(min=0.0),
            "status": Str(max_len=256),
        },
    ),
}

MESSAGES: dict[MsgType, type[Message]] = {
    MsgType.DISPATCH: Dispatch,
    MsgType.GRID_REPORT: GridReport,
    MsgType.NETWORK_UPDATE: NetworkUpdate,
    MsgType.NETWORK_RESULT: NetworkResult,
}
