"""What a run produces, independent of how it was cleared (centralized or distributed).

``RunResult`` holds the tables of SPEC section 6 as pandas DataFrames with the column names
written to disk; ``write_results`` (common.report) turns it into the results folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

SCHEMA = "p2pm.run/1"


def entity_hour_frame(entity: str, ids, values: dict, *, first_hour: int = 1, **per_entity) -> pd.DataFrame:
    """A long table (one row per entity and hour, entity-major) from (entity x hour) arrays.

    ``values``: column name -> array of shape (len(ids), hours); ``per_entity``: column name ->
    one value per entity (repeated over the hours), placed between the entity and the hour.
    """
    ids = list(ids)
    arrays = {k: np.asarray(v) for k, v in values.items()}
    hours = next(iter(arrays.values())).shape[1] if arrays else 0
    n = len(ids)
    cols = {entity: np.repeat(np.asarray(ids, dtype=object), hours)}
    for k, v in per_entity.items():
        cols[k] = np.repeat(np.asarray(list(v)), hours)
    cols["hour"] = np.tile(np.arange(first_hour, first_hour + hours), n)
    for k, v in arrays.items():
        if v.shape != (n, hours):
            raise ValueError(f"{k}: shape {v.shape}, expected ({n}, {hours}) (entity x hour)")
        cols[k] = v.reshape(-1)
    return pd.DataFrame(cols)


@dataclass
class ACReport:
    """AC power-flow validation of a dispatch, all hours (built by dso_service.powerflow).

    buses: bus, hour, vm_pu
    lines: line, hour, loading_percent  (every branch; transformers and the transformer-as-line
           are listed with ``kind`` == "trafo")
    hours: hour, converged, losses_mw, losses_pct, load_mw, slack_p_mw, vmin_pu, vmax_pu,
           max_line_loading_pct, max_trafo_loading_pct, violations
    violations: hour, element ("bus" | "line" | "trafo" | "powerflow"), index, value, limit, kind
                ("undervoltage" | "overvoltage" | "overload" | "not_converged")
    network_buses / network_branches: the network's drawing (sent with the DSO's first report only)
    """

    buses: pd.DataFrame
    lines: pd.DataFrame
    hours: pd.DataFrame
    violations: pd.DataFrame
    # where to draw the network (dso_service.layout): bus, x, y, vn_kv, source ("geodata" | "tree layout")
    network_buses: pd.DataFrame | None = None
    # line (as in ``lines``), element, kind, from_bus, to_bus
    network_branches: pd.DataFrame | None = None


@dataclass
class RunResult:
    scenario: str
    market: str  # "p2p" | "community"
    model: str  # "benchmark" | ...
    solver: str  # "centralized" | "admm"
    converged: bool
    # dispatch: peer, kind, bus, hour, p_mw, q_mvar  (p_mw: net injection, producers positive)
    dispatch: pd.DataFrame
    # per-hour economics: hour, social_welfare_eur, differentiation_cost_eur, flex_penalty_eur
    economics: pd.DataFrame
    iterations: int = 0
    outer_iterations: int = 0
    wall_s: float = 0.0
    trades: pd.DataFrame | None = None  # seller, buyer, hour, p_mw, price_eur_per_mwh
    prices: pd.DataFrame | None = None  # bus or peer, hour, price_eur_per_mwh
    ev_soc: pd.DataFrame | None = None  # peer, hour, soc_mwh (end of hour)
    payments: pd.DataFrame | None = None  # peer, payment_eur (positive = pays)
    grid_exchange: pd.DataFrame | None = None  # hour, import_mw, export_mw (community root exchange)
    relaxation: pd.DataFrame | None = None  # hour, losses_socp_mw, losses_ac_mw, max_vm_gap_pu (community)
    ac: ACReport | None = None
    ac_initial: ACReport | None = None  # first AC check of an outer loop
    admm_history: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame(columns=["outer", "iteration", "primal_residual", "dual_residual", "rho"])
    )
    messages: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["iteration", "type", "count", "bytes"]))
    processes: int = 1
    primal_residual: float = 0.0
    dual_residual: float = 0.0
    outer_hours: pd.DataFrame | None = None  # per hour before/after the outer loop (common.outer_loop.hours_frame)
    outer_history: pd.DataFrame | None = None  # outer, admm_iterations, violations, hours_with_violations, step, actions
    outer_day: pd.DataFrame | None = None  # quantity, before, after: the day before and after the outer loop
    penalties: pd.DataFrame | None = None  # outer, source, host, peer, parameters: who got which PENALTY
    extra: dict = field(default_factory=dict)  # more summary keys (e.g. timing breakdown)
