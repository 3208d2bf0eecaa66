"""Experiments (p2pm.experiment): the file is refused naming the field before anything runs, an
interrupted experiment resumes and skips finished cells, the in-process grid gives the same
message counts every time, and (e2e) the same message counts, bytes and iterations as real
processes."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from p2pm.cli import app
from p2pm.experiment import ExperimentError, cells, load_experiment, run_experiment

TINY = """\
name: tiny
description: three hours of a small P2P market on the IEEE 33-bus feeder
network: {name: case33bw, line_max_i_ka: 0.5}
market: {kind: p2p, hours: 3, rho: 30.0, tolerance: 1.0e-4, max_iterations: 1000, price_init_eur_per_mwh: 30.0}
peers:
  - {id: grid, kind: grid, bus: 0, p_import_max_mw: 5.0, import_price_eur_per_mwh: 58.0}
  - {id: chp1, kind: chp, bus: 5, p_min_mw: 0.0, p_max_mw: 0.4, cost_a_eur_per_mw2h: 20.0, cost_b_eur_per_mwh: 40.0}
  - {id: pv1, kind: pv, bus: 10, p_forecast_mw: [0.0, 0.3, 0.5], cost_a_eur_per_mw2h: 1.0, cost_b_eur_per_mwh: 4.0}
  - {id: load1, kind: load, bus: 3, p_base_mw: 0.4}
  - {id: load2, kind: load, bus: 20, p_base_mw: [0.3, 0.5, 0.6], flex_fraction: 0.2}
"""


def _files(tmp_path, driver="in-process", extra="", variants="[plain, pool-price]", ppp="[2]"):
    sc = tmp_path / "tiny.yaml"
    sc.write_text(TINY)
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"""\
name: tiny-grid
driver: {driver}
scenarios:
  - file: {sc}
