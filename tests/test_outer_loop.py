"""The TSO/DSO outer loop (models cong, volt, freq, full) on a tiny radial 11 kV feeder:
0 (slack) - 1 - 2 and 1 - 3; the centralized loop and the distributed one (every role's engine in
this process, and once with real processes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandapower as pp
import pandas as pd
import pytest
import yaml

from common.models import apply_parameters, flex_penalty_eur, hourly_peer, load_baseline_mw
from common.public import split_scenario
from common.report import build_summary, write_results
from common.scenario import load_scenario
from p2pm.local import run_centralized, run_in_process
from p2pm_support import invoke, run_cli

pytestmark = pytest.mark.usefixtures("networks_built_once")


def feeder(path: Path, r_ohm_per_km: float = 0.4, x_ohm_per_km: float = 0.35, max_i_ka=(0.3, 0.3, 0.3)) -> Path:
    """Lines 0-1 (1 km), 1-2 (2 km), 1-3 (1 km)."""
    net = pp.create_empty_network(sn_mva=10)
    buses = [pp.create_bus(net, vn_kv=11.0, name=f"bus {i}") for i in range(4)]
    pp.create_ext_grid(net, buses[0], vm_pu=1.0)
    for (a, b, km), imax in zip(((0, 1, 1.0), (1, 2, 2.0), (1, 3, 1.0)), max_i_ka):
        pp.create_line_from_parameters(net, buses[a], buses[b], length_km=km, r_ohm_per_km=r_ohm_per_km,
                                       x_ohm_per_km=x_ohm_per_km, c_nf_per_km=0.0, max_i_ka=imax)
    pp.to_json(net, str(path))
    return path


def scenario(path: Path, network: Path, model: str, peers: list, dso: dict | None = None, tso: dict | None = None,
             hours: int = 2) -> Path:
    doc = {"name": path.stem, "network": {"file": str(network)},
           "market": {"kind": "p2p", "model": model, "hours": hours, "rho": 1.0, "tolerance": 1e-5,
                      "max_iterations": 20000, "price_init_eur_per_mwh": 30.0},
           "peers": [{"id": "grid", "kind": "grid", "bus": 0, "p_import_max_mw": 10, "import_price_eur_per_mwh": 58.0},
                     *peers]}
    if dso:
        doc["dso"] = dso
    if tso:
        doc["tso"] = tso
    path.write_text(yaml.safe_dump(doc))
    return path


def congestion(tmp_path: Path) -> Path:
    """load2 (bus 2) buys the cheap PV of bus 3 across line 1-2, rated for ~0.76 MW: overloaded. A
    CHP at bus 2 is dearer but needs no line."""
    net = feeder(tmp_path / "net.json", max_i_ka=(0.3, 0.04, 0.3))
    peers = [{"id": "load2", "kind": "load", "bus": 2, "p_base_mw": 1.0, "flex_fraction": 0.0, "tan_phi": 0.0},
             {"id": "pv3", "kind": "pv", "bus": 3, "p_forecast_mw": 1.5, "cost_a_eur_per_mw2h": 1.0, "tan_phi": 0.0},
             {"id": "chp2", "kind": "chp", "bus": 2, "p_min_mw": 0.0, "p_max_mw": 0.6, "cost_a_eur_per_mw2h": 1.0,
              "cost_b_eur_per_mwh": 30.0, "tan_phi": 0.0}]
    return scenario(tmp_path / "cong.yaml", net, "cong", peers, dso={"k_differentiation": 10, "up_cong_km": 10.0})


def voltage(tmp_path: Path) -> Path:
    """A heavy load at the end of a weak feeder: 0.948 pu at bus 2 with tan phi 0.3, 0.958 at 0."""
    net = feeder(tmp_path / "net.json", r_ohm_per_km=1.0, x_ohm_per_km=0.8)
    peers = [{"id": "load2", "kind": "load", "bus": 2, "p_base_mw": 1.6, "flex_fraction": 0.0},
             {"id": "load1", "kind": "load", "bus": 1, "p_base_mw": 0.05, "flex_fraction": 0.0},
             {"id": "load3", "kind": "load", "bus": 3, "p_base_mw": 0.3, "flex_fraction": 0.0}]
    return scenario(tmp_path / "volt.yaml", net, "volt", peers, dso={"k_differentiation": 1})


def trades(out: Path) -> pd.Series:
    t = pd.read_csv(out / "trades.csv")
    return t.groupby(["seller", "buyer", "hour"])["p_mw"].sum()


# -- pure pieces ------------------------------------------------------------------------------------
def test_flexibility_step_moves_the_utility_line_and_is_penalised(tmp_path):
    sc = load_scenario(voltage(tmp_path))
    base = hourly_peer(sc, sc.peer("load2").model_copy(update={"flex_fraction": 0.3}))
    baseline, f0 = load_baseline_mw(base)
    assert np.allclose(baseline, 1.6) and np.allclose(f0, 0.3)
    down = apply_parameters(base, {"flex_down_fraction": np.array([0.4, 0.3])})
    assert np.allclose(-down.p_max_mw, [1.6 * 0.6, 1.6 * 0.7]) and np.allclose(-down.p_min_mw, 1.6 * 1.3)
    # the same prices at the new ends: 58 EUR/MWh at the new minimum, 4 at the maximum
    assert np.allclose(down.marginal_cost_eur_per_mwh(down.p_max_mw), 58.0)
    assert np.allclose(down.marginal_cost_eur_per_mwh(down.p_min_mw), 4.0)
    pen = flex_penalty_eur(base, {"flex_down_fraction": np.array([0.4, 0.3]), "beta_eur_per_mwh": np.array([100.0])})
    assert np.allclose(pen, [100.0 * 0.1 * 1.6, 0.0])


# -- centralized outer loop -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def congestion_central(tmp_path_factory):
    """(scenario file, the centralized outer loop's results) of the congestion case, run once."""
    path = congestion(tmp_path_factory.mktemp("congestion"))
    return path, run_centralized(load_scenario(path))


def test_congestion_penalty_moves_the_trade_off_the_overloaded_line(congestion_central):
    path, r = congestion_central
    sc = load_scenario(path)
    bench = run_centralized(sc.model_copy(update={"market": sc.market.model_copy(update={"model": "benchmark"})}))
    before, after = bench.trades.groupby(["seller", "buyer"])["p_mw"].sum(), r.trades.groupby(["seller", "buyer"])["p_mw"].sum()
    assert len(r.ac_initial.violations) == 2 and set(r.ac_initial.violations["kind"]) == {"overload"}
    assert len(r.ac.violations) == 0 and r.extra["outer_status"] == "feasible"
    # the PV across line 1-2 sold ~1 MW per hour to load2; after the penalty the CHP next to it sells
    assert before[("pv3", "load2")] > 1.9 and after.get(("chp2", "load2"), 0.0) > 1.1
    assert after[("pv3", "load2")] < before[("pv3", "load2")] - 1.0
    assert r.outer_hours["load_flex_down_pct"].isna().all()  # differentiation alone solved it
    assert r.economics["social_welfare_eur"].sum() <= bench.economics["social_welfare_eur"].sum() + 1e-6
    assert r.economics["differentiation_cost_eur"].sum() > 0
    day = r.outer_day.set_index("quantity")
    assert day.loc["chp_mwh", "after"] > day.loc["chp_mwh", "before"] + 1.0
    assert day.loc["consumption_mwh", "after"] == pytest.approx(day.loc["consumption_mwh", "before"])


def test_voltage_fixed_by_reactive_control_of_the_most_sensitive_load(tmp_path):
    r = run_centralized(load_scenario(voltage(tmp_path)))
    assert set(r.ac_initial.violations["kind"]) == {"undervoltage"}
    assert len(r.ac.violations) == 0
    assert list(r.outer_hours["tan_phi_changes"]) == ["load2:0", "load2:0"]  # one step was enough
    q = r.dispatch.set_index(["peer", "hour"])["q_mvar"]
    assert q.loc[("load2", 1)] == 0.0 and q.loc[("load3", 1)] == pytest.approx(-0.09)
    assert r.economics["flex_penalty_eur"].sum() == 0.0


def _stuck(tmp_path: Path) -> Path:
    net = feeder(tmp_path / "net.json", max_i_ka=(0.02, 0.3, 0.3))  # ~0.38 MW through line 0-1
    peers = [{"id": "load2", "kind": "load", "bus": 2, "p_base_mw": 1.0, "flex_fraction": 0.1}]
    return scenario(tmp_path / "stuck.yaml", net, "cong", peers, dso={"k_differentiation": 1, "flex_step": 0.1,
                                                                      "flex_max": 0.3})


def _assert_exhausted(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())  # the last outer iteration is kept
    assert summary["violations"] > 0 and summary["outer_status"] == "exhausted" and not summary["converged"]
    assert summary["outer_iterations"] == 4  # differentiation once, then 20 % and 30 % flexibility, then exhausted
    return summary


def test_exhausted_flexibility_is_a_clear_error_centralized(tmp_path):
    r = invoke("run", _stuck(tmp_path), "--solver", "centralized", "--out", tmp_path / "out", "--no-report")
    assert r.exit_code == 1
    assert "flexibility exhausted" in r.output and "hour 1" in r.output and "Traceback" not in r.output
    _assert_exhausted(tmp_path / "out")


@pytest.mark.e2e
def test_exhausted_flexibility_is_a_clear_error_distributed_and_the_report_is_written(tmp_path):
    """Real processes; the one end-to-end run of the suite that renders the figures and the
    report page (the outer loop's before/after figure included), for a run that failed."""
    out = tmp_path / "out"
    r = run_cli("run", _stuck(tmp_path), "--out", out, "--quiet")
    assert r.returncode == 1
    assert "flexibility exhausted" in r.stderr and "hour 1" in r.stderr and "Traceback" not in r.stderr
    summary = _assert_exhausted(out)
    assert summary["solver"] == "admm" and summary["processes"] == 2 + 3
    pen = pd.read_csv(out / "penalties.csv")
    assert set(pen["peer"]) == {"load2"} and pen["parameters"].str.contains("flex_down_fraction").any()
    for name in ("report.html", "figures/outer_before_after.png", "figures/admm_residuals.png", "outer_hours.csv"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    page = (out / "report.html").read_text()
    assert "stuck" in page and "could not be drawn" not in page and page.count("data:image/png;base64,") >= 5
    for p in out.glob("logs/*.log"):
        assert "Traceback" not in p.read_text(), p


# -- distributed: every role's engine in this process, messages through the codec -------------------
# (the same engines the processes run; the distributed outer loop over real processes and sockets
# is the end-to-end run above)
def in_process(path: Path):
    """(results, the in-process driver) of the distributed clearing of a scenario file."""
    return run_in_process(load_scenario(path))


def test_distributed_congestion_loop_matches_the_centralized_one(tmp_path, congestion_central):
    path, rc = congestion_central
    ra, _ = in_process(path)
    admm, central = tmp_path / "admm", tmp_path / "central"
    public = split_scenario(load_scenario(path))[0]
    write_results(ra, admm, public, figures=False)
    write_results(rc, central, public, figures=False)
    sa, sc = (json.loads((d / "summary.json").read_text()) for d in (admm, central))
    assert sa["violations"] == 0 and sa["violations_initial"] == 2 and sa["converged"] and sa["solver"] == "admm"
    assert sa["outer_iterations"] == sc["outer_iterations"] > 1
    assert abs(sa["social_welfare_eur"] - sc["social_welfare_eur"]) <= 1e-3 * abs(sc["social_welfare_eur"])
    da = pd.read_csv(admm / "dispatch.csv").set_index(["peer", "hour"])["p_mw"]
    dc = pd.read_csv(central / "dispatch.csv").set_index(["peer", "hour"])["p_mw"]
    assert np.abs(da - dc.loc[da.index]).max() < 1e-3
    assert trades(admm)[("chp2", "load2", 1)] > 0.55
    for name in ("outer_hours.csv", "outer_day.csv", "outer_history.csv", "violations_initial.csv"):
        assert (admm / name).exists(), name
    hours = pd.read_csv(admm / "outer_hours.csv").set_index("hour")
    assert (hours["violations_before"] == 1).all() and (hours["violations_after"] == 0).all()
    assert (hours["max_line_loading_before_pct"] > 100).all() and (hours["max_line_loading_after_pct"] <= 100).all()
    hist = pd.read_csv(admm / "admm_history.csv")
    assert hist["outer"].max() == sa["outer_iterations"] and hist["iteration"].is_monotonic_increasing
    # only the consumer (its trades carry the weights) ever received a penalty
    pen = pd.read_csv(admm / "penalties.csv")
    assert set(pen["peer"]) == {"load2"} and set(pen["parameters"]) == {"diff_eur_per_mwh"}


def test_outer_messages_reach_only_the_peers_concerned(tmp_path):
    r, driver = in_process(voltage(tmp_path))
    s = build_summary(r)
    assert s["violations"] == 0 and s["violations_initial"] == 2
    pen = r.penalties
    # reactive control: load2 (end of the weak feeder), never load3 on the other feeder; the outer
    # iteration that changes tan phi messages no one else
    q_rows = pen[pen["parameters"].str.contains("tan_phi")]
    assert set(q_rows["peer"]) == {"load2"} and set(pen.loc[pen["outer"].isin(q_rows["outer"]), "peer"]) == {"load2"}
    # the differentiation before it weighs the trades sharing the path to bus 2 (load3 shares line 0-1)
    assert set(pen.loc[pen["peer"] == "load3", "parameters"]) <= {"diff_eur_per_mwh"}
    assert "grid" not in set(pen["peer"])  # producers never get weights
    # one PENALTY message per host concerned (one peer per host here)
    msgs = r.messages
    assert int(msgs.loc[msgs["type"] == "penalty", "count"].sum()) == len(pen)
    logs: dict[str, str] = {}
    for source, text in driver.logs:
        logs[source] = logs.get(source, "") + text + "\n"
    load3_log = next(text for name, text in logs.items() if "load3" in name)
    load2_log = next(text for name, text in logs.items() if "load2" in name)
    assert "tan_phi" not in load3_log and "load2: new tan_phi" in load2_log
    q = r.dispatch.set_index(["peer", "hour"])["q_mvar"]
    assert q.loc[("load2", 1)] == 0.0


def test_virtual_load_is_served(tmp_path):
    net = feeder(tmp_path / "net.json")
    peers = [{"id": "load2", "kind": "load", "bus": 2, "p_base_mw": 0.5, "flex_fraction": 0.3},
             {"id": "pv3", "kind": "pv", "bus": 3, "p_forecast_mw": [2.0, 0.2], "cost_a_eur_per_mw2h": 1.0},
             {"id": "tso-vl", "kind": "virtual_load", "bus": 0}]
    path = scenario(tmp_path / "freq.yaml", net, "freq", peers, tso={"virtual_load_mw": [0.8, 0.0]})
    r, _ = in_process(path)
    central = run_centralized(load_scenario(path))
    s = build_summary(r)
    assert s["energy_mwh"]["virtual_load"] == pytest.approx(0.8, abs=1e-3)
    d = r.dispatch.set_index(["peer", "hour"])["p_mw"]
    assert d.loc[("tso-vl", 1)] == pytest.approx(-0.8, abs=1e-4) and abs(d.loc[("tso-vl", 2)]) < 1e-6
    # the PV (cheapest) serves most of it; the load, facing a higher price, gives up the rest
    bench = run_centralized(load_scenario(path).model_copy(update={"market": load_scenario(path).market.model_copy(
        update={"model": "benchmark"})}))
    before = bench.dispatch.set_index(["peer", "hour"])["p_mw"]
    pv_up, load_down = d.loc[("pv3", 1)] - before.loc[("pv3", 1)], d.loc[("load2", 1)] - before.loc[("load2", 1)]
    assert pv_up > 0.7 and pv_up + load_down == pytest.approx(0.8, abs=1e-3)
    assert abs(d.loc[("grid", 1)] - before.loc[("grid", 1)]) < 1e-3
    assert list(r.penalties["peer"]) == ["tso-vl"] and list(r.penalties["source"]) == ["tso"]
    dc = central.dispatch.set_index(["peer", "hour"])["p_mw"]
    assert np.abs(d - dc.loc[d.index]).max() < 1e-3
    assert s["social_welfare_eur"] <= bench.economics["social_welfare_eur"].sum() + 1e-6


def test_peer_refuses_a_penalty_not_meant_for_it_and_applies_its_own(tmp_path):
    from common.engine import Received, Started
    from common.protocol.control import Welcome
    from common.protocol.market import Penalty
    from peer_node.engine import PeerEngine

    sc = load_scenario(voltage(tmp_path))
    model = hourly_peer(sc, sc.peer("load2").model_copy(update={"flex_fraction": 0.3}))
    host = PeerEngine([model], "h-load2")
    host.handle(Started())
    host.handle(Received("coordinator", Welcome(config={"run_id": "r", "hours": 2, "market": "p2p", "topology": "relay",
                                                        "partners": {"load2": ["grid"]}})))

    def penalty(peers, sender="coordinator"):
        return host.handle(Received(sender, Penalty(peers=peers), iteration=3))

    for bad in ({"load3": {"tan_phi": np.zeros(2)}}, {"load2": {"tan_phi": np.zeros(3)}},
                {"load2": {"diff_eur_per_mwh": np.zeros((2, 2))}}, {"load2": {"price_cap": np.zeros(2)}}):
        out = penalty(bad)
        assert len(out) == 1 and "rejected a penalty" in out[0].text, out
    # a penalty from anyone but the coordinator (a partner host on the mesh socket) is refused too
    assert "rejected a penalty" in penalty({"load2": {"tan_phi": np.zeros(2)}}, sender="h-load3")[0].text
    assert host.rejected == {"body": 4, "type": 1}
    assert np.allclose(host.locals["load2"].p_max_mw, model.p_max_mw)  # nothing applied
    assert np.allclose(host.models["load2"].tan_phi, model.tan_phi)
    out = penalty({"load2": {"flex_down_fraction": np.array([0.5, 0.3]), "diff_eur_per_mwh": np.array([[-2.0, 0.0]]),
                             "tan_phi": np.array([0.0, 0.3])}})
    assert [o.text for o in out] == ["load2: new diff_eur_per_mwh, flex_down_fraction, tan_phi (iteration 3)"]
    assert np.allclose(-host.locals["load2"].p_max_mw, [0.8, 1.6 * 0.7])
    assert np.allclose(host.locals["load2"].weights, [[-2.0, 0.0]])
    assert np.allclose(host.models["load2"].tan_phi, [0.0, 0.3])
