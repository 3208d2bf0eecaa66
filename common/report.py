"""The results folder of a run (SPEC section 6): ``summary.json``, the tables as CSV and ``report.html``.

``build_summary`` turns a :class:`~common.results.RunResult` into the ``summary.json`` dictionary (plain Python
numbers, NaN -> None), ``write_results`` writes the whole folder, ``format_summary`` gives the short text the CLI
prints at the end of a run.

Energy conventions (``energy_mwh``; every value is a positive amount of energy unless stated):
dispatch ``p_mw`` is the net injection (producers positive, consumers negative), hourly MW x 1 h.
- grid_import / grid_export: positive / negative ``p_mw`` of the ``grid`` peer; in the community market the
  root exchange belongs to the network agent and ``RunResult.grid_exchange`` (import_mw, export_mw) is used.
- pv, wind, chp: sum of those peers' injections.
- ev_discharge / ev_charge: positive / negative ``p_mw`` of ``ev`` peers, both reported positive.
- load: consumption of ``load`` peers (-sum p_mw), positive.
- virtual_load: net consumption of the TSO's ``virtual_load`` rows (-sum p_mw); negative for a net downward
  regulation (a virtual load that injects).

Matplotlib is imported only by ``write_results`` (Agg backend), so roles that only build summaries stay light.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from common.results import SCHEMA, ACReport, RunResult

HOURS_PER_PERIOD = 1.0  # market periods are hourly: energy [MWh] = power [MW] x 1 h

ENERGY_KEYS = ("grid_import", "grid_export", "pv", "wind", "chp", "ev_charge", "ev_discharge", "load", "virtual_load")

SUMMARY_KEYS = (
    "schema", "scenario", "market", "model", "solver", "converged", "iterations", "outer_iterations", "wall_s",
    "social_welfare_eur", "differentiation_cost_eur", "flex_penalty_eur", "energy_mwh", "losses_pct",
    "max_line_loading_pct", "max_trafo_loading_pct", "vmin_pu", "vmax_pu", "violations", "violations_initial",
    "primal_residual", "dual_residual", "messages", "bytes", "processes",
)

# Column order of the tables on disk (SPEC section 6); more columns are kept after these.
TABLE_COLUMNS = {
    "dispatch": ["peer", "kind", "bus", "hour", "p_mw", "q_mvar"],
    "trades": ["seller", "buyer", "hour", "p_mw", "price_eur_per_mwh"],
    "prices": ["bus", "peer", "hour", "price_eur_per_mwh"],
    "buses": ["bus", "hour", "vm_pu"],
    "lines": ["line", "hour", "loading_percent"],
    "hours": ["hour"],
    "violations": ["hour", "element", "index", "value", "limit", "kind"],
    "admm_history": ["outer", "iteration", "primal_residual", "dual_residual", "rho"],
    "messages": ["iteration", "type", "count", "bytes"],
    "ev_soc": ["peer", "hour", "soc_mwh"],
    "payments": ["peer", "payment_eur"],
    "relaxation": ["hour", "losses_socp_mw", "losses_ac_mw", "max_vm_gap_pu"],
    "grid_exchange": ["hour", "import_mw", "export_mw"],
}

DEFAULT_VM_MIN_PU = 0.95
DEFAULT_VM_MAX_PU = 1.05
DEFAULT_MAX_LOADING_PERCENT = 100.0


# ---------------------------------------------------------------------------------------------------------------
# plain values
# ---------------------------------------------------------------------------------------------------------------
def _py(value):
    """A json-serializable copy: numpy scalars -> Python, NaN/inf -> None, containers recursively."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        return {str(k): _py(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_py(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_py(v) for v in value.tolist()]
    if isinstance(value, pd.Series):
        return [_py(v) for v in value.tolist()]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, Path):
        return str(value)
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return str(value)


def _float(value) -> float | None:
    if value is None:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _column_sum(df: pd.DataFrame | None, column: str) -> float:
    if df is None or column not in df.columns or df.empty:
        return 0.0
    return float(pd.to_numeric(df[column], errors="coerce").sum(skipna=True))


def _nan_extreme(values: pd.Series, fn) -> float | None:
    arr = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
    arr = arr[np.isfinite(arr)]
    return float(fn(arr)) if arr.size else None


def _has_rows(df: pd.DataFrame | None) -> bool:
    return df is not None and isinstance(df, pd.DataFrame) and not df.empty


# ---------------------------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------------------------
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
    return summary