topologies: [relay, mesh]
variants: {variants}
peers_per_process: {ppp}
{extra}""")
    return exp


@pytest.mark.parametrize("change, field", [
    ("topologies: [relay, ring]", "topologies.1"),
    ("variants: [fast]", "variants.0"),
    ("repetitions: 0", "repetitions"),
    ("peers_per_process: [0]", "peers_per_process"),
    ("network: [{latency_ms: -1}]", "network.0.latency_ms"),
    ("network: [{jitter: 2}]", "network.0.jitter"),
    ("network: [{links: {peer-to-peer: {latency_ms: 5}}}]", "network.0.links"),
    ("colour: blue", "colour: unknown field"),
    ("scenarios: [{family: nowhere, peers: [10]}]", "family: unknown feeder 'nowhere'"),
    ("scenarios: [{family: mv37}]", "peers: a family needs at least one size"),
    ("staleness: 0", "staleness"),
    ("partners: {rule: k_nearest}", "partners: k"),
    ("rho: -1", "rho"),
])
def test_a_bad_experiment_file_is_refused_naming_the_field(tmp_path, change, field):
    path = tmp_path / "bad.yaml"
    base = {"name": "x", "scenarios": "[{family: mv37, peers: [10]}]"}
    key = change.split(":")[0]
    lines = [f"{k}: {v}" for k, v in base.items() if k != key] + [change]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ExperimentError, match=field.replace("[", r"\[").replace(".", r"\.")):
        load_experiment(path)
    result = CliRunner().invoke(app, ["experiment", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert field.split(":")[0] in result.output
    assert not (tmp_path / "out").exists()  # nothing ran


def test_the_builtin_experiments_are_valid_and_acceleration_on_mesh_is_skipped():
    for name in ("scaling", "latency", "smoke", "partners", "latency-async"):
        exp = load_experiment(name)
        assert cells(exp)
    grid = cells(load_experiment("latency-async").model_copy(update={"topologies": ["relay", "mesh"]}))
    assert {c.topology for c in grid if c.skip} == {"relay"}
    assert {c.variant for c in grid if c.skip} == {"asynchronous"}
    exp = load_experiment("scaling")
    assert len(cells(exp)) == 16
    grid = cells(exp.model_copy(update={"variants": ["accelerated"]}))
    assert {c.topology for c in grid if c.skip} == {"mesh"}
    assert all(c.skip is None for c in grid if c.topology == "relay")


def test_resume_after_interruption_skips_finished_cells(tmp_path, monkeypatch):
    """The runner's bookkeeping with a stand-in for the runs: an interruption (Ctrl-C) in the third
    cell leaves two finished cells and a half-written folder; the next run skips the two and runs the
    other two again; a third run does nothing."""
    import p2pm.experiment as experiment

    exp = load_experiment(_files(tmp_path, variants="[pool-price]", ppp="[1, 2]"))
    out = tmp_path / "out"
    ran = []

    def fake_run_cell(exp, cell, rep, out, on_iteration=None):
        folder = out / "cells" / cell.id / f"rep{rep}"
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        ran.append(cell.id)
        if len(ran) == 3 and interrupt:
            (folder / "partial.txt").write_text("half a run")
            raise KeyboardInterrupt
        row = {c: None for c in experiment.COLUMNS}
        row.update(experiment=exp.name, cell=cell.id, rep=rep, status="ok", peers=5, topology=cell.topology,
                   variant=cell.variant, network=cell.network_label, driver=exp.driver, converged=True)
        (folder / "row.json").write_text(json.dumps(row))
        return row

    monkeypatch.setattr(experiment, "run_cell", fake_run_cell)
    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        run_experiment(exp, out, quiet=True, report=False)
    assert len(list(out.glob("cells/*/rep0/row.json"))) == 2
    first_two = list(ran[:2])
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("cells/*/rep0/row.json")}
    interrupt, ran[:] = False, []
    rows, counts = run_experiment(exp, out, quiet=True, report=False)
    assert counts == {"cells": 4, "resumed": 2, "ran": 2, "skipped": 0, "failed": 0}
    assert not set(ran) & set(first_two) and len(rows) == 4
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())  # finished cells untouched
    assert not list(out.glob("cells/*/rep0/partial.txt"))
    assert len(pd.read_csv(out / "results.csv")) == 4
    parquet = pd.read_parquet(out / "results.parquet")  # the same table (pyarrow: the experiments extra)
    pd.testing.assert_frame_equal(parquet.reset_index(drop=True), pd.read_csv(out / "results.csv"), check_dtype=False)
    ran[:] = []
    _, counts = run_experiment(exp, out, quiet=True, report=False)
    assert counts["ran"] == 0 and counts["resumed"] == 4 and not ran


def test_in_process_message_counts_are_exact_and_latency_only_moves_the_clock(tmp_path, networks_built_once):
    """The synchronous rounds send the same messages whatever the latency (relay and mesh); the
    simulated clock grows with it; the table has the traffic per type and per link and the report
    its figures."""
    exp = load_experiment(_files(tmp_path, variants="[pool-price]", extra="network: [{latency_ms: 0}, "
                                                                          "{latency_ms: 20, jitter: 0.2}]\n"))
    out = tmp_path / "a"
    rows, counts = run_experiment(exp, out, quiet=True, report=True)
    assert counts["ran"] == 4 and counts["failed"] == 0, [r["reason"] for r in rows]
    df = pd.DataFrame(rows).set_index(["topology", "network"])
    for topo in ("relay", "mesh"):
        zero, lat = df.loc[(topo, "0ms")], df.loc[(topo, "20ms-j0.2")]
        assert zero["converged"] and lat["converged"]
        assert zero["messages"] == lat["messages"] and zero["rounds"] == lat["rounds"]
        assert zero["sim_time_s"] == 0.0
        # at least two 20 ms (x 0.8) hops per round (price rounds and ADMM iterations)
        assert lat["sim_time_s"] >= 2 * 0.016 * lat["rounds"]
        assert lat["welfare_rel_error"] < 1e-6
    assert df.loc[("relay", "0ms")]["rounds"] == df.loc[("mesh", "0ms")]["rounds"]
    table = pd.read_csv(out / "results.csv")
    for col in ("messages_round", "bytes_round", "messages_peer-coordinator", "bytes_coordinator-peer"):
        assert (table[col] > 0).all(), col
    assert (table[table["topology"] == "mesh"]["messages_peer-peer"] > 0).all()
    assert (table[table["topology"] == "relay"]["messages_peer-peer"] == 0).all()
    assert (out / "report.html").exists() and (out / "figures" / "latency.png").exists()


@pytest.mark.e2e
def test_in_process_and_real_processes_send_the_same_messages(tmp_path):
    """The same small grid with real processes and on the in-process driver: the same iterations,
    the same message count of every type, and the same bytes of every ADMM message."""
    exp = load_experiment(_files(tmp_path, driver="processes"))
    real, _ = run_experiment(exp, tmp_path / "real", quiet=True, report=False)
    inproc, _ = run_experiment(exp.model_copy(update={"driver": "in-process"}), tmp_path / "inproc", quiet=True,
                               report=False)
    assert [r["status"] for r in real] == ["ok"] * 4, [r["reason"] for r in real]
    for a, b in zip(real, inproc):
        assert a["cell"] == b["cell"]
        assert a["iterations"] == b["iterations"] and a["rounds"] == b["rounds"]
        assert a["messages"] == b["messages"], a["cell"]
        for key in a:
            if key.startswith("messages_"):
                assert a[key] == b.get(key, 0), (a["cell"], key)
        for t in ("round", "update", "trades", "residuals", "price_probe", "quantity_sum", "pool_price",
                  "pool_quantity", "dispatch"):
            assert a.get(f"bytes_{t}") == b.get(f"bytes_{t}"), (a["cell"], t)


@pytest.mark.e2e
def test_injected_latency_with_real_processes_keeps_the_messages(tmp_path):
    """Every role's shell holds its messages for the link's latency (P2PM_NETWORK): the run still
    converges, with the same messages as without latency, and nothing is left held at shutdown."""
    exp = load_experiment(_files(tmp_path, driver="processes", variants="[pool-price]",
                                 extra="network: [{latency_ms: 0}, {latency_ms: 10, jitter: 0.2, "
                                       "links: {peer-peer: {latency_ms: 5, bandwidth_mbit_s: 100}}}]\n"))
    rows, counts = run_experiment(exp, tmp_path / "out", quiet=True, report=False)
    assert counts["failed"] == 0, [r["reason"] for r in rows]
    df = pd.DataFrame(rows).set_index(["topology", "network"])
    for topo in ("relay", "mesh"):
        zero = df.loc[(topo, "0ms")]
        lat = df.loc[[i for i in df.index if i[0] == topo and i[1] != "0ms"][0]]
        assert lat["converged"] and lat["messages"] == zero["messages"] and lat["rounds"] == zero["rounds"]
        assert lat["welfare_rel_error"] < 1e-6


@pytest.mark.slow
def test_asynchronous_variant_converges_in_process_under_jitter(tmp_path):
    """The variant asynchronous (mesh, market.staleness) on the in-process driver: converged, the
    centralized welfare, sooner on the simulated clock than the synchronous mesh; relay skipped."""
    exp = load_experiment(_files(tmp_path, variants="[plain, asynchronous]", ppp="[1]",
                                 extra="staleness: 1\nmax_iterations: 3000\nnetwork: [{latency_ms: 5, jitter: 0.2}]\n"))
    rows, counts = run_experiment(exp, tmp_path / "out", quiet=True, report=False)
    by = {(r["topology"], r["variant"]): r for r in rows}
    assert by[("relay", "asynchronous")]["status"] == "skipped"
    a, s = by[("mesh", "asynchronous")], by[("mesh", "plain")]
    assert a["status"] == "ok" and a["converged"], a["reason"]
    assert a["welfare_rel_error"] < 1e-4 and s["welfare_rel_error"] < 1e-4  # residuals within tolerance 1e-4 MW
    assert a["messages_round"] == 2 * a["peer_processes"]  # one ROUND to start, one to stop
    assert a["sim_time_s"] < s["sim_time_s"]


def test_the_parquet_table_takes_columns_of_mixed_values(tmp_path):
    """A column with numbers in some rows and text in others (a failed cell's error) is written as
    text, numbers with blanks as numbers: results.parquet is written whatever the cells hold."""
    from p2pm.experiment import _typed_columns

    df = pd.DataFrame({"iterations": [12, None], "error": [None, "timeout"], "mixed": [1.5, "n/a"]})
    _typed_columns(df).to_parquet(tmp_path / "t.parquet", index=False)
    back = pd.read_parquet(tmp_path / "t.parquet")
    assert back["iterations"].tolist()[0] == 12 and pd.isna(back["iterations"][1])
    assert back["error"].tolist() == [None, "timeout"] and back["mixed"].tolist() == ["1.5", "n/a"]
