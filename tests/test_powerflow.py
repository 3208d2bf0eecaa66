"""DSO power-flow validation, the built-in networks and their branch-flow data."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from common.grid import GridModel
from common.scenario import NetworkSpec
from dso_service.networks import MV37_PLACEMENT, build_mv37, build_network, grid_model, is_trafo_line
from dso_service.powerflow import base_case, run_ac

DISPATCH_COLUMNS = ["peer", "kind", "bus", "hour", "p_mw", "q_mvar"]


@pytest.fixture(scope="module")
def case33():
    return build_network(NetworkSpec(name="case33bw"))


def _loads_as_dispatch(net, hours=(1,), scale=1.0) -> pd.DataFrame:
    """The network's own loads as consumer peers (net injection = -consumption)."""
    rows = [(f"load{b}", "load", int(b), h, -p * scale, -q * scale)
            for h in hours for b, p, q in net.load[["bus", "p_mw", "q_mvar"]].itertuples(index=False)]
    return pd.DataFrame(rows, columns=DISPATCH_COLUMNS)


# -- case33bw: the Baran & Wu reference ----------------------------------------------------------
def test_case33bw_base_case_reproduces_baran_wu(case33):
    losses_kw, vmin_pu, vmin_bus = base_case(case33)
    assert losses_kw == pytest.approx(202.68, abs=0.1)
    assert vmin_pu == pytest.approx(0.91309, abs=1e-4)
    assert vmin_bus == 17


def test_run_ac_with_the_shipped_loads_matches_the_base_case(case33):
    spec = NetworkSpec(name="case33bw")
    n_loads = len(case33.load)
    dispatch = _loads_as_dispatch(case33, hours=(1, 2))
    dispatch.loc[len(dispatch)] = ("grid", "grid", 0, 1, 3.9, 2.4)  # not placed: the slack supplies it
    rep = run_ac(case33, dispatch, spec)

    assert list(rep.buses.columns) == ["bus", "hour", "vm_pu"]
    assert {"line", "hour", "loading_percent", "kind", "name"} <= set(rep.lines.columns)
    assert list(rep.hours.columns) == ["hour", "converged", "losses_mw", "losses_pct", "load_mw", "slack_p_mw",
                                       "vmin_pu", "vmax_pu", "max_line_loading_pct", "max_trafo_loading_pct",
                                       "violations"]
    assert list(rep.violations.columns) == ["hour", "element", "index", "value", "limit", "kind"]
    assert len(rep.buses) == 2 * 33 and len(rep.lines) == 2 * 32  # the 5 open tie lines are not reported
    assert set(rep.lines["kind"]) == {"line"}

    h1 = rep.hours.set_index("hour").loc[1]
    assert bool(h1["converged"])
    assert h1["losses_mw"] * 1000 == pytest.approx(202.68, abs=0.1)
    assert h1["load_mw"] == pytest.approx(3.715, abs=1e-9)
    assert h1["losses_pct"] == pytest.approx(100 * h1["losses_mw"] / h1["load_mw"])
    assert h1["slack_p_mw"] == pytest.approx(h1["load_mw"] + h1["losses_mw"], abs=1e-6)
    assert h1["vmin_pu"] == pytest.approx(0.91309, abs=1e-4)
    assert np.isnan(h1["max_trafo_loading_pct"])  # no transformer in case33bw
    # the input network is left as it was
    assert len(case33.load) == n_loads and case33.load["in_service"].all() and len(case33.sgen) == 0


