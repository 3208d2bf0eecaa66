"""Results folder and report (common.report, SPEC section 6) on small synthetic runs."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pandas as pd
import pytest

from common.report import ENERGY_KEYS, SUMMARY_KEYS, build_summary, format_summary, write_results
from common.results import SCHEMA, ACReport, RunResult

HOURS = [1, 2, 3]
# net injections [MW]: producers positive, consumers negative; the grid exports in hour 3
GRID_P = [0.5, 1.0, -0.5]
LOAD_P = [-1.0, -2.0, -1.5]
PV_P = [0.5, 1.0, 2.0]


def _dispatch(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["peer", "kind", "bus", "hour", "p_mw", "q_mvar"])


def _ac(n_violations: int = 1, trafo: bool = True) -> ACReport:
    buses = pd.DataFrame([(b, h, 1.0 - 0.01 * b * h) for b in range(3) for h in HOURS], columns=["bus", "hour", "vm_pu"])
    lines = [(0, h, 40.0 + 10 * h, "line") for h in HOURS] + [(1, h, 20.0 + h, "line") for h in HOURS]
    if trafo:
        lines += [(2, h, 30.0 + h, "trafo") for h in HOURS]
    lines = pd.DataFrame(lines, columns=["line", "hour", "loading_percent", "kind"])
    hours = pd.DataFrame({
        "hour": HOURS, "converged": True, "losses_mw": [0.01, 0.02, 0.03], "losses_pct": [1.0, 1.0, 2.0],
        "load_mw": [1.0, 2.0, 1.5], "slack_p_mw": [0.51, 1.02, -0.47],
        "vmin_pu": [0.98, 0.96, 0.94], "vmax_pu": [1.0, 1.0, 1.0],
        "max_line_loading_pct": [50.0, 60.0, 70.0], "max_trafo_loading_pct": [31.0, 32.0, 33.0] if trafo else np.nan,
        "violations": [0, 0, n_violations],
    })
    violations = pd.DataFrame([(3, "bus", 2, 0.94, 0.95, "undervoltage")] * n_violations,
                              columns=["hour", "element", "index", "value", "limit", "kind"])
    return ACReport(buses, lines, hours, violations)


def _p2p_result(**kw) -> RunResult:
    rows = []
    for i, h in enumerate(HOURS):
        rows += [("grid", "grid", 0, h, GRID_P[i], 0.0), ("L1", "load", 1, h, LOAD_P[i], 0.3 * LOAD_P[i]),
                 ("PV1", "pv", 2, h, PV_P[i], 0.0)]
    trades = pd.DataFrame(
        [("PV1", "L1", 1, 0.5, 50.0), ("grid", "L1", 1, 0.5, 58.0), ("PV1", "L1", 2, 1.0, 48.0),
         ("grid", "L1", 2, 1.0, 58.0), ("PV1", "L1", 3, 1.5, 40.0), ("PV1", "grid", 3, 0.5, 30.0)],
        columns=["seller", "buyer", "hour", "p_mw", "price_eur_per_mwh"])
    economics = pd.DataFrame({"hour": HOURS, "social_welfare_eur": [10.0, 20.0, 30.0],
                              "differentiation_cost_eur": [0.0, 1.0, 0.0], "flex_penalty_eur": [0.0, 0.0, 0.5]})
    admm = pd.DataFrame({"outer": [0, 0, 0, 1, 1], "iteration": [1, 2, 3, 1, 2],
                         "primal_residual": [1.0, 0.1, 1e-5, 0.2, 1e-5], "dual_residual": [0.5, 0.05, 0.0, 0.1, 2e-5],
                         "rho": [1.0, 1.0, 2.0, 2.0, 2.0]})
    messages = pd.DataFrame({"iteration": [0, 1, 1, 2], "type": ["hello", "update", "prices", "update"],
                             "count": [3, 3, 3, 3], "bytes": [300, 1200, 900, 1200]})
    args = dict(
        scenario="tiny", market="p2p", model="cong", solver="admm", converged=True, dispatch=_dispatch(rows),
        economics=economics, iterations=5, outer_iterations=2, wall_s=1.25, trades=trades, ac=_ac(1),
        ac_initial=_ac(3), admm_history=admm, messages=messages, processes=6, primal_residual=1e-5,
        dual_residual=np.float64(2e-5), extra={"topology": "mesh", "timing_s": {"local": np.float64(0.5)},
                                               "unknown": float("nan"), "wall_s": 999.0},
    )
    args.update(kw)
    return RunResult(**args)


def _community_result() -> RunResult:
    """24 hours, 33 buses with prices, EVs, root exchange of the network agent, two outer iterations."""
    H = np.arange(1, 25)
    rng = np.random.default_rng(0)
    shape = 0.6 + 0.4 * np.exp(-((H - 20) / 3.0) ** 2)
    pv = np.clip(np.sin((H - 6) / 14 * np.pi), 0, None)
    rows = []
    for b in range(1, 33):
        rows += [(f"load{b}", "load", b, h, -0.1 * shape[h - 1], -0.03 * shape[h - 1]) for h in H]
    for b in (5, 12, 25):
        rows += [(f"pv{b}", "pv", b, h, 0.3 * pv[h - 1], 0.0) for h in H]
    for j, b in enumerate((7, 18)):
        rows += [(f"ev{j}", "ev", b, h, (-0.007 if h < 7 else (0.005 if 19 <= h <= 21 else 0.0)), 0.0) for h in H]
    dispatch = _dispatch(rows)
    net = -dispatch.groupby("hour")["p_mw"].sum().to_numpy()
    soc = pd.DataFrame([(f"ev{j}", h, 0.02 + 0.001 * h) for j in range(2) for h in H], columns=["peer", "hour", "soc_mwh"])
    prices = pd.DataFrame([(b, h, 90 + 20 * shape[h - 1] + 0.1 * b) for b in range(33) for h in H],
                          columns=["bus", "hour", "price_eur_per_mwh"])
    buses = pd.DataFrame([(b, h, 1.0 - 0.002 * b * shape[h - 1]) for b in range(33) for h in H], columns=["bus", "hour", "vm_pu"])
    lines = pd.DataFrame([(i, h, 80.0 * shape[h - 1] * (1 - i / 40)) for i in range(32) for h in H],
                         columns=["line", "hour", "loading_percent"])
    lines["kind"] = "line"
    g = buses.groupby("hour")["vm_pu"]
    hours = pd.DataFrame({"hour": H, "converged": True, "losses_mw": 0.02 * net, "losses_pct": 2.0, "load_mw": net,
                          "slack_p_mw": 1.02 * net, "vmin_pu": g.min().to_numpy(), "vmax_pu": g.max().to_numpy(),
                          "max_line_loading_pct": lines.groupby("hour")["loading_percent"].max().to_numpy(),
                          "max_trafo_loading_pct": np.nan, "violations": 0})
    ac = ACReport(buses, lines, hours, pd.DataFrame(columns=["hour", "element", "index", "value", "limit", "kind"]))
    n = 60
    k = np.arange(1, n + 1)
    admm = pd.DataFrame({"outer": np.repeat([0, 1], n), "iteration": np.tile(k, 2),
                         "primal_residual": np.tile(np.exp(-k / 8), 2), "dual_residual": np.tile(0.5 * np.exp(-k / 9), 2),
                         "rho": np.tile(np.where(k > 30, 2.0, 1.0), 2)})
    messages = pd.DataFrame([(i, t, 39, 39 * 400 + int(rng.integers(0, 100))) for i in range(1, 2 * n + 1)
                             for t in ("update", "prices")], columns=["iteration", "type", "count", "bytes"])
    return RunResult(
        scenario="ieee33_like", market="community", model="benchmark", solver="admm", converged=True,
        dispatch=dispatch, economics=pd.DataFrame({"hour": H, "social_welfare_eur": 50.0, "differentiation_cost_eur": 0.0,
                                                   "flex_penalty_eur": 0.0}),
        iterations=2 * n, outer_iterations=2, wall_s=12.0, prices=prices, ev_soc=soc,
        payments=pd.DataFrame({"peer": ["load1", "pv5"], "payment_eur": [12.0, -30.0]}),
        grid_exchange=pd.DataFrame({"hour": H, "import_mw": 1.02 * net, "export_mw": 0.0}),
        relaxation=pd.DataFrame({"hour": H, "losses_socp_mw": 0.02 * net, "losses_ac_mw": 0.02 * net, "max_vm_gap_pu": 1e-4}),
        ac=ac, admm_history=admm, messages=messages, processes=40,
    )


# ------------------------------------------------------------------------------------------------------------
def test_summary_has_every_key_with_the_right_values():
    s = build_summary(_p2p_result())
    for key in SUMMARY_KEYS:
        assert key in s, key
    assert list(s)[: len(SUMMARY_KEYS)] == list(SUMMARY_KEYS)
    assert set(s["energy_mwh"]) == set(ENERGY_KEYS)
    assert s["schema"] == SCHEMA == "p2pm.run/1"
    assert (s["scenario"], s["market"], s["model"], s["solver"]) == ("tiny", "p2p", "cong", "admm")
    assert s["converged"] is True
    assert (s["iterations"], s["outer_iterations"], s["processes"]) == (5, 2, 6)
    assert s["wall_s"] == 1.25  # a required key is not overwritten by extra
    assert s["social_welfare_eur"] == pytest.approx(60.0)
    assert s["differentiation_cost_eur"] == pytest.approx(1.0)
    assert s["flex_penalty_eur"] == pytest.approx(0.5)
    e = s["energy_mwh"]
    assert e["load"] == pytest.approx(-sum(LOAD_P)) == pytest.approx(4.5)
    assert e["pv"] == pytest.approx(sum(PV_P))
    assert e["grid_import"] == pytest.approx(1.5)
    assert e["grid_export"] == pytest.approx(0.5)
    for k in ("wind", "chp", "ev_charge", "ev_discharge", "virtual_load"):
        assert e[k] == 0.0
    assert s["losses_pct"] == pytest.approx(100 * 0.06 / 4.5)
    assert s["max_line_loading_pct"] == pytest.approx(70.0)
    assert s["max_trafo_loading_pct"] == pytest.approx(33.0)
    assert s["vmin_pu"] == pytest.approx(0.94)
    assert s["vmax_pu"] == pytest.approx(1.0)
    assert (s["violations"], s["violations_initial"]) == (1, 3)
    assert s["primal_residual"] == pytest.approx(1e-5) and s["dual_residual"] == pytest.approx(2e-5)
    assert (s["messages"], s["bytes"]) == (12, 3600)
    assert s["topology"] == "mesh" and s["timing_s"] == {"local": 0.5} and s["unknown"] is None
    # plain Python values only
    text = json.dumps(s, allow_nan=False)
    assert json.loads(text) == s
    assert type(s["messages"]) is int and type(s["bytes"]) is int and type(s["violations"]) is int
    assert type(s["dual_residual"]) is float and type(s["timing_s"]["local"]) is float


def test_grid_exchange_ev_and_virtual_load_energies():
    rows = [("L1", "load", 1, 1, -2.0, -0.6), ("L1", "load", 1, 2, -1.0, -0.3),
            ("ev1", "ev", 2, 1, -0.4, 0.0), ("ev1", "ev", 2, 2, 0.3, 0.0),
            ("tso", "virtual_load", 0, 1, -0.2, 0.0), ("tso", "virtual_load", 0, 2, -0.1, 0.0),
            ("grid", "grid", 0, 1, 9.0, 0.0)]  # ignored: the community root exchange wins
    res = RunResult("c", "community", "benchmark", "centralized", True, _dispatch(rows),
                    pd.DataFrame({"hour": [1, 2], "social_welfare_eur": [1.0, np.nan]}),
                    grid_exchange=pd.DataFrame({"hour": [1, 2], "import_mw": [2.6, 0.0], "export_mw": [0.0, 0.4]}))
    s = build_summary(res)
    e = s["energy_mwh"]
    assert e["grid_import"] == pytest.approx(2.6) and e["grid_export"] == pytest.approx(0.4)
    assert e["ev_charge"] == pytest.approx(0.4) and e["ev_discharge"] == pytest.approx(0.3)
    assert e["virtual_load"] == pytest.approx(0.3)
    assert e["load"] == pytest.approx(3.0)
    assert s["social_welfare_eur"] == pytest.approx(1.0)
    assert s["differentiation_cost_eur"] == 0.0  # a cost nobody reported is zero, ...
    assert build_summary(RunResult("c", "p2p", "benchmark", "admm", True, _dispatch(rows),
                                   pd.DataFrame({"hour": [1]})))["social_welfare_eur"] is None  # ... welfare is unknown
    # no AC report: the grid figures are null
    for key in ("losses_pct", "max_line_loading_pct", "max_trafo_loading_pct", "vmin_pu", "vmax_pu",
                "violations", "violations_initial"):
        assert s[key] is None, key
    assert (s["messages"], s["bytes"]) == (0, 0)
    json.dumps(s, allow_nan=False)


def test_trafo_loading_is_null_without_a_trafo_branch():
    s = build_summary(_p2p_result(ac=_ac(0, trafo=False), ac_initial=None))
    assert s["max_trafo_loading_pct"] is None
    assert s["max_line_loading_pct"] == pytest.approx(70.0)
    assert s["violations"] == s["violations_initial"] == 0


def _columns(path):
    return list(pd.read_csv(path, nrows=0).columns)


@pytest.fixture(scope="module")
def p2p_folder(tmp_path_factory):
    """The results folder of ``_p2p_result()`` with its public scenario, written once (figures and
    page included) for the tests that read it."""
    from common.public import split_scenario
    from common.scenario import parse_scenario

    scenario = parse_scenario({
        "name": "tiny", "network": {"name": "case33bw", "vm_min_pu": 0.9, "vm_max_pu": 1.1},
        "market": {"kind": "p2p", "hours": 3, "tolerance": 1e-3},
        "peers": [
            {"id": "grid", "kind": "grid", "bus": 0, "p_import_max_mw": 5.0, "import_price_eur_per_mwh": [58, 60, 62]},
            {"id": "L1", "kind": "load", "bus": 1, "p_base_mw": 1.5},
            {"id": "PV1", "kind": "pv", "bus": 2, "p_forecast_mw": [0.5, 1.0, 2.0]},
        ],
    })
    run = tmp_path_factory.mktemp("report") / "run"
    return run, write_results(_p2p_result(), run, scenario=split_scenario(scenario)[0])


def test_write_results_folder(p2p_folder):
    res = _p2p_result()
    run, out = p2p_folder
    assert out == run
    summary = json.loads((out / "summary.json").read_text())
    assert summary == build_summary(res)
    assert _columns(out / "dispatch.csv")[:6] == ["peer", "kind", "bus", "hour", "p_mw", "q_mvar"]
    assert _columns(out / "trades.csv")[:5] == ["seller", "buyer", "hour", "p_mw", "price_eur_per_mwh"]
    assert _columns(out / "buses.csv")[:3] == ["bus", "hour", "vm_pu"]
    assert _columns(out / "lines.csv")[:3] == ["line", "hour", "loading_percent"]
    assert _columns(out / "admm_history.csv") == ["outer", "iteration", "primal_residual", "dual_residual", "rho"]
    assert _columns(out / "messages.csv") == ["iteration", "type", "count", "bytes"]
    assert _columns(out / "violations.csv") == ["hour", "element", "index", "value", "limit", "kind"]
    hours = pd.read_csv(out / "hours.csv")
    assert {"hour", "losses_mw", "vmin_pu", "social_welfare_eur", "flex_penalty_eur"} <= set(hours.columns)
    assert hours["hour"].tolist() == HOURS
    dispatch = pd.read_csv(out / "dispatch.csv")
    assert -dispatch.loc[dispatch["kind"] == "load", "p_mw"].sum() == pytest.approx(summary["energy_mwh"]["load"])
    assert len(pd.read_csv(out / "violations.csv")) == 1
    assert not (out / "prices.csv").exists() and not (out / "ev_soc.csv").exists()

    page = (out / "report.html").read_text()
    images = re.findall(r'<img[^>]+src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) >= 4
    assert "could not be drawn" not in page
    for key in ("tiny", "p2p", "cong", "admm"):
        assert key in page
    pngs = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert {"supply_mix.png", "load.png", "prices.png", "voltage.png", "loading.png", "admm_residuals.png",
            "messages.png"} <= set(pngs)
    assert base64.b64decode(images[0])[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_page_gives_the_residuals_in_their_units(p2p_folder):
    # primal residual: power mismatch of the trades [MW]; dual residual: rho * change of the
    # trades [EUR/MWh] (common.admm)
    page = (p2p_folder[1] / "report.html").read_text()
    cell = {name: re.search(rf"<th>{name} residual</th><td[^>]*>([^<]*)</td>", page).group(1)
            for name in ("primal", "dual")}
    assert cell["primal"].endswith(" MW")
    assert cell["dual"] == "2.00e-05 EUR/MWh"

def test_write_results_community_with_prices_and_evs(tmp_path):
    res = _community_result()
    out = write_results(res, tmp_path / "community")
    assert _columns(out / "prices.csv")[:3] == ["bus", "hour", "price_eur_per_mwh"]
    assert _columns(out / "ev_soc.csv") == ["peer", "hour", "soc_mwh"]
    assert (out / "payments.csv").exists() and (out / "relaxation.csv").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["max_trafo_loading_pct"] is None
    assert summary["energy_mwh"]["grid_import"] == pytest.approx(res.grid_exchange["import_mw"].sum())
    page = (out / "report.html").read_text()
    assert "could not be drawn" not in page
    assert page.count("data:image/png;base64,") == 9  # every figure, EV state of charge and the heatmap included
    assert (out / "figures" / "ev_soc.png").exists()


def test_write_results_without_ac_or_history(tmp_path):
    res = RunResult("bare", "p2p", "benchmark", "centralized", False,
                    _dispatch([("g", "grid", 0, 1, 1.0, 0.0), ("l", "load", 1, 1, -1.0, -0.3)]),
                    pd.DataFrame({"hour": [1], "social_welfare_eur": [5.0]}))
    out = write_results(res, tmp_path / "nested" / "bare")
    s = json.loads((out / "summary.json").read_text())
    assert s["converged"] is False and s["losses_pct"] is None and s["violations"] is None
    assert _columns(out / "buses.csv") == ["bus", "hour", "vm_pu"]
    assert _columns(out / "lines.csv") == ["line", "hour", "loading_percent"]
    assert _columns(out / "admm_history.csv") == ["outer", "iteration", "primal_residual", "dual_residual", "rho"]
    page = (out / "report.html").read_text()
    assert "could not be drawn" not in page and page.count("data:image/png;base64,") == 3  # supply mix, load, heatmap


def test_prosumers_pass_the_table_contracts_and_count_on_both_sides(tmp_path):
    """A prosumer's injection is supply and its withdrawal demand, hour by hour; its dispatch rows
    are a known kind (a built-in scenario with prosumers once broke the dispatch table's contract)."""
    rows = [("g", "grid", 0, 1, 1.0, 0.0), ("g", "grid", 0, 2, 0.0, 0.0),
            ("h1", "prosumer", 1, 1, -0.5, 0.0), ("h1", "prosumer", 1, 2, 0.75, 0.0),
            ("h2", "prosumer", 2, 1, 0.25, 0.0), ("l", "load", 1, 1, -0.75, -0.2), ("l", "load", 1, 2, -0.75, -0.2)]
    res = RunResult("pros", "p2p", "benchmark", "centralized", True, _dispatch(rows),
                    pd.DataFrame({"hour": [1, 2], "social_welfare_eur": [5.0, 4.0]}))
    out = write_results(res, tmp_path / "pros")
    e = json.loads((out / "summary.json").read_text())["energy_mwh"]
    assert e["prosumer_injection"] == pytest.approx(1.0) and e["prosumer_withdrawal"] == pytest.approx(0.5)
    supply = e["grid_import"] + e["prosumer_injection"]
    demand = e["load"] + e["prosumer_withdrawal"]
    assert supply == pytest.approx(demand)
    assert "prosumer injection" in format_summary(json.loads((out / "summary.json").read_text()))
    page = (out / "report.html").read_text()
    assert "could not be drawn" not in page and "prosumer withdrawal" in page


def test_format_summary_is_short_text():
    s = build_summary(_p2p_result())
    text = format_summary(s)
    assert 4 <= len(text.splitlines()) <= 10
    assert "tiny" in text and "60.00 EUR" in text and "violations 1 (initial 3)" in text
    assert "load 4.500" in text
    bare = dict(s, vmin_pu=None, violations=None, losses_pct=None)
    assert "no power-flow check" in format_summary(bare)


def test_write_results_with_scenario_limits_and_copy(p2p_folder):
    out = p2p_folder[1]
    saved = json.loads((out / "scenario.json").read_text())
    assert saved["network"]["vm_min_pu"] == 0.9 and saved["schema"] == "p2pm.public/1"
    # the public part only: the roster, no peer's private data
    assert [p["id"] for p in saved["roster"]] == ["grid", "L1", "PV1"] and "peers" not in saved
    assert "cost_a_eur_per_mw2h" not in (out / "scenario.json").read_text()
    page = (out / "report.html").read_text()
    assert "could not be drawn" not in page and page.count("data:image/png;base64,") >= 7
