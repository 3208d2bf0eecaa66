"""Scenario files (common.scenario): the built-ins load, and bad scenarios are refused with a
ScenarioError whose one-line message names the offending field."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import yaml

from common.models import peer_models
from common.scenario import BUILTIN_DIR, ScenarioError, builtin_names, load_scenario, parse_scenario

BUILTIN = BUILTIN_DIR / "ieee33-ev.yaml"


@pytest.fixture(scope="module")
def raw_builtin() -> dict:
    return yaml.safe_load(BUILTIN.read_text())


@pytest.fixture
def raw(raw_builtin) -> dict:
    """A fresh, mutable copy of the built-in ieee33-ev scenario as plain data."""
    return copy.deepcopy(raw_builtin)


def _index(raw: dict, kind: str) -> int:
    return next(i for i, p in enumerate(raw["peers"]) if p["kind"] == kind)


def _refused(raw: dict, *fragments: str) -> str:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(raw, source="bad.yaml")
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert msg.startswith("bad.yaml: "), msg
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    return msg


def _chp(**kw) -> dict:
    return {"id": "chp1", "kind": "chp", "bus": 5, "p_min_mw": 0.1, "p_max_mw": 0.5, "cost_b_eur_per_mwh": 80.0, **kw}


# ----------------------------------------------------------------------------------------------
# built-ins
# ----------------------------------------------------------------------------------------------


def test_ieee33_ev_loads():
    sc = load_scenario("ieee33-ev")
    assert sc.name == "ieee33-ev"
    assert sc.network.name == "case33bw"
    assert sc.market.kind == "community" and sc.market.hours == 24
    kinds = [p.kind for p in sc.peers]
    assert kinds.count("grid") == 1 and kinds.count("load") == 32 and kinds.count("pv") == 10 and kinds.count("ev") == 20
    assert len({p.id for p in sc.peers}) == len(sc.peers)
    assert all(0 <= p.bus < 33 for p in sc.peers)
    # every hourly value resolves to 24 finite numbers
    grid = sc.peer("grid")
    price = sc.hourly(grid, "import_price_eur_per_mwh")
    assert price.shape == (24,) and np.all(np.isfinite(price)) and np.all(price > 0)
    load1 = sc.peer("load1")
    np.testing.assert_allclose(sc.hourly(load1, "p_base_mw"), 0.1 * np.asarray(sc.series["load_btn_c_pu"]))
    models = peer_models(sc)
    assert len(models) == len(sc.peers)
    for m in models:
        if m.kind != "ev":
            assert np.all(m.p_min_mw <= m.p_max_mw)
    assert "ieee33-ev" in builtin_names()


def test_mv37_loads():
    if not (BUILTIN_DIR / "mv37.yaml").exists():
        pytest.skip("built-in scenario mv37 not there yet")
    sc = load_scenario("mv37")
    assert sc.network.name == "mv37"
    assert all(0 <= p.bus < 38 for p in sc.peers)
    assert len(peer_models(sc)) == len(sc.peers)


def test_builtin_round_trip_through_parse(raw):
    sc = parse_scenario(raw)
    assert sc == load_scenario("ieee33-ev")


def test_market_overrides(tmp_path):
    sc = load_scenario("ieee33-ev", rho=5.0, tolerance=None, max_iterations=7)
    assert sc.market.rho == 5.0 and sc.market.max_iterations == 7
    assert sc.market.tolerance == load_scenario("ieee33-ev").market.tolerance  # None: not overridden
    with pytest.raises(ScenarioError, match="rho"):
        load_scenario("ieee33-ev", rho=-1.0)


# ----------------------------------------------------------------------------------------------
# bad scenarios
# ----------------------------------------------------------------------------------------------


def test_unknown_bus(raw):
    raw["peers"][1]["bus"] = 99
    _refused(raw, "bus", "load1", "99")


def test_negative_bus(raw):
    raw["peers"][1]["bus"] = -1
    _refused(raw, "bus")


def test_negative_capacity_grid_import(raw):
    raw["peers"][_index(raw, "grid")]["p_import_max_mw"] = -1
    _refused(raw, "p_import_max_mw")


def test_negative_capacity_chp(raw):
    raw["peers"].append(_chp(p_min_mw=0.0, p_max_mw=-0.5))
    _refused(raw, "p_max_mw")


def test_negative_ev_capacity(raw):
    raw["peers"][_index(raw, "ev")]["capacity_mwh"] = -0.05
    _refused(raw, "capacity_mwh")


def test_chp_min_above_max(raw):
    raw["peers"].append(_chp(p_min_mw=0.6, p_max_mw=0.5))
    _refused(raw, "p_min_mw", "p_max_mw")


def test_peer_list_of_wrong_length(raw):
    i = _index(raw, "pv")
    raw["peers"][i]["p_forecast_mw"] = [0.1] * 23
    _refused(raw, "p_forecast_mw", raw["peers"][i]["id"], "23", "24")


def test_named_series_of_wrong_length(raw):
    raw["series"]["pv_ren_pu"] = raw["series"]["pv_ren_pu"][:23]
    _refused(raw, "series.pv_ren_pu", "23", "24")


def test_named_series_longer_than_the_market(raw):
    raw["market"]["hours"] = 12
    _refused(raw, "series.", "24", "12")


def test_unknown_peer_kind(raw):
    raw["peers"][1]["kind"] = "battery"
    _refused(raw, "peers", "kind", "battery")


def test_price_referencing_unknown_series(raw):
    raw["peers"][_index(raw, "grid")]["import_price_eur_per_mwh"] = {"series": "no_such_series"}
    _refused(raw, "import_price_eur_per_mwh", "no_such_series")


def test_grid_without_import_price(raw):
    raw["peers"][_index(raw, "grid")].pop("import_price_eur_per_mwh")
    _refused(raw, "import_price_eur_per_mwh", "missing")


def test_duplicate_peer_id(raw):
    raw["peers"][2]["id"] = raw["peers"][1]["id"]
    _refused(raw, "id", raw["peers"][1]["id"], "another peer")


def test_unknown_top_level_field(raw):
    raw["solver_options"] = {"x": 1}
    _refused(raw, "solver_options", "unknown field")


def test_unknown_peer_field(raw):
    raw["peers"][1]["p_base_kw"] = 1.0
    _refused(raw, "p_base_kw", "unknown field")


def test_missing_section(raw):
    raw.pop("market")
    _refused(raw, "market", "missing")


def test_ev_departure_energy_unreachable(raw):
    i = _index(raw, "ev")
    raw["peers"][i]["p_charge_max_mw"] = 0.0001
    _refused(raw, "soc_departure_mwh", raw["peers"][i]["id"], "cannot be reached")


def test_ev_energy_above_capacity(raw):
    i = _index(raw, "ev")
    raw["peers"][i]["soc_departure_mwh"] = raw["peers"][i]["capacity_mwh"] * 2
    _refused(raw, "soc_departure_mwh", "capacity_mwh")


def test_ev_in_a_p2p_market(raw):
    raw["market"]["kind"] = "p2p"
    _refused(raw, "kind", "community")


@pytest.mark.parametrize("side", ["producer", "consumer"])
def test_p2p_market_with_one_side_empty(raw, side):
    # full P2P market: producers trade with consumers only, so without the other side a peer
    # would have no partner at all
    raw["market"]["kind"] = "p2p"
    producer_kinds = ("pv", "wind", "chp", "grid")
    keep = (lambda p: p["kind"] not in producer_kinds) if side == "producer" else (lambda p: p["kind"] in producer_kinds)
    raw["peers"] = [p for p in raw["peers"] if p["kind"] != "ev" and keep(p)]
    for p in raw["peers"]:
        if p["kind"] == "grid":  # a supplier that may export buys too (a two-way peer): here it may not
            p["p_export_max_mw"] = 0.0
    assert len(raw["peers"]) >= 2
    msg = _refused(raw, "peers", f"no {side}", "p2p")
    other = "consumer" if side == "producer" else "producer"
    assert f"the {other}s have no one to trade with" in msg


def test_community_market_with_consumers_only_is_accepted(raw):
    raw["peers"] = [p for p in raw["peers"] if p["kind"] in ("load", "grid")]  # the grid is the network agent's
    assert parse_scenario(raw).market.kind == "community"

def test_two_grid_peers(raw):
    extra = copy.deepcopy(raw["peers"][_index(raw, "grid")])
    extra["id"] = "grid2"
    raw["peers"].append(extra)
    _refused(raw, "peers", "grid")


def test_unknown_network(raw):
    raw["network"] = {"name": "case9999"}
    _refused(raw, "network", "case9999")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_in_named_series(raw, bad):
    raw["series"]["pv_ren_pu"][10] = bad
    _refused(raw, "series", "pv_ren_pu")


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_in_peer_list(raw, bad):
    i = _index(raw, "pv")
    raw["peers"][i]["p_forecast_mw"] = [0.1] * 23 + [bad]
    _refused(raw, "p_forecast_mw")


def test_non_finite_series_scale(raw):
    raw["peers"][_index(raw, "pv")]["p_forecast_mw"]["scale"] = math.inf
    _refused(raw, "p_forecast_mw")


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_scalar(raw, bad):
    raw["peers"].append(_chp(cost_b_eur_per_mwh=bad))
    _refused(raw, "cost_b_eur_per_mwh")


def test_non_finite_hourly_constant(raw):
    raw["peers"][_index(raw, "grid")]["export_price_eur_per_mwh"] = math.nan
    _refused(raw, "export_price_eur_per_mwh")


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------

SMALL_YAML = """\
name: small
network: {name: case33bw, line_max_i_ka: 0.5}
market: {kind: p2p, hours: 3}
series:
  price: [50.0, 60.0, 70.0]
