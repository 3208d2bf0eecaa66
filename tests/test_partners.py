"""Restricted trading partners (``market.partners``, ``common.partners``): the trade graph of the
rules, the same graph everywhere (coordinator, centralized solve, results), the distributed
clearing of a restricted market equal to the centralized solve of the same market (relay and mesh
in process; mesh with real processes), and bad sections refused naming the field."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from common.centralized import solve_p2p
from common.market import trade_graph
from common.models import peer_models
from common.partners import eligible_pairs, public_graph, scenario_graph
from common.public import load_public, split_scenario
from common.scenario import PartnersSpec, ScenarioError, load_scenario
from engines.conftest import small_p2p
from p2pm.local import clear_market, market_public
from p2pm_support import invoke, run_cli, small_market


def _restricted(path, **partners):
    doc = yaml.safe_load(path.read_text())
    doc["market"]["partners"] = partners
    path.write_text(yaml.safe_dump(doc))
    return path


def _pairs(graph) -> set[tuple[str, str]]:
    return {(graph.peer_ids[n], graph.peer_ids[m]) for n, m in zip(graph.owner, graph.partner)}


def test_k_nearest_graph(tmp_path):
    """Each load's one choice is its nearest producer; the graph travels in the public file as
    explicit lists (the coordinator builds it without the network)."""
    sc = load_scenario(_restricted(small_market(tmp_path / "s.yaml", 3), rule="k_nearest", k=1))
    g, full = scenario_graph(sc), trade_graph(peer_models(sc))
    pairs = _pairs(g)
    assert pairs < _pairs(full)  # fewer pairs, all of the full market
    assert all((m, n) in pairs for n, m in pairs)  # reciprocal
    deg = np.bincount(g.owner, minlength=len(g.peer_ids))
    assert deg.min() >= 1
    # the supplier is a hub: it keeps every partner of the full market
    grid = g.peer_ids.index("grid")
    assert deg[grid] == np.bincount(full.owner)[grid]
    # each load's one choice is its nearest producer (along the lines of case33bw)
    from common.partners import _distances

    from common.networks import build_network

    buses = np.array([p.bus for p in sc.peers])
    dist = _distances("network", sc.network, buses, build_network(sc.network))
    ids = [p.id for p in sc.peers]
    from common.models import PRODUCER_KINDS

    producers = [i for i, p in enumerate(sc.peers) if p.kind in PRODUCER_KINDS]  # the supplier too
    for i, p in enumerate(sc.peers):
        if p.kind == "load":
            nearest = producers[int(np.argmin(dist[i, producers]))]
            assert (p.id, ids[nearest]) in pairs
    public, _ = split_scenario(sc)
    assert public.market.partners.rule == "explicit"
    path = tmp_path / "public.json"
    path.write_text(json.dumps(public.dump()))
    assert _pairs(public_graph(load_public(path))) == pairs


def test_same_feeder_graph(tmp_path):
    from common.networks import build_network
    from common.partners import bus_feeders

    sc = load_scenario(_restricted(small_market(tmp_path / "s.yaml", 4), rule="same_feeder"))
    feeder = bus_feeders(build_network(sc.network))
    assert len({f for f in feeder.values() if f >= 0}) >= 2  # case33bw branches below its first buses
    g = scenario_graph(sc)
    bus = {p.id: p.bus for p in sc.peers}
    for a, b in _pairs(g):
        if "grid" not in (a, b):
            fa, fb = feeder[bus[a]], feeder[bus[b]]
            assert fa == fb or fa < 0 or fb < 0


def test_explicit_lists_and_the_public_file(tmp_path):
    scen = _restricted(small_market(tmp_path / "s.yaml", 3), rule="explicit", hubs=[],
                       lists={"load0": ["chp1", "grid"], "load1": ["pv1"], "load2": ["wind1", "grid"]})
    sc = load_scenario(scen)
    g = scenario_graph(sc)
    assert _pairs(g) == {(a, b) for a, b in [("load0", "chp1"), ("load0", "grid"), ("load1", "pv1"), ("load2", "wind1"),
                                             ("load2", "grid")]} | {(b, a) for a, b in [
        ("load0", "chp1"), ("load0", "grid"), ("load1", "pv1"), ("load2", "wind1"), ("load2", "grid")]}


@pytest.mark.parametrize("topology", ["relay", "mesh"])
def test_restricted_market_clears_to_the_centralized_optimum_in_process(topology):
    peers = small_p2p(4, seed=5)
    spec = PartnersSpec(rule="explicit", lists={"l0": ["g0", "g1"], "l1": ["g1"]})
    public = market_public(peers, partners=spec)
    graph = public_graph(public)
    assert graph.n_pairs == 6  # g0-l1 cannot trade
    ref = solve_p2p(peers, graph=graph)
    full = solve_p2p(peers)
    assert abs(ref.social_welfare_eur.sum() - full.social_welfare_eur.sum()) > 1e-3  # the restriction matters
    outcome, coordinator, _ = clear_market(peers, rho=1.0, tolerance=1e-6, pool_price_start=False, topology=topology,
                                           peers_per_process=2, max_iterations=20000, partners=spec)
    c = outcome.clearings[-1]
    assert c.converged and c.trades_mw.shape == (6, 4)
    np.testing.assert_allclose(c.p_mw, ref.p_mw, atol=1e-4)
    assert abs(c.sw_eur.sum() - ref.social_welfare_eur.sum()) <= 1e-6 * abs(ref.social_welfare_eur.sum())
    np.testing.assert_allclose(c.trades_mw, ref.trades_mw, atol=1e-4)


@pytest.mark.parametrize("partners, field", [
    (dict(rule="k_nearest"), "market.partners: k"),
    (dict(rule="k_nearest", k=0), "market.partners.k"),
    (dict(rule="same_feeder", k=3), "market.partners: k"),
    (dict(rule="explicit"), "market.partners: lists"),
    (dict(rule="explicit", lists={"nobody": ["grid"]}), "market.partners.lists.nobody"),
    (dict(rule="explicit", lists={"load0": ["load1"]}), "market.partners.lists.load0"),
    (dict(rule="explicit", lists={"load0": ["chp1"]}, hubs=[]), "market.partners: peer(s)"),
    (dict(rule="k_nearest", k=2, hubs=["ghost"]), "market.partners.hubs"),
    (dict(rule="nearest"), "market.partners.rule"),
    (dict(rule="k_nearest", k=2, distance="far"), "market.partners.distance"),
])
def test_bad_partners_are_refused_naming_the_field(tmp_path, partners, field):
    scen = _restricted(small_market(tmp_path / "s.yaml", 3), **partners)
    with pytest.raises(ScenarioError) as err:
        load_scenario(scen)
    assert field in str(err.value), str(err.value)


def test_bad_partners_exit_2_before_any_process(tmp_path):
    scen = _restricted(small_market(tmp_path / "s.yaml", 3), rule="explicit", lists={"load0": ["load1"]})
    r = invoke("run", scen, "--out", tmp_path / "out", "--quiet")
    assert r.exit_code == 2 and "market.partners.lists.load0" in r.output
    assert not (tmp_path / "out").exists()


def test_partners_only_in_the_p2p_market(tmp_path):
    doc = yaml.safe_load(small_market(tmp_path / "s.yaml", 3).read_text())
    doc["market"].update(kind="community", partners={"rule": "k_nearest", "k": 2})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ScenarioError, match="market.partners"):
        load_scenario(tmp_path / "c.yaml")


def test_eligible_pairs_are_the_full_market():
    e = eligible_pairs([True, False, False], [False, False, True])
    assert e.tolist() == [[False, True, True], [True, False, True], [True, True, False]]


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_restricted_market_with_processes_matches_the_centralized_solve(tmp_path):
    scen = _restricted(small_market(tmp_path / "s.yaml", 15, hours=3), rule="k_nearest", k=2)
    sc = load_scenario(scen)
    g = scenario_graph(sc)
    assert g.n_pairs < trade_graph(peer_models(sc)).n_pairs
    ref = solve_p2p(peer_models(sc), graph=g)
    out = tmp_path / "out"
    proc = run_cli("run", scen, "--topology", "mesh", "--out", out, "--quiet", "--no-report", "--peers-per-process", 3)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["converged"] is True
    sw_ref = ref.social_welfare_eur.sum()
    assert abs(summary["social_welfare_eur"] - sw_ref) <= 1e-5 * abs(sw_ref)  # residuals within 1e-5 MW
    disp = pd.read_csv(out / "dispatch.csv").pivot(index="peer", columns="hour", values="p_mw").loc[list(g.peer_ids)]
    assert np.abs(disp.to_numpy() - ref.p_mw).max() < 1e-3
    trades = pd.read_csv(out / "trades.csv")
    assert set(zip(trades["seller"], trades["buyer"])) <= _pairs(g)