def test_run_ac_detects_undervoltage_and_overload(case33):
    spec = NetworkSpec(name="case33bw", line_max_i_ka=0.15)  # 3.3 MVA at the head < 3.7 MW + 2.3 Mvar
    net = build_network(spec)
    rep = run_ac(net, _loads_as_dispatch(net, hours=(5,)), spec)
    v = rep.violations
    under = v[v["kind"] == "undervoltage"]
    assert len(under) > 0 and (under["element"] == "bus").all()
    assert 17 in set(under["index"]) and (under["value"] < 0.95).all() and (under["limit"] == 0.95).all()
    over = v[v["kind"] == "overload"]
    assert 0 in set(over["index"]) and (over["element"] == "line").all() and (over["value"] > 100).all()
    assert (v["hour"] == 5).all()
    assert int(rep.hours["violations"].iloc[0]) == len(v)
    assert rep.hours["max_line_loading_pct"].iloc[0] == pytest.approx(rep.lines["loading_percent"].max())

    # lighter loads: no violation at all
    rep_ok = run_ac(net, _loads_as_dispatch(net, hours=(5,), scale=0.3), spec)
    assert len(rep_ok.violations) == 0 and int(rep_ok.hours["violations"].iloc[0]) == 0


def test_generator_without_output_is_out_of_service(case33):
    spec = NetworkSpec(name="case33bw")
    base = run_ac(case33, _loads_as_dispatch(case33), spec)
    dispatch = _loads_as_dispatch(case33)
    dispatch.loc[len(dispatch)] = ("pv17", "pv", 17, 1, 0.0, 0.5)  # at night: removed, its q ignored
    night = run_ac(case33, dispatch, spec)
    assert night.hours["losses_mw"].iloc[0] == pytest.approx(base.hours["losses_mw"].iloc[0], rel=1e-9)
    dispatch.loc[len(dispatch) - 1, "p_mw"] = 0.8  # producing: raises the far-end voltage
    day = run_ac(case33, dispatch, spec)
    assert day.hours["vmin_pu"].iloc[0] > base.hours["vmin_pu"].iloc[0] + 0.01
    assert day.hours["load_mw"].iloc[0] == pytest.approx(base.hours["load_mw"].iloc[0])


def test_non_converging_hour_is_an_outcome_not_an_exception(case33):
    spec = NetworkSpec(name="case33bw")
    dispatch = _loads_as_dispatch(case33, hours=(1, 2))
    absurd = (dispatch["hour"] == 1) & (dispatch["bus"] == 17)
    dispatch.loc[absurd, ["p_mw", "q_mvar"]] = [-1000.0, -500.0]
    rep = run_ac(case33, dispatch, spec)
    hours = rep.hours.set_index("hour")
    assert not bool(hours.loc[1, "converged"]) and np.isnan(hours.loc[1, "losses_mw"])
    assert bool(hours.loc[2, "converged"])  # the next hour recovers
    assert hours.loc[2, "losses_mw"] * 1000 == pytest.approx(202.68, abs=0.1)
    failed = rep.violations[rep.violations["hour"] == 1]
    assert list(failed["kind"]) == ["not_converged"] and list(failed["element"]) == ["powerflow"]
    assert rep.buses.loc[rep.buses["hour"] == 1, "vm_pu"].isna().all()



def _mv37_with_a_collapsing_hour():
    """A copy of the built-in mv37 scenario cut to 3 hours whose loads draw 100 times their
    consumption in hour 2 (no power-flow solution), and its dispatch: loads at their maximum
    consumption, producers off."""
    import yaml

    from common.clearing import dispatch_frame
    from common.models import peer_models
    from common.scenario import parse_scenario, resolve_path

    raw = yaml.safe_load(resolve_path("mv37").read_text())
    raw["market"]["hours"] = 3
    raw["series"] = {k: v[:3] for k, v in raw["series"].items()}
    for k in ("load_btn_a_pu", "load_btn_b_pu", "load_btn_c_pu"):
        raw["series"][k][1] *= 100.0
    for peer in raw["peers"]:  # the market itself must be able to balance (the scenario check)
        if peer["kind"] == "grid":
            peer["p_import_max_mw"] = 1000.0
    sc = parse_scenario(raw)
    models = peer_models(sc)
    p = np.vstack([m.p_min_mw if m.kind == "load" else np.zeros(3) for m in models])
    return sc, dispatch_frame(models, p)


