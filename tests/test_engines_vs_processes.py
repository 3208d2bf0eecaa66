"""One engine set, two drivers: the clearing over real processes and sockets gives the residual
history of the in-process driver (to 1e-9), in the relay and mesh topologies and in the community
market."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from common.scenario import load_scenario
from p2pm.local import run_in_process

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("scenario, topology, iterations", [("mv37", "relay", 100), ("mv37", "mesh", 30),
                                                            ("ieee33-ev", "relay", 30)])
def test_processes_and_in_process_driver_agree(tmp_path, scenario, topology, iterations):
    limit = ["--max-iterations", str(iterations)]
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "p2pm", "run", scenario, "--topology", topology, "--peers-per-process",
                        "10", "--out", str(out), "--quiet", "--no-report", "--no-pool-price", *limit],
                       capture_output=True, text=True,
                       timeout=300)
    assert r.returncode in (0, 1), r.stderr  # 1: stopped at the iteration limit, results written
    over_sockets = pd.read_csv(out / "admm_history.csv")
    sc = load_scenario(scenario, max_iterations=iterations, pool_price_start=False)
    result, driver = run_in_process(sc, topology=topology, peers_per_process=10)
    in_process = result.admm_history
    assert len(over_sockets) == len(in_process) == iterations
    np.testing.assert_allclose(over_sockets[["primal_residual", "dual_residual", "rho"]].to_numpy(),
                               in_process[["primal_residual", "dual_residual", "rho"]].to_numpy(), rtol=1e-9, atol=1e-12)
    # and the same messages: every message type and count per iteration as counted on the sockets
    msgs = pd.read_csv(out / "messages.csv").groupby("type")["count"].sum()
    assert msgs.to_dict() == result.messages.groupby("type")["count"].sum().to_dict()
