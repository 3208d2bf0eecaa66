"""The community market cleared by real processes (peers, coordinator, the DSO's network agent)
against the centralized SOCP of the same scenario; a network agent that fails ends the run naming
it (every role's engine in this process: the failure path over real processes is the exhausted
flexibility of test_outer_loop)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pandapower as pp
import pytest
import yaml

from common.engine import RunFailed
from common.scenario import load_scenario
from p2pm.local import run_in_process
from p2pm_support import assert_no_private_data


def feeder(path: Path) -> Path:
    """A 4-bus 12.66 kV radial feeder: 0 (slack) - 1 - 2, 1 - 3."""
    net = pp.create_empty_network(sn_mva=10)
    buses = [pp.create_bus(net, vn_kv=12.66, name=f"bus {i}") for i in range(4)]
    pp.create_ext_grid(net, buses[0], vm_pu=1.0)
    for a, b, km in ((0, 1, 1.0), (1, 2, 1.5), (1, 3, 0.8)):
        pp.create_line_from_parameters(net, buses[a], buses[b], length_km=km, r_ohm_per_km=0.4, x_ohm_per_km=0.35,
                                       c_nf_per_km=0.0, max_i_ka=0.2)
    pp.to_json(net, str(path))
    return path


def community(path: Path, network: Path, vm_min_pu: float = 0.95) -> Path:
    H = 6
    doc = {
        "name": "tiny-community",
        "network": {"file": str(network), "vm_min_pu": vm_min_pu},
        "market": {"kind": "community", "hours": H, "rho": 100.0, "tolerance": 1e-4, "max_iterations": 3000,
                   "residual_balancing": False},
        "peers": [
            {"id": "grid", "kind": "grid", "bus": 0, "p_import_max_mw": 5, "p_export_max_mw": 2,
             "import_price_eur_per_mwh": [120, 110, 100, 140, 180, 160], "export_price_eur_per_mwh": 40},
            {"id": "load2", "kind": "load", "bus": 2, "p_base_mw": [0.6, 0.5, 0.5, 0.7, 0.9, 0.8], "flex_fraction": 0.1,
             "price_at_min_eur_per_mwh": 200, "price_at_max_eur_per_mwh": 100},
            {"id": "load3", "kind": "load", "bus": 3, "p_base_mw": [0.4, 0.4, 0.3, 0.5, 0.6, 0.5], "flex_fraction": 0.1,
             "price_at_min_eur_per_mwh": 200, "price_at_max_eur_per_mwh": 100},
            {"id": "pv3", "kind": "pv", "bus": 3, "p_forecast_mw": [0.0, 0.2, 0.4, 0.3, 0.0, 0.0], "cost_a_eur_per_mw2h": 1.0},
            {"id": "ev2", "kind": "ev", "bus": 2, "capacity_mwh": 0.05, "soc_initial_mwh": 0.03, "soc_min_mwh": 0.01,
             "soc_departure_mwh": 0.04, "soc_final_mwh": 0.02, "trip_energy_mwh": 0.01, "p_charge_max_mw": 0.0074,
             "p_discharge_max_mw": 0.0074, "arrival_hour": 4, "departure_hour": 3, "degradation_eur_per_mwh": 5},
            {"id": "ev3", "kind": "ev", "bus": 3, "capacity_mwh": 0.04, "soc_initial_mwh": 0.03, "soc_min_mwh": 0.008,
             "soc_departure_mwh": 0.035, "trip_energy_mwh": 0.012, "p_charge_max_mw": 0.0037,
             "p_discharge_max_mw": 0.0037, "arrival_hour": 5, "departure_hour": 3, "degradation_eur_per_mwh": 5},
        ],
    }
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.e2e
def test_community_admm_processes_match_the_centralized_socp(tmp_path, admm_and_centralized):
    scen = community(tmp_path / "c.yaml", feeder(tmp_path / "feeder.json"))
    # 5 peers (the grid is the network agent's root exchange) in 3 processes: one hosts both EVs
    admm, central, sa, sc = admm_and_centralized(scen, "--peers-per-process", "2")
    assert sa["converged"] and sa["market"] == "community" and sa["processes"] == 3 + 3
    assert abs(sa["social_welfare_eur"] - sc["social_welfare_eur"]) <= 1e-3 * abs(sc["social_welfare_eur"])
    da = pd.read_csv(admm / "dispatch.csv").set_index(["peer", "hour"])["p_mw"]
    dc = pd.read_csv(central / "dispatch.csv").set_index(["peer", "hour"])["p_mw"]
    assert np.abs(da - dc.loc[da.index]).max() < 1e-3
    # bus prices of the network agent against the centralized nodal prices
    pa = pd.read_csv(admm / "prices.csv").set_index(["bus", "hour"])["price_eur_per_mwh"]
    pc = pd.read_csv(central / "prices.csv").set_index(["bus", "hour"])["price_eur_per_mwh"]
    assert np.abs(pa - pc.loc[pa.index]).max() < 0.05
    # EV state of charge within bounds, departure energy met
    soc = pd.read_csv(admm / "ev_soc.csv").pivot(index="peer", columns="hour", values="soc_mwh")
    assert soc.loc["ev2"].min() >= 0.01 - 1e-6 and soc.loc["ev2"].max() <= 0.05 + 1e-6
    assert soc.loc["ev2", 2] >= 0.04 - 1e-6  # departs at the start of hour 3
    assert soc.loc["ev3", 2] >= 0.035 - 1e-6 and soc.loc["ev3"].min() >= 0.008 - 1e-6
    assert sa["messages"] > 0 and "network_update" in set(pd.read_csv(admm / "messages.csv")["type"])
    for p in admm.glob("logs/*.log"):
        assert "Traceback" not in p.read_text(), p
    # no peer's private data (costs, utilities, EV batteries) in the results folder
    assert_no_private_data(admm, scen, tmp_path)


def test_failing_network_agent_ends_the_run_with_a_clear_error(tmp_path):
    # the root is held at 1.0 pu, so a lower voltage limit above it makes every SOCP infeasible
    scen = community(tmp_path / "c.yaml", feeder(tmp_path / "feeder.json"), vm_min_pu=1.001)
    with pytest.raises(RunFailed) as info:
        run_in_process(load_scenario(scen))
    assert info.value.role == "dso"
    assert "iteration 1" in info.value.reason and "network agent" in info.value.reason
    assert "infeasible" in info.value.reason and "Traceback" not in info.value.reason
