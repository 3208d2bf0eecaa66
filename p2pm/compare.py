"""Agreement of a distributed run with the centralized solve of the same scenario (SPEC 9):
social welfare, dispatch per peer and hour, and trade prices against the centralized duals (or,
where an hour's dual is not unique, against the interval of supporting prices)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

PRICE_TOL_EUR_PER_MWH = 0.01


def compare_p2p(run_dir: Path, scenario, ref=None) -> dict:
    """``ref``: a centralized P2PSolution of the same scenario (solved here when None)."""
    from common.centralized import solve_p2p
    from common.market import uniform_price_interval
    from common.models import peer_models

    peers = peer_models(scenario)
    if ref is None:
        from common.partners import scenario_graph

        ref = solve_p2p(peers, graph=scenario_graph(scenario))
    run_dir = Path(run_dir)
    disp = _matrix(pd.read_csv(run_dir / "dispatch.csv"), "peer", "p_mw")
    p = disp.loc[[x.id for x in peers]].to_numpy()
    sw = -np.sum([x.cost_eur(p[i]) for i, x in enumerate(peers)], axis=0)
    sw_ref = ref.social_welfare_eur
    out = {
        "dispatch_max_abs_diff_mw": float(np.abs(p - ref.p_mw).max()),
        "social_welfare_eur": float(sw.sum()),
        "social_welfare_ref_eur": float(sw_ref.sum()),
        "social_welfare_rel_diff": float(abs(sw.sum() - sw_ref.sum()) / max(abs(sw_ref.sum()), 1e-9)),
    }
    # prices: the centralized dual of each traded pair vs the distributed price of the same pair
    trades = pd.read_csv(run_dir / "trades.csv")
    graph = ref.graph
    idx = graph.pair_index()
    pos = {pid: n for n, pid in enumerate(graph.peer_ids)}
    uniform = has_uniform_price(peers, graph)
    lo, hi = uniform_price_interval(peers, ref.p_mw)
    rows = []
    for r in trades.itertuples():
        k = idx[(pos[r.seller], pos[r.buyer])]
        t = int(r.hour) - 1
        dual = ref.prices_eur_per_mwh[k, t]
        rows.append((t + 1, r.price_eur_per_mwh, dual, lo[t], hi[t]))
    pr = pd.DataFrame(rows, columns=["hour", "admm", "dual", "lo", "hi"])
    unique = ((pr["hi"] - pr["lo"]) <= PRICE_TOL_EUR_PER_MWH) | (not uniform)
    within_dual = (pr["admm"] - pr["dual"]).abs() <= PRICE_TOL_EUR_PER_MWH
    within_interval = (pr["admm"] >= pr["lo"] - PRICE_TOL_EUR_PER_MWH) & (pr["admm"] <= pr["hi"] + PRICE_TOL_EUR_PER_MWH)
    out.update({
        "price_max_abs_diff_unique_hours_eur_per_mwh": float((pr["admm"] - pr["dual"]).abs()[unique].max()) if unique.any() else 0.0,
        "hours_with_unique_price": int(pr.loc[unique, "hour"].nunique()),
        "hours_with_price_interval": sorted(int(h) for h in pr.loc[~unique, "hour"].unique()),
        "traded_pairs_checked": int(len(pr)),
        "prices_within_0.01_of_dual": int(within_dual.sum()),
        "prices_within_interval": int(within_interval.sum()) if uniform else None,  # None: no uniform price
        "price_interval_by_hour": {int(h): [round(float(lo[h - 1]), 4), round(float(hi[h - 1]), 4)]
                                   for h in sorted(pr.loc[~unique, "hour"].unique())},
    })
    return out


def has_uniform_price(peers, graph) -> bool:
    """One price per hour supports a P2P optimum only without fees and with every pair trading;
    otherwise the pairs' prices differ by design and only the centralized duals say what they are."""
    from common.market import trade_graph

    fees = any(any(v != 0 for v in (x.trade_weights or {}).values()) for x in peers)
    return not fees and graph.n_pairs == trade_graph(peers).n_pairs


