"""Market modelling (issue 14): product differentiation as data, prosumers, open demand, a supplier
that exports, voltage-controlled generators in the AC check, infeasibility named early, and the
trade listing threshold. Hand-computed small cases; distributed (engines in process) against the
centralized solve."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from common.centralized import solve_p2p
from common.models import HourlyPeer, load_utility_coefficients, peer_models
from common.scenario import ScenarioError, parse_scenario
from p2pm.local import clear_market
from p2pm_support import invoke, run_cli

H = 4


# -- a small network whose distances and PTDFs are known by hand ---------------------------------
#
#   bus 0 (slack) --2 km-- bus 1 --3 km-- bus 2
#        \
#         --1 km-- bus 3
@pytest.fixture(scope="module")
def tiny_net(tmp_path_factory) -> Path:
    import pandapower as pp

    net = pp.create_empty_network()
    for b in range(4):
        pp.create_bus(net, vn_kv=10.0, index=b, zone="north" if b in (1, 2) else "south")
    pp.create_ext_grid(net, 0)
    for f, t, km in ((0, 1, 2.0), (1, 2, 3.0), (0, 3, 1.0)):
        pp.create_line_from_parameters(net, f, t, length_km=km, r_ohm_per_km=0.2, x_ohm_per_km=0.3, c_nf_per_km=0.0,
                                       max_i_ka=0.4)
    path = tmp_path_factory.mktemp("net") / "tiny.json"
    pp.to_json(net, str(path))
    return path


def _tiny_raw(net_path: Path, differentiation: dict | None = None) -> dict:
    raw = {
        "name": "tiny", "network": {"file": str(net_path)}, "market": {"kind": "p2p", "hours": 2},
        "peers": [
            {"id": "gen2", "kind": "chp", "bus": 2, "p_min_mw": 0.0, "p_max_mw": 1.0, "cost_a_eur_per_mw2h": 10.0,
             "cost_b_eur_per_mwh": 20.0},
            {"id": "pv3", "kind": "pv", "bus": 3, "p_forecast_mw": 0.5},
            {"id": "load1", "kind": "load", "bus": 1, "p_base_mw": 0.4},
            {"id": "load3", "kind": "load", "bus": 3, "p_base_mw": 0.3},
        ],
    }
    if differentiation is not None:
        raw["differentiation"] = differentiation
    return raw


def _fees(net_path, **spec) -> dict:
    sc = parse_scenario(_tiny_raw(net_path, spec))
    models = peer_models(sc)
    return {m.id: m.trade_weights for m in models}


# gamma by hand for the four peers' buses (2, 3, 1, 3); the trades are producer <-> consumer:
#   gen2-load1: buses 2-1, gen2-load3: buses 2-3, pv3-load1: buses 3-1, pv3-load3: buses 3-3
@pytest.mark.parametrize("spec, gamma", [
    # a unique fee
    (dict(method="unique"), {("gen2", "load1"): 1, ("gen2", "load3"): 1, ("pv3", "load1"): 1, ("pv3", "load3"): 1}),
    # straight-line distance from given coordinates [km]: bus 1 (0, 0), 2 (3, 4), 3 (6, 8)
    (dict(method="distance", bus_coordinates_km={0: [0, 0], 1: [0, 0], 2: [3, 4], 3: [6, 8]}),
     {("gen2", "load1"): 5, ("gen2", "load3"): 5, ("pv3", "load1"): 10, ("pv3", "load3"): 0}),
    # along the lines: 2-1 3 km, 2-3 3 + 2 + 1 = 6 km, 3-1 1 + 2 = 3 km
    (dict(method="network_distance"), {("gen2", "load1"): 3, ("gen2", "load3"): 6, ("pv3", "load1"): 3, ("pv3", "load3"): 0}),
    # zones from the network's buses: north (1, 2), south (0, 3)
    (dict(method="zonal", zone_gamma=[{"zones": ["north", "south"], "gamma": 4.0}], intra_zone_gamma=0.5),
     {("gen2", "load1"): 0.5, ("gen2", "load3"): 4, ("pv3", "load1"): 4, ("pv3", "load3"): 0.5}),
    # zones given per peer
    (dict(method="zonal", zones={"gen2": "a", "pv3": "b", "load1": "a", "load3": "a"},
          zone_gamma=[{"zones": ["a", "b"], "gamma": 2.0}]),
     {("gen2", "load1"): 0, ("gen2", "load3"): 0, ("pv3", "load1"): 2, ("pv3", "load3"): 2}),
    # given as a matrix (the absent reverse entry mirrors) and as pairs
    (dict(method="given", gamma={"load1": {"gen2": 7.0}, "gen2": {"load3": 1.5}}),
     {("gen2", "load1"): 7, ("gen2", "load3"): 1.5, ("pv3", "load1"): 0, ("pv3", "load3"): 0}),
    (dict(method="given", gamma=[{"peers": ["pv3", "load1"], "gamma": 2.5}]),
     {("gen2", "load1"): 0, ("gen2", "load3"): 0, ("pv3", "load1"): 2.5, ("pv3", "load3"): 0}),
    # PTDF network usage on a radial network: |PTDF(l, b) - PTDF(l, b')| is 1 on the lines of the
    # path and 0 elsewhere, so gamma counts the lines (weight none) or adds their lengths
    (dict(method="network_usage"), {("gen2", "load1"): 1, ("gen2", "load3"): 3, ("pv3", "load1"): 2, ("pv3", "load3"): 0}),
    (dict(method="network_usage", ptdf_weight="length_km"),
     {("gen2", "load1"): 3, ("gen2", "load3"): 6, ("pv3", "load1"): 3, ("pv3", "load3"): 0}),
])
def test_weight_recipe_matches_the_hand_computed_gamma(tiny_net, spec, gamma):
    c = 2.0
    fees = _fees(tiny_net, c_eur_per_mwh=c, side="buyer", **spec)
    for (seller, buyer), g in gamma.items():
        # the buyer pays c gamma per MWh: its trade p_nm < 0 carries w = -c gamma (w p_nm >= 0)
        assert fees[buyer].get(seller, 0.0) == pytest.approx(-c * g, abs=1e-9), (seller, buyer)
        assert fees[seller].get(buyer, 0.0) == 0.0


def test_fees_on_the_seller_or_shared_and_a_peer_own_c(tiny_net):
    spec = dict(method="network_distance", c_eur_per_mwh=2.0, c_by_peer_eur_per_mwh={"gen2": 1.0})
    seller = _fees(tiny_net, side="seller", **spec)
    assert seller["gen2"] == pytest.approx({"load1": 1.0 * 3, "load3": 1.0 * 6})  # w > 0 on a sale: fee c_n gamma
    assert seller["pv3"] == pytest.approx({"load1": 2.0 * 3})
    assert not seller["load1"] and not seller["load3"]
    shared = _fees(tiny_net, side="shared", **spec)
    assert shared["gen2"]["load3"] == pytest.approx(0.5 * 1.0 * 6)
    assert shared["load3"]["gen2"] == pytest.approx(-0.5 * 2.0 * 6)


def test_fees_stay_in_the_private_files_and_clear_alike(tiny_net):
    from common.public import split_scenario
    from p2pm.local import run_centralized, run_in_process

    sc = parse_scenario(_tiny_raw(tiny_net, dict(method="network_distance", c_eur_per_mwh=3.0, side="shared")))
    public, private = split_scenario(sc)
    assert "differentiation" not in public.dump() and "trade_weights" not in str(public.dump())
    # shared: each side pays half of c gamma; load3 (bus 3) buys from gen2 (bus 2, 6 km) and pv3 (same bus)
    assert private["load3"]["trade_weights_eur_per_mwh"] == pytest.approx({"gen2": -0.5 * 3.0 * 6})
    assert private["gen2"]["trade_weights_eur_per_mwh"] == pytest.approx({"load1": 0.5 * 3.0 * 3, "load3": 0.5 * 3.0 * 6})
    ref = run_centralized(sc)
    res, _ = run_in_process(sc)
    p_ref = ref.dispatch.pivot(index="peer", columns="hour", values="p_mw")
    p_dis = res.dispatch.pivot(index="peer", columns="hour", values="p_mw")
    assert float((p_ref - p_dis).abs().max().max()) < 1e-3
    diff_ref, diff = ref.economics["differentiation_cost_eur"].sum(), res.economics["differentiation_cost_eur"].sum()
    assert diff_ref > 0 and diff == pytest.approx(diff_ref, rel=1e-4)
    # fees per trade: both sides' columns, adding up to the total
    for r in (ref, res):
        assert {"fee_seller_eur", "fee_buyer_eur"} <= set(r.trades.columns)
        listed = r.trades[["fee_seller_eur", "fee_buyer_eur"]].to_numpy().sum()
        assert listed == pytest.approx(r.economics["differentiation_cost_eur"].sum(), rel=1e-3)


def test_unknown_peer_or_missing_coordinates_refused(tiny_net):
    with pytest.raises(ScenarioError, match="differentiation: unknown peer"):
        parse_scenario(_tiny_raw(tiny_net, dict(method="given", gamma={"nobody": {"gen2": 1.0}})))
    with pytest.raises(ScenarioError, match="coordinates"):
        parse_scenario(_tiny_raw(tiny_net, dict(method="distance")))


# -- prosumers, open demand, a supplier that exports ------------------------------------------------
def _two_way_market() -> list[HourlyPeer]:
    a, b = load_utility_coefficients(np.full(H, 1.0), np.full(H, 3.0), 50.0, 5.0)
    return [
        HourlyPeer("chp", "chp", 1, np.zeros(H), np.array([3.0, 1.0, 4.0, 0.5]), np.full(H, 1.0), np.full(H, 10.0), 0.0),
        HourlyPeer("load", "load", 1, -np.full(H, 3.0), -np.full(H, 1.0), a, b, 0.3),
        # prosumers: one cost curve, injection between -2 and 2 MW (-1 and 1.5)
        HourlyPeer("pros0", "prosumer", 1, np.full(H, -2.0), np.full(H, 2.0), np.full(H, 2.0),
                   np.array([5.0, 40.0, 0.0, 60.0]), 0.0),
        HourlyPeer("pros1", "prosumer", 1, np.full(H, -1.0), np.full(H, 1.5), np.full(H, 3.0),
                   np.array([20.0, 10.0, 30.0, 0.0]), 0.0),
        # the supplier imports at 58 and exports (buys) at 20 EUR/MWh
        HourlyPeer("grid", "grid", 0, np.full(H, -2.0), np.full(H, 5.0), np.zeros(H), np.full(H, 58.0), 0.0,
                   cost_b_neg_eur_per_mwh=np.full(H, 20.0)),
    ]


@pytest.mark.parametrize("topology, pool, hour_stopping", [("relay", False, False), ("relay", True, False),
                                                           ("mesh", False, False), ("mesh", False, True)])
def test_prosumers_buy_in_some_hours_and_sell_in_others(topology, pool, hour_stopping):
    peers = _two_way_market()
    ref = solve_p2p(peers)
    out, coordinator, _ = clear_market(peers, pool_price_start=pool, topology=topology, tolerance=1e-6,
                                       hour_stopping=hour_stopping)
    cleared = out.clearings[-1]
    assert cleared.converged
    assert np.abs(cleared.p_mw - ref.p_mw).max() < 1e-3
    sw_ref = ref.social_welfare_eur.sum()
    assert abs(cleared.sw_eur.sum() - sw_ref) <= 1e-6 * abs(sw_ref) + 1e-3
    ids = [p.id for p in peers]
    for pid in ("pros0", "pros1"):
        p = cleared.p_mw[ids.index(pid)]
        assert p.max() > 0.1 and p.min() < -0.1, (pid, p)  # sells in some hours, buys in others
    # the supplier exports (buys at its export price, 20 EUR/MWh) in hours 1 and 3, when the market is long
    g = cleared.p_mw[ids.index("grid")]
    assert g[0] == pytest.approx(-2.0, abs=1e-3) and g[2] == pytest.approx(-2.0, abs=1e-3)
    assert np.all(g <= 1e-3)  # and never imports at 58
    # a prosumer trades with the other prosumer in both directions over the day
    from common.clearing import trades_frame

    tf = trades_frame(coordinator.graph, cleared.trades_mw, cleared.prices_eur_per_mwh, 1e-3)
    assert {"pros0", "pros1"} <= set(tf["seller"]) and {"pros0", "pros1"} <= set(tf["buyer"])


def test_prosumer_in_the_community_market():
    from common.centralized import solve_community
    from common.grid import GridModel
    from p2pm.local import clear_community

    Hc = 6
    base = 0.3 + 0.1 * np.sin(np.arange(Hc))
    a, b = load_utility_coefficients(0.9 * base, 1.1 * base, 150.0, 40.0)
    peers = [HourlyPeer("load2", "load", 2, -1.1 * base, -0.9 * base, a, b, 0.3),
             HourlyPeer("pv1", "pv", 1, np.zeros(Hc), 0.2 * np.ones(Hc), np.full(Hc, 1.0), np.full(Hc, 4.0), 0.0)]
    grid = GridModel(n_bus=3, root=0, base_mva=1.0, base_kv=np.full(3, 12.66), from_bus=[0, 1], to_bus=[1, 2],
                     r_pu=[0.02, 0.03], x_pu=[0.015, 0.02], s_max_pu=[np.inf, np.inf], branch_kind=("line",) * 2,
                     branch_name=("l01", "l12"), vm_min_pu=0.95, vm_max_pu=1.05)
    pros = HourlyPeer("pros2", "prosumer", 2, np.full(Hc, -0.2), np.full(Hc, 0.2), np.full(Hc, 400.0),
                      np.full(Hc, 100.0), 0.0)
    models = [*peers, pros]
    price = np.where(np.arange(Hc) % 2 == 0, 60.0, 160.0)  # cheap and dear hours
    ref = solve_community(models, grid, price, 0.5 * price, 10.0, 10.0)
    from dso_service.network_agent import NetworkAgent

    agent = NetworkAgent(grid, [m.bus for m in models], [m.tan_phi if getattr(m, "kind", "") == "load" else 0.0
                                                         for m in models], price, 0.5 * price, 10.0, 10.0)
    out, _, _, _ = clear_community(models, agent, price, 0.5 * price, 10.0, 10.0, rho=100.0)
    p = out.clearings[-1].p_mw[-1]
    assert np.abs(p - ref.p_mw[-1]).max() < 1e-3
    assert p.max() > 0.05 and p.min() < -0.05  # sells in the dear hours, buys in the cheap ones


def test_zero_minimum_load(tmp_path):
    raw = {"name": "open", "network": {"name": "case33bw", "line_max_i_ka": 0.5},
           "market": {"kind": "p2p", "hours": 3},
           "peers": [{"id": "grid", "kind": "grid", "bus": 0, "p_import_max_mw": 5, "import_price_eur_per_mwh": [10, 58, 58]},
                     {"id": "pv", "kind": "pv", "bus": 4, "p_forecast_mw": [0.0, 0.3, 0.0]},
                     {"id": "flex1", "kind": "load", "bus": 3, "p_base_mw": 0.4, "flex_fraction": 1.0,
                      "price_at_min_eur_per_mwh": 50.0},
                     {"id": "heat", "kind": "load", "bus": 5, "d_min_mw": 0.0, "d_max_mw": [0.5, 0.5, 0.2],
                      "price_at_min_eur_per_mwh": 40.0, "price_at_max_eur_per_mwh": 0.0}]}
    sc = parse_scenario(raw)
    models = {m.id: m for m in peer_models(sc)}
    assert np.all(models["flex1"].p_max_mw == 0.0) and np.allclose(models["flex1"].p_min_mw, -0.8)
    assert np.all(models["heat"].p_max_mw == 0.0) and np.allclose(models["heat"].p_min_mw, [-0.5, -0.5, -0.2])
    ref = solve_p2p(list(models.values()))
    out, _, _ = clear_market(list(models.values()))
    p = out.clearings[-1].p_mw
    assert np.abs(p - ref.p_mw).max() < 1e-3
    heat = list(models).index("heat")
    assert p[heat, 2] == pytest.approx(0.0, abs=1e-4)  # at 58 EUR/MWh the heat pump (40 at most) buys nothing
    assert p[heat, 0] < -0.3  # cheap import: it buys
    with pytest.raises(ScenarioError, match="d_min_mw and d_max_mw"):
        bad = copy.deepcopy(raw)
        del bad["peers"][3]["d_max_mw"]
        parse_scenario(bad)


# -- infeasibility named early ---------------------------------------------------------------------------
INFEASIBLE = """\
name: short-hour
network: {name: case33bw, line_max_i_ka: 0.5}
market: {kind: p2p, hours: 3}
peers:
  - {id: grid, kind: grid, bus: 0, p_import_max_mw: 0.5, import_price_eur_per_mwh: 58.0}
  - {id: pv1, kind: pv, bus: 10, p_forecast_mw: [0.5, 0.0, 0.5]}
  - {id: load1, kind: load, bus: 3, p_base_mw: [0.5, 1.0, 0.6], flex_fraction: 0.0}
