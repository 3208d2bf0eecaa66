"""The tables of the TSO/DSO outer loop around the full P2P market (thesis 3.2-3.4; models cong,
volt, freq, full). The loop itself is the coordinator engine's (``coordinator.engine``), for the
distributed and the centralized clearing alike.

One outer iteration: clear the market (warm-started), AC check by the DSO, the DSO's planner
(``dso_service.planner``) decides new parameters for the peers concerned, repeat until no violation
is left. In the freq and full models the TSO's virtual load joins the market after the first
clearing (thesis: P2P market first, then the TSO's request).

Welfare accounting: social welfare is always measured with the peers' benchmark cost and utility
functions (a load's utility line extended beyond its benchmark range), so that before and after
compare, and the result can never beat the benchmark's optimum; differentiation costs and the
flexibility penalty (beta times the extra flexibility offered) are reported apart (SPEC 3.1).
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def hours_frame(ac_before, ac_after, sw_before, sw_after, hour_rows: list[dict], virtual_load_mw) -> pd.DataFrame:
    """Per hour, before (first AC check) and after (last): the layout of thesis Tables 4.2-4.10."""
    hb, ha = ac_before.hours.set_index("hour"), ac_after.hours.set_index("hour")
    df = pd.DataFrame(hour_rows).set_index("hour")
    out = pd.DataFrame({
        "violations_before": hb["violations"], "violations_after": ha["violations"],
        "losses_pct_before": hb["losses_pct"], "losses_pct_after": ha["losses_pct"],
        "social_welfare_before_eur": np.asarray(sw_before), "social_welfare_after_eur": np.asarray(sw_after),
        "max_line_loading_before_pct": hb["max_line_loading_pct"], "max_line_loading_after_pct": ha["max_line_loading_pct"],
        "max_trafo_loading_before_pct": hb["max_trafo_loading_pct"], "max_trafo_loading_after_pct": ha["max_trafo_loading_pct"],
        "vmin_before_pu": hb["vmin_pu"], "vmin_after_pu": ha["vmin_pu"],
        "vmax_before_pu": hb["vmax_pu"], "vmax_after_pu": ha["vmax_pu"],
        "virtual_load_mw": np.asarray(virtual_load_mw),
    }, index=hb.index)
    return out.join(df).reset_index()


def day_frame(dispatch_before: pd.DataFrame, result, sw_before) -> pd.DataFrame:
    """The day before (first clearing) and after (last), the layout of thesis Tables 4.3, 4.6, 4.9
    and 4.11: energy by technology [MWh], losses [%] and social welfare [EUR]."""

    def energy(d: pd.DataFrame) -> dict:
        by_kind = d.groupby("kind")["p_mw"].sum()
        return {"grid_mwh": by_kind.get("grid", 0.0), "chp_mwh": by_kind.get("chp", 0.0),
                "wind_mwh": by_kind.get("wind", 0.0), "pv_mwh": by_kind.get("pv", 0.0),
                "consumption_mwh": -by_kind.get("load", 0.0), "virtual_load_mwh": -by_kind.get("virtual_load", 0.0)}

    def losses(ac) -> float:
        return float(100 * ac.hours["losses_mw"].sum() / ac.hours["load_mw"].sum())

    before, after = energy(dispatch_before), energy(result.dispatch)
    before.update(losses_pct=losses(result.ac_initial), social_welfare_eur=float(np.sum(sw_before)))
    after.update(losses_pct=losses(result.ac), social_welfare_eur=float(result.economics["social_welfare_eur"].sum()))
    return pd.DataFrame({"quantity": list(before), "before": [float(v) + 0.0 for v in before.values()],
                         "after": [float(after[k]) + 0.0 for k in before]})


def finish_outer(result, hour_rows: list[dict], sw_before, virtual_load_mw, history, status: str, reason: str,
                 dispatch_before: pd.DataFrame) -> None:
    """Attach the outer loop's tables and status to a result (shared by both solvers);
    ``hour_rows``: the DSO planner's per-hour record (``OuterPlanner.hour_table``)."""
    result.outer_hours = hours_frame(result.ac_initial, result.ac, sw_before, result.economics["social_welfare_eur"],
                                     hour_rows, virtual_load_mw)
    result.outer_history = pd.DataFrame(history, columns=["outer", "admm_iterations", "violations",
                                                          "hours_with_violations", "step", "actions"])
    result.outer_day = day_frame(dispatch_before, result, sw_before)
    hb = result.ac_initial.hours
    result.extra["social_welfare_initial_eur"] = float(np.sum(sw_before))
    result.extra["losses_pct_initial"] = float(100 * hb["losses_mw"].sum() / hb["load_mw"].sum())
    result.extra["hours_with_violations_initial"] = [int(h) for h in hb.loc[hb["violations"] > 0, "hour"]]
    result.extra["outer_status"] = status
    if reason:
        result.extra["outer_failure"] = reason
    if status not in ("feasible",):
        result.converged = False
