"""report.html: one self-contained page (figures inlined as PNG) rendered from a Jinja2 template
(``templates/report.html.j2``) with the summary, the energy balance, the figures and the tables a
reader looks at first (outer loop, violations, payments)."""

from __future__ import annotations

import base64
import json
from functools import lru_cache

import pandas as pd

from common.report.summary import DEMAND, HOURS_PER_PERIOD, SUMMARY_KEYS, SUPPLY
from common.report.tables import _ordered
from common.report.values import _column_sum, _fmt, _fmt_bytes, _has_rows, _py
from common.results import SCHEMA, RunResult

OUTER_HTML_COLUMNS = ["hour", "violations_before", "violations_after", "losses_pct_before", "losses_pct_after",
                      "social_welfare_before_eur", "social_welfare_after_eur", "load_flex_down_pct", "load_flex_up_pct",
                      "res_cap_pct", "tan_phi_changes", "differentiation_iterations", "virtual_load_mw"]


def _numeric_text(text) -> bool:
    t = str(text).replace(",", "").split(" ")[0]
    try:
        float(t)
        return True
    except ValueError:
        return False


@lru_cache(maxsize=1)
def _template():
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("common.report", "templates"),
                             autoescape=True, trim_blocks=False, lstrip_blocks=False,
                             undefined=jinja2.StrictUndefined)
    env.tests["numeric_text"] = _numeric_text
    return env.get_template("report.html.j2")


def _frame(df: pd.DataFrame, limit: int = 30, **extra) -> dict:
    """A table for the template: column names, formatted cells (with a numeric flag), rows left out."""
    rows = []
    for row in df.head(limit).itertuples(index=False):
        cells = []
        for v in row:
            v = _py(v)
            cells.append((_fmt(v, 4), isinstance(v, (int, float)) and not isinstance(v, bool)))
        rows.append(cells)
    return {"columns": [str(c) for c in df.columns], "rows": rows, "more": max(len(df) - limit, 0), **extra}


def render_page(result: RunResult, summary: dict, figures: list[dict], scenario, files: list[str],
                contract_failures: list[str] = ()) -> str:
    s = summary
    e = s["energy_mwh"]
    desc = getattr(scenario, "description", "") if scenario is not None else ""
    meta = [
        ("scenario", s["scenario"], None), ("market", s["market"], None), ("model", s["model"], None),
        ("solver", s["solver"], None), ("converged", "yes" if s["converged"] else "no", "ok" if s["converged"] else "bad"),
        ("iterations", f"{s['iterations']:,} inner, {s['outer_iterations']:,} outer", None),
        ("wall time", _fmt(s["wall_s"], 2, "s"), None), ("processes", f"{s['processes']:,}", None),
    ]
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
    tot_supply = sum(e[k] or 0.0 for _, k in SUPPLY)
    tot_demand = sum(e[k] or 0.0 for _, k in DEMAND)
    energy_rows = [(f"supply: {label}", _fmt(e[k], 3, "MWh")) for label, k in SUPPLY]
    energy_rows.append(("total supply", _fmt(tot_supply, 3, "MWh")))
    energy_rows += [(f"demand: {label}", _fmt(e[k], 3, "MWh")) for label, k in DEMAND]
    energy_rows.append(("total demand", _fmt(tot_demand, 3, "MWh")))
    energy_rows.append(("supply - demand", _fmt(tot_supply - tot_demand, 4, "MWh")))
    if result.ac is not None and _has_rows(result.ac.hours) and "losses_mw" in result.ac.hours.columns:
        energy_rows.append(("AC losses (supplied by the slack)",
                            _fmt(_column_sum(result.ac.hours, "losses_mw") * HOURS_PER_PERIOD, 3, "MWh")))
    extra_rows = [(k, json.dumps(v) if isinstance(v, (dict, list)) else _fmt(v, 4))
                  for k, v in s.items() if k not in SUMMARY_KEYS]
    shown = [dict(f, base64=base64.b64encode(f["png"]).decode("ascii")) if "png" in f else f for f in figures]

    outer = None
    if _has_rows(result.outer_hours):
        h = result.outer_hours
        acted = h[(h["violations_before"] > 0) | (h["violations_after"] > 0) | (h.get("virtual_load_mw", 0) > 0)]
        outer = {"iterations": s["outer_iterations"], "status": str(s.get("outer_status", "")),
                 "failure": s.get("outer_failure"),
                 "day": _frame(result.outer_day) if _has_rows(result.outer_day) else None,
                 "hours": _frame(acted[[c for c in OUTER_HTML_COLUMNS if c in acted.columns]], limit=24)}
    ac = result.ac
    return _template().render(
        title=f"p2pm run: {s['scenario']}", description=str(desc or ""), meta=meta, key_rows=key_rows,
        energy_rows=energy_rows, extra_rows=extra_rows, figures=shown, outer=outer,
        outer_history=_frame(result.outer_history, limit=80) if _has_rows(result.outer_history) else None,
        violations=(_frame(_ordered(ac.violations, "violations"), total=len(ac.violations))
                    if ac is not None and _has_rows(ac.violations) else None),
        payments=_frame(_ordered(result.payments, "payments"), limit=60) if _has_rows(result.payments) else None,
        contract_failures=list(contract_failures), files=files, schema=SCHEMA)