def solve_community_reference(scenario):
    """The centralized SOCP of a community scenario (the reference of the distributed run)."""
    from common.centralized import solve_community
    from common.models import peer_models
    from dso_service.networks import build_network, grid_model

    models = [m for m in peer_models(scenario) if m.kind != "grid"]
    grid_peer = next(p for p in scenario.peers if p.kind == "grid")
    grid = grid_model(build_network(scenario.network), scenario.network)
    sol = solve_community(models, grid, scenario.hourly(grid_peer, "import_price_eur_per_mwh"),
                          scenario.hourly(grid_peer, "export_price_eur_per_mwh"), grid_peer.p_import_max_mw,
                          grid_peer.p_export_max_mw)
    return models, sol


def compare_community(run_dir: Path, scenario, ref=None) -> dict:
    """``ref``: (models, CommunitySolution) of the same scenario (solved here when None)."""
    models, sol = ref or solve_community_reference(scenario)
    run_dir = Path(run_dir)
    disp = _matrix(pd.read_csv(run_dir / "dispatch.csv"), "peer", "p_mw")
    p = disp.loc[[m.id for m in models]].to_numpy()
    summary = _read_run(run_dir)["summary"]
    sw, sw_ref = summary["social_welfare_eur"], float(np.sum(sol.social_welfare_eur))
    prices = _matrix(pd.read_csv(run_dir / "prices.csv"), "bus", "price_eur_per_mwh")
    return {
        "dispatch_max_abs_diff_mw": float(np.abs(p - sol.p_mw).max()),
        "social_welfare_eur": float(sw),
        "social_welfare_ref_eur": sw_ref,
        "social_welfare_rel_diff": float(abs(sw - sw_ref) / max(abs(sw_ref), 1e-9)),
        "bus_price_max_abs_diff_eur_per_mwh": float(np.abs(prices.sort_index().to_numpy() - sol.prices_eur_per_mwh).max()),
    }


def compare_outer(run_dir: Path, ref) -> dict:
    """An outer-loop run (models cong, volt, freq, full) against the centralized outer loop's
    RunResult ``ref``: the same outer steps (step and actions of every outer iteration), the same
    violations, the final dispatch and welfare, and the ADMM iterations of each re-clear."""
    run_dir = Path(run_dir)
    hist = pd.read_csv(run_dir / "outer_history.csv").fillna("")
    ref_hist = ref.outer_history.fillna("")
    steps = list(zip(hist["step"], hist["actions"]))
    ref_steps = list(zip(ref_hist["step"], ref_hist["actions"]))
    disp = pd.read_csv(run_dir / "dispatch.csv").pivot(index="peer", columns="hour", values="p_mw")
    ref_disp = ref.dispatch.pivot(index="peer", columns="hour", values="p_mw").loc[disp.index]
    sw = float(json.loads((run_dir / "summary.json").read_text())["social_welfare_eur"])
    sw_ref = float(ref.economics["social_welfare_eur"].sum())
    reclears = hist["admm_iterations"].to_numpy()[1:]
    return {
        "outer_iterations": int(len(hist)),
        "outer_iterations_ref": int(len(ref_hist)),
        "same_outer_steps": steps == ref_steps,
        "same_violations": list(hist["violations"]) == list(ref_hist["violations"]),
        "dispatch_max_abs_diff_mw": float(np.abs(disp.to_numpy() - ref_disp.to_numpy()).max()),
        "social_welfare_eur": sw,
        "social_welfare_ref_eur": sw_ref,
        "social_welfare_rel_diff": abs(sw - sw_ref) / max(abs(sw_ref), 1e-9),
        "first_clearing_iterations": int(hist["admm_iterations"].iloc[0]),
        "reclear_iterations_median": float(np.median(reclears)) if len(reclears) else 0.0,
        "reclear_iterations_max": int(reclears.max()) if len(reclears) else 0,
    }


# ---------------------------------------------------------------------------------------------------------------
# two results folders side by side (`p2pm compare RUN_A RUN_B`)
# ---------------------------------------------------------------------------------------------------------------
TRADE_MIN_MW = 1e-6  # a trade below this carries no price worth comparing