def _fmt(value, digits: int = 3, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        text = f"{value:,}"
    elif isinstance(value, float):
        if value != 0 and (abs(value) < 10 ** (-digits) or abs(value) >= 1e7):
            text = f"{value:.{max(digits - 1, 1)}e}"
        else:
            text = f"{value:,.{digits}f}"
    else:
        text = str(value)
    return f"{text} {unit}".rstrip() if unit else text


def _fmt_bytes(n) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


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
    supply = [("grid import", "grid_import"), ("PV", "pv"), ("wind", "wind"), ("CHP", "chp"),
              ("EV discharge", "ev_discharge")]
    demand = [("load", "load"), ("EV charge", "ev_charge"), ("grid export", "grid_export"),
              ("virtual load", "virtual_load")]
    parts = [f"{label} {_fmt(e.get(key), 3)}" for label, key in supply if (e.get(key) or 0) != 0 or key == "grid_import"]
    lines.append("supply [MWh]: " + ", ".join(parts))
    parts = [f"{label} {_fmt(e.get(key), 3)}" for label, key in demand if (e.get(key) or 0) != 0 or key == "load"]
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


# ---------------------------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------------------------
def _ordered(df: pd.DataFrame, name: str) -> pd.DataFrame:
    first = [c for c in TABLE_COLUMNS.get(name, []) if c in df.columns]
    return df[first + [c for c in df.columns if c not in first]]


def _write_csv(df: pd.DataFrame | None, path: Path, name: str, always: bool = False) -> bool:
    """Write a table; an absent or empty table is written (header only) only when ``always``."""
    if df is None:
        if not always:
            return False
        cols = [c for c in TABLE_COLUMNS.get(name, []) if not (name == "prices" and c == "peer")]
        df = pd.DataFrame(columns=cols)
    elif df.empty and not always:
        return False
    _ordered(df, name).to_csv(path, index=False)
    return True


def _hours_table(result: RunResult) -> pd.DataFrame:
    econ = result.economics if result.economics is not None else pd.DataFrame(columns=["hour"])
    if result.ac is not None and result.ac.hours is not None and "hour" in result.ac.hours.columns:
        acc = result.ac.hours
        if "hour" not in econ.columns or econ.empty:
            table = acc.copy()
            for c in econ.columns:
                if c not in table.columns:
                    table[c] = np.nan
        else:
            table = acc.merge(econ, on="hour", how="outer", suffixes=("", "_market"))
    else:
        table = econ.copy()
    if "hour" in table.columns and not table.empty:
        table = table.sort_values("hour").reset_index(drop=True)
    return table


# ---------------------------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------------------------
_COLORS = {
    "grid_import": "#8c8c8c", "chp": "#a0522d", "wind": "#4c9be8", "pv": "#f4c430", "ev_discharge": "#2ca02c",
    "load": "#d9534f", "ev_charge": "#98df8a", "virtual_load": "#9467bd", "grid_export": "#505050",
    "losses": "#f0a0a0",
}
_LABELS = {
    "grid_import": "grid import", "chp": "CHP", "wind": "wind", "pv": "PV", "ev_discharge": "EV discharge",
    "load": "load", "ev_charge": "EV charge", "virtual_load": "virtual load (TSO)", "grid_export": "grid export",
}


def _limits(scenario) -> dict:
    net = getattr(scenario, "network", None)
    market = getattr(scenario, "market", None)
    return {
        "vm_min_pu": float(getattr(net, "vm_min_pu", DEFAULT_VM_MIN_PU)),
        "vm_max_pu": float(getattr(net, "vm_max_pu", DEFAULT_VM_MAX_PU)),
        "max_loading_percent": float(getattr(net, "max_loading_percent", DEFAULT_MAX_LOADING_PERCENT)),
        "tolerance": getattr(market, "tolerance", None),
    }


def _grid_price(scenario) -> np.ndarray | None:
    """The public import tariff at the root (community market), for reference in the price figure;
    in the full P2P market the external supplier's price is its own private data."""
    tariff = getattr(scenario, "tariff", None)
    return None if tariff is None else np.asarray(tariff.import_price_eur_per_mwh, dtype=float)


def _hour_axis(ax, hours) -> None:
    hours = list(hours)
    if not hours:
        return
    ax.set_xlabel("hour")
    n = len(hours)
    step = 1 if n <= 24 else (2 if n <= 48 else 6)
    ticks = [h for i, h in enumerate(hours) if i % step == 0]
    ax.set_xticks(ticks)
    ax.set_xlim(min(hours) - 0.6, max(hours) + 0.6)


def _new_figure(height: float = 4.2, nrows: int = 1, width: float = 10.0, sharex: bool = True, **kw):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    axes = fig.subplots(nrows, 1, sharex=sharex, squeeze=False, **kw)[:, 0]
    return fig, (axes[0] if nrows == 1 else axes)


def _legend(ax, **kw) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, fontsize=9, framealpha=0.9, **kw)


