"""Checkpoint and resume with real processes (end to end): the coordinator of a running clearing
is killed (SIGKILL) after a checkpoint; `p2pm resume RESULTS` goes on from it, started by the local
launcher (every role again) or by hand (the coordinator again, then the other roles again as the
lab or the orchestrator would), and ends at the optimum of the whole market."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from p2pm_support import (
    P2PM,
    alive,
    descendants,
    fault_env,
    free_port,
    small_market,
    split,
    stop_run,
    wait_for,
)

from common.centralized import solve_p2p
from common.models import peer_models
from common.scenario import load_scenario

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

CHECKPOINT = r"checkpoint: iteration (\d+) written"


def _wait_for(path: Path, pattern: str, timeout_s: float, proc: subprocess.Popen | None = None) -> re.Match:
    return wait_for(path, pattern, time.monotonic() + timeout_s, proc)


def _optimum(scen: Path) -> float:
    return float(solve_p2p(peer_models(load_scenario(scen))).social_welfare_eur.sum())


def _coordinator_pid(log: Path) -> int:
    return int(re.search(r"coordinator pid (\d+)", log.read_text()).group(1))


class _ByHand:
    """A small market's roles started by hand (without CURVE), each logging to ``logs/<name>.log``;
    ``close()`` kills what is still running."""

    def __init__(self, tmp_path: Path, seed: int):
        self.scenario = small_market(tmp_path / "small.yaml", seed, hours=3, pool_price_start=False)
        self.public, self.private = split(self.scenario, tmp_path / "split")
        self.address, self.out, self.logs = f"tcp://127.0.0.1:{free_port()}", tmp_path / "out", tmp_path / "logs"
        self.logs.mkdir()
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *args) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "a") as f:
            self.procs[name] = subprocess.Popen([*P2PM, *map(str, args), "--insecure"], stdout=f, stderr=f,
                                                env=fault_env())
        return self.procs[name]

    def service(self, name: str, svc: str, *extra) -> subprocess.Popen:
        return self.start(name, svc, "--scenario", self.public, "--coordinator", self.address, *extra)

    def peer_host(self, name: str, host: str, peer_ids: list[str]) -> subprocess.Popen:
        return self.start(name, "peer", "--coordinator", self.address, "--host-id", host,
                          *[a for pid in peer_ids for a in ("--model", self.private[pid])])

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)


def test_a_run_whose_coordinator_was_killed_resumes_from_its_checkpoint_to_the_optimum(tmp_path):
    scen = small_market(tmp_path / "small.yaml", 15, hours=3)
    out = tmp_path / "out"
    proc = subprocess.Popen([*P2PM, "run", str(scen), "--out", str(out), "--quiet", "--no-report", "--no-pool-price",
                             "--tolerance", "1e-7", "--checkpoint-every", "10", "--timeout-s", "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=fault_env(),
                            start_new_session=True)
    log = out / "logs" / "coordinator.log"
    try:
        _wait_for(log, r"checkpoint: iteration 20 written", 90, proc)
        pids = descendants(proc.pid)
        os.kill(_coordinator_pid(log), signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        stop_run(proc)
    assert proc.returncode == 1 and "the coordinator exited with code -9" in err, err
    time.sleep(0.5)
    assert [p for p in pids if alive(p)] == []
    written = int(re.findall(CHECKPOINT, log.read_text())[-1])
    assert (out / "checkpoint" / "state.npz").is_file() and not (out / "summary.json").exists()

    resumed = subprocess.run([*P2PM, "resume", str(out)], capture_output=True, text=True, env=fault_env(), timeout=150)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"from iteration {written}" in resumed.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["converged"] and s["resumed_from"]["iteration"] == written and s["iterations"] > written
    assert abs(s["social_welfare_eur"] - _optimum(scen)) <= 1e-6 * abs(_optimum(scen))
    assert (out / "logs-interrupted-1" / "coordinator.log").is_file()  # the interrupted run's logs are kept
    assert not (out / "checkpoint").exists()  # the run ended: nothing left to resume
    again = subprocess.run([*P2PM, "resume", str(out)], capture_output=True, text=True, env=fault_env(), timeout=60)
    assert again.returncode == 2 and "does not exist" in again.stderr


def test_a_coordinator_started_by_hand_resumes_and_the_roles_started_again_finish_the_run(tmp_path):
    roles = _ByHand(tmp_path, 16)
    procs, logs, out = roles.procs, roles.logs, roles.out

    def others(tag: str):
        for svc in ("dso", "tso"):
            roles.service(f"{svc}{tag}", svc, "--timeout-s", "10")
        ids = sorted(roles.private)
        for host, group in (("h-a", ids[:3]), ("h-b", ids[3:])):
            roles.peer_host(f"{host}{tag}", host, group)

    try:
        roles.start("coordinator", "coordinator", "--scenario", roles.public, "--bind", roles.address, "--out", out,
                    "--no-report", "--tolerance", "1e-7", "--checkpoint-every", "10", "--heartbeat-s", "0.5")
        others("")
        _wait_for(logs / "coordinator.log", r"checkpoint: iteration 20 written", 90, procs["coordinator"])
        procs["coordinator"].send_signal(signal.SIGKILL)
        for name, p in procs.items():  # every role gives its lost coordinator up: within a few heartbeats
            assert p.wait(timeout=30) != 0, name  # (a service not yet welcomed: within its --timeout-s)
        written = int(re.findall(CHECKPOINT, (logs / "coordinator.log").read_text())[-1])

        procs["resume"] = subprocess.Popen([*P2PM, "resume", str(out)], stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True, env=fault_env())
        others("-again")
        _, err = procs["resume"].communicate(timeout=120)
        assert procs["resume"].returncode == 0, err[-3000:]
        for name in ("dso-again", "tso-again", "h-a-again", "h-b-again"):
            assert procs[name].wait(timeout=30) == 0, (logs / f"{name}.log").read_text()[-2000:]
    finally:
        roles.close()
    s = json.loads((out / "summary.json").read_text())
    assert s["converged"] and s["resumed_from"]["iteration"] == written
    assert abs(s["social_welfare_eur"] - _optimum(roles.scenario)) <= 1e-6 * abs(_optimum(roles.scenario))


def test_a_service_started_by_hand_that_is_never_welcomed_stops_naming_the_coordinator(tmp_path):
    scen = small_market(tmp_path / "small.yaml", 17, hours=2)
    public, _ = split(scen, tmp_path / "split")
    address = f"tcp://127.0.0.1:{free_port()}"  # nobody listens there
    for svc in ("dso", "tso"):
        r = subprocess.run([*P2PM, svc, "--scenario", str(public), "--coordinator", address, "--insecure",
                            "--timeout-s", "2"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1
        assert f"the coordinator at {address} did not welcome this role within 2 s (is it running" in r.stderr, \
            r.stderr[-2000:]


def test_a_dso_started_again_by_hand_under_policy_wait_answers_and_the_run_ends(tmp_path):
    """Roles by hand, --on-peer-loss wait: the DSO is killed during the clearing and started again;
    it registers again, gets the dispatch, and the run ends with its grid report."""
    roles = _ByHand(tmp_path, 18)
    procs, out = roles.procs, roles.out
    try:
        roles.start("coordinator", "coordinator", "--scenario", roles.public, "--bind", roles.address, "--out", out,
                    "--no-report", "--tolerance", "1e-7", "--heartbeat-s", "0.5", "--on-peer-loss", "wait",
                    "--grace-s", "60")
        for svc in ("dso", "tso"):
            roles.service(svc, svc)
        roles.peer_host("h-a", "h-a", sorted(roles.private))
        coord_log = roles.logs / "coordinator.log"
        _wait_for(coord_log, r"dso service registered", 90, procs["coordinator"])
        _wait_for(coord_log, r"peers in 1 processes ready", 90, procs["coordinator"])
        procs["dso"].send_signal(signal.SIGKILL)
        _wait_for(coord_log, r"the dso service lost at iteration \d+: .*waiting up to 60 s", 30, procs["coordinator"])
        roles.service("dso-again", "dso")
        assert procs["coordinator"].wait(timeout=120) == 0, coord_log.read_text()[-3000:]
        assert procs["dso-again"].wait(timeout=30) == 0
    finally:
        roles.close()
    s = json.loads((out / "summary.json").read_text())
    (back,) = s["rejoined_services"]
    assert back["role"] == "dso" and s["converged"] and s["rejoined_peers"] == []
    assert abs(s["social_welfare_eur"] - _optimum(roles.scenario)) <= 1e-6 * abs(_optimum(roles.scenario))
    assert (out / "buses.csv").is_file()
