"""`p2pm compare RUN_A RUN_B`: the side by side of two results folders (p2pm.compare), on folders
written by common.report from small synthetic runs. Nothing here starts a process."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from common.report import write_results
from p2pm.cli import app
from tests.test_report import _community_result, _p2p_result


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    a = _p2p_result(solver="centralized", messages=pd.DataFrame(columns=["iteration", "type", "count", "bytes"]))
    b = _p2p_result()
    d = b.dispatch.copy()
    moved = (d["peer"] == "L1") & (d["hour"] == 2)
    d.loc[moved, "p_mw"] -= 0.25  # B's load takes 0.25 MW more in hour 2
    b.dispatch = d
    b.trades = b.trades.assign(price_eur_per_mwh=b.trades["price_eur_per_mwh"] + [0, 0, 1.5, 0, 0, 0])
    b.economics = b.economics.assign(social_welfare_eur=[10.0, 22.0, 30.0])
    return write_results(a, root / "a", figures=False), write_results(b, root / "b", figures=False)


def test_compare_prints_and_writes_the_side_by_side(two_runs, tmp_path):
    a, b = two_runs
    result = CliRunner().invoke(app, ["compare", str(a), str(b), "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "social welfare [EUR]" in text and "60.00" in text and "62.00" in text
    assert "dispatch: max |B - A| 2.500e-01 MW (peer L1, hour 2)" in text
    assert "prices (trades): max |B - A| 1.5 EUR/MWh over 6 traded pairs" in text
    assert "update" in text  # messages by type, B only

    j = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert j["social_welfare_rel_diff"] == pytest.approx(2.0 / 60.0)
    assert j["dispatch"]["max_abs_diff_mw"] == pytest.approx(0.25)
    assert j["a_run"]["solver"] == "centralized" and j["b_run"]["solver"] == "admm"
    assert j["summary"]["messages"] == {"a": 0, "b": 12, "b_minus_a": 12}
    hours = pd.read_csv(tmp_path / "cmp" / "compare_hours.csv")
    assert hours["dispatch_max_abs_diff_mw"].round(9).tolist() == [0.0, 0.25, 0.0]
    assert (hours["social_welfare_eur_b"] - hours["social_welfare_eur_a"]).tolist() == [0.0, 2.0, 0.0]
    disp = pd.read_csv(tmp_path / "cmp" / "compare_dispatch.csv")
    assert len(disp) == 9 and list(disp.columns) == ["peer", "hour", "p_mw_a", "p_mw_b", "diff_mw"]
    msgs = pd.read_csv(tmp_path / "cmp" / "compare_messages.csv").set_index("type")
    assert msgs.loc["update", "count_a"] == 0 and msgs.loc["update", "count_b"] == 6


def test_compare_defaults_to_a_folder_inside_run_b(two_runs):
    a, b = two_runs
    result = CliRunner().invoke(app, ["compare", str(a), str(b)])
    assert result.exit_code == 0, result.output
    assert (b / "compare-with-a" / "compare.json").is_file()


def test_compare_community_bus_prices(tmp_path):
    a = write_results(_community_result(), tmp_path / "a", figures=False)
    res = _community_result()
    res.prices = res.prices.assign(price_eur_per_mwh=res.prices["price_eur_per_mwh"] + 0.5)
    b = write_results(res, tmp_path / "b", figures=False)
    result = CliRunner().invoke(app, ["compare", str(a), str(b), "--out", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert "prices (bus prices): max |B - A| 0.5 EUR/MWh" in result.output
    assert "dispatch: max |B - A| 0.000e+00 MW" in result.output


def test_compare_refuses_a_folder_without_summary(two_runs, tmp_path):
    result = CliRunner().invoke(app, ["compare", str(tmp_path), str(two_runs[1])])
    assert result.exit_code == 2
    assert "not a results folder (no summary.json)" in result.output