def test_not_converged_hour_travels_to_the_report(tmp_path):
    from common.codec import decode, encode
    from common.protocol.grid import GridReport
    from common.report import build_summary, format_summary, write_results
    from common.report_codec import ac_from_tables
    from common.results import RunResult
    from dso_service.engine import grid_report

    sc, dispatch = _mv37_with_a_collapsing_hour()
    ac = run_ac(build_network(sc.network), dispatch, sc.network)
    assert ac.hours["converged"].tolist() == [True, False, True]

    # DSO -> coordinator: the DSO engine's GRID_REPORT on the wire, the AC report rebuilt from its tables
    wire = encode(grid_report(ac).envelope(run_id="run1", sender="dso"))
    report = GridReport.from_envelope(decode(wire, expect_run="run1"))
    back = ac_from_tables(report.tables)
    assert back.hours["converged"].tolist() == [True, False, True] and set(back.lines["hour"]) == {1, 2, 3}
    for name in ("buses", "lines", "hours", "violations"):
        pd.testing.assert_frame_equal(getattr(back, name), getattr(ac, name))
    hours = back.hours.set_index("hour")
    assert not bool(hours.loc[2, "converged"]) and bool(hours.loc[1, "converged"]) and bool(hours.loc[3, "converged"])
    assert np.isnan(hours.loc[2, "losses_mw"]) and hours.loc[2, "violations"] == 1
    assert back.buses.loc[back.buses["hour"] == 2, "vm_pu"].isna().all()
    assert back.lines.loc[back.lines["hour"] == 2, "loading_percent"].isna().all()
    assert back.buses.loc[back.buses["hour"] != 2, "vm_pu"].notna().all()
    failed = back.violations[back.violations["hour"] == 2]
    assert list(failed["kind"]) == ["not_converged"] and list(failed["element"]) == ["powerflow"]

    # the results: the hour reported as not converged, the AC figures from the hours that converged
    result = RunResult(sc.name, "p2p", "benchmark", "admm", True, dispatch,
                       pd.DataFrame({"hour": [1, 2, 3], "social_welfare_eur": 0.0}), ac=back)
    summary = build_summary(result)
    ok = hours[hours["converged"]]
    assert summary["losses_pct"] == pytest.approx(100 * ok["losses_mw"].sum() / ok["load_mw"].sum())
    assert summary["vmin_pu"] == pytest.approx(ok["vmin_pu"].min())
    assert summary["violations"] == len(ac.violations)
    assert "violations" in format_summary(summary)
    out = write_results(result, tmp_path / "run")
    written = pd.read_csv(out / "hours.csv").set_index("hour")
    assert written["converged"].tolist() == [True, False, True] and np.isnan(written.loc[2, "losses_mw"])
    assert "not_converged" in pd.read_csv(out / "violations.csv")["kind"].tolist()
    assert "could not be drawn" not in (out / "report.html").read_text()

