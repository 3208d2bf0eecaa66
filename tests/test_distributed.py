"""End-to-end tests of the distributed market: real OS processes, real ZeroMQ sockets on loopback,
started the way a user starts them (the CLI; by hand from ``p2pm scenarios split``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pandas as pd
import pytest
import zmq

from common.centralized import solve_p2p
from common.codec import encode
from common.models import peer_models
from common.protocol import MAX_MESSAGE_BYTES, PROTOCOL_VERSION, MsgType, make_envelope
from common.scenario import load_scenario
from p2pm_support import P2PM, alive, assert_no_private_data, descendants, free_port, run_cli, small_market, split

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

def _assert_matches_centralized(scen: Path, out: Path, topology: str) -> dict:
    """The distributed clearing written to ``out`` is the centralized one; its messages are the
    topology's; returns the summary."""
    summary = json.loads((out / "summary.json").read_text())
    peers = peer_models(load_scenario(scen))
    ref = solve_p2p(peers)
    disp = pd.read_csv(out / "dispatch.csv").pivot(index="peer", columns="hour", values="p_mw").loc[[p.id for p in peers]]
    assert np.abs(disp.to_numpy() - ref.p_mw).max() < 1e-3
    sw_ref = ref.social_welfare_eur.sum()
    assert abs(summary["social_welfare_eur"] - sw_ref) <= 1e-3 * abs(sw_ref)
    assert summary["converged"] is True and summary["solver"] == "admm" and summary["topology"] == topology
    assert summary["messages"] > 0 and summary["bytes"] > 0
    kinds = set(pd.read_csv(out / "messages.csv")["type"])
    assert ("trades" in kinds) == (topology == "mesh") and ("residuals" in kinds) == (topology == "mesh")
    assert ("update" in kinds) == (topology == "relay")
    trades = pd.read_csv(out / "trades.csv")
    assert (trades["price_eur_per_mwh"] > 0).all()
    return summary


@pytest.fixture(scope="module")
def mesh_run(tmp_path_factory):
    """The launcher's mesh run: three peers per process (a seed whose market converges in a few
    hundred iterations). The relay topology is cleared by the roles started by hand below."""
    tmp = tmp_path_factory.mktemp("run-mesh")
    scen = small_market(tmp / "small.yaml", 15, hours=3)
    out = tmp / "out"
    proc = run_cli("run", scen, "--topology", "mesh", "--out", out, "--quiet", "--no-report", "--peers-per-process", 3,
                   "--log-level", "debug")
    return scen, out, proc


def test_distributed_clearing_matches_centralized(mesh_run):
    scen, out, proc = mesh_run
    assert proc.returncode == 0, proc.stderr + proc.stdout
    summary = _assert_matches_centralized(scen, out, "mesh")
    assert summary["peer_processes"] == 3 and summary["processes"] == 3 + 3  # the peer processes, coordinator, DSO, TSO
    # from the pool price: price rounds, then the ADMM; every round trip counted
    assert summary["price_rounds"] >= 2 and summary["rounds"] == summary["price_rounds"] + summary["iterations"]
    msgs = pd.read_csv(out / "messages.csv").groupby("type")["count"].sum()
    assert msgs["price_probe"] == msgs["quantity_sum"] == 3 * (summary["price_rounds"] - 1)
    # --no-report: the tables and the summary, no figures and no page
    assert not (out / "report.html").exists() and not (out / "figures").exists()
    logs = sorted(p.name for p in out.glob("logs/*.log"))
    assert {"coordinator.log", "dso.log", "tso.log"} <= set(logs) and len([n for n in logs if n.startswith("h")]) == 3
    for p in out.glob("logs/*.log"):
        assert "Traceback" not in p.read_text(), p
    # the results keep their contracts (summary.json's schema, the tables' pandera schemas)
    check = run_cli("schema", "summary", "--check", out)
    assert check.returncode == 0 and check.stdout.strip() == f"{out}: ok", check.stdout + check.stderr


def test_logs_have_levels_roles_pids_and_trace_every_message_at_debug(mesh_run):
    """--log-level debug: every line has the time to the ms, the level, the role and the pid; every
    message a role sends or receives is traced with its type, iteration and size."""
    _, out, proc = mesh_run
    assert proc.returncode == 0, proc.stderr
    line = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} (DEBUG|INFO|WARNING|ERROR) +(\S+) pid (\d+): ")
    for path in out.glob("logs/*.log"):
        lines = [x for x in path.read_text().splitlines() if x.strip()]
        if path.stem == "zygote":  # the peers' fork server: no role, nothing to say on a good run
            continue
        role = path.stem
        parsed = [line.match(x) for x in lines]
        assert lines and all(parsed), (path, [x for x, m in zip(lines, parsed) if not m][:3])
        assert {m.group(2) for m in parsed} == {role}, path
        assert len({m.group(3) for m in parsed}) == 1, path
    coord = (out / "logs" / "coordinator.log").read_text()
    summary = json.loads((out / "summary.json").read_text())
    sent = re.findall(r"DEBUG +coordinator pid \d+: sent (\w+) iteration (\d+) to (\S+), (\d+) B", coord)
    received = re.findall(r"DEBUG +coordinator pid \d+: received (\w+) iteration (\d+) from (\S+), (\d+) B", coord)
    assert sent and received
    msgs = pd.read_csv(out / "messages.csv")
    coordinator_types = {t for t, *_ in sent} | {t for t, *_ in received}
    relayed = msgs[msgs["type"].isin(coordinator_types)]
    # every message through the coordinator is in its trace, with the bytes counted in messages.csv
    assert len(sent) + len(received) == relayed["count"].sum()
    assert sum(int(b) for *_, b in sent + received) == relayed["bytes"].sum()
    assert summary["messages"] >= len(sent) + len(received)
    peer_log = next(out.glob("logs/h*.log")).read_text()
    assert re.search(r"DEBUG +\S+ pid \d+: sent trades iteration \d+ to h", peer_log)  # mesh traffic too


