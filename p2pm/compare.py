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
    ref = ref or solve_p2p(peers)
    run_dir = Path(run_dir)
    disp = pd.read_csv(run_dir / "dispatch.csv").pivot(index="peer", columns="hour", values="p_mw")
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
    lo, hi = uniform_price_interval(peers, ref.p_mw)
    rows = []
    for r in trades.itertuples():
        k = idx[(pos[r.seller], pos[r.buyer])]
        t = int(r.hour) - 1
        dual = ref.prices_eur_per_mwh[k, t]
        rows.append((t + 1, r.price_eur_per_mwh, dual, lo[t], hi[t]))
    pr = pd.DataFrame(rows, columns=["hour", "admm", "dual", "lo", "hi"])
    unique = (pr["hi"] - pr["lo"]) <= PRICE_TOL_EUR_PER_MWH
    within_dual = (pr["admm"] - pr["dual"]).abs() <= PRICE_TOL_EUR_PER_MWH
    within_interval = (pr["admm"] >= pr["lo"] - PRICE_TOL_EUR_PER_MWH) & (pr["admm"] <= pr["hi"] + PRICE_TOL_EUR_PER_MWH)
    out.update({
        "price_max_abs_diff_unique_hours_eur_per_mwh": float((pr["admm"] - pr["dual"]).abs()[unique].max()) if unique.any() else 0.0,
        "hours_with_unique_price": int(pr.loc[unique, "hour"].nunique()),
        "hours_with_price_interval": sorted(int(h) for h in pr.loc[~unique, "hour"].unique()),
        "traded_pairs_checked": int(len(pr)),
        "prices_within_0.01_of_dual": int(within_dual.sum()),
        "prices_within_interval": int(within_interval.sum()),
        "price_interval_by_hour": {int(h): [round(float(lo[h - 1]), 4), round(float(hi[h - 1]), 4)]
                                   for h in sorted(pr.loc[~unique, "hour"].unique())},
    })
    return out


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
    disp = pd.read_csv(run_dir / "dispatch.csv").pivot(index="peer", columns="hour", values="p_mw")
    p = disp.loc[[m.id for m in models]].to_numpy()
    summary = __import__("json").loads((run_dir / "summary.json").read_text())
    sw, sw_ref = summary["social_welfare_eur"], float(np.sum(sol.social_welfare_eur))
    prices = pd.read_csv(run_dir / "prices.csv").pivot(index="bus", columns="hour", values="price_eur_per_mwh")
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