# -- mv37 -----------------------------------------------------------------------------------------
def test_mv37_topology():
    net = build_mv37()
    assert len(net.bus) == 38 and (net.bus["vn_kv"] == 11.0).all()
    assert len(net.line) == 37 and len(net.trafo) == 0
    assert list(net.ext_grid["bus"]) == [0] and net.ext_grid["vm_pu"].iloc[0] == 1.0
    ends = net.line[["from_bus", "to_bus"]]
    assert tuple(ends.loc[12]) == (1, 13) and tuple(ends.loc[13]) == (13, 14) and tuple(ends.loc[26]) == (1, 27)
    assert tuple(ends.loc[0]) == (0, 1) and net.line.at[0, "name"] == "trafo"
    assert all(net.line.at[k, "name"] == f"line {k}" and net.line.at[k, "to_bus"] == k + 1 for k in range(1, 37))
    assert list(is_trafo_line(net)) == [True] + [False] * 36
    assert net.line.at[0, "max_i_ka"] == pytest.approx(20 / (np.sqrt(3) * 11))

    g = grid_model(net, NetworkSpec(name="mv37"))
    assert g.n_bus == 38 and g.n_branch == 37 and g.root == 0  # radial: a tree
    assert g.branch_kind[g.branch_name.index("trafo")] == "trafo"
    assert g.branch_kind.count("trafo") == 1
    assert g.s_max_pu[0] == pytest.approx(20 / 10.0)
    # feeders as documented: bus 12 behind line 1, bus 20 behind line 12, bus 37 behind line 26
    for bus, head in ((12, 1), (20, 12), (37, 26), (14, 12)):
        assert g.branch_name[g.feeder_of(bus)] == f"line {head}"
    loads = {b for _, kind, b, _ in MV37_PLACEMENT if kind == "load"}
    assert {12, 14, 16, 31, 32, 34, 36, 37} <= loads
    kinds = pd.Series([k for _, k, _, _ in MV37_PLACEMENT]).value_counts().to_dict()
    assert kinds == {"load": 22, "pv": 22, "chp": 3, "wind": 2, "grid": 1}
    feeder_c = {b for _, kind, b, _ in MV37_PLACEMENT if g.feeder_of(b) == 26 and kind not in ("load",)}
    assert {k for _, k, b, _ in MV37_PLACEMENT if b in feeder_c and k != "load"} == {"pv"}


def test_mv37_stress_factors():
    plain = build_network(NetworkSpec(name="mv37"))
    net = build_network(NetworkSpec(name="mv37", line_capacity_scale=0.5, line_impedance_scale=3.0,
                                    trafo_capacity_scale=1 / 3))
    dist = ~is_trafo_line(net)
    assert np.allclose(net.line.loc[dist, "max_i_ka"], 0.5 * plain.line.loc[dist, "max_i_ka"])
    assert np.allclose(net.line.loc[dist, "r_ohm_per_km"], 3 * plain.line.loc[dist, "r_ohm_per_km"])
    assert np.allclose(net.line.loc[dist, "x_ohm_per_km"], 3 * plain.line.loc[dist, "x_ohm_per_km"])
    assert net.line.at[0, "max_i_ka"] == pytest.approx(plain.line.at[0, "max_i_ka"] / 3)
    assert net.line.at[0, "r_ohm_per_km"] == plain.line.at[0, "r_ohm_per_km"]  # transformer impedance kept


def test_mv37_line_13_reproduces_the_thesis_hour_17_loading():
    """Bus 14's balance in hour 17 (thesis table 4.7: 3148.8 kW) loads line 13 at 134.9 % with the
    line capacities halved; our rebuilt line 13 gives about the same."""
    spec = NetworkSpec(name="mv37", line_capacity_scale=0.5)
    net = build_network(spec)
    rows = [("chp14", "chp", 14, 17, 0.1, 0.0), ("wind14", "wind", 14, 17, 3.2256, 0.0),
            ("pv14", "pv", 14, 17, 1.1907, 0.0), ("load14", "load", 14, 17, -1.3675, -0.3 * 1.3675)]
    rep = run_ac(net, pd.DataFrame(rows, columns=DISPATCH_COLUMNS), spec)
    loading = rep.lines.set_index("line").loc[13, "loading_percent"]
    assert loading == pytest.approx(134.9, abs=4.0)
    assert rep.hours["max_trafo_loading_pct"].iloc[0] < 20  # the transformer (line 0) reported as such
    assert set(rep.lines.loc[rep.lines["line"] == 0, "kind"]) == {"trafo"}


