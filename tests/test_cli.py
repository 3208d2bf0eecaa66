"""The command line (p2pm.cli) through typer's CliRunner, in this process: listing and splitting
scenarios, refusing bad input with exit code 2 and a one-line reason (a full scenario given to a
role that takes only the public part included), and a centralized run that writes the results
folder. Nothing here starts a process."""

from __future__ import annotations

import json
import stat

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from p2pm.cli import app
from common.scenario import builtin_names, load_scenario

SMALL_P2P = """\
name: small-p2p
description: three hours of a small P2P market on the IEEE 33-bus feeder
network: {name: case33bw, line_max_i_ka: 0.5}
market: {kind: p2p, hours: 3}
peers:
  - {id: grid, kind: grid, bus: 0, p_import_max_mw: 5.0, import_price_eur_per_mwh: 58.0}
  - {id: chp1, kind: chp, bus: 5, p_min_mw: 0.0, p_max_mw: 0.4, cost_a_eur_per_mw2h: 20.0, cost_b_eur_per_mwh: 40.0}
  - {id: pv1, kind: pv, bus: 10, p_forecast_mw: [0.0, 0.3, 0.5], cost_a_eur_per_mw2h: 1.0, cost_b_eur_per_mwh: 4.0}
  - {id: load1, kind: load, bus: 3, p_base_mw: 0.4}
  - {id: load2, kind: load, bus: 20, p_base_mw: [0.3, 0.5, 0.6], flex_fraction: 0.2}
"""

SUMMARY_KEYS = (
    "schema", "scenario", "market", "model", "solver", "converged", "iterations", "outer_iterations", "wall_s",
    "social_welfare_eur", "differentiation_cost_eur", "flex_penalty_eur", "energy_mwh", "losses_pct",
    "max_line_loading_pct", "max_trafo_loading_pct", "vmin_pu", "vmax_pu", "violations", "violations_initial",
    "primal_residual", "dual_residual", "messages", "bytes", "processes",
)
ENERGY_KEYS = ("grid_import", "grid_export", "pv", "wind", "chp", "ev_charge", "ev_discharge", "load", "virtual_load")


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


def _assert_bad_input(result, *fragments: str) -> str:
    text = result.output
    assert result.exit_code == 2, text
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in text
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert lines[0].startswith("bad input: "), text
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def test_version(runner):
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("p2pm ")
    assert result.output.split()[1][0].isdigit()


def test_scenarios_lists_the_builtins(runner):
    result = runner.invoke(app, ["scenarios"])
    assert result.exit_code == 0, result.output
    names = builtin_names()
    assert "ieee33-ev" in names
    listed = [line.split()[0] for line in result.output.splitlines() if line.strip()]
    assert listed == names
    assert "INVALID" not in result.output
    assert "community" in result.output


def test_no_arguments_shows_help(runner):
    result = runner.invoke(app, [])
    assert "run" in result.output and "scenarios" in result.output
    assert "Traceback" not in result.output


