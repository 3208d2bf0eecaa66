"""Grid checks: the coordinator and the DSO service.

Arrays are float64 with hours along the last axis. Powers in the market's convention (SPEC 3.1):
``p_mw``/``q_mvar`` are net injections, positive when the peer produces, negative when it consumes.
The envelope's ``iteration`` is the ADMM iteration whose dispatch is checked; the DSO answers with
the same iteration.

DISPATCH (coordinator -> DSO)
    ``peer_ids``: list[str] (n_peers); ``kinds``: list[str] (n_peers; "pv", "wind", "chp", "load",
    "ev", "grid", ...); ``buses``: list[int] (n_peers; pandapower bus index); ``p_mw``: (n_peers,
    hours); ``q_mvar``: (n_peers, hours); optional ``plan``: bool, outer loop: the DSO also decides
    the next parameters of the peers concerned.
GRID_REPORT (DSO -> coordinator)
    ``violations``: list of records {``kind``: str ("vm_min", "vm_max", "line_loading",
    "trafo_loading", ...), ``element``: int|str (bus, line or trafo), ``hour``: int (0-based index),
    ``value``: float, ``limit``: float (same unit as value)}; ``tables``: the AC report's tables
    (buses, lines, hours, violations, and with the first report the network's drawing), each a map
    {column: array or list[str]} with ``__columns__``: list[str], the columns in order, and
    ``<column>__nan``: bool array, where a float column holds NaN (sent as 0); optional ``status``:
    str ("ok" when absent; anything else: the DSO could not check the dispatch, and says why);
    outer loop: ``penalties``: {peer_id: {name: array}} as in PENALTY (common.protocol.market), only
    the peers concerned and only what changed; ``outer_status``: str ("feasible", "continue",
    "exhausted", "unhandled"), ``outer_reason``: str, ``actions``: list[str] (one line per hour
    acted on); ``tables`` then also carries ``outer_hours``.
NETWORK_UPDATE (coordinator -> DSO network agent; community market)
    ``rho``: float, ADMM penalty; ``arrays``: {name: float64 array}, ``v_mw`` (n_bus, hours) the
    peers' injections aggregated per bus plus the scaled duals.
NETWORK_RESULT (DSO network agent -> coordinator; community market)
    ``arrays``: {name: float64 array}, the network agent's new iterate (``z_mw``, ...); optional
    ``status``: str ("ok" when absent).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import msgspec
import numpy as np

from common.protocol import (
    F2,
    FN,
    MAX_CONTAINER_LEN,
    Arrays,
    Float,
    Id,
    Ids,
    Int,
    Message,
    MsgType,
    NonNegFloat,
    NonNegInt,
    ProtocolError,
    Record,
    Text,
    check_arrays,
)
from common.protocol.market import STATUS_OK, Parameters, check_parameters

_LEN = msgspec.Meta(max_length=MAX_CONTAINER_LEN)
Kind = Annotated[str, msgspec.Meta(max_length=64)]


def _fail(text: str) -> ProtocolError:
    return ProtocolError("body", text)


class Dispatch(Message, frozen=True):
    """Coordinator -> DSO: the dispatch to validate with an AC power flow."""

    TYPE: ClassVar[MsgType] = MsgType.DISPATCH
    peer_ids: Ids
    kinds: Annotated[tuple[Kind, ...], _LEN]
    buses: Annotated[tuple[NonNegInt, ...], _LEN]
    p_mw: F2
    q_mvar: F2
    plan: bool = False  # outer loop: the DSO also decides the next parameters (GRID_REPORT penalties)

    def check(self) -> None:
        n = len(self.peer_ids)
        if len(self.kinds) != n or len(self.buses) != n:
            raise _fail(f"{n} peer_ids, {len(self.kinds)} kinds, {len(self.buses)} buses")
        p, q = self.p_mw, self.q_mvar
        if p.shape != q.shape or p.shape[0] != n:
            raise _fail(f"p_mw {p.shape} and q_mvar {q.shape} must both be ({n}, hours)")


class Violation(Record, frozen=True):
    """A limit the AC power flow found broken."""

    kind: Kind
    element: Int | Id
    hour: NonNegInt
    value: Float
    limit: Float


Table = Annotated[dict[Id, Any], _LEN]
"""One table, column by column: {column: array or list, ``__columns__``: list[str]}."""


def _check_table(name: str, table: dict[str, Any]) -> None:
    columns = table.get("__columns__")
    if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
        raise _fail(f"tables.{name}: no __columns__ list")
    names = set(columns) | {f"{c}__nan" for c in columns if f"{c}__nan" in table} | {"__columns__"}
    if set(table) != names:
        raise _fail(f"tables.{name}: columns {sorted(set(table) - names)} not in __columns__, "
                    f"{sorted(names - set(table))} missing")
    lengths = set()
    for c in names - {"__columns__"}:
        v = table[c]
        if not (isinstance(v, list) or (isinstance(v, np.ndarray) and v.ndim == 1)):
            raise _fail(f"tables.{name}.{c}: expected a list or a vector, got {type(v).__name__}")
        lengths.add(len(v))
    if len(lengths) > 1:
        raise _fail(f"tables.{name}: columns of different lengths {sorted(lengths)}")


class GridReport(Message, frozen=True):
    """DSO -> coordinator: the AC power flow's outcome for a dispatch."""

    TYPE: ClassVar[MsgType] = MsgType.GRID_REPORT
    FREE: ClassVar[tuple[str, ...]] = ("tables",)
    violations: Annotated[tuple[Violation, ...], _LEN]
    tables: Annotated[dict[Id, Table], _LEN]  # the AC report's tables, column by column
    status: Annotated[str, msgspec.Meta(max_length=4096)] = STATUS_OK  # else: the DSO could not check, and why
    penalties: Parameters | None = None  # outer loop: the peers' next parameters
    outer_status: Annotated[str, msgspec.Meta(max_length=32)] | None = None  # "feasible" | "continue" | ...
    outer_reason: Text = ""
    actions: Annotated[tuple[Text, ...], _LEN] = ()

    def check(self) -> None:
        for name, table in self.tables.items():
            if not isinstance(table, dict):
                raise _fail(f"tables.{name}: expected a map")
            _check_table(name, table)
        if self.penalties is not None:
            check_parameters("penalties", self.penalties)


class NetworkUpdate(Message, frozen=True):
    """Coordinator -> DSO network agent (community market): the peers' side of the ADMM iterate."""

    TYPE: ClassVar[MsgType] = MsgType.NETWORK_UPDATE
    rho: NonNegFloat
    arrays: Arrays

    def check(self) -> None:
        check_arrays("arrays", self.arrays, FN.__metadata__[0])


class NetworkResult(Message, frozen=True):
    """DSO network agent -> coordinator (community market): the network's side of the iterate."""

    TYPE: ClassVar[MsgType] = MsgType.NETWORK_RESULT
    arrays: Arrays
    status: Annotated[str, msgspec.Meta(max_length=256)] = STATUS_OK

    def check(self) -> None:
        check_arrays("arrays", self.arrays, FN.__metadata__[0])