def test_mv37_design_point_hour_20():
    """The suggested placement at the hour-20 design point (docstring of dso_service.networks):
    line 26 near the thesis's 98.3 %, losses near 1.41 %, no violation."""
    spec = NetworkSpec(name="mv37")
    net = build_network(spec)
    rows = []
    for pid, kind, bus, size in MV37_PLACEMENT:
        if kind == "load":
            p = -0.7 * 0.76 * size
            rows.append((pid, kind, bus, 20, p, 0.3 * p))
        elif kind == "wind":
            rows.append((pid, kind, bus, 20, 0.8 if bus == 14 else 0.5, 0.0))
        elif kind == "chp":
            rows.append((pid, kind, bus, 20, 0.5, 0.0))
        elif kind == "pv":
            rows.append((pid, kind, bus, 20, 0.0, 0.0))
    rep = run_ac(net, pd.DataFrame(rows, columns=DISPATCH_COLUMNS), spec)
    h = rep.hours.iloc[0]
    loading = rep.lines.set_index("line")["loading_percent"]
    assert loading.idxmax() == 26 and 95.0 < loading[26] < 100.0
    assert 1.2 < h["losses_pct"] < 1.7
    assert h["vmin_pu"] > 0.95 and int(h["violations"]) == 0


def test_run_ac_24_hours_of_mv37():
    spec = NetworkSpec(name="mv37")
    net = build_network(spec)
    shape = 0.6 + 0.4 * np.sin(np.pi * np.arange(24) / 24)
    sun = np.clip(np.sin(np.pi * (np.arange(24) - 6) / 13), 0, None)
    rows = []
    for pid, kind, bus, size in MV37_PLACEMENT:
        for h in range(24):
            p = {"load": -0.8 * size * shape[h], "pv": 0.8 * size * sun[h], "wind": 0.3 * size,
                 "chp": 0.3, "grid": 5.0}[kind]
            rows.append((pid, kind, bus, h + 1, p, 0.3 * p if kind in ("load", "pv") else 0.0))
    rep = run_ac(net, pd.DataFrame(rows, columns=DISPATCH_COLUMNS), spec)
    assert rep.hours["converged"].all() and list(rep.hours["hour"]) == list(range(1, 25))
    assert len(rep.buses) == 24 * 38 and len(rep.lines) == 24 * 37
    assert (rep.hours["max_trafo_loading_pct"] > 0).all()
    # PV out of service at night changes nothing the warm start would miss: compare with a cold run
    cold = run_ac(net, pd.DataFrame(rows, columns=DISPATCH_COLUMNS).query("hour in (7, 12)"), spec)
    warm = rep.hours.set_index("hour").loc[[7, 12]]
    assert np.allclose(cold.hours["losses_mw"], warm["losses_mw"], rtol=1e-6)


# -- branch-flow data -------------------------------------------------------------------------------
def test_grid_model_of_case33bw(case33):
    spec = NetworkSpec(name="case33bw", base_mva=10.0)
    g = grid_model(case33, spec)
    assert isinstance(g, GridModel)
    assert g.n_bus == 33 and g.n_branch == 32 and g.root == 0
    assert set(g.branch_kind) == {"line"}
    assert (g.depth[g.to_bus] == g.depth[g.from_bus] + 1).all()  # oriented away from the root
    assert (g.parent[g.to_bus] == g.from_bus).all() and g.parent[0] == -1
    z_base = 12.66**2 / 10.0
    lines = case33.line.loc[g.branch_element]
    assert np.allclose(g.r_pu, lines["r_ohm_per_km"] * lines["length_km"] / z_base)
    assert np.allclose(g.x_pu, lines["x_ohm_per_km"] * lines["length_km"] / z_base)
    assert np.all(np.isinf(g.s_max_pu))  # case33bw is unrated
    assert g.vm_min_pu == 0.95 and g.vm_max_pu == 1.05
    # paths
    assert [int(g.to_bus[k]) for k in g.path_to_root(17)] == list(range(17, 0, -1))
    assert g.path_to_root(0) == []
    between = g.path_between(17, 21)  # 17 -> 1 and 1 -> 18 -> 21
    assert len(between) == 16 + 4
    assert set(g.common_path(17, 21)) == {int(g.parent_branch[1])}

    rated = grid_model(build_network(NetworkSpec(name="case33bw", line_max_i_ka=0.4)), spec)
    assert np.allclose(rated.s_max_pu, 0.4 * 12.66 * np.sqrt(3) / 10.0)