def test_scenarios_split_writes_the_public_part_and_one_private_file_per_peer(runner, tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text(SMALL_P2P)
    out = tmp_path / "split"
    result = runner.invoke(app, ["scenarios", "split", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    ids = ["grid", "chp1", "pv1", "load1", "load2"]
    public = json.loads((out / "public.json").read_text())
    assert public["schema"] == "p2pm.public/1" and public["name"] == "small-p2p"
    assert [p["id"] for p in public["roster"]] == ids and "peers" not in public
    assert {"id", "kind", "bus"} <= set(public["roster"][0])
    text = (out / "public.json").read_text()
    for private in ("cost_a_eur_per_mw2h", "cost_b_eur_per_mwh", "p_min_mw", "p_max_mw", "p_forecast_mw"):
        assert private not in text, private
    assert sorted(p.name for p in (out / "peers").iterdir()) == sorted(f"{i}.json" for i in ids)
    for pid in ids:
        f = out / "peers" / f"{pid}.json"
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, pid  # only this user reads a peer's private file
        data = json.loads(f.read_text())
        assert data["id"] == pid and {"cost_a_eur_per_mw2h", "cost_b_eur_per_mwh"} <= set(data)
        assert not [other for other in ids if other != pid and f'"{other}"' in f.read_text()]
    chp = json.loads((out / "peers" / "chp1.json").read_text())
    assert chp["cost_a_eur_per_mw2h"] == [20.0] * 3 and chp["cost_b_eur_per_mwh"] == [40.0] * 3


def test_scenarios_split_of_a_bad_scenario_exits_2(runner, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(SMALL_P2P.replace("bus: 20", "bus: 99"))
    result = runner.invoke(app, ["scenarios", "split", str(path), "--out", str(tmp_path / "split")])
    _assert_bad_input(result, "load2", "bus")
    assert not (tmp_path / "split").exists()


ROLE_ARGS = {"coordinator": ["--out", "unused"], "dso": ["--coordinator", "tcp://127.0.0.1:9"],
             "tso": ["--coordinator", "tcp://127.0.0.1:9"]}


@pytest.mark.parametrize("role", list(ROLE_ARGS))
def test_roles_refuse_a_full_scenario(runner, tmp_path, role):
    """The coordinator, the DSO and the TSO take only the public part of a scenario: a full one,
    with every peer's costs, is refused (exit 2) and the message names the schema expected."""
    import yaml

    full = tmp_path / "full.json"
    full.write_text(json.dumps(yaml.safe_load(SMALL_P2P)))
    result = runner.invoke(app, [role, "--scenario", str(full), *ROLE_ARGS[role]])
    _assert_bad_input(result, "full.json", "schema", "p2pm.public/1", "p2pm scenarios split")
    # the usual forms of a full scenario, a YAML file and a built-in name, are refused as well
    yaml_file = tmp_path / "full.yaml"
    yaml_file.write_text(SMALL_P2P)
    for scenario in (str(yaml_file), "mv37"):
        _assert_bad_input(runner.invoke(app, [role, "--scenario", scenario, *ROLE_ARGS[role]]), scenario)
    assert not (tmp_path / "unused").exists()


def test_a_public_scenario_with_private_fields_is_refused(runner, tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text(SMALL_P2P)
    assert runner.invoke(app, ["scenarios", "split", str(path), "--out", str(tmp_path / "split")]).exit_code == 0
    public = json.loads((tmp_path / "split" / "public.json").read_text())
    public["roster"][1]["cost_a_eur_per_mw2h"] = 20.0
    bad = tmp_path / "public.json"
    bad.write_text(json.dumps(public))
    result = runner.invoke(app, ["dso", "--scenario", str(bad), "--coordinator", "tcp://127.0.0.1:9"])
    _assert_bad_input(result, "cost_a_eur_per_mw2h")


@pytest.mark.parametrize("what", ["full scenario", "public part", "missing file", "no model"])
def test_peer_refuses_anything_but_its_private_files(runner, tmp_path, what):
    path = tmp_path / "small.yaml"
    path.write_text(SMALL_P2P)
    assert runner.invoke(app, ["scenarios", "split", str(path), "--out", str(tmp_path / "split")]).exit_code == 0
    model = {"full scenario": path, "public part": tmp_path / "split" / "public.json",
             "missing file": tmp_path / "nope.json", "no model": None}[what]
    args = ["peer", "--coordinator", "tcp://127.0.0.1:9", *(["--model", str(model)] if model else [])]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("old, new, fragments", [
    ("bus: 20", "bus: 99", ("load2", "bus", "99")),
    ("p_import_max_mw: 5.0", "p_import_max_mw: -1", ("p_import_max_mw",)),
    ("kind: chp,", "kind: battery,", ("battery",)),
    ("[0.0, 0.3, 0.5]", "[0.0, 0.3]", ("pv1", "p_forecast_mw")),
    ("p_min_mw: 0.0, p_max_mw: 0.4", "p_min_mw: 0.5, p_max_mw: 0.4", ("p_min_mw",)),
    ("import_price_eur_per_mwh: 58.0", "import_price_eur_per_mwh: {series: nope}", ("import_price_eur_per_mwh", "nope")),
    ("import_price_eur_per_mwh: 58.0", "import_price_eur_per_mwh: .nan", ("import_price_eur_per_mwh",)),
])
def test_run_bad_file_exits_2(runner, tmp_path, old, new, fragments):
    assert old in SMALL_P2P
    path = tmp_path / "bad.yaml"
    path.write_text(SMALL_P2P.replace(old, new, 1))
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(path), "--solver", "centralized", "--out", str(out)])
    _assert_bad_input(result, *fragments)
    assert not out.exists()


def test_run_bad_file_exits_2_before_launching_processes(runner, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(SMALL_P2P.replace("bus: 20", "bus: 99"))
    result = runner.invoke(app, ["run", str(path), "--out", str(tmp_path / "out")])
    _assert_bad_input(result, "load2", "bus")


def test_run_unknown_scenario_exits_2(runner, tmp_path):
    result = runner.invoke(app, ["run", "no-such-scenario", "--solver", "centralized", "--out", str(tmp_path / "o")])
    _assert_bad_input(result, "unknown scenario", "no-such-scenario", "ieee33-ev")


def test_run_missing_file_exits_2(runner, tmp_path):
    result = runner.invoke(app, ["run", str(tmp_path / "missing.yaml"), "--solver", "centralized"])
    _assert_bad_input(result, "not found")


def test_run_bad_option_exits_2(runner, tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text(SMALL_P2P)
    result = runner.invoke(app, ["run", str(path), "--solver", "quantum"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["run", str(path), "--solver", "centralized", "--rho", "-1"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output


# ----------------------------------------------------------------------------------------------
# a centralized run of a small P2P market
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def centralized_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli-run")
    path = tmp / "small.yaml"
    path.write_text(SMALL_P2P)
    out = tmp / "results"
    # tables and summary only: the report page is rendered by test_report and by one end-to-end run
    result = CliRunner().invoke(app, ["run", str(path), "--solver", "centralized", "--out", str(out), "--no-report"])
    return path, out, result


def test_run_centralized_exits_0(centralized_run):
    _, out, result = centralized_run
    assert result.exit_code == 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert "small-p2p" in result.output
    assert str(out) in result.output


def test_run_centralized_writes_the_results_folder(centralized_run):
    _, out, result = centralized_run
    assert result.exit_code == 0, result.output
    for name in ("summary.json", "dispatch.csv", "trades.csv", "buses.csv", "lines.csv", "scenario.json"):
        assert (out / name).is_file(), name
        assert (out / name).stat().st_size > 0, name
    # --no-report: no figures, no page
    assert not (out / "report.html").exists() and not list(out.glob("figures/*.png"))
    scenario = json.loads((out / "scenario.json").read_text())  # the public part only
    assert scenario["schema"] == "p2pm.public/1" and "roster" in scenario and "peers" not in scenario
    assert "cost_a_eur_per_mw2h" not in (out / "scenario.json").read_text()


def test_run_centralized_summary(centralized_run):
    path, out, result = centralized_run
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    missing = [k for k in SUMMARY_KEYS if k not in summary]
    assert not missing, missing
    assert set(ENERGY_KEYS) <= set(summary["energy_mwh"])
    assert summary["scenario"] == "small-p2p"
    assert summary["market"] == "p2p"
    assert summary["model"] == "benchmark"
    assert summary["solver"] == "centralized"
    assert summary["converged"] is True
    assert isinstance(summary["schema"], str) and summary["schema"]
    assert summary["wall_s"] > 0
    assert summary["processes"] >= 1
    assert summary["violations"] == 0
    assert 0.9 < summary["vmin_pu"] <= summary["vmax_pu"] < 1.1
    assert 0 < summary["max_line_loading_pct"] < 100
    assert summary["losses_pct"] >= 0

    # energy balance of the P2P market (losses are not part of it): supply = demand
    e = summary["energy_mwh"]
    supply = e["grid_import"] + e["pv"] + e["wind"] + e["chp"] + e["ev_discharge"]
    demand = e["load"] + e["grid_export"] + e["ev_charge"]
    assert supply == pytest.approx(demand, abs=1e-4)
    assert e["wind"] == 0 and e["ev_charge"] == 0 and e["ev_discharge"] == 0
    assert e["pv"] > 0 and e["chp"] > 0 and e["load"] > 0

    # the same social welfare as the centralized solver called directly
    from common.centralized import solve_p2p
    from common.models import peer_models

    sol = solve_p2p(peer_models(load_scenario(path)))
    assert summary["social_welfare_eur"] == pytest.approx(float(sol.social_welfare_eur.sum()), rel=1e-5, abs=1e-3)


def test_run_centralized_tables(centralized_run):
    _, out, result = centralized_run
    assert result.exit_code == 0, result.output
    dispatch = pd.read_csv(out / "dispatch.csv")
    assert list(dispatch.columns[:6]) == ["peer", "kind", "bus", "hour", "p_mw", "q_mvar"]
    assert len(dispatch) == 5 * 3
    assert set(dispatch["peer"]) == {"grid", "chp1", "pv1", "load1", "load2"}
    by_hour = dispatch.groupby("hour")["p_mw"].sum()
    np.testing.assert_allclose(by_hour.to_numpy(), 0.0, atol=1e-5)  # every hour balances
    loads = dispatch[dispatch["kind"] == "load"]
    assert (loads["p_mw"] < 0).all()
    pv = dispatch[dispatch["peer"] == "pv1"].sort_values("hour")["p_mw"].to_numpy()
    assert np.all(pv >= -1e-6) and np.all(pv <= np.array([0.0, 0.3, 0.5]) + 1e-6)

    trades = pd.read_csv(out / "trades.csv")
    assert list(trades.columns[:5]) == ["seller", "buyer", "hour", "p_mw", "price_eur_per_mwh"]
    assert len(trades) > 0 and (trades["p_mw"] > 0).all()
    assert set(trades["seller"]) <= {"grid", "chp1", "pv1"} and set(trades["buyer"]) <= {"load1", "load2"}
    # what the buyers bought is what they consume
    bought = trades.groupby(["buyer", "hour"])["p_mw"].sum()
    for (buyer, hour), mw in bought.items():
        p = dispatch[(dispatch["peer"] == buyer) & (dispatch["hour"] == hour)]["p_mw"].iloc[0]
        assert mw == pytest.approx(-p, abs=1e-5)
    assert (trades["price_eur_per_mwh"] > 0).all() and (trades["price_eur_per_mwh"] <= 58.0 + 1e-3).all()

    buses = pd.read_csv(out / "buses.csv")
    assert {"bus", "hour", "vm_pu"} <= set(buses.columns)
    assert len(buses) == 33 * 3
    lines = pd.read_csv(out / "lines.csv")
    assert {"line", "hour", "loading_percent"} <= set(lines.columns)
    assert len(lines) > 0


def test_freq_model_without_a_virtual_load_is_refused_before_anything_runs():
    result = CliRunner().invoke(app, ["run", "mv37", "--model", "freq", "--solver", "centralized"])
    assert result.exit_code == 2
    assert "tso" in result.output and "virtual_load" in result.output and "Traceback" not in result.output



def _commands(group, prefix=()):
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):  # a sub-app
            yield from _commands(cmd, prefix + (name,))
        yield prefix + (name,), cmd


def test_every_option_has_help_text_and_the_launchers_own_are_hidden():
    import typer.main

    group = typer.main.get_command(app)
    missing, hidden = [], set()
    for path, cmd in _commands(group):
        for p in cmd.params:
            if getattr(p, "hidden", False):
                hidden.add(p.name)
            elif p.param_type_name == "option" and not (p.help or "").strip():
                missing.append(f"{' '.join(path)} {p.opts[0]}")
    assert missing == []
    assert {"ready_file", "t0", "processes"} <= hidden  # set by the launcher, not by a user


@pytest.mark.parametrize("option,value", [("--rho", "0"), ("--rho", "-1"), ("--tolerance", "0"),
                                          ("--max-iterations", "0"), ("--log-level", "chatty")])
def test_option_bounds_are_the_scenarios(runner, option, value):
    """--rho and --tolerance > 0 and --max-iterations >= 1, as the scenario's market section."""
    r = runner.invoke(app, ["run", "mv37", "--solver", "centralized", option, value])
    assert r.exit_code == 2 and option in r.output


def test_run_centralized_results_keep_their_contract(centralized_run):
    _, out, _ = centralized_run
    from common.report import check_results

    assert check_results(out) == []


def test_a_run_whose_table_breaks_its_contract_fails_naming_the_check(runner, tmp_path, monkeypatch):
    """A deliberate fault (hours counted from 0 in the dispatch) is exit 1 with the broken check
    named, the tables still written for a look."""
    import p2pm.local

    real = p2pm.local.run_centralized

    def faulty(scenario):
        result = real(scenario)
        result.dispatch = result.dispatch.assign(hour=result.dispatch["hour"] - 1)
        return result

    monkeypatch.setattr(p2pm.local, "run_centralized", faulty)
    path = tmp_path / "small.yaml"
    path.write_text(SMALL_P2P)
    r = runner.invoke(app, ["run", str(path), "--solver", "centralized", "--out", str(tmp_path / "out"), "--no-report"])
    assert r.exit_code == 1
    assert "run failed: results tables break their contract:" in r.output
    assert "dispatch.csv: column 'hour' fails greater_than_or_equal_to(1) in 5 row(s) (row 0: 0, row 3: 0, row 6: 0)" \
        in r.output, r.output
    assert (tmp_path / "out" / "dispatch.csv").is_file()


def test_unwritable_out_and_non_finite_timeout_are_refused(tmp_path):
    from p2pm_support import invoke

    a_file = tmp_path / "a-file"
    a_file.write_text("")
    r = invoke("run", "mv37", "--out", a_file, "--no-report")
    assert r.exit_code == 2 and "--out" in r.output and "not a folder" in r.output, r.output
    r = invoke("run", "mv37", "--out", "/proc/p2pm-cannot-write", "--no-report")
    assert r.exit_code == 2 and "--out: cannot write" in r.output, r.output
    r = invoke("run", "mv37", "--timeout-s", "inf", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "--timeout-s" in r.output, r.output


def test_bench_refuses_a_market_too_large_for_its_centralized_comparison(runner, monkeypatch, tmp_path):
    """Before anything starts (no results folder), naming the pairs and the way out."""
    import p2pm.cli

    monkeypatch.setattr(p2pm.cli, "BENCH_MAX_PAIRS", 100)
    result = runner.invoke(app, ["bench", "mv37", "--out", str(tmp_path / "b")])
    _assert_bad_input(result, "mv37", "trading pairs", "at most 100 pairs", "p2pm run", "p2pm experiment")
    assert not (tmp_path / "b").exists()


def test_bench_security_compare_gets_its_pairs_of_runs(runner, monkeypatch, tmp_path):
    """--pairs reaches the CURVE comparison as given (not the market's count of trading pairs)."""
    import p2pm.cli

    seen = {}
    monkeypatch.setattr(p2pm.cli, "_bench_security", lambda *args: seen.setdefault("pairs", args[-1]))
    result = runner.invoke(app, ["bench", "mv37", "--security", "compare", "--pairs", "3",
                                 "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    assert seen == {"pairs": 3}