"""


def test_infeasible_hour_refused_with_exit_2_naming_it(tmp_path):
    path = tmp_path / "short.yaml"
    path.write_text(INFEASIBLE)
    result = invoke("run", path, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "hour(s) 2:" in result.output and "minimum consumption exceeds the maximum supply" in result.output
    assert not (tmp_path / "out").exists()


def test_too_much_must_run_supply_refused():
    raw = yaml.safe_load(INFEASIBLE)
    raw["peers"].append({"id": "chp", "kind": "chp", "bus": 5, "p_min_mw": 2.0, "p_max_mw": 3.0, "cost_b_eur_per_mwh": 30.0})
    with pytest.raises(ScenarioError, match=r"hour\(s\) 1, 2, 3: minimum supply exceeds the maximum consumption"):
        parse_scenario(raw)


def _short_market() -> list[HourlyPeer]:
    a, b = load_utility_coefficients(np.full(H, 1.0), np.full(H, 3.0), 50.0, 5.0)
    return [HourlyPeer("g0", "chp", 1, np.zeros(H), np.array([3.0, 1.0, 4.0, 2.5]), np.full(H, 1.0), np.full(H, 10.0), 0.0),
            HourlyPeer("g1", "chp", 1, np.zeros(H), np.array([1.0, 1.0, 1.0, 0.2]), np.full(H, 2.0), np.full(H, 12.0), 0.0),
            HourlyPeer("l0", "load", 1, -np.full(H, 3.0), -np.array([1.0, 2.5, 1.0, 2.9]), a, b, 0.3),
            HourlyPeer("l1", "load", 1, -np.full(H, 3.0), -np.array([1.0, 0.5, 1.0, 0.3]), a, b, 0.3)]


@pytest.mark.parametrize("topology, hour_stopping", [("relay", False), ("mesh", False), ("mesh", True)])
def test_admm_names_the_infeasible_hours(topology, hour_stopping):
    from common.engine import RunFailed

    # hours 2 and 4: the loads' minimum exceeds the producers' maximum (no scenario check here)
    with pytest.raises(RunFailed, match=r"infeasible in hour\(s\) 2, 4: after \d+ ADMM iterations"):
        clear_market(_short_market(), pool_price_start=False, topology=topology, hour_stopping=hour_stopping)
    # the price rounds see it too: no price balances those hours
    with pytest.raises(RunFailed, match=r"infeasible in hour\(s\) 2, 4: the price rounds found no balancing price"):
        clear_market(_short_market(), pool_price_start=True, topology=topology)


COMMUNITY_THIN_LINE = """\
name: community-thin-line
description: the far-end load cannot be served through 50 A lines in hours 3 and 4
network: {name: case33bw, line_max_i_ka: 0.05}
market: {kind: community, hours: 4, rho: 100.0, residual_balancing: false, price_init_eur_per_mwh: 100.0}
peers:
  - {id: grid, kind: grid, bus: 0, p_import_max_mw: 10.0, import_price_eur_per_mwh: 100.0}
  - {id: load17, kind: load, bus: 17, p_base_mw: [0.4, 0.5, 1.5, 1.6], flex_fraction: 0.2,
     price_at_min_eur_per_mwh: 300.0, price_at_max_eur_per_mwh: 120.0}
  - {id: load5, kind: load, bus: 5, p_base_mw: 0.2, flex_fraction: 0.2, price_at_min_eur_per_mwh: 300.0,
     price_at_max_eur_per_mwh: 120.0}
  - {id: pv10, kind: pv, bus: 10, p_forecast_mw: [0.0, 0.1, 0.0, 0.0]}
