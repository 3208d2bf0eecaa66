"""``summary.json``: the figures of a run (SPEC section 6), their contract and their short text.

Energy conventions (``energy_mwh``; every value is a positive amount of energy unless stated):
dispatch ``p_mw`` is the net injection (producers positive, consumers negative), hourly MW x 1 h.
- grid_import / grid_export: positive / negative ``p_mw`` of the ``grid`` peer; in the community market the
  root exchange belongs to the network agent and ``RunResult.grid_exchange`` (import_mw, export_mw) is used.
- pv, wind, chp: sum of those peers' injections.
- ev_discharge / ev_charge: positive / negative ``p_mw`` of ``ev`` peers, both reported positive.
- load: consumption of ``load`` peers (-sum p_mw), positive.
- virtual_load: net consumption of the TSO's ``virtual_load`` rows (-sum p_mw); negative for a net downward
  regulation (a virtual load that injects).
- prosumer_injection / prosumer_withdrawal: positive / negative ``p_mw`` of ``prosumer`` peers (hour by hour and
  peer by peer), both reported positive.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, ValidationError

from common.report.values import _column_sum, _float, _fmt, _fmt_bytes, _has_rows, _nan_extreme, _py
from common.results import SCHEMA, ACReport, RunResult

HOURS_PER_PERIOD = 1.0  # market periods are hourly: energy [MWh] = power [MW] x 1 h

ENERGY_KEYS = ("grid_import", "grid_export", "pv", "wind", "chp", "ev_charge", "ev_discharge", "load", "virtual_load",
               "prosumer_injection", "prosumer_withdrawal")
# the ``energy_mwh`` categories on each side of the balance, with their labels (summary text, report, figures)
SUPPLY = (("grid import", "grid_import"), ("CHP", "chp"), ("wind", "wind"), ("PV", "pv"),
          ("EV discharge", "ev_discharge"), ("prosumer injection", "prosumer_injection"))
DEMAND = (("load", "load"), ("EV charge", "ev_charge"), ("virtual load (TSO)", "virtual_load"),
          ("prosumer withdrawal", "prosumer_withdrawal"), ("grid export", "grid_export"))

SUMMARY_KEYS = (
    "schema", "scenario", "market", "model", "solver", "converged", "iterations", "outer_iterations", "wall_s",
    "social_welfare_eur", "differentiation_cost_eur", "flex_penalty_eur", "energy_mwh", "losses_pct",
    "max_line_loading_pct", "max_trafo_loading_pct", "vmin_pu", "vmax_pu", "violations", "violations_initial",
    "primal_residual", "dual_residual", "messages", "bytes", "processes",
)



# ---------------------------------------------------------------------------------------------------------------
# the contract of summary.json (published as a JSON Schema: `p2pm schema summary`)
# ---------------------------------------------------------------------------------------------------------------
Number = Optional[float]  # null: not measured in this run (no AC check, no hour with a welfare, ...)


class EnergyMWh(BaseModel):
    """Energy over the day [MWh] by category; positive amounts (virtual_load: net consumption of the
    TSO's virtual load, negative for a net downward regulation)."""

    model_config = ConfigDict(extra="forbid")
    grid_import: Optional[NonNegativeFloat] = Field(description="Energy bought from the external grid [MWh].")
    grid_export: Optional[NonNegativeFloat] = Field(description="Energy sold to the external grid [MWh].")
    pv: Number = Field(description="PV generation [MWh].")
    wind: Number = Field(description="Wind generation [MWh].")
    chp: Number = Field(description="CHP generation [MWh].")
    ev_charge: Optional[NonNegativeFloat] = Field(description="EV charging [MWh].")
    ev_discharge: Optional[NonNegativeFloat] = Field(description="EV discharging (V2G) [MWh].")
    load: Number = Field(description="Consumption of the loads [MWh].")
    virtual_load: Number = Field(description="Net consumption of the TSO's virtual load [MWh].")
    prosumer_injection: Optional[NonNegativeFloat] = Field(description="Injection of the prosumers [MWh].")
    prosumer_withdrawal: Optional[NonNegativeFloat] = Field(description="Withdrawal of the prosumers [MWh].")


class DroppedHost(BaseModel):
    """A peer host lost during a clearing and dropped from the market (``--on-peer-loss drop``)."""

    model_config = ConfigDict(extra="forbid")
    host: str = Field(description="The lost peer host (process identity).")
    peers: list[str] = Field(description="Its peers, which left the market.")
    iteration: NonNegativeInt = Field(description="ADMM iteration during which it was lost; the clearing went on "
                                                  "from the state of the iteration before, without its peers.")
    reason: str = Field(description="How its loss was noticed (silence, disconnection).")
    detected_s: float = Field(description="When its loss was noticed, seconds since the launch [s].")


class Summary(BaseModel):
    """summary.json of a run (schema p2pm.run/1, SPEC section 6). These keys are always present, in
    this order; a run adds more (timings, rounds, peak memory, outer-loop status, ...)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, title="p2pm run summary (p2pm.run/1)")
    schema_id: Literal["p2pm.run/1"] = Field(alias="schema", description="Schema of this file.")
    scenario: str = Field(description="Scenario name.")
    market: Literal["p2p", "community"] = Field(description="Full P2P market or community market.")
    model: Literal["benchmark", "cong", "volt", "freq", "full"] = Field(description="Market model (outer loop).")
    solver: Literal["centralized", "admm"] = Field(description="Centralized reference or distributed ADMM.")
    converged: bool = Field(description="Every clearing converged (and the outer loop ended feasible).")
    iterations: NonNegativeInt = Field(description="All inner ADMM iterations.")
    outer_iterations: NonNegativeInt = Field(description="Clearings of the outer loop (1 without one; 0: none).")
    wall_s: Optional[NonNegativeFloat] = Field(description="Whole run, launch to results written [s].")
    social_welfare_eur: Number = Field(description="Social welfare with the peers' own costs and utilities [EUR].")
    differentiation_cost_eur: Number = Field(description="Product differentiation costs paid [EUR].")
    flex_penalty_eur: Number = Field(description="Flexibility penalty (beta x extra flexibility) [EUR].")
    energy_mwh: EnergyMWh
    losses_pct: Number = Field(description="AC losses over load, hours with a power-flow solution [%].")
    max_line_loading_pct: Optional[NonNegativeFloat] = Field(description="Max line loading, all hours [%].")
    max_trafo_loading_pct: Optional[NonNegativeFloat] = Field(description="Max transformer loading, all hours [%].")
    vmin_pu: Optional[NonNegativeFloat] = Field(description="Min bus voltage, all hours [pu].")
    vmax_pu: Optional[NonNegativeFloat] = Field(description="Max bus voltage, all hours [pu].")
    violations: Optional[NonNegativeInt] = Field(description="Violations after the last AC check.")
    violations_initial: Optional[NonNegativeInt] = Field(description="Violations at the first AC check.")
    primal_residual: Optional[NonNegativeFloat] = Field(description="Last primal residual [MW].")
    dual_residual: Optional[NonNegativeFloat] = Field(description="Last dual residual [EUR/MWh].")
    messages: NonNegativeInt = Field(description="Messages of the run (every type and iteration).")
    bytes: NonNegativeInt = Field(description="Bytes of those messages.")
    processes: NonNegativeInt = Field(description="OS processes of the run.")
    # present in distributed runs only (after the keys above)
    rejected_messages: Optional[NonNegativeInt] = Field(
        None, description="Messages refused by any role of the run (sum of rejected_by_role).")
    rejected_by_role: Optional[dict[str, dict[str, NonNegativeInt]]] = Field(
        None, description="Refused messages by role (coordinator, dso, tso, peers: the sum over the peer hosts) and "
                          "reason (common.protocol.REASONS, and the engines' own: stale, duplicate, registration, "
                          "late_hello, internal, ...).")
    on_peer_loss: Optional[Literal["abort", "drop", "wait"]] = Field(
        None, description="What the run did when a peer host was lost: end (abort), go on without its peers (drop), "
                          "or wait for it to come back (wait).")
    dropped_peers: Optional[list[DroppedHost]] = Field(
        None, description="Peer hosts lost and dropped during the run, in order; the result is the market without "
                          "their peers.")
    rejoined_peers: Optional[list[dict]] = Field(
        None, description="Peer hosts lost and back within the grace time (policy wait): host, peers, iteration, "
                          "reason, lost_s and back_s (seconds since the launch).")
    rejoined_services: Optional[list[dict]] = Field(
        None, description="The DSO or TSO lost and back within the grace time (policy wait): role, iteration, reason, "
                          "lost_s and back_s; a request it had not answered was sent again.")
    resumed_from: Optional[dict] = Field(
        None, description="A run resumed from a checkpoint ('p2pm resume'): the interrupted run's run_id, the iteration "
                          "it went on from and when that checkpoint was written (written_s, seconds since the "
                          "interrupted run's launch). Iterations count on from it; wall times are the resumed run's.")


def summary_json_schema() -> dict:
    """The published JSON Schema of summary.json."""
    schema = Summary.model_json_schema(by_alias=True)
    schema["$id"] = "https://p2pm.invalid/schema/p2pm.run-1.json"
    return schema


class SummaryContractError(ValueError):
    pass


def check_summary(data: dict) -> dict:
    """Validate a summary dictionary against the contract; returns it as JSON data (SPEC key order
    first). Raises SummaryContractError with one line per broken field."""
    try:
        return Summary.model_validate(data).model_dump(mode="json", by_alias=True, exclude_unset=True)
    except ValidationError as exc:
        lines = [f"summary.json: {'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']} (got {e.get('input')!r})"
                 for e in exc.errors()]
        raise SummaryContractError("\n".join(lines)) from None


def check_summary_file(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SummaryContractError(f"{path}: {exc}") from None
    return check_summary(data)


def hourly_energy(result: RunResult) -> pd.DataFrame:
    """Per hour, the ``energy_mwh`` categories as powers [MW] (all positive amounts, see the module doc).

    Index: hour (sorted); columns: ENERGY_KEYS.
    """
    d = result.dispatch
    hours: set = set()
    cols: dict[str, pd.Series] = {}
    if _has_rows(d):
        p = pd.to_numeric(d["p_mw"], errors="coerce").fillna(0.0)
        kind = d["kind"].astype(str)
        hour = d["hour"]
        hours.update(hour.unique().tolist())

        def by_hour(values: pd.Series, mask: pd.Series) -> pd.Series:
            return values[mask].groupby(hour[mask]).sum()

        cols["grid_import"] = by_hour(p.clip(lower=0.0), kind == "grid")
        cols["grid_export"] = by_hour((-p).clip(lower=0.0), kind == "grid")
        for k in ("pv", "wind", "chp"):
            cols[k] = by_hour(p, kind == k)
        cols["ev_discharge"] = by_hour(p.clip(lower=0.0), kind == "ev")
        cols["ev_charge"] = by_hour((-p).clip(lower=0.0), kind == "ev")
        cols["load"] = by_hour(-p, kind == "load")
        cols["virtual_load"] = by_hour(-p, kind == "virtual_load")
        cols["prosumer_injection"] = by_hour(p.clip(lower=0.0), kind == "prosumer")
        cols["prosumer_withdrawal"] = by_hour((-p).clip(lower=0.0), kind == "prosumer")
    ge = result.grid_exchange
    if ge is not None:
        # community market: the root exchange is the network agent's, not a peer's
        cols["grid_import"] = pd.Series(dtype=float)
        cols["grid_export"] = pd.Series(dtype=float)
        if _has_rows(ge):
            hours.update(ge["hour"].unique().tolist())
            if "import_mw" in ge.columns:
                cols["grid_import"] = pd.to_numeric(ge["import_mw"], errors="coerce").groupby(ge["hour"]).sum()
            if "export_mw" in ge.columns:
                cols["grid_export"] = pd.to_numeric(ge["export_mw"], errors="coerce").groupby(ge["hour"]).sum()
    index = pd.Index(sorted(hours), name="hour")
    out = pd.DataFrame(index=index)
    for key in ENERGY_KEYS:
        series = cols.get(key)
        out[key] = 0.0 if series is None else series.reindex(index).fillna(0.0).astype(float)
    return out


def _loading_figures(ac: ACReport) -> tuple[float | None, float | None]:
    """Max line loading and max transformer loading [%] over all hours (None when there is none)."""
    lines, hours = ac.lines, ac.hours
    max_line = max_trafo = None
    if _has_rows(lines) and "loading_percent" in lines.columns:
        if "kind" in lines.columns:
            is_trafo = lines["kind"].astype(str) == "trafo"
            max_line = _nan_extreme(lines.loc[~is_trafo, "loading_percent"], np.max)
            max_trafo = _nan_extreme(lines.loc[is_trafo, "loading_percent"], np.max)
            return max_line, max_trafo
        max_line = _nan_extreme(lines["loading_percent"], np.max)
    if _has_rows(hours):
        if max_line is None and "max_line_loading_pct" in hours.columns:
            max_line = _nan_extreme(hours["max_line_loading_pct"], np.max)
        if "max_trafo_loading_pct" in hours.columns:
            max_trafo = _nan_extreme(hours["max_trafo_loading_pct"], np.max)
    return max_line, max_trafo


def _ac_figures(ac: ACReport | None) -> dict:
    if ac is None:
        return dict(losses_pct=None, max_line_loading_pct=None, max_trafo_loading_pct=None, vmin_pu=None,
                    vmax_pu=None, violations=None)
    hours = ac.hours if ac.hours is not None else pd.DataFrame()
    losses_pct = None
    if "losses_mw" in hours.columns and "load_mw" in hours.columns:
        # over the hours with a power-flow solution: an hour that did not converge has no losses
        solved = hours[pd.to_numeric(hours["losses_mw"], errors="coerce").notna()]
        load = _column_sum(solved, "load_mw")
        if abs(load) > 0:
            losses_pct = 100.0 * _column_sum(solved, "losses_mw") / load
    vmin = _nan_extreme(hours["vmin_pu"], np.min) if "vmin_pu" in hours.columns else None
    vmax = _nan_extreme(hours["vmax_pu"], np.max) if "vmax_pu" in hours.columns else None
    if (vmin is None or vmax is None) and _has_rows(ac.buses) and "vm_pu" in ac.buses.columns:
        vmin = vmin if vmin is not None else _nan_extreme(ac.buses["vm_pu"], np.min)
        vmax = vmax if vmax is not None else _nan_extreme(ac.buses["vm_pu"], np.max)
    max_line, max_trafo = _loading_figures(ac)
    violations = 0 if ac.violations is None else int(len(ac.violations))
    return dict(losses_pct=losses_pct, max_line_loading_pct=max_line, max_trafo_loading_pct=max_trafo,
                vmin_pu=vmin, vmax_pu=vmax, violations=violations)


def _welfare(economics: pd.DataFrame | None) -> float | None:
    """Sum of the hourly social welfare; None when no hour has one (0 would read as a result)."""
    if economics is None or "social_welfare_eur" not in economics.columns:
        return None
    values = pd.to_numeric(economics["social_welfare_eur"], errors="coerce")
    return _float(values.sum()) if values.notna().any() else None


def build_summary(result: RunResult) -> dict:
    """The ``summary.json`` dictionary of SPEC section 6 (plain Python values, NaN -> None).

    Required keys come first, in the SPEC's order; then the keys of ``result.extra`` that do not
    collide with a required key (a required key is never overwritten by ``extra``).
    """
    energy = hourly_energy(result).sum(axis=0) * HOURS_PER_PERIOD
    ac = _ac_figures(result.ac)
    if result.ac_initial is not None:
        violations_initial = 0 if result.ac_initial.violations is None else int(len(result.ac_initial.violations))
    else:
        violations_initial = ac["violations"]
    summary = {
        "schema": SCHEMA,
        "scenario": str(result.scenario),
        "market": str(result.market),
        "model": str(result.model),
        "solver": str(result.solver),
        "converged": bool(result.converged),
        "iterations": int(result.iterations),
        "outer_iterations": int(result.outer_iterations),
        "wall_s": _float(result.wall_s),
        "social_welfare_eur": _welfare(result.economics),
        "differentiation_cost_eur": _float(_column_sum(result.economics, "differentiation_cost_eur")),
        "flex_penalty_eur": _float(_column_sum(result.economics, "flex_penalty_eur")),
        "energy_mwh": {k: _float(energy.get(k, 0.0)) for k in ENERGY_KEYS},
        "losses_pct": _float(ac["losses_pct"]),
        "max_line_loading_pct": _float(ac["max_line_loading_pct"]),
        "max_trafo_loading_pct": _float(ac["max_trafo_loading_pct"]),
        "vmin_pu": _float(ac["vmin_pu"]),
        "vmax_pu": _float(ac["vmax_pu"]),
        "violations": ac["violations"],
        "violations_initial": violations_initial,
        "primal_residual": _float(result.primal_residual),
        "dual_residual": _float(result.dual_residual),
        "messages": int(round(_column_sum(result.messages, "count"))),
        "bytes": int(round(_column_sum(result.messages, "bytes"))),
        "processes": int(result.processes),
    }
    for key, value in (result.extra or {}).items():
        if str(key) not in summary:
            summary[str(key)] = _py(value)
    return check_summary(summary)



def format_summary(summary: dict) -> str:
    """A short multi-line text of a summary (printed by the CLI at the end of a run)."""
    s = summary
    e = s.get("energy_mwh") or {}
    lines = [
        f"scenario {s.get('scenario')}: {s.get('market')} market, model {s.get('model')}, solver {s.get('solver')}",
        (f"converged: {_fmt(s.get('converged'))} after {_fmt(s.get('iterations'))} iterations "
         f"({_fmt(s.get('outer_iterations'))} outer), wall {_fmt(s.get('wall_s'), 2, 's')}, "
         f"{_fmt(s.get('processes'))} processes"),
        (f"social welfare {_fmt(s.get('social_welfare_eur'), 2, 'EUR')} "
         f"(differentiation cost {_fmt(s.get('differentiation_cost_eur'), 2, 'EUR')}, "
         f"flexibility penalty {_fmt(s.get('flex_penalty_eur'), 2, 'EUR')})"),
    ]
    parts = [f"{label} {_fmt(e.get(key), 3)}" for label, key in SUPPLY if (e.get(key) or 0) != 0 or key == "grid_import"]
    lines.append("supply [MWh]: " + ", ".join(parts))
    parts = [f"{label} {_fmt(e.get(key), 3)}" for label, key in DEMAND if (e.get(key) or 0) != 0 or key == "load"]
    lines.append("demand [MWh]: " + ", ".join(parts))
    if s.get("vmin_pu") is not None or s.get("violations") is not None:
        lines.append(
            f"grid (AC): losses {_fmt(s.get('losses_pct'), 2, '%')}, "
            f"max line loading {_fmt(s.get('max_line_loading_pct'), 1, '%')}, "
            f"max trafo loading {_fmt(s.get('max_trafo_loading_pct'), 1, '%')}, "
            f"voltage {_fmt(s.get('vmin_pu'), 4)}-{_fmt(s.get('vmax_pu'), 4)} pu, "
            f"violations {_fmt(s.get('violations'))} (initial {_fmt(s.get('violations_initial'))})")
    else:
        lines.append("grid (AC): no power-flow check")
    lines.append(
        f"residuals: primal {_fmt(s.get('primal_residual'), 3)}, dual {_fmt(s.get('dual_residual'), 3)}; "
        f"messages {_fmt(s.get('messages'))} ({_fmt_bytes(s.get('bytes'))})")
    return "\n".join(lines)