SUMMARY_ROWS = [  # (summary key, label, unit)
    ("social_welfare_eur", "social welfare", "EUR"),
    ("differentiation_cost_eur", "differentiation cost", "EUR"),
    ("flex_penalty_eur", "flexibility penalty", "EUR"),
    ("converged", "converged", ""),
    ("iterations", "ADMM iterations", ""),
    ("outer_iterations", "outer iterations", ""),
    ("wall_s", "wall time", "s"),
    ("losses_pct", "losses", "%"),
    ("max_line_loading_pct", "max line loading", "%"),
    ("max_trafo_loading_pct", "max transformer loading", "%"),
    ("vmin_pu", "min voltage", "pu"),
    ("vmax_pu", "max voltage", "pu"),
    ("violations", "violations (last AC check)", ""),
    ("primal_residual", "primal residual", "MW"),
    ("dual_residual", "dual residual", "EUR/MWh"),
    ("messages", "messages", ""),
    ("bytes", "bytes", "B"),
    ("processes", "processes", ""),
]


class CompareError(ValueError):
    """A folder that is not a results folder (no summary.json, or a table it cannot read)."""


def _read_run(folder: Path) -> dict:
    folder = Path(folder)
    if not (folder / "summary.json").is_file():
        raise CompareError(f"{folder}: not a results folder (no summary.json)")
    import json

    run = {"dir": folder, "summary": json.loads((folder / "summary.json").read_text())}
    for name in ("dispatch", "trades", "prices", "hours", "messages"):
        path = folder / f"{name}.csv"
        run[name] = pd.read_csv(path) if path.is_file() else None
    return run


def _has(df) -> bool:
    return df is not None and not df.empty


def _matrix(df: pd.DataFrame, index: str | list, value: str) -> pd.DataFrame:
    """entity x hour matrix of a long table."""
    return df.pivot_table(index=index, columns="hour", values=value, aggfunc="sum")


def _summary_rows(a: dict, b: dict) -> pd.DataFrame:
    rows = []
    keys = SUMMARY_ROWS + [(f"energy_mwh.{k}", f"energy: {k}", "MWh") for k in (a["summary"].get("energy_mwh") or {})]
    for key, label, unit in keys:
        va, vb = (_get(r["summary"], key) for r in (a, b))
        num = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (va, vb))
        diff = vb - va if num else None
        rel = abs(diff) / abs(va) if num and va not in (0, 0.0) else None
        rows.append({"quantity": key, "label": label, "unit": unit, "a": va, "b": vb, "b_minus_a": diff,
                     "rel_diff": rel})
    return pd.DataFrame(rows, dtype=object)


def _get(summary: dict, key: str):
    value = summary
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _dispatch(a: dict, b: dict) -> tuple[pd.DataFrame | None, dict]:
    if not (_has(a["dispatch"]) and _has(b["dispatch"])):
        return None, {"compared": False}
    pa, pb = (_matrix(r["dispatch"], "peer", "p_mw") for r in (a, b))
    peers = pa.index.union(pb.index)
    hours = pa.columns.union(pb.columns)
    pa, pb = pa.reindex(index=peers, columns=hours), pb.reindex(index=peers, columns=hours)
    diff = pb - pa
    long = pd.DataFrame({"peer": np.repeat(peers.to_numpy(), len(hours)), "hour": np.tile(hours.to_numpy(), len(peers)),
                         "p_mw_a": pa.to_numpy().ravel(), "p_mw_b": pb.to_numpy().ravel(),
                         "diff_mw": diff.to_numpy().ravel()})
    absdiff = diff.abs()
    both = pa.notna() & pb.notna()
    out = {"compared": True, "peers_in_both": int(both.any(axis=1).sum()),
           "peers_only_in_a": sorted(map(str, pa.index[pa.notna().any(axis=1) & pb.isna().all(axis=1)])),
           "peers_only_in_b": sorted(map(str, pb.index[pb.notna().any(axis=1) & pa.isna().all(axis=1)]))}
    if both.to_numpy().any():
        i, k = np.unravel_index(np.nanargmax(absdiff.to_numpy()), absdiff.shape)
        peer, hour = peers[i], hours[k]
        out.update({"max_abs_diff_mw": float(absdiff.max().max()), "at_peer": str(peer), "at_hour": int(hour),
                    "rms_diff_mw": float(np.sqrt(np.nanmean(diff.to_numpy() ** 2))),
                    "energy_abs_diff_mwh": float(np.nansum(absdiff.to_numpy()))})
    return long, out


