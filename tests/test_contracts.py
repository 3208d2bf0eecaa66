"""The contracts of the results folder: summary.json against its pydantic model and published JSON
Schema (`p2pm schema summary`), the CSV tables against their pandera schemas (checked when written,
a broken one reported by table, column and check), and the maps of the report (network, trades)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from common.report import (ResultsContractError, build_summary, check_results, summary_json_schema, write_results)
from common.report.figures import trade_hour, worst_hour
from common.results import ACReport
from p2pm.cli import app
from tests.test_report import _ac, _p2p_result

SCHEMA_FILE = Path(__file__).resolve().parents[1] / "common" / "report" / "summary.schema.json"


def test_the_published_schema_is_the_models():
    """common/report/summary.schema.json (shipped with the package) is what `p2pm schema summary` prints."""
    printed = CliRunner().invoke(app, ["schema", "summary"])
    assert printed.exit_code == 0
    schema = summary_json_schema()
    assert json.loads(printed.output) == schema
    published = json.loads(SCHEMA_FILE.read_text())  # written by the pinned pydantic; others word it differently
    assert published["required"] == schema["required"] and published["properties"].keys() == schema["properties"].keys()
    for key in ("schema", "scenario", "market", "model", "solver", "converged", "iterations", "outer_iterations",
                "wall_s", "social_welfare_eur", "energy_mwh", "violations_initial", "messages", "bytes", "processes"):
        assert key in schema["required"], key
    assert schema["properties"]["schema"]["const"] == "p2pm.run/1"
    assert schema["additionalProperties"] is True  # a run adds more keys


def test_a_summary_that_breaks_the_schema_is_named_field_by_field(tmp_path):
    out = write_results(_p2p_result(), tmp_path / "run", figures=False)
    assert check_results(out) == []
    s = json.loads((out / "summary.json").read_text())
    s.update(messages=-1, market="spot")
    del s["energy_mwh"]["pv"]
    (out / "summary.json").write_text(json.dumps(s))
    r = CliRunner().invoke(app, ["schema", "summary", "--check", str(out)])
    assert r.exit_code == 1
    assert "summary.json: market: Input should be 'p2p' or 'community' (got 'spot')" in r.output
    assert "summary.json: messages: Input should be greater than or equal to 0 (got -1)" in r.output
    assert "summary.json: energy_mwh.pv: Field required" in r.output


def test_build_summary_refuses_what_the_contract_refuses():
    with pytest.raises(ValueError, match="summary.json: solver"):
        build_summary(_p2p_result(solver="gurobi"))


def test_a_faulty_table_is_written_and_reported_by_table_column_and_check(tmp_path):
    res = _p2p_result()
    d = res.dispatch.copy()
    d.loc[d.index[:3], "hour"] = 0  # a deliberate fault: hours counted from 0
    d.loc[d.index[4], "p_mw"] = np.nan
    res.dispatch = d
    res.messages = res.messages.assign(bytes=[300, -5, 900, 1200])
    with pytest.raises(ResultsContractError) as err:
        write_results(res, tmp_path / "bad")
    text = str(err.value)
    assert text.startswith("results tables break their contract:")
    assert "dispatch.csv: column 'hour' fails greater_than_or_equal_to(1) in 3 row(s) (row 0: 0, row 1: 0, row 2: 0)" in text
    assert "dispatch.csv: column 'p_mw' fails not_nullable in 1 row(s) (row 4: nan)" in text
    assert "messages.csv: column 'bytes' fails greater_than_or_equal_to(0) in 1 row(s) (row 1: -5)" in text
    # what the run produced is still there to look at, and the page names the broken checks
    assert (tmp_path / "bad" / "dispatch.csv").is_file()
    assert "Tables that break their contract" in (tmp_path / "bad" / "report.html").read_text()
    failures = check_results(tmp_path / "bad")
    assert any(f.startswith("dispatch.csv: column 'hour'") for f in failures)


def test_a_results_folder_is_checked_by_the_cli(tmp_path):
    out = write_results(_p2p_result(), tmp_path / "good", figures=False)
    r = CliRunner().invoke(app, ["schema", "summary", "--check", str(out)])
    assert r.exit_code == 0 and r.output.strip() == f"{out}: ok"
    tables = CliRunner().invoke(app, ["schema", "tables"])
    assert tables.exit_code == 0 and "dispatch.csv: peer (str)" in tables.output


def _mapped_ac() -> ACReport:
    """The synthetic AC report with the network's drawing: bus 0 (slack) - 1 - 2 and the trafo 0 - 2."""
    ac = _ac(1)
    ac.network_buses = pd.DataFrame({"bus": [0, 1, 2], "x": [0.0, 1.0, 2.0], "y": [0.0, 0.0, -1.0],
                                     "vn_kv": 11.0, "slack": [True, False, False], "source": "tree layout"})
    ac.network_branches = pd.DataFrame({"line": [0, 1, 2], "element": ["line", "line", "line"],
                                        "kind": ["line", "line", "trafo"], "from_bus": [0, 1, 0], "to_bus": [1, 2, 2]})
    return ac


def test_network_map_trade_network_and_heatmap_are_drawn(tmp_path):
    res = _p2p_result(ac=_mapped_ac())
    out = write_results(res, tmp_path / "maps")
    pngs = {p.name for p in (out / "figures").glob("*.png")}
    assert {"network_map.png", "trade_network.png", "dispatch_heatmap.png"} <= pngs
    page = (out / "report.html").read_text()
    assert "could not be drawn" not in page
    assert pd.read_csv(out / "network_branches.csv").columns.tolist() == ["line", "element", "kind", "from_bus", "to_bus"]
    assert check_results(out) == []
    # the worst hour: hour 3 (voltage 0.94 pu under a 0.95 limit: 1.2 x the band; loading 70 %)
    assert worst_hour(res.ac, {"max_loading_percent": 100.0, "vm_min_pu": 0.95, "vm_max_pu": 1.05}) == (3, pytest.approx(1.2))
    assert trade_hour(res) == 2  # 2.0 MW traded in hours 2 and 3: the first


def test_figures_drawn_in_one_process_are_the_same_files(tmp_path):
    from common.report.figures import render_figures

    res = _p2p_result(ac=_mapped_ac())
    two = render_figures(res, tmp_path / "two", workers=2)
    one = render_figures(res, tmp_path / "one", workers=1)
    assert [f["name"] for f in two] == [f["name"] for f in one]
    assert all("png" in f for f in two)


def test_tree_layout_places_a_feeder_from_the_slack():
    from dso_service.layout import tree_layout

    # 0 - 1 - 2 - 3 and 1 - 4: depth is x, the leaves 3 and 4 on separate rows, bus 1 between them
    xy = tree_layout([0, 1, 2, 3, 4], [0, 1, 2, 1], [1, 2, 3, 4], root=0)
    assert xy[:, 0].tolist() == [0, 1, 2, 3, 2]
    assert xy[3, 1] != xy[4, 1] and min(xy[3, 1], xy[4, 1]) <= xy[1, 1] <= max(xy[3, 1], xy[4, 1])


def test_every_peer_kind_a_scenario_accepts_passes_the_dispatch_contract():
    """The dispatch table's contract knows every kind of peer the scenario schema accepts."""
    from typing import get_args

    from common.report.tables import PEER_KINDS
    from common.scenario import Peer

    accepted = {kind for cls in get_args(get_args(Peer)[0]) for kind in get_args(cls.model_fields["kind"].annotation)}
    assert "prosumer" in accepted and len(accepted) >= 8
    assert accepted <= set(PEER_KINDS)
