"""End-to-end tests of the distributed market: real OS processes, real ZeroMQ sockets on loopback,
started the way a user starts them (the CLI)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pandas as pd
import pytest
import yaml
import zmq

from common.centralized import solve_p2p
from common.codec import encode
from common.models import peer_models
from common.protocol import MAX_MESSAGE_BYTES, MsgType, make_envelope
from common.scenario import load_scenario

PY = sys.executable


def small_market(path: Path, seed: int, hours: int = 4, **market) -> Path:
    """A random market: grid, CHP, PV, wind sellers and three flexible loads."""
    rng = np.random.default_rng(seed)
    pv = np.round(rng.uniform(0.0, 0.6, hours), 3).tolist()
    doc = {
        "name": f"small-{seed}",
        "network": {"name": "case33bw", "line_max_i_ka": 0.5},
        "market": {"kind": "p2p", "hours": hours, "rho": 1.0, "tolerance": 1e-5, "max_iterations": 20000, **market},
        "peers": [
            {"id": "grid", "kind": "grid", "bus": 0, "p_import_max_mw": 5, "import_price_eur_per_mwh": 58},
            {"id": "chp1", "kind": "chp", "bus": 5, "p_min_mw": 0.1, "p_max_mw": 0.5,
             "cost_a_eur_per_mw2h": float(rng.uniform(8, 20)), "cost_b_eur_per_mwh": float(rng.uniform(40, 50))},
            {"id": "pv1", "kind": "pv", "bus": 10, "p_forecast_mw": pv, "cost_a_eur_per_mw2h": 2.0},
            {"id": "wind1", "kind": "wind", "bus": 17, "p_forecast_mw": float(rng.uniform(0.1, 0.4)),
             "cost_a_eur_per_mw2h": 3.0},
        ] + [
            {"id": f"load{i}", "kind": "load", "bus": int(b), "p_base_mw": np.round(rng.uniform(0.1, 0.5, hours), 3).tolist()}
            for i, b in enumerate(rng.choice(np.arange(1, 33), 3, replace=False))
        ],
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def p2pm(*args, timeout=300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "common.cli", *map(str, args)], capture_output=True, text=True, timeout=timeout, **kw)


def pids_in_logs(log_dir: Path) -> list[int]:
    pids = []
    for f in log_dir.glob("*.log"):
        m = re.search(r"pid (\d+)", f.read_text())
        if m:
            pids.append(int(m.group(1)))
    return pids


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("topology,seed,per_process", [("relay", 1, 1), ("mesh", 2, 1), ("mesh", 5, 3)])
def test_distributed_clearing_matches_centralized(tmp_path, topology, seed, per_process):
    scen = small_market(tmp_path / "small.yaml", seed)
    out = tmp_path / "out"
    proc = p2pm("run", scen, "--topology", topology, "--out", out, "--quiet", "--peers-per-process", per_process)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    sc = load_scenario(scen)
    peers = peer_models(sc)
    ref = solve_p2p(peers)
    disp = pd.read_csv(out / "dispatch.csv").pivot(index="peer", columns="hour", values="p_mw").loc[[p.id for p in peers]]
    assert np.abs(disp.to_numpy() - ref.p_mw).max() < 1e-3
    sw_ref = ref.social_welfare_eur.sum()
    assert abs(summary["social_welfare_eur"] - sw_ref) <= 1e-3 * abs(sw_ref)
    assert summary["converged"] is True and summary["solver"] == "admm"
    hosts = -(-len(peers) // per_process)
    assert summary["processes"] == hosts + 3  # the peer processes, coordinator, DSO, TSO
    assert summary["messages"] > 0 and summary["bytes"] > 0
    msgs = pd.read_csv(out / "messages.csv")
    kinds = set(msgs["type"])
    assert ("trades" in kinds) == (topology == "mesh")
    assert ("update" in kinds) == (topology == "relay")
    # prices of traded pairs agree with the centralized duals where those are unique
    trades = pd.read_csv(out / "trades.csv")
    assert (trades["price_eur_per_mwh"] > 0).all()
    for p in out.glob("logs/*.log"):
        assert "Traceback" not in p.read_text(), p


def _reader(stream, sink: list):
    for line in iter(stream.readline, ""):
        sink.append(line)


def test_bad_messages_are_rejected_counted_and_survived(tmp_path):
    scen = small_market(tmp_path / "small.yaml", 3, hours=2)
    out, ready = tmp_path / "out", tmp_path / "address"
    run = "run-bad-msg"
    procs = []
    try:
        coord = subprocess.Popen([PY, "-m", "coordinator", "--scenario", scen, "--bind", "tcp://127.0.0.1:*",
                                  "--ready-file", ready, "--run-id", run, "--out", out, "--timeout-s", "60"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        procs.append(coord)
        coord_log: list[str] = []
        threading.Thread(target=_reader, args=(coord.stderr, coord_log), daemon=True).start()
        deadline = time.monotonic() + 30
        while not (ready.exists() and ready.read_text()):
            assert time.monotonic() < deadline and coord.poll() is None, "".join(coord_log)
            time.sleep(0.05)
        address = ready.read_text()

        ctx = zmq.Context()
        rogue = ctx.socket(zmq.DEALER)
        rogue.setsockopt(zmq.LINGER, 0)
        rogue.setsockopt(zmq.IDENTITY, b"rogue")
        rogue.connect(address)
        good = encode(make_envelope(MsgType.READY, run_id=run, sender="rogue"))
        bad = [
            b"\x93garbage\xff",  # not msgpack of the envelope
            msgpack.packb([99, run, "rogue", "ready", 0, {}]),  # wrong protocol version
            msgpack.packb([1, "another-run", "rogue", "ready", 0, {}]),  # wrong run
            msgpack.packb([1, run, "rogue", "no-such-type", 0, {}]),  # unknown type
            msgpack.packb([1, run, "rogue", "update", 7, {"peers": {"x": {"p_out_mw": [1.0]}}}]),  # malformed body
            b"\x00" * (MAX_MESSAGE_BYTES + 16),  # oversized
            good,  # a good message from an unknown role: not an answer the coordinator waits for
        ]
        for frame in bad:
            rogue.send(frame)

        peer_logs: list[str] = []
        sc = load_scenario(scen)
        for p in sc.peers:
            pr = subprocess.Popen([PY, "-m", "peer_node", "--coordinator", address, "--scenario", scen, "--peer-id", p.id,
                                   "--timeout-s", "60"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            procs.append(pr)
            if p.id == "load0":
                threading.Thread(target=_reader, args=(pr.stderr, peer_logs), daemon=True).start()
        # a peer's mesh socket gets garbage too
        deadline = time.monotonic() + 30
        while not any("mesh socket" in line for line in peer_logs):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        mesh = re.search(r"mesh socket (\S+)", "".join(peer_logs)).group(1)
        rogue2 = ctx.socket(zmq.DEALER)
        rogue2.setsockopt(zmq.LINGER, 0)
        rogue2.connect(mesh)
        rogue2.send(b"\xc1 not a message")
        rogue2.send(msgpack.packb([1, "another-run", "x", "trades", 0, {}]))
        for svc in ("dso_service", "tso_service"):
            procs.append(subprocess.Popen([PY, "-m", svc, "--scenario", scen, "--coordinator", address, "--timeout-s", "60"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        assert coord.wait(timeout=240) == 0, "".join(coord_log)
        for pr in procs[1:]:
            assert pr.wait(timeout=30) == 0
        rogue.close()
        rogue2.close()
        ctx.term()
        summary = json.loads((out / "summary.json").read_text())
        assert summary["converged"]
        assert summary["rejected_messages"] >= 6, "".join(coord_log)
        text = "".join(coord_log)
        for reason in ("malformed", "version", "run", "type", "body", "oversized"):
            assert f"'{reason}'" in text, text
        # the peer ran on, and counted the garbage it was sent on its mesh socket (before the run
        # had started the peer reads only its coordinator socket, so count what it drained)
        assert any("shutdown" in line for line in peer_logs)
    finally:
        for pr in procs:
            if pr.poll() is None:
                pr.kill()
            pr.wait(timeout=10)
            if pr.stderr is not None:
                pr.stderr.close()


def test_killed_peer_ends_the_run_naming_it_and_leaves_nothing(tmp_path):
    scen = small_market(tmp_path / "small.yaml", 4, hours=3)
    out = tmp_path / "out"
    launcher = subprocess.Popen([PY, "-m", "common.cli", "run", str(scen), "--out", str(out), "--quiet",
                                 "--tolerance", "1e-14", "--max-iterations", "1000000", "--timeout-s", "5"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        victim_log = None
        deadline = time.monotonic() + 60
        while victim_log is None:
            assert time.monotonic() < deadline and launcher.poll() is None
            for f in (out / "logs").glob("*load1.log") if (out / "logs").exists() else []:
                if "pid" in f.read_text():
                    victim_log = f
            time.sleep(0.1)
        coordinator_log = out / "logs" / "coordinator.log"
        while "ready after" not in (coordinator_log.read_text() if coordinator_log.exists() else ""):
            assert time.monotonic() < deadline and launcher.poll() is None
            time.sleep(0.1)
        time.sleep(0.5)
        victim = int(re.search(r"pid (\d+)", victim_log.read_text()).group(1))
        while len(pids_in_logs(out / "logs")) < 9:  # 6 peers, coordinator, dso, tso
            assert time.monotonic() < deadline and launcher.poll() is None
            time.sleep(0.1)
        pids = pids_in_logs(out / "logs")
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = launcher.communicate(timeout=60)
        assert launcher.returncode == 1
        assert "load1" in stderr and "Traceback" not in stderr
        time.sleep(0.5)
        assert [p for p in pids if alive(p)] == []
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()


def test_ctrl_c_stops_every_process(tmp_path):
    scen = small_market(tmp_path / "small.yaml", 6, hours=3)
    out = tmp_path / "out"
    launcher = subprocess.Popen([PY, "-m", "common.cli", "run", str(scen), "--out", str(out), "--quiet",
                                 "--tolerance", "1e-14", "--max-iterations", "1000000"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(pids_in_logs(out / "logs") if (out / "logs").exists() else []) < 9:
            assert time.monotonic() < deadline and launcher.poll() is None
            time.sleep(0.1)
        pids = pids_in_logs(out / "logs")
        launcher.send_signal(signal.SIGINT)
        _, stderr = launcher.communicate(timeout=60)
        assert launcher.returncode == 1
        assert "interrupted" in stderr and "Traceback" not in stderr
        time.sleep(0.5)
        assert [p for p in pids if alive(p)] == []
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()