def _hourly_price(run: dict) -> pd.Series | None:
    """Trade-weighted average price per hour (full P2P) or mean bus price per hour (community)."""
    t, p = run["trades"], run["prices"]
    if _has(t):
        t = t[t["p_mw"].abs() > TRADE_MIN_MW]
        w = t["p_mw"].abs()
        return (w * t["price_eur_per_mwh"]).groupby(t["hour"]).sum() / w.groupby(t["hour"]).sum()
    if _has(p):
        return p.groupby("hour")["price_eur_per_mwh"].mean()
    return None


def _prices(a: dict, b: dict) -> dict:
    out: dict = {}
    if _has(a["trades"]) and _has(b["trades"]):
        key = ["seller", "buyer", "hour"]
        ta, tb = (r["trades"][r["trades"]["p_mw"].abs() > TRADE_MIN_MW].set_index(key) for r in (a, b))
        common = ta.index.intersection(tb.index)
        d = (tb.loc[common, "price_eur_per_mwh"] - ta.loc[common, "price_eur_per_mwh"]).abs()
        out.update({"kind": "trades", "traded_pairs_in_both": int(len(common)),
                    "traded_pairs_only_in_a": int(len(ta.index.difference(tb.index))),
                    "traded_pairs_only_in_b": int(len(tb.index.difference(ta.index))),
                    "max_abs_diff_eur_per_mwh": float(d.max()) if len(d) else None,
                    "mean_abs_diff_eur_per_mwh": float(d.mean()) if len(d) else None})
    elif _has(a["prices"]) and _has(b["prices"]):
        who = "bus" if "bus" in a["prices"].columns else "peer"
        ma, mb = (_matrix(r["prices"], who, "price_eur_per_mwh") for r in (a, b))
        d = (mb - ma).abs()
        out.update({"kind": f"{who} prices", "max_abs_diff_eur_per_mwh": float(np.nanmax(d.to_numpy()))
                    if d.notna().to_numpy().any() else None})
    else:
        out["kind"] = "none in common"
    return out


def _messages(a: dict, b: dict) -> pd.DataFrame | None:
    if not (_has(a["messages"]) or _has(b["messages"])):
        return None
    empty = pd.DataFrame({"type": pd.Series(dtype=str), "count": pd.Series(dtype="int64"),
                          "bytes": pd.Series(dtype="int64")})
    ma, mb = ((r["messages"] if _has(r["messages"]) else empty).groupby("type")[["count", "bytes"]].sum()
              for r in (a, b))
    m = ma.join(mb, how="outer", lsuffix="_a", rsuffix="_b").fillna(0).astype("int64")
    m = m[["count_a", "count_b", "bytes_a", "bytes_b"]].sort_values("bytes_b", ascending=False)
    return m.reset_index()


def _hours(a: dict, b: dict, dispatch: pd.DataFrame | None) -> pd.DataFrame:
    cols = {}
    for tag, r in (("a", a), ("b", b)):
        h = r["hours"]
        if _has(h) and "social_welfare_eur" in h.columns:
            cols[f"social_welfare_eur_{tag}"] = h.set_index("hour")["social_welfare_eur"]
        price = _hourly_price(r)
        if price is not None:
            cols[f"price_eur_per_mwh_{tag}"] = price
    if dispatch is not None:
        cols["dispatch_max_abs_diff_mw"] = dispatch.assign(d=dispatch["diff_mw"].abs()).groupby("hour")["d"].max()
    table = pd.DataFrame(cols)
    table.index.name = "hour"
    return table.reset_index()


def compare_runs(run_a: Path, run_b: Path) -> dict:
    """Side by side of two results folders: summary figures (welfare, energy, grid, iterations,
    traffic), dispatch per peer and hour, prices, messages per type. Returns the tables
    (``summary``, ``hours``, ``dispatch``, ``messages``: DataFrames) and the figures (``json``)."""
    a, b = _read_run(run_a), _read_run(run_b)
    summary = _summary_rows(a, b)
    dispatch, dispatch_figures = _dispatch(a, b)
    messages = _messages(a, b)
    sa, sb = a["summary"], b["summary"]
    figures = {
        "a": str(a["dir"]), "b": str(b["dir"]),
        "a_run": {k: sa.get(k) for k in ("scenario", "market", "model", "solver")},
        "b_run": {k: sb.get(k) for k in ("scenario", "market", "model", "solver")},
        "same_scenario": sa.get("scenario") == sb.get("scenario"),
        "social_welfare_rel_diff": _rel(sa.get("social_welfare_eur"), sb.get("social_welfare_eur")),
        "dispatch": dispatch_figures,
        "prices": _prices(a, b),
        "summary": {r.quantity: {"a": r.a, "b": r.b, "b_minus_a": r.b_minus_a} for r in summary.itertuples()},
    }
    return {"json": figures, "summary": summary, "hours": _hours(a, b, dispatch), "dispatch": dispatch,
            "messages": messages}