"""


@pytest.mark.e2e
def test_admm_detected_infeasibility_ends_with_exit_1_naming_the_hours(tmp_path):
    path = tmp_path / "thin.yaml"
    path.write_text(COMMUNITY_THIN_LINE)
    proc = run_cli("run", path, "--out", tmp_path / "out", "--quiet", "--no-report", timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    text = proc.stdout + proc.stderr
    assert "the market is infeasible in hour(s) 3, 4" in text, text
    assert "did not converge" not in text


def test_feasible_plateau_is_not_called_infeasible():
    from common.admm import InfeasibilityWatch

    watch = InfeasibilityWatch(1e-4)
    # a residual stuck at 0.015 MW for 200 iterations at rho 100 (the prices move 1.5 EUR/MWh per
    # iteration: 300 EUR/MWh in all) is a plateau, not an infeasibility
    assert not any(watch.observe(0.015, 1e-6, 100.0) for _ in range(300))
    watch = InfeasibilityWatch(1e-4)
    fired = [k for k in range(300) if watch.observe(0.9, 1e-6, 100.0)]
    assert fired and fired[0] < 120


# -- trades listed above the threshold ------------------------------------------------------------------
def test_trades_listed_only_above_ten_times_the_tolerance():
    from common.clearing import trade_threshold_mw, trades_frame
    from common.market import trade_graph

    peers = _two_way_market()[:2]
    graph = trade_graph(peers)
    trades = np.array([[0.5, 2e-4, 5e-6, 0.0], [-0.5, -2e-4, -5e-6, 0.0]])
    thr = trade_threshold_mw(1e-4)
    assert thr == pytest.approx(1e-3)
    tf = trades_frame(graph, trades, np.full(trades.shape, 30.0), thr)
    assert tf["hour"].tolist() == [1] and tf["seller"].tolist() == ["chp"]


# -- voltage-controlled generators in the AC check ----------------------------------------------------------
def test_pv_bus_power_flow_reproduces_case39():
    import pandapower as pp

    from common.networks import build_network
    from common.scenario import NetworkSpec
    from dso_service.powerflow import run_ac

    spec = NetworkSpec(name="case39", vm_min_pu=0.9, vm_max_pu=1.1)
    net = build_network(spec)
    ref = copy.deepcopy(net)
    pp.runpp(ref, numba=False)
    rows = [(f"G{i}", "chp", int(g.bus), 1, float(g.p_mw), 0.0) for i, g in net.gen.iterrows()]
    rows += [(f"L{i}", "load", int(ld.bus), 1, -float(ld.p_mw), -float(ld.q_mvar)) for i, ld in net.load.iterrows()]
    rows.append(("grid", "grid", int(net.ext_grid.bus.iloc[0]), 1, 0.0, 0.0))
    dispatch = pd.DataFrame(rows, columns=["peer", "kind", "bus", "hour", "p_mw", "q_mvar"])
    setpoints = {f"G{i}": float(g.vm_pu) for i, g in net.gen.iterrows()}
    ac = run_ac(net, dispatch, spec, setpoints)
    assert bool(ac.hours["converged"].iloc[0])
    vm = ac.buses.sort_values("bus")["vm_pu"].to_numpy()
    assert np.abs(vm - ref.res_bus["vm_pu"].to_numpy()).max() < 1e-6  # the case's own power flow
    gen_bus = net.gen["bus"].to_numpy()
    assert np.allclose(vm[gen_bus], net.gen["vm_pu"].to_numpy(), atol=1e-8)  # PV buses hold their voltage
    assert ac.hours["slack_p_mw"].iloc[0] == pytest.approx(float(ref.res_ext_grid["p_mw"].sum()), abs=1e-4)
    # the same dispatch with every generator a fixed-Q injection has no power-flow solution
    assert not bool(run_ac(net, dispatch, spec).hours["converged"].iloc[0])


def test_vm_pu_reaches_the_public_roster():
    from common.public import split_scenario, voltage_setpoints
    from common.scenario import load_scenario

    public, private = split_scenario(load_scenario("case39-p2p"))
    sp = voltage_setpoints(public.roster)
    assert len(sp) == 9 and sp["G_bus29"] == pytest.approx(1.0499)
    assert len(public.roster) == 31
    assert all("vm_pu" not in p for p in private.values())