def test_grid_model_rejects_a_meshed_network(case33):
    net = copy.deepcopy(case33)
    net.line.loc[net.line.index[-1], "in_service"] = True  # close a tie line
    with pytest.raises(ValueError, match="radial"):
        grid_model(net, NetworkSpec(name="case33bw"))


def test_grid_module_does_not_import_pandapower():
    code = "import sys, common.grid; sys.exit(1 if 'pandapower' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_grid_model_checks_orientation():
    with pytest.raises(ValueError, match="oriented"):
        GridModel(n_bus=3, root=0, base_mva=1.0, base_kv=[1, 1, 1], from_bus=[0, 2], to_bus=[1, 1],
                  r_pu=[0.1, 0.1], x_pu=[0.1, 0.1], s_max_pu=[np.inf, np.inf], branch_kind=["line"] * 2,
                  branch_name=["a", "b"])


def test_deferred_module_is_imported_on_first_use(tmp_path, monkeypatch):
    from common.deferred import Deferred, defer

    pkg = tmp_path / "deferpkg"
    (pkg / "heavy").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "heavy" / "__init__.py").write_text("import builtins\nbuiltins.deferpkg_loads += 1\nVALUE = 42\n")
    (pkg / "heavy" / "part.py").write_text("PART = 'part'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("builtins.deferpkg_loads", 0, raising=False)
    try:
        assert defer("deferpkg.heavy", "deferpkg.not_there") == ["deferpkg.heavy"]
        assert "deferpkg" not in sys.modules  # finding the module imported nothing, not even its parent
        import builtins

        import deferpkg.heavy as heavy
        import deferpkg.heavy.part as part  # a submodule loads without its package's __init__

        assert isinstance(heavy, Deferred) and builtins.deferpkg_loads == 0 and part.PART == "part"
        assert heavy.VALUE == 42 and builtins.deferpkg_loads == 1  # the first use imports it, once
        assert heavy.VALUE == 42 and builtins.deferpkg_loads == 1
        assert not isinstance(sys.modules["deferpkg.heavy"], Deferred)
        assert sys.modules["deferpkg"].heavy is sys.modules["deferpkg.heavy"]
    finally:
        for name in [m for m in sys.modules if m.split(".")[0] == "deferpkg"]:
            del sys.modules[name]


def test_dso_process_defers_what_it_does_not_use():
    """The DSO's start-up (dso_service.main) leaves pandapower's plotting and estimation, pyplot
    and scipy.stats unimported, and its AC check is the same as with them imported."""
    code = """
import sys
from common.deferred import Deferred, defer
if sys.argv[1] == "defer":
    from dso_service.main import UNUSED
    defer(*UNUSED)
from common.scenario import load_scenario
from common.public import split_scenario
from dso_service.engine import DSOEngine
from dso_service.powerflow import base_case
engine = DSOEngine(split_scenario(load_scenario("mv37"))[0])
loaded = [m for m in ("pandapower.plotting", "pandapower.estimation", "matplotlib.pyplot", "scipy.stats")
          if m in sys.modules and not isinstance(sys.modules[m], Deferred)]
print(repr((loaded, base_case(engine.net))))
"""
    out = {mode: subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True)
           for mode in ("defer", "plain")}
    deferred, plain = (eval(out[m].stdout.strip().splitlines()[-1]) for m in ("defer", "plain"))
    assert deferred[0] == [] and len(plain[0]) == 4
    assert deferred[1] == plain[1]