def _rel(a, b):
    if not all(isinstance(v, (int, float)) for v in (a, b)) or a == 0:
        return None
    return abs(b - a) / abs(a)


def write_comparison(cmp: dict, out: Path) -> list[Path]:
    import json
    import math

    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        if isinstance(v, (np.floating, float)):
            return float(v) if math.isfinite(v) else None
        if isinstance(v, np.integer):
            return int(v)
        return v

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "compare.json"]
    files[0].write_text(json.dumps(clean(cmp["json"]), indent=2, allow_nan=False) + "\n")
    for name in ("summary", "hours", "dispatch", "messages"):
        if cmp[name] is not None:
            path = out / f"compare_{name}.csv"
            cmp[name].to_csv(path, index=False)
            files.append(path)
    return files


def _cell(value, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e7):
            return f"{value:.3e}"
        return f"{value:,.4f}" if abs(value) < 10 else f"{value:,.2f}"
    return str(value)


def format_comparison(cmp: dict) -> str:
    j = cmp["json"]
    ra, rb = j["a_run"], j["b_run"]
    lines = [f"A: {j['a']}  ({ra['scenario']}, {ra['market']}, {ra['model']}, {ra['solver']})",
             f"B: {j['b']}  ({rb['scenario']}, {rb['market']}, {rb['model']}, {rb['solver']})"]
    if not j["same_scenario"]:
        lines.append("note: the two runs are of different scenarios")
    lines.append(f"{'':30s} {'A':>16s} {'B':>16s} {'B - A':>14s}")
    for r in cmp["summary"].itertuples():
        if r.a is None and r.b is None:
            continue
        label = f"{r.label} [{r.unit}]" if r.unit else r.label
        lines.append(f"{label:30s} {_cell(r.a):>16s} {_cell(r.b):>16s} {_cell(r.b_minus_a):>14s}")
    if j["social_welfare_rel_diff"] is not None:
        lines.append(f"social welfare relative difference: {j['social_welfare_rel_diff']:.3e}")
    d = j["dispatch"]
    if d.get("max_abs_diff_mw") is not None:
        lines.append(f"dispatch: max |B - A| {d['max_abs_diff_mw']:.3e} MW (peer {d['at_peer']}, hour {d['at_hour']}), "
                     f"rms {d['rms_diff_mw']:.3e} MW, sum of |B - A| {d['energy_abs_diff_mwh']:.3e} MWh over "
                     f"{d['peers_in_both']} peers")
    for side in ("a", "b"):
        if d.get(f"peers_only_in_{side}"):
            lines.append(f"  peers only in {side.upper()}: {', '.join(d[f'peers_only_in_{side}'])}")
    p = j["prices"]
    if p.get("max_abs_diff_eur_per_mwh") is not None:
        extra = (f" over {p['traded_pairs_in_both']} traded pairs and hours in both "
                 f"({p['traded_pairs_only_in_a']} only in A, {p['traded_pairs_only_in_b']} only in B)"
                 if p["kind"] == "trades" else "")
        lines.append(f"prices ({p['kind']}): max |B - A| {p['max_abs_diff_eur_per_mwh']:.4g} EUR/MWh{extra}")
    m = cmp["messages"]
    if m is not None:
        lines.append(f"{'messages by type':30s} {'count A':>10s} {'count B':>10s} {'bytes A':>14s} {'bytes B':>14s}")
        for r in m.itertuples():
            lines.append(f"  {str(r.type):28s} {r.count_a:>10,d} {r.count_b:>10,d} {r.bytes_a:>14,d} {r.bytes_b:>14,d}")
    return "\n".join(lines)