def _fig_supply_mix(result: RunResult, energy: pd.DataFrame):
    if energy.empty:
        return None
    fig, ax = _new_figure(4.6)
    hours = energy.index.to_numpy()
    bottom = np.zeros(len(hours))
    for key in ("grid_import", "chp", "wind", "pv", "ev_discharge"):
        v = energy[key].to_numpy()
        if np.any(np.abs(v) > 1e-9):
            ax.bar(hours, v, 0.8, bottom=bottom, color=_COLORS[key], label=_LABELS[key], edgecolor="white", linewidth=0.4)
            bottom = bottom + v
    bottom = np.zeros(len(hours))
    for key in ("load", "ev_charge", "virtual_load", "grid_export"):
        v = energy[key].to_numpy()
        if np.any(np.abs(v) > 1e-9):
            hatch = "//" if key == "grid_export" else None
            ax.bar(hours, -v, 0.8, bottom=bottom, color=_COLORS[key], label=_LABELS[key], hatch=hatch,
                   edgecolor="white", linewidth=0.4)
            bottom = bottom - v
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_ylabel("power [MW]  (supply > 0, demand < 0)")
    ax.set_title("Supply mix per hour (market dispatch)")
    _hour_axis(ax, hours)
    ax.grid(axis="y", alpha=0.3)
    _legend(ax, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def _fig_load(result: RunResult, energy: pd.DataFrame):
    if energy.empty:
        return None
    fig, ax = _new_figure(4.2)
    hours = energy.index.to_numpy()
    bottom = np.zeros(len(hours))
    for key in ("load", "ev_charge", "virtual_load"):
        v = energy[key].to_numpy()
        if np.any(np.abs(v) > 1e-9) or key == "load":
            ax.bar(hours, v, 0.8, bottom=bottom, color=_COLORS[key], label=_LABELS[key], edgecolor="white", linewidth=0.4)
            bottom = bottom + v
    ac = result.ac
    if ac is not None and _has_rows(ac.hours) and {"hour", "losses_mw"} <= set(ac.hours.columns):
        losses = ac.hours.groupby("hour")["losses_mw"].sum().reindex(hours).fillna(0.0).to_numpy(dtype=float)
        if np.any(np.abs(losses) > 1e-9):
            ax.bar(hours, losses, 0.8, bottom=bottom, color=_COLORS["losses"], label="AC losses", hatch="..",
                   edgecolor="white", linewidth=0.4)
    ax.set_ylabel("power [MW]")
    ax.set_title("Load per hour")
    _hour_axis(ax, hours)
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)
    _legend(ax, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def _fig_prices(result: RunResult, scenario):
    trades, prices = result.trades, result.prices
    grid_price = _grid_price(scenario) if scenario is not None else None
    if _has_rows(trades) and {"hour", "p_mw", "price_eur_per_mwh"} <= set(trades.columns):
        t = trades.copy()
        t["w"] = pd.to_numeric(t["p_mw"], errors="coerce").abs()
        t["price"] = pd.to_numeric(t["price_eur_per_mwh"], errors="coerce")
        t = t[(t["w"] > 1e-6) & t["price"].notna()]
        if t.empty:
            return None
        t["wp"] = t["w"] * t["price"]
        g = t.groupby("hour")
        avg = g["wp"].sum() / g["w"].sum()
        lo, hi = g["price"].min(), g["price"].max()
        hours = avg.index.to_numpy()
        fig, ax = _new_figure(4.2)
        ax.fill_between(hours, lo.to_numpy(), hi.to_numpy(), color="#1f77b4", alpha=0.2, step=None,
                        label="min-max over trades")
        ax.plot(hours, avg.to_numpy(), "o-", color="#1f77b4", label="trade-weighted average")
        if grid_price is not None and len(grid_price) >= int(max(hours)):
            ax.plot(hours, grid_price[hours.astype(int) - 1], "--", color="#555555", label="grid import price")
        ax.set_ylabel("price [EUR/MWh]")
        ax.set_title("Trade prices per hour")
        _hour_axis(ax, hours)
        ax.grid(alpha=0.3)
        _legend(ax, loc="best")
        return fig
    if _has_rows(prices) and {"hour", "price_eur_per_mwh"} <= set(prices.columns):
        who = "bus" if "bus" in prices.columns else ("peer" if "peer" in prices.columns else None)
        if who is None:
            return None
        table = prices.pivot_table(index=who, columns="hour", values="price_eur_per_mwh", aggfunc="mean")
        hours = table.columns.to_numpy()
        if len(table) <= 10:
            fig, ax = _new_figure(4.2)
            for name, row in table.iterrows():
                ax.plot(hours, row.to_numpy(dtype=float), "o-", markersize=3, label=f"{who} {name}")
            if grid_price is not None and len(grid_price) >= int(max(hours)):
                ax.plot(hours, grid_price[hours.astype(int) - 1], "--", color="#555555", label="grid import price")
            ax.set_ylabel("price [EUR/MWh]")
            ax.set_title(f"Prices per {who} and hour")
            _hour_axis(ax, hours)
            ax.grid(alpha=0.3)
            _legend(ax, loc="center left", bbox_to_anchor=(1.01, 0.5))
            return fig
        values = table.to_numpy(dtype=float)
        fig, (ax, ax2) = _new_figure(7.6, nrows=2, height_ratios=[1, 1.3])
        plural = "buses" if who == "bus" else "peers"
        mean = np.nanmean(values, axis=0)
        ax.fill_between(hours, np.nanmin(values, axis=0), np.nanmax(values, axis=0), color="#1f77b4", alpha=0.2,
                        label=f"min-max over {plural}")
        ax.plot(hours, mean, "o-", color="#1f77b4", markersize=3, label=f"mean over {plural}")
        if grid_price is not None and len(grid_price) >= int(max(hours)):
            ax.plot(hours, grid_price[hours.astype(int) - 1], "--", color="#555555", label="grid import price")
        ax.set_ylabel("price [EUR/MWh]")
        ax.set_title(f"Prices per hour ({len(table)} {plural})")
        ax.grid(alpha=0.3)
        _legend(ax, loc="best")
        # the level is in the upper panel; the map shows where prices differ: deviation from the hourly mean
        dev = values - mean[None, :]
        span = float(np.nanmax(np.abs(dev))) if np.isfinite(dev).any() else 0.0
        span = span if span > 1e-9 else 1.0
        im = ax2.imshow(dev, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-span, vmax=span,
                        interpolation="nearest",
                        extent=(hours.min() - 0.5, hours.max() + 0.5, -0.5, len(table) - 0.5))
        names = [str(x) for x in table.index]
        step = max(1, int(np.ceil(len(names) / 12)))
        ax2.set_yticks(range(0, len(names), step))
        ax2.set_yticklabels(names[::step])
        ax2.set_ylabel(who)
        _hour_axis(ax2, hours)
        ax2.set_title(f"Price per {who} minus the hourly mean over {plural}")
        cax = ax2.inset_axes((1.01, 0.0, 0.015, 1.0))
        cbar = fig.colorbar(im, cax=cax)
        cbar.set_label("deviation [EUR/MWh]")
        return fig
    return None


def _fig_ev_soc(result: RunResult):
    soc = result.ev_soc
    if not _has_rows(soc) or not {"peer", "hour", "soc_mwh"} <= set(soc.columns):
        return None
    fig, ax = _new_figure(4.2)
    peers = list(dict.fromkeys(soc["peer"].tolist()))
    cmap = _cmap("tab20" if len(peers) > 10 else "tab10")
    for i, peer in enumerate(peers):
        s = soc[soc["peer"] == peer].sort_values("hour")
        ax.plot(s["hour"].to_numpy(), pd.to_numeric(s["soc_mwh"]).to_numpy() * 1000.0, "o-", markersize=3,
                color=cmap(i % cmap.N), label=str(peer))
    ax.set_ylabel("state of charge [kWh] (end of hour)")
    ax.set_title("EV state of charge")
    _hour_axis(ax, sorted(soc["hour"].unique()))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if len(peers) <= 20:
        _legend(ax, loc="center left", bbox_to_anchor=(1.01, 0.5), ncol=1 if len(peers) <= 12 else 2)
    return fig


def _cmap(name: str):
    import matplotlib

    return matplotlib.colormaps[name]


def _per_hour(ac: ACReport, hour_col: str, bus_col: str, source: pd.DataFrame | None, fn: str) -> pd.Series | None:
    if _has_rows(ac.hours) and hour_col in ac.hours.columns:
        s = pd.to_numeric(ac.hours.set_index("hour")[hour_col], errors="coerce")
        if s.notna().any():
            return s.sort_index()
    if _has_rows(source) and bus_col in source.columns:
        return pd.to_numeric(source[bus_col], errors="coerce").groupby(source["hour"]).agg(fn).sort_index()
    return None


def _fig_voltage(result: RunResult, limits: dict):
    ac = result.ac
    if ac is None:
        return None
    vmin = _per_hour(ac, "vmin_pu", "vm_pu", ac.buses, "min")
    vmax = _per_hour(ac, "vmax_pu", "vm_pu", ac.buses, "max")
    if vmin is None or vmax is None:
        return None
    fig, ax = _new_figure(4.2)
    hours = vmin.index.to_numpy()
    ax.fill_between(hours, vmin.to_numpy(dtype=float), vmax.reindex(vmin.index).to_numpy(dtype=float),
                    color="#1f77b4", alpha=0.12)
    ax.plot(hours, vmax.reindex(vmin.index).to_numpy(dtype=float), "^-", color="#d62728", markersize=4,
            label="max voltage")
    ax.plot(hours, vmin.to_numpy(dtype=float), "v-", color="#1f77b4", markersize=4, label="min voltage")
    ax.axhline(limits["vm_max_pu"], color="#d62728", linestyle="--", linewidth=1.2,
               label=f"limits {limits['vm_min_pu']:.2f} / {limits['vm_max_pu']:.2f} pu")
    ax.axhline(limits["vm_min_pu"], color="#1f77b4", linestyle="--", linewidth=1.2)
    lo = min(limits["vm_min_pu"], float(np.nanmin(vmin.to_numpy(dtype=float)))) if vmin.notna().any() else limits["vm_min_pu"]
    hi = max(limits["vm_max_pu"], float(np.nanmax(vmax.to_numpy(dtype=float)))) if vmax.notna().any() else limits["vm_max_pu"]
    pad = 0.1 * (hi - lo)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_ylabel("voltage [pu]")
    ax.set_title("Minimum and maximum bus voltage per hour (AC power flow)")
    _hour_axis(ax, hours)
    ax.grid(alpha=0.3)
    _legend(ax, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def _fig_loading(result: RunResult, limits: dict):
    ac = result.ac
    if ac is None:
        return None
    lines = ac.lines
    line_src = trafo_src = None
    if _has_rows(lines) and {"hour", "loading_percent"} <= set(lines.columns):
        if "kind" in lines.columns:
            is_trafo = lines["kind"].astype(str) == "trafo"
            line_src, trafo_src = lines[~is_trafo], lines[is_trafo]
        else:
            line_src = lines
    line = _per_hour(ac, "max_line_loading_pct", "loading_percent", line_src, "max")
    trafo = None
    if trafo_src is None or not trafo_src.empty:
        trafo = _per_hour(ac, "max_trafo_loading_pct", "loading_percent", trafo_src, "max")
    if line is None and trafo is None:
        return None
    fig, ax = _new_figure(4.2)
    top = limits["max_loading_percent"]
    hours_all: set = set()
    if line is not None:
        ax.plot(line.index.to_numpy(), line.to_numpy(dtype=float), "o-", color="#ff7f0e", markersize=4,
                label="max line loading")
        hours_all.update(line.index.tolist())
        top = max(top, float(np.nanmax(line.to_numpy(dtype=float))) if line.notna().any() else top)
    if trafo is not None and trafo.notna().any():
        ax.plot(trafo.index.to_numpy(), trafo.to_numpy(dtype=float), "s-", color="#7f3c8d", markersize=4,
                label="max transformer loading")
        hours_all.update(trafo.index.tolist())
        top = max(top, float(np.nanmax(trafo.to_numpy(dtype=float))))
    ax.axhline(limits["max_loading_percent"], color="black", linestyle="--", linewidth=1.2,
               label=f"limit {limits['max_loading_percent']:.0f} %")
    ax.set_ylim(0, top * 1.1)
    ax.set_ylabel("loading [%]")
    ax.set_title("Maximum branch loading per hour (AC power flow)")
    _hour_axis(ax, sorted(hours_all))
    ax.grid(alpha=0.3)
    _legend(ax, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def _integer_locator():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _positive(values) -> np.ndarray:
    arr = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(dtype=float)
    return np.where(arr > 0, arr, np.nan)


def _fig_admm(result: RunResult, limits: dict):
    h = result.admm_history
    if not _has_rows(h) or not {"primal_residual", "dual_residual"} <= set(h.columns):
        return None
    sort_cols = [c for c in ("outer", "iteration") if c in h.columns]
    h = h.sort_values(sort_cols, kind="stable").reset_index(drop=True) if sort_cols else h.reset_index(drop=True)
    primal, dual = _positive(h["primal_residual"]), _positive(h["dual_residual"])
    if not (np.isfinite(primal).any() or np.isfinite(dual).any()):
        return None
    multi_outer = "outer" in h.columns and h["outer"].nunique() > 1
    if multi_outer or "iteration" not in h.columns:
        x = np.arange(1, len(h) + 1, dtype=float)
        xlabel = "ADMM iteration (counted over all outer iterations)"
    else:
        x = pd.to_numeric(h["iteration"], errors="coerce").to_numpy(dtype=float)
        xlabel = "ADMM iteration"
    # one segment per outer iteration: lines are not joined across a restart
    segments = [np.arange(len(h))]
    starts: list[int] = []
    if multi_outer:
        starts = h.index[h["outer"].ne(h["outer"].shift())].to_list()[1:]
        segments = np.split(np.arange(len(h)), starts)
    fig, ax = _new_figure(4.6)
    marker = "o" if len(x) <= 40 else None
    series = [(primal, "#1f77b4", "-", "primal residual"), (dual, "#d62728", "-", "dual residual")]
    for values, color, style, label in series:
        for k, seg in enumerate(segments):
            ax.plot(x[seg], values[seg], color=color, linestyle=style, marker=marker, markersize=3,
                    label=label if k == 0 else None)
    tol = limits.get("tolerance")
    if tol is not None:
        ax.axhline(float(tol), color="black", linestyle="--", linewidth=1.0, label=f"tolerance {float(tol):g}")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.xaxis.set_major_locator(_integer_locator())
    ax.set_ylabel("primal [MW], dual [EUR/MWh]")
    ax.set_title("ADMM residuals per iteration")
    ax.grid(alpha=0.3, which="major")
    for i, s in enumerate(starts):
        ax.axvline(x[s] - 0.5, color="#777777", linestyle=":", linewidth=1.2,
                   label="start of an outer iteration" if i == 0 else None)
    handles, labels = ax.get_legend_handles_labels()
    if "rho" in h.columns:
        rho = _positive(h["rho"])
        if np.isfinite(rho).any():
            ax2 = ax.twinx()
            for k, seg in enumerate(segments):
                ax2.plot(x[seg], rho[seg], color="#2ca02c", linestyle="-.", linewidth=1.2,
                         label="penalty rho (right axis)" if k == 0 else None)
            finite = rho[np.isfinite(rho)]
            if finite.max() / finite.min() > 10.0:
                ax2.set_yscale("log")
            else:
                ax2.set_ylim(0, finite.max() * 1.15)
            ax2.set_ylabel("penalty rho [EUR/MW²h]", color="#2ca02c")
            ax2.tick_params(axis="y", which="both", colors="#2ca02c")
            ax2.spines["right"].set_visible(True)
            h2, l2 = ax2.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.17),
              ncol=min(len(labels), 5), frameon=False)
    return fig


def _fig_messages(result: RunResult):
    m = result.messages
    if not _has_rows(m) or "iteration" not in m.columns:
        return None
    m = m.copy()
    m["count"] = pd.to_numeric(m["count"], errors="coerce").fillna(0.0) if "count" in m.columns else 0.0
    m["bytes"] = pd.to_numeric(m["bytes"], errors="coerce").fillna(0.0) if "bytes" in m.columns else 0.0
    m["type"] = m["type"].astype(str) if "type" in m.columns else "all"
    counts = m.pivot_table(index="iteration", columns="type", values="count", aggfunc="sum", fill_value=0.0)
    nbytes = m.pivot_table(index="iteration", columns="type", values="bytes", aggfunc="sum", fill_value=0.0)
    order = list(counts.sum(axis=0).sort_values(ascending=False).index)
    counts, nbytes = counts[order], nbytes.reindex(columns=order, fill_value=0.0)
    x = counts.index.to_numpy(dtype=float)
    big = float(nbytes.sum(axis=1).max())
    scale, unit = (1e6, "MB") if big >= 1e6 else ((1e3, "kB") if big >= 1e3 else (1.0, "B"))
    fig, (ax1, ax2) = _new_figure(6.6, nrows=2)
    cmap = _cmap("tab10" if len(order) <= 10 else "tab20")
    for ax, table, div in ((ax1, counts, 1.0), (ax2, nbytes, scale)):
        bottom = np.zeros(len(x))
        for i, col in enumerate(order):
            v = table[col].to_numpy(dtype=float) / div
            color = cmap(i % cmap.N)
            if len(x) <= 60:
                ax.bar(x, v, 0.8, bottom=bottom, color=color, label=str(col), linewidth=0)
            else:  # stacked areas, one step per iteration
                ax.fill_between(x, bottom, bottom + v, step="mid", color=color, label=str(col), linewidth=0)
            bottom = bottom + v
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    ax1.set_ylabel("messages [count]")
    ax2.set_ylabel(f"bytes [{unit}]")
    ax2.set_xlabel("ADMM iteration")
    ax2.xaxis.set_major_locator(_integer_locator())
    ax1.set_title(f"Messages and bytes per iteration, stacked by type (total {int(m['count'].sum()):,} messages, "
                  f"{_fmt_bytes(float(m['bytes'].sum()))})")
    _legend(ax1, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="message type")
    return fig


def _fig_outer(result: RunResult, limits: dict):
    """Max loading and min/max voltage per hour at the first AC check (before the outer loop) and
    the last one (after): the thesis's before/after figures (e.g. 4.12-4.13, 4.16-4.17)."""
    h = result.outer_hours
    if not _has_rows(h):
        return None
    fig, (ax1, ax2) = _new_figure(7.5, nrows=2)
    hours = h["hour"].to_numpy()
    for col, style, label in (("max_line_loading", "o", "lines"), ("max_trafo_loading", "s", "transformer")):
        before, after = h[f"{col}_before_pct"].to_numpy(float), h[f"{col}_after_pct"].to_numpy(float)
        if np.isfinite(before).any():
            ax1.plot(hours, before, f"{style}--", color="#9e9e9e", markersize=4, label=f"{label}, before")
            ax1.plot(hours, after, f"{style}-", color="#ff7f0e" if label == "lines" else "#7f3c8d", markersize=4,
                     label=f"{label}, after")
    ax1.axhline(limits["max_loading_percent"], color="black", linestyle="--", linewidth=1.2, label="limit")
    ax1.set_ylabel("max loading [%]")
    ax1.set_title("Maximum loading and voltage range per hour, before and after the outer loop")
    ax1.grid(alpha=0.3)
    _legend(ax1, loc="center left", bbox_to_anchor=(1.01, 0.5))
    for col, color in (("vmin", "#1f77b4"), ("vmax", "#d62728")):
        ax2.plot(hours, h[f"{col}_before_pu"].to_numpy(float), "--", color=color, alpha=0.5, label=f"{col[1:]}, before")
        ax2.plot(hours, h[f"{col}_after_pu"].to_numpy(float), "-", color=color, marker=".", label=f"{col[1:]}, after")
    ax2.axhline(limits["vm_min_pu"], color="black", linestyle=":", linewidth=1)
    ax2.axhline(limits["vm_max_pu"], color="black", linestyle=":", linewidth=1, label="limits")
    ax2.set_ylabel("voltage [pu]")
    ax2.grid(alpha=0.3)
    _hour_axis(ax2, hours)
    _legend(ax2, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


OUTER_HTML_COLUMNS = ["hour", "violations_before", "violations_after", "losses_pct_before", "losses_pct_after",
                      "social_welfare_before_eur", "social_welfare_after_eur", "load_flex_down_pct", "load_flex_up_pct",
                      "res_cap_pct", "tan_phi_changes", "differentiation_iterations", "virtual_load_mw"]


def render_figures(result: RunResult, fig_dir: Path, scenario=None) -> list[dict]:
    """Draw every figure that has data, save each as PNG in ``fig_dir``.

    Returns one dict per figure: name, title, path, png (bytes) or error (a figure that fails to draw is
    reported in the page, it does not stop the results from being written).
    """
    import matplotlib

    matplotlib.use("Agg")

    fig_dir.mkdir(parents=True, exist_ok=True)
    energy = hourly_energy(result)
    limits = _limits(scenario)
    builders = [
        ("supply_mix", "Supply mix per hour", lambda: _fig_supply_mix(result, energy)),
        ("load", "Load per hour", lambda: _fig_load(result, energy)),
        ("prices", "Prices per hour", lambda: _fig_prices(result, scenario)),
        ("ev_soc", "EV state of charge", lambda: _fig_ev_soc(result)),
        ("voltage", "Voltage per hour", lambda: _fig_voltage(result, limits)),
        ("loading", "Branch loading per hour", lambda: _fig_loading(result, limits)),
        ("outer_before_after", "Outer loop: grid before and after", lambda: _fig_outer(result, limits)),
        ("admm_residuals", "ADMM residuals per iteration", lambda: _fig_admm(result, limits)),
        ("messages", "Messages and bytes per iteration", lambda: _fig_messages(result)),
    ]
    out = []
    style = {"font.size": 11, "axes.titlesize": 13, "axes.labelsize": 11, "legend.fontsize": 9,
             "xtick.labelsize": 10, "ytick.labelsize": 10, "axes.spines.top": False, "axes.spines.right": False}
    with matplotlib.rc_context(style):
        for name, title, build in builders:
            try:
                fig = build()
                if fig is None:
                    continue
                path = fig_dir / f"{name}.png"
                fig.savefig(path, format="png")
                out.append({"name": name, "title": title, "path": path, "png": path.read_bytes()})
            except Exception as exc:  # noqa: BLE001 - failures are data: reported in the page
                out.append({"name": name, "title": title, "error": f"{type(exc).__name__}: {exc}"})
    return out


# ---------------------------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------------------------
_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; line-height: 1.4; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0 1em 0; font-size: 0.95em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.7em; }
th { background: #f4f4f4; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ok { color: #1a7f37; font-weight: bold; } .bad { color: #c62828; font-weight: bold; }
.meta td, .meta th { border: none; padding: 0.1em 1em 0.1em 0; background: none; }
.grid { display: flex; flex-wrap: wrap; gap: 2em; }
figure { margin: 1em 0 2em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
.error { color: #c62828; }
"""


def _table(rows, header=None) -> str:
    parts = ["<table>"]
    if header:
        parts.append("<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>")
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            if i == 0:
                cells.append(f"<th>{html.escape(str(cell))}</th>")
            else:
                cls = ' class="num"' if isinstance(cell, (int, float)) or _looks_numeric(cell) else ""
                cells.append(f"<td{cls}>{html.escape(str(cell))}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</table>")
    return "\n".join(parts)


def _looks_numeric(text) -> bool:
    t = str(text).replace(",", "").split(" ")[0]
    try:
        float(t)
        return True
    except ValueError:
        return False


def _df_table(df: pd.DataFrame, limit: int = 30) -> str:
    parts = ["<table>", "<tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns) + "</tr>"]
    for row in df.head(limit).itertuples(index=False):
        cells = []
        for v in row:
            v = _py(v)
            cls = ' class="num"' if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
            cells.append(f"<td{cls}>{html.escape(_fmt(v, 4))}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</table>")
    if len(df) > limit:
        parts.append(f"<p>{len(df) - limit} more rows in the CSV file.</p>")
    return "\n".join(parts)


def _html(result: RunResult, summary: dict, figures: list[dict], scenario, files: list[str]) -> str:
    s = summary
    e = s["energy_mwh"]
    status = '<span class="ok">yes</span>' if s["converged"] else '<span class="bad">no</span>'
    title = f"p2pm run: {s['scenario']}"
    desc = getattr(scenario, "description", "") if scenario is not None else ""
    meta = [
        ("scenario", html.escape(str(s["scenario"]))), ("market", html.escape(str(s["market"]))),
        ("model", html.escape(str(s["model"]))), ("solver", html.escape(str(s["solver"]))), ("converged", status),
        ("iterations", f"{s['iterations']:,} inner, {s['outer_iterations']:,} outer"),
        ("wall time", html.escape(_fmt(s["wall_s"], 2, "s"))), ("processes", f"{s['processes']:,}"),
    ]
    out = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
    ]
    if desc:
        out.append(f"<p>{html.escape(str(desc))}</p>")
    out.append('<table class="meta">' + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in meta) + "</table>")

    key_rows = [
        ("social welfare", _fmt(s["social_welfare_eur"], 2, "EUR")),
        ("differentiation cost", _fmt(s["differentiation_cost_eur"], 2, "EUR")),
        ("flexibility penalty", _fmt(s["flex_penalty_eur"], 2, "EUR")),
        ("losses (AC)", _fmt(s["losses_pct"], 3, "%")),
        ("max line loading", _fmt(s["max_line_loading_pct"], 1, "%")),
        ("max transformer loading", _fmt(s["max_trafo_loading_pct"], 1, "%")),
        ("min voltage", _fmt(s["vmin_pu"], 4, "pu")),
        ("max voltage", _fmt(s["vmax_pu"], 4, "pu")),
        ("violations (last AC check)", _fmt(s["violations"])),
        ("violations (first AC check)", _fmt(s["violations_initial"])),
        ("primal residual", _fmt(s["primal_residual"], 3, "MW")),
        ("dual residual", _fmt(s["dual_residual"], 3, "EUR/MWh")),
        ("messages", _fmt(s["messages"])),
        ("bytes", f"{_fmt(s['bytes'])} ({_fmt_bytes(s['bytes'])})"),
    ]
    supply = [("grid import", "grid_import"), ("CHP", "chp"), ("wind", "wind"), ("PV", "pv"),
              ("EV discharge", "ev_discharge")]
    demand = [("load", "load"), ("EV charge", "ev_charge"), ("virtual load (TSO)", "virtual_load"),
              ("grid export", "grid_export")]
    tot_supply = sum(e[k] or 0.0 for _, k in supply)
    tot_demand = sum(e[k] or 0.0 for _, k in demand)
    energy_rows = [(f"supply: {label}", _fmt(e[k], 3, "MWh")) for label, k in supply]
    energy_rows.append(("total supply", _fmt(tot_supply, 3, "MWh")))
    energy_rows += [(f"demand: {label}", _fmt(e[k], 3, "MWh")) for label, k in demand]
    energy_rows.append(("total demand", _fmt(tot_demand, 3, "MWh")))
    energy_rows.append(("supply - demand", _fmt(tot_supply - tot_demand, 4, "MWh")))
    if result.ac is not None and _has_rows(result.ac.hours) and "losses_mw" in result.ac.hours.columns:
        energy_rows.append(("AC losses (supplied by the slack)",
                            _fmt(_column_sum(result.ac.hours, "losses_mw") * HOURS_PER_PERIOD, 3, "MWh")))
    out.append('<div class="grid"><div><h2>Key figures</h2>' + _table(key_rows) + "</div>")
    out.append("<div><h2>Energy balance</h2>" + _table(energy_rows) + "</div></div>")
    extra = {k: v for k, v in s.items() if k not in SUMMARY_KEYS}
    if extra:
        rows = [(k, json.dumps(v) if isinstance(v, (dict, list)) else _fmt(v, 4)) for k, v in extra.items()]
        out.append("<h2>More summary keys</h2>" + _table(rows))

    out.append("<h2>Figures</h2>")
    for f in figures:
        if "error" in f:
            out.append(f'<p class="error">Figure "{html.escape(f["title"])}" could not be drawn: '
                       f"{html.escape(f['error'])}</p>")
            continue
        data = base64.b64encode(f["png"]).decode("ascii")
        out.append(f'<figure id="{f["name"]}"><img alt="{html.escape(f["title"])}" src="data:image/png;base64,{data}">'
                   f'<figcaption>{html.escape(f["title"])} (figures/{f["name"]}.png)</figcaption></figure>')

    if _has_rows(result.outer_hours):
        h = result.outer_hours
        acted = h[(h["violations_before"] > 0) | (h["violations_after"] > 0) | (h.get("virtual_load_mw", 0) > 0)]
        out.append(f"<h2>Outer loop ({s['outer_iterations']} outer iterations, "
                   f"{html.escape(str(s.get('outer_status', '')))})</h2>")
        if s.get("outer_failure"):
            out.append(f'<p class="bad">{html.escape(str(s["outer_failure"]))}</p>')
        if _has_rows(result.outer_day):
            out.append("<p>The day before (first clearing) and after (last clearing):</p>")
            out.append(_df_table(result.outer_day))
        out.append("<p>Hours with a violation before or after, or a TSO request (outer_hours.csv has every hour):</p>")
        out.append(_df_table(acted[[c for c in OUTER_HTML_COLUMNS if c in acted.columns]], limit=24))
    if _has_rows(result.outer_history):
        out.append("<h2>Outer iterations</h2>")
        out.append(_df_table(result.outer_history, limit=80))
    if result.ac is not None and _has_rows(result.ac.violations):
        out.append(f"<h2>Violations after the last AC check ({len(result.ac.violations)})</h2>")
        out.append(_df_table(_ordered(result.ac.violations, "violations")))
    if _has_rows(result.payments):
        out.append("<h2>Payments (positive = pays)</h2>")
        out.append(_df_table(_ordered(result.payments, "payments"), limit=60))
    out.append("<h2>Files</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in files) + "</ul>")
    out.append(f"<p style='color:#888;font-size:0.85em'>schema {html.escape(SCHEMA)}</p>")
    out.append("</body></html>")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------
# the results folder
# ---------------------------------------------------------------------------------------------------------------
def write_results(result: RunResult, out_dir: Path, scenario=None, figures: bool = True) -> Path:
    """Write the results folder of a run (SPEC section 6) and return it.

    ``scenario`` (optional, the public scenario, ``common.public.PublicScenario``) gives the voltage
    and loading limits and the tolerance drawn in the figures, the grid tariff drawn with the prices,
    and is saved as ``scenario.json``. ``figures=False`` writes the tables only (no figures, no page).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = build_summary(result)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    files = ["summary.json"]

    def table(df, name, always=False):
        if _write_csv(df, out_dir / f"{name}.csv", name, always=always):
            files.append(f"{name}.csv")

    ac = result.ac
    table(result.dispatch, "dispatch", always=True)
    table(result.trades, "trades")
    table(result.prices, "prices")
    table(ac.buses if ac is not None else None, "buses", always=True)
    table(ac.lines if ac is not None else None, "lines", always=True)
    table(_hours_table(result), "hours", always=True)
    table(ac.violations if ac is not None else None, "violations", always=True)
    if result.ac_initial is not None:
        table(result.ac_initial.violations, "violations_initial", always=True)
    table(result.admm_history, "admm_history", always=True)
    table(result.messages, "messages", always=True)
    table(result.ev_soc, "ev_soc")
    table(result.payments, "payments")
    table(result.relaxation, "relaxation")
    table(result.grid_exchange, "grid_exchange")
    table(result.outer_hours, "outer_hours")
    table(result.outer_history, "outer_history")
    table(result.outer_day, "outer_day")
    table(result.penalties, "penalties")
    if scenario is not None and hasattr(scenario, "dump"):  # the public part only: no peer's private data
        (out_dir / "scenario.json").write_text(json.dumps(_py(scenario.dump()), indent=2) + "\n")
        files.append("scenario.json")

    if not figures:
        return out_dir
    figures = render_figures(result, out_dir / "figures", scenario)
    files += [f"figures/{f['name']}.png" for f in figures if "png" in f]
    files.append("report.html")
    (out_dir / "report.html").write_text(_html(result, summary, figures, scenario, files), encoding="utf-8")
    return out_dir