def test_results_hold_no_private_data(mesh_run, tmp_path):
    """No file of the results folder (scenario.json, the tables, summary.json, the logs) holds a
    peer's cost coefficients: neither their field names nor their values."""
    scen, out, proc = mesh_run
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert_no_private_data(out, scen, tmp_path)
    # and the check finds a leak: a CHP cost coefficient written into a peer's log
    leaky = tmp_path / "leaky"
    shutil.copytree(out, leaky)
    cost_a = load_scenario(scen).peer("chp1").cost_a_eur_per_mw2h
    with open(next(leaky.glob("logs/h*.log")), "a") as log:
        log.write(f"chp1 marginal cost slope {cost_a:.10g}\n")
    with pytest.raises(AssertionError, match="private data"):
        assert_no_private_data(leaky, scen, tmp_path / "again")


def _reader(stream, sink: list):
    for line in iter(stream.readline, ""):
        sink.append(line)


def test_bad_messages_are_rejected_counted_and_survived(tmp_path):
    """Roles started by hand from ``p2pm scenarios split``, all at once (the others connect until
    the coordinator listens), relay topology: the coordinator, DSO and TSO get the public part, each
    peer process only its own peers' private files. Garbage sent to the coordinator and to a peer's
    mesh socket is refused and counted; the run goes on to the centralized clearing. Without CURVE
    (``--insecure``), so that the garbage reaches the codec (tests/test_security.py attacks CURVE)."""
    scen = small_market(tmp_path / "small.yaml", 3, hours=2)
    public, private = split(scen, tmp_path / "split")
    out = tmp_path / "out"
    address = f"tcp://127.0.0.1:{free_port()}"
    run = "run-bad-msg"
    procs = []
    ctx = zmq.Context()
    try:
        coord = subprocess.Popen([*P2PM, "coordinator", "--scenario", public, "--bind", address, "--run-id", run,
                                  "--out", out, "--timeout-s", "60", "--no-report", "--insecure"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        procs.append(coord)
        coord_log: list[str] = []
        threading.Thread(target=_reader, args=(coord.stderr, coord_log), daemon=True).start()
        # two peer processes: load0 alone (its log gives its mesh socket), the six others together;
        # each gets its own peers' private files only
        peer_logs: list[str] = []
        others = [pid for pid in private if pid != "load0"]
        for host, ids in (("h-load0", ["load0"]), ("h-others", others)):
            models = [a for pid in ids for a in ("--model", private[pid])]
            pr = subprocess.Popen([*P2PM, "peer", "--coordinator", address, *models, "--host-id", host, "--timeout-s", "60",
                                   "--insecure"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            procs.append(pr)
            threading.Thread(target=_reader, args=(pr.stderr, peer_logs if host == "h-load0" else []), daemon=True).start()
        for svc in ("dso", "tso"):
            procs.append(subprocess.Popen([*P2PM, svc, "--scenario", public, "--coordinator", address, "--timeout-s", "60",
                                           "--insecure"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

        # garbage for the coordinator (queued until it listens)
        rogue = ctx.socket(zmq.DEALER)
        rogue.setsockopt(zmq.LINGER, 0)
        rogue.setsockopt(zmq.IDENTITY, b"rogue")
        rogue.connect(address)
        good = encode(make_envelope(MsgType.READY, run_id=run, sender="rogue"))
        bad = [
            b"\x93garbage\xff",  # not msgpack of the envelope
            msgpack.packb([99, run, "rogue", "ready", 0, {}]),  # wrong protocol version
            msgpack.packb([PROTOCOL_VERSION, "another-run", "rogue", "ready", 0, {}]),  # wrong run
            msgpack.packb([PROTOCOL_VERSION, run, "rogue", "no-such-type", 0, {}]),  # unknown type
            msgpack.packb([PROTOCOL_VERSION, run, "rogue", "update", 7, {"peers": {"x": {"p_out_mw": [1.0]}}}]),  # malformed body
            b"\x00" * (MAX_MESSAGE_BYTES + 16),  # oversized
            good,  # a good message from an unknown role: not an answer the coordinator waits for
        ]
        for frame in bad:
            rogue.send(frame)

        # a peer's mesh socket gets garbage too
        deadline = time.monotonic() + 30
        while not any("mesh socket" in line for line in peer_logs):
            assert time.monotonic() < deadline and procs[1].poll() is None, "".join(peer_logs)
            time.sleep(0.02)
        mesh = re.search(r"mesh socket (\S+)", "".join(peer_logs)).group(1)
        rogue2 = ctx.socket(zmq.DEALER)
        rogue2.setsockopt(zmq.LINGER, 0)
        rogue2.connect(mesh)
        rogue2.send(b"\xc1 not a message")
        rogue2.send(msgpack.packb([PROTOCOL_VERSION, "another-run", "x", "trades", 0, {}]))

        assert coord.wait(timeout=90) == 0, "".join(coord_log)
        for pr in procs[1:]:
            assert pr.wait(timeout=30) == 0
        summary = _assert_matches_centralized(scen, out, "relay")
        assert summary["peer_processes"] == 2 and summary["processes"] == 5
        assert_no_private_data(out, scen, tmp_path, logs=False)
        assert summary["rejected_messages"] >= 6, "".join(coord_log)
        text = "".join(coord_log)
        for reason in ("malformed", "version", "run", "type", "body", "oversized"):
            assert f"'{reason}'" in text, text
        # the peer ran on to the end of the run
        assert any("shutdown: run complete" in line for line in peer_logs), "".join(peer_logs)
    finally:
        for pr in procs:
            if pr.poll() is None:
                pr.kill()
            pr.wait(timeout=10)
            if pr.stderr is not None:
                pr.stderr.close()
        ctx.destroy(linger=0)


def _endless_run(scen: Path, out: Path, *extra) -> subprocess.Popen:
    """A distributed run that does not converge (tolerance 1e-14): it goes on until stopped."""
    return subprocess.Popen([*P2PM, "run", str(scen), "--out", str(out), "--quiet", "--no-report", "--tolerance", "1e-14",
                             "--max-iterations", "1000000", *map(str, extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _clearing(launcher: subprocess.Popen, out: Path, hosts: int, deadline: float) -> list[int]:
    """Once every peer process has registered and the ADMM rounds have begun: the pids of every
    process of the run (fork server, coordinator, DSO, TSO and the peer processes)."""
    coordinator_log = out / "logs" / "coordinator.log"
    while True:
        if launcher.poll() is not None:
            pytest.fail(f"the run ended (code {launcher.returncode}) before clearing:\n{launcher.stderr.read()}")
        assert time.monotonic() < deadline, "the peer processes did not all register within 60 s"
        if coordinator_log.exists() and re.search(rf"peers in {hosts} processes ready", coordinator_log.read_text()):
            pids = descendants(launcher.pid)
            if len(pids) >= 4 + hosts:
                return pids
        time.sleep(0.02)


def _all_gone(pids: list[int]) -> list[int]:
    deadline = time.monotonic() + 5
    while [p for p in pids if alive(p)] and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def test_a_killed_peer_or_ctrl_c_ends_the_run_and_leaves_no_process(tmp_path):
    """Two runs at once (so that their teardowns overlap): in one a peer process is killed outright
    and the run ends naming its peer; the other is interrupted with Ctrl-C. After either, none of
    the run's processes (fork server, coordinator, DSO, TSO, peer processes) is left."""
    # three peers per process: grid..pv1, wind1..load1, load2 alone; four: grid..wind1, load0..load2
    killed = _endless_run(small_market(tmp_path / "a.yaml", 4, hours=3), tmp_path / "killed", "--timeout-s", "5",
                          "--peers-per-process", "3")
    interrupted = _endless_run(small_market(tmp_path / "b.yaml", 6, hours=3), tmp_path / "interrupted",
                               "--peers-per-process", "4")
    try:
        deadline = time.monotonic() + 60
        killed_pids = _clearing(killed, tmp_path / "killed", 3, deadline)
        interrupted_pids = _clearing(interrupted, tmp_path / "interrupted", 2, deadline)
        log = next((tmp_path / "killed" / "logs").glob("h*-load2.log")).read_text()
        victim = int(re.search(r"pid (\d+)", log).group(1))
        assert victim in killed_pids
        os.kill(victim, signal.SIGKILL)
        interrupted.send_signal(signal.SIGINT)
        _, killed_err = killed.communicate(timeout=60)
        _, interrupted_err = interrupted.communicate(timeout=60)
        assert killed.returncode == 1, killed_err
        assert "load2" in killed_err and "Traceback" not in killed_err, killed_err
        assert interrupted.returncode == 1, interrupted_err
        assert "interrupted" in interrupted_err and "Traceback" not in interrupted_err, interrupted_err
        assert _all_gone(killed_pids) == [] and _all_gone(interrupted_pids) == []
    finally:
        for launcher in (killed, interrupted):
            if launcher.poll() is None:
                launcher.kill()
                launcher.communicate()
