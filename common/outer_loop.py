"""The TSO/DSO outer loop around the full P2P market (thesis 3.2-3.4; models cong, volt, freq,
full): the pieces the coordinator and the centralized reference share, and the centralized loop.

One outer iteration: clear the market (warm-started), AC check by the DSO, the DSO's planner
(``dso_service.outer``) decides new parameters for the peers concerned, repeat until no violation
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

from common.models import HourlyPeer, apply_parameters, flex_penalty_eur, load_baseline_mw

def virtual_load_id(scenario) -> str | None:
    return next((p.id for p in scenario.peers if p.kind == "virtual_load"), None)


def planner_for(scenario, net, roster_ids, kinds, buses, tan_phi0, flex0):
    """The DSO's planner for a scenario's network (the pandapower ``net`` built from it) and roster."""
    from dso_service.networks import branch_lengths_km, grid_model
    from dso_service.outer import OuterPlanner

    grid = grid_model(net, scenario.network)
    return OuterPlanner(grid, roster_ids, kinds, buses, scenario.market.model, scenario.dso,
                        branch_lengths_km(net, grid), tan_phi0, flex0, scenario.market.hours,
                        scenario.network.max_loading_percent)


def initial_q_and_flex(models: list[HourlyPeer]) -> tuple[np.ndarray, np.ndarray]:
    """Per peer: benchmark tan phi and (loads) flexibility fraction, the DSO's starting point. In a
    real deployment the DSO knows these from the connection agreements."""
    tan0 = np.array([float(np.asarray(m.tan_phi).reshape(-1)[0]) for m in models])
    flex0 = np.array([float(np.max(load_baseline_mw(m)[1])) if m.kind == "load" else 0.0 for m in models])
    return tan0, flex0


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


def history_row(outer: int, admm_iterations: int, ac, step: str, actions: str) -> tuple:
    """One row of ``outer_history``: the outer iteration, its clearing and what its AC check found."""
    return (outer, admm_iterations, len(ac.violations), int((ac.hours["violations"] > 0).sum()), step, actions)


def accounting(base_models: list[HourlyPeer], params: dict, p_mw: np.ndarray, trades_mw: np.ndarray, graph, weights):
    """(social welfare, differentiation cost, flexibility penalty) per hour [EUR]."""
    sw = -np.sum([m.cost_eur(p_mw[i]) for i, m in enumerate(base_models)], axis=0)
    diff = np.sum(np.where(graph.sign[:, None] < 0, weights * trades_mw, 0.0), axis=0)
    flex = np.sum([flex_penalty_eur(m, params.get(m.id, {})) for m in base_models], axis=0)
    return sw, diff, flex


def run_centralized_outer(scenario):
    """The outer loop with the centralized market clearing (the reference of the distributed run)."""
    from common import centralized
    from common.clearing import dispatch_frame, p2p_result
    from common.models import peer_models
    from dso_service.networks import build_network
    from dso_service.powerflow import run_ac
    from tso_service.service import regulation_request_mw

    model = scenario.market.model
    base = peer_models(scenario)
    ids = [m.id for m in base]
    tan0, flex0 = initial_q_and_flex(base)
    net = build_network(scenario.network)
    planner = planner_for(scenario, net, ids, [m.kind for m in base], [m.bus for m in base], tan0, flex0)
    params: dict[str, dict] = {}
    history = []
    vl_id = virtual_load_id(scenario)
    H = scenario.market.hours
    vl = np.zeros(H)

    def clear():
        models = [apply_parameters(m, params.get(m.id, {})) for m in base]
        w = planner.weights()
        sol = centralized.solve_p2p(models, w)
        dispatch = dispatch_frame(models, sol.p_mw)
        return models, w, sol, dispatch, run_ac(net, dispatch, scenario.network)

    models, w, sol, dispatch, ac = clear()
    ac_initial, dispatch_before = ac, dispatch
    sw_before = accounting(base, params, sol.p_mw, sol.trades_mw, sol.graph, w)[0]
    outer, status, reason = 1, "feasible", ""
    history.append(history_row(1, 0, ac, "clearing", ""))
    if model in ("freq", "full") and vl_id is not None:
        vl = regulation_request_mw(scenario)
        params.setdefault(vl_id, {})["virtual_load_mw"] = vl
        models, w, sol, dispatch, ac = clear()
        outer += 1
        history.append(history_row(outer, 0, ac, "tso", f"virtual load {vl.sum():.2f} MWh"))
    while True:
        plan = planner.step(sol.p_mw, ac)
        for pid, upd in plan.updates.items():
            params.setdefault(pid, {}).update(upd)
        if plan.status != "continue":
            status, reason = plan.status, plan.reason
            break
        if outer >= scenario.dso.max_outer_iterations:
            status, reason = "limit", f"no feasible dispatch after {outer} outer iterations"
            break
        models, w, sol, dispatch, ac = clear()
        outer += 1
        history.append(history_row(outer, 0, ac, "dso", " | ".join(plan.actions)))
    sw, diff, flex = accounting(base, params, sol.p_mw, sol.trades_mw, sol.graph, w)
    result = p2p_result(scenario, sol.graph, dispatch, sol.trades_mw, sol.prices_eur_per_mwh, sw, diff, "centralized")
    result.economics["flex_penalty_eur"] = flex
    result.ac, result.ac_initial = ac, ac_initial
    result.outer_iterations = outer
    finish_outer(result, planner.hour_table(), sw_before, vl, history, status, reason, dispatch_before)
    return result


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