peers:
  - {id: grid, kind: grid, bus: 0, p_import_max_mw: 5.0, import_price_eur_per_mwh: {series: price, scale: 1.0}}
  - {id: pv1, kind: pv, bus: 10, p_forecast_mw: [0.0, 0.3, 0.5], cost_a_eur_per_mw2h: 1.0}
  - {id: load1, kind: load, bus: 3, p_base_mw: 0.4}
"""

SMALL_TOML = """\
name = "small"

[network]
name = "case33bw"
line_max_i_ka = 0.5

[market]
kind = "p2p"
hours = 3

[series]
price = [50.0, 60.0, 70.0]

[[peers]]
id = "grid"
kind = "grid"
bus = 0
p_import_max_mw = 5.0
import_price_eur_per_mwh = { series = "price", scale = 1.0 }

[[peers]]
id = "pv1"
kind = "pv"
bus = 10
p_forecast_mw = [0.0, 0.3, 0.5]
cost_a_eur_per_mw2h = 1.0

[[peers]]
id = "load1"
kind = "load"
bus = 3
p_base_mw = 0.4
"""


@pytest.mark.parametrize("suffix, text", [(".yaml", SMALL_YAML), (".toml", SMALL_TOML)])
def test_load_scenario_from_file(tmp_path, suffix, text):
    path = tmp_path / f"small{suffix}"
    path.write_text(text)
    sc = load_scenario(path)
    assert sc.name == "small" and sc.market.kind == "p2p" and sc.market.hours == 3
    assert [p.id for p in sc.peers] == ["grid", "pv1", "load1"]
    np.testing.assert_allclose(sc.hourly(sc.peer("grid"), "import_price_eur_per_mwh"), [50.0, 60.0, 70.0])
    np.testing.assert_allclose(sc.hourly(sc.peer("load1"), "p_base_mw"), [0.4, 0.4, 0.4])
    # also by its name as a string
    assert load_scenario(str(path)) == sc


def test_yaml_and_toml_give_the_same_scenario(tmp_path):
    (tmp_path / "a.yaml").write_text(SMALL_YAML)
    (tmp_path / "a.toml").write_text(SMALL_TOML)
    assert load_scenario(tmp_path / "a.yaml") == load_scenario(tmp_path / "a.toml")


@pytest.mark.parametrize("suffix, text, fragment", [
    (".yaml", SMALL_YAML.replace("bus: 10", "bus: 99"), "pv1"),
    (".toml", SMALL_TOML.replace("bus = 10", "bus = 99"), "pv1"),
    (".yaml", SMALL_YAML.replace("[0.0, 0.3, 0.5]", "[0.0, 0.3]"), "p_forecast_mw"),
    (".toml", SMALL_TOML.replace('kind = "pv"', 'kind = "battery"'), "battery"),
])
def test_bad_file_is_refused_naming_the_field(tmp_path, suffix, text, fragment):
    path = tmp_path / f"bad{suffix}"
    path.write_text(text)
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and fragment in msg, msg


@pytest.mark.parametrize("suffix, text, fragment", [
    (".yaml", "name: [unclosed\n", "cannot be read"),
    (".toml", "name = \n", "cannot be read"),
    (".yaml", "- just\n- a list\n", "mapping"),
])
def test_unreadable_file(tmp_path, suffix, text, fragment):
    path = tmp_path / f"broken{suffix}"
    path.write_text(text)
    with pytest.raises(ScenarioError, match=fragment) as info:
        load_scenario(path)
    assert "\n" not in str(info.value)


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(ScenarioError, match="not found"):
        load_scenario(tmp_path / "nope.yaml")
    with pytest.raises(ScenarioError, match="unknown scenario") as info:
        load_scenario("no-such-builtin")
    assert "ieee33-ev" in str(info.value)


# ----------------------------------------------------------------------------------------------
# bad input that used to slip through: refused before any process starts, naming the field
# ----------------------------------------------------------------------------------------------


def test_negative_forecast_and_base_load(raw):
    pv = copy.deepcopy(raw)
    pv["peers"][_index(pv, "pv")]["p_forecast_mw"] = -0.1
    _refused(pv, "p_forecast_mw", "negative")
    load = copy.deepcopy(raw)
    load["peers"][_index(load, "load")]["p_base_mw"] = -0.2
    _refused(load, "p_base_mw", "negative")


def test_absurd_capacity(raw):
    raw["peers"][_index(raw, "grid")]["p_import_max_mw"] = 1e308
    _refused(raw, "p_import_max_mw", "beyond")


@pytest.mark.parametrize("content, fragment", [
    (bytes(range(256)) * 4, "not a UTF-8 text file"),
    (("a: " + "[" * 10000 + "]" * 10000).encode(), "nested too deeply"),
])
def test_binary_and_deeply_nested_files(tmp_path, content, fragment):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(ScenarioError, match=fragment):
        load_scenario(path)
