"""Faults of real processes (end to end): a peer host killed (SIGKILL) or stopped (SIGSTOP) at a
random moment of the clearing, under ``--on-peer-loss abort`` and ``drop``; roles started by hand
that lose their coordinator. Each run is a small market (7 peers, 3 hours) slowed by a 3 ms link
latency so that the fault falls inside the ADMM rounds.

Checked: the exit code, the message (it names the lost host), the seconds from the fault to its
detection (reported, never asserted), no process of the run left, and under drop the result against
the centralized optimum of the market without the lost host's peers."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from p2pm_support import (
    P2PM,
    descendants,
    fault_env,
    free_port,
    launch_run,
    leftovers,
    small_market,
    split,
    stop_run,
    wait_for,
)

from common.centralized import solve_p2p
from common.models import peer_models
from common.scenario import load_scenario

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]

HEARTBEAT_S = 0.5  # a host silent for 5 intervals (2.5 s) is lost
BY_HAND_LATENCY_MS = 20.0  # an iteration takes ~0.1 s: the clearing is far from its end (residuals 0.0) at the fault
BY_HAND_HEARTBEAT_S = 1.0  # roles by hand: 5 s before a role gives its coordinator up (a loaded CI machine)
VICTIM = "h0006-load2"  # one peer per process: hosts h0000-grid .. h0006-load2


def _launch(scen: Path, out: Path, policy: str, *extra) -> subprocess.Popen:
    return launch_run(scen, out, policy, *extra, heartbeat_s=HEARTBEAT_S)


def _fault_run(tmp_path: Path, fault: signal.Signals, policy: str, seed: int) -> dict:
    """One run with ``fault`` sent to the victim's process at a random moment of the clearing; its
    exit code, stderr, detection seconds, processes left and summary (or None)."""
    rng = random.Random(seed)
    scen = small_market(tmp_path / "small.yaml", 15, hours=3)
    out = tmp_path / "out"
    proc = _launch(scen, out, policy)
    log = out / "logs" / "coordinator.log"
    try:
        deadline = time.monotonic() + 90
        wait_for(log, r"peers in 7 processes ready", deadline, proc)
        pids = descendants(proc.pid)
        victim = int(re.search(r"pid (\d+)", (out / "logs" / f"{VICTIM}.log").read_text()).group(1))
        assert victim in pids
        time.sleep(rng.uniform(0.2, 1.5))  # a random iteration
        assert proc.poll() is None, "the run ended before the fault"
        t_fault = time.monotonic()
        os.kill(victim, fault)
        # noticed by the coordinator (silence, no route), or by the launcher (the process exited)
        pattern = rf"{VICTIM} \(peer load2\) lost at iteration (\d+)"
        while not re.search(pattern, log.read_text()) and proc.poll() is None:
            assert time.monotonic() - t_fault < 60, "the fault went unnoticed for 60 s"
            time.sleep(0.01)
        detect_s = time.monotonic() - t_fault
        _, err = proc.communicate(timeout=90)
        m = re.search(pattern, log.read_text())
        summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else None
        return {"code": proc.returncode, "stderr": err, "detect_s": detect_s, "iteration": int(m.group(1)) if m else None,
                "left": leftovers([*pids, victim]), "summary": summary, "scenario": scen}
    finally:
        stop_run(proc)
        try:
            os.kill(victim, signal.SIGKILL)  # a stopped victim never reads its SIGTERM otherwise
        except (ProcessLookupError, UnboundLocalError):
            pass


def _report(row: str) -> None:
    with open(os.environ.get("P2PM_FAULT_TABLE", os.devnull), "a") as f:
        f.write(row + "\n")


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["kill9", "sigstop"])
def test_a_lost_peer_host_aborts_the_run_naming_it(tmp_path, fault):
    r = _fault_run(tmp_path, fault, "abort", seed=fault.value)
    message = r["stderr"].strip().splitlines()[0] if r["stderr"].strip() else ""
    _report(f"{fault.name} abort exit={r['code']} detect_s={r['detect_s']:.2f} it={r['iteration']} left={len(r['left'])} "
            f"message={message!r}")
    assert r["code"] == 1, r["stderr"]
    # a killed process is seen exiting by the launcher at once; a stopped one is lost by the coordinator
    assert (f"peer host {VICTIM} (peer load2) lost at iteration" in r["stderr"]
            or f"peer load2 (host {VICTIM}, pid" in r["stderr"]), r["stderr"]
    assert "Traceback" not in r["stderr"]
    assert r["left"] == []


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["kill9", "sigstop"])
def test_a_lost_peer_host_is_dropped_and_the_market_clears_to_the_optimum_without_it(tmp_path, fault):
    r = _fault_run(tmp_path, fault, "drop", seed=10 + fault.value)
    s = r["summary"]
    peers = [p for p in peer_models(load_scenario(r["scenario"])) if p.id != "load2"]
    ref = solve_p2p(peers).social_welfare_eur.sum()
    rel = abs(s["social_welfare_eur"] - ref) / abs(ref) if s else float("nan")
    _report(f"{fault.name} drop exit={r['code']} detect_s={r['detect_s']:.2f} it={r['iteration']} "
            f"left={len(r['left'])} welfare_rel_diff={rel:.2e}")
    assert r["code"] == 0, r["stderr"]
    assert s["converged"] is True and s["on_peer_loss"] == "drop"
    (dropped,) = s["dropped_peers"]
    assert dropped["host"] == VICTIM and dropped["peers"] == ["load2"] and dropped["iteration"] == r["iteration"]
    assert rel <= 1e-4
    assert r["left"] == []
    dispatch = (r["scenario"].parent / "out" / "dispatch.csv").read_text()
    assert "load2" not in dispatch


@pytest.mark.parametrize("fault", ["coordinator-kill9", "peer-sigstop"])
def test_roles_started_by_hand_stop_soon_after_a_fault(tmp_path, fault):
    """Coordinator, DSO, TSO and two peer processes started by hand, in the middle of the clearing:
    - the coordinator is killed (SIGKILL): every other role exits within a few heartbeat intervals
      (the DSO's idle timeout is an hour), naming the coordinator;
    - a peer process is stopped (SIGSTOP): the coordinator ends the run naming it and sends every
      role still connected its SHUTDOWN before it closes (a role that misses it stops on the
      coordinator's silence)."""
    scen = small_market(tmp_path / "small.yaml", 15, hours=3)
    public, private = split(scen, tmp_path / "split")
    address = f"tcp://127.0.0.1:{free_port()}"
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: dict[str, subprocess.Popen] = {}

    def start(name, *args):  # (liveness, not security: without CURVE keys)
        f = open(logs / f"{name}.log", "w")
        procs[name] = subprocess.Popen([*P2PM, *map(str, args), "--insecure"], stdout=f, stderr=f,
                                       env=fault_env(latency_ms=BY_HAND_LATENCY_MS))
        f.close()

    try:
        start("coordinator", "coordinator", "--scenario", public, "--bind", address, "--out", tmp_path / "out",
              "--no-report", "--tolerance", "1e-17", "--max-iterations", "1000000", "--heartbeat-s",
              BY_HAND_HEARTBEAT_S)
        for svc in ("dso", "tso"):
            start(svc, svc, "--scenario", public, "--coordinator", address)
        ids = sorted(private)
        for host, group in (("h-a", ids[:3]), ("h-b", ids[3:])):
            start(host, "peer", "--coordinator", address, "--host-id", host,
                  *[a for pid in group for a in ("--model", private[pid])])
        deadline = time.monotonic() + 90
        wait_for(logs / "coordinator.log", r"peers in 2 processes ready", deadline, procs["coordinator"])
        for svc in ("dso", "tso"):  # (a service that never reached its coordinator waits for its idle timeout)
            wait_for(logs / "coordinator.log", rf"{svc} service registered", deadline, procs["coordinator"])
        time.sleep(1.0)
        t_fault = time.monotonic()
        victim = "coordinator" if fault == "coordinator-kill9" else "h-b"
        procs[victim].send_signal(signal.SIGKILL if victim == "coordinator" else signal.SIGSTOP)
        ended = {}
        others = [n for n in procs if n != victim]
        while len(ended) < len(others) and time.monotonic() - t_fault < 30:
            for name in others:
                if name not in ended and procs[name].poll() is not None:
                    ended[name] = time.monotonic() - t_fault
            time.sleep(0.02)
        _report(f"by hand: {fault} -> " + ", ".join(f"{n} exit {procs[n].returncode} after {t:.2f} s"
                                                    for n, t in sorted(ended.items())))
        assert sorted(ended) == sorted(others), ended
        for name in others:
            text = (logs / f"{name}.log").read_text()
            if victim == "coordinator":
                assert procs[name].returncode == 1 and "lost the coordinator" in text, text[-1500:]
            elif name == "coordinator":
                assert procs[name].returncode == 1 and "peer host h-b (peers" in text and " lost " in text, text[-1500:]
            else:  # told by the coordinator's SHUTDOWN (exit 0), or else by its silence
                told = "shutdown: run failed: peer host h-b" in text
                assert (procs[name].returncode, told) in ((0, True), (1, False)), text[-1500:]
                assert told or "lost the coordinator" in text, text[-1500:]
        if victim == "h-b":
            told = [n for n in others if n != "coordinator" and procs[n].returncode == 0]
            assert told, "no role got the coordinator's SHUTDOWN"
        if victim == "h-b":  # once it runs again it stops too: on the SHUTDOWN the kernel kept for it
            procs["h-b"].send_signal(signal.SIGCONT)  # while it was stopped, or else on its coordinator's silence
            code = procs["h-b"].wait(timeout=30)
            text = (logs / "h-b.log").read_text()
            told = "shutdown: run failed: peer host h-b" in text
            assert (code, told) in ((0, True), (1, False)), text[-1500:]
            assert told or "lost the coordinator" in text, text[-1500:]
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
            p.wait(timeout=10)


def test_hostile_messages_during_a_run_never_end_it(tmp_path):
    """Against a running clearing: HELLOs followed at once by a disconnect, a HELLO flood from many
    identities, a connection whose identity is not UTF-8, forged answers of the right run, garbage
    on a peer's mesh socket. The run ends as an undisturbed one would (the centralized optimum), and
    every refusal is in summary.json by role and reason (the peer's with its heartbeats)."""
    import zmq

    from common.codec import encode
    from common.protocol import MsgType, make_envelope
    from common.protocol.control import Hello

    scen = small_market(tmp_path / "small.yaml", 15, hours=3)
    out = tmp_path / "out"
    proc = _launch(scen, out, "abort", "--insecure")  # strangers' messages reach the codec (CURVE: tests/test_security.py)
    log = out / "logs" / "coordinator.log"
    ctx = zmq.Context()
    socks = []

    def dealer(identity: bytes, address: str):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 2000)
        s.setsockopt(zmq.ROUTING_ID, identity)
        s.connect(address)
        socks.append(s)
        return s

    try:
        deadline = time.monotonic() + 90
        wait_for(log, r"peers in 7 processes ready", deadline, proc)
        text = log.read_text()
        address = re.search(r"listening on (\S+), run (\w+)", text)
        address, run = address.group(1), address.group(2)
        for i in range(9):  # one HELLO, then gone
            ident = f"stranger-{i}"
            s = dealer(ident.encode(), address)
            claim = Hello(role="tso" if i % 3 == 0 else "peer", peer_ids=() if i % 3 == 0 else ("load0",), pid=1,
                          host="x")
            s.send(encode(claim.envelope(run_id="*", sender=ident)))
            time.sleep(0.05)
            s.close(linger=2000)  # gone at once, but its HELLO leaves first (under load 50 ms may not be enough)
        for i in range(20):  # a flood: 2000 HELLOs from 20 identities
            ident = f"flood-{i}"
            s = dealer(ident.encode(), address)
            frame = encode(Hello(role="peer", peer_ids=("load0",), pid=1, host="x").envelope(run_id="*", sender=ident))
            for _ in range(100):
                s.send(frame)
        dealer(b"\xff\xfe-not-utf8", address).send(encode(make_envelope(MsgType.READY, run_id=run, sender="x")))
        forged = make_envelope(MsgType.RESULT, {"peers": {}}, run_id=run, sender="h0004-load0")
        dealer(b"forger", address).send(encode(forged))  # a sender that is not its connection
        mesh = re.search(r"mesh socket (\S+)", (out / "logs" / "h0004-load0.log").read_text()).group(1)
        garbage = dealer(b"g", mesh)
        for frame in (b"\xc1 not a message", encode(make_envelope(MsgType.READY, run_id="another", sender="g"))):
            garbage.send(frame)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    finally:
        stop_run(proc)
        for s in socks:
            s.close(linger=0)
        ctx.term()
    s = json.loads((out / "summary.json").read_text())
    ref = solve_p2p(peer_models(load_scenario(scen))).social_welfare_eur.sum()
    assert s["converged"] and abs(s["social_welfare_eur"] - ref) <= 1e-4 * abs(ref)
    by_role = s["rejected_by_role"]
    coordinator = by_role["coordinator"]
    assert coordinator.get("late_hello", 0) + coordinator.get("registration", 0) >= 2000 + 6, by_role
    assert coordinator["malformed"] >= 1 and coordinator["sender"] >= 1, by_role  # not UTF-8; forged sender
    assert by_role["peers"] == {"malformed": 1, "run": 1}, by_role
    assert s["rejected_messages"] == sum(sum(v.values()) for v in by_role.values())
    _report(f"hostile: {s['rejected_messages']} refused, welfare rel diff "
            f"{abs(s['social_welfare_eur'] - ref) / abs(ref):.1e}, by role {by_role}")


def test_a_killed_peer_host_started_again_by_hand_rejoins_and_the_run_ends_at_the_same_optimum(tmp_path):
    """Policy wait: the victim is killed; `p2pm peer` started again with its host id and private
    file re-registers, gets its state with the next round, and the run ends at the optimum of the
    whole market."""
    scen = small_market(tmp_path / "small.yaml", 15, hours=3)
    _, private = split(scen, tmp_path / "split")
    out = tmp_path / "out"
    keys = tmp_path / "keys"  # the run's keys made beforehand: the peer started again by hand has its own
    subprocess.run([*P2PM, "keys", str(scen), "--out", str(keys)], check=True, capture_output=True, env=fault_env())
    proc = _launch(scen, out, "wait", "--grace-s", "30", "--keys", keys)
    log = out / "logs" / "coordinator.log"
    again = None
    try:
        deadline = time.monotonic() + 90
        wait_for(log, r"peers in 7 processes ready", deadline, proc)
        address = re.search(r"listening on (\S+),", log.read_text()).group(1)
        victim = int(re.search(r"pid (\d+)", (out / "logs" / f"{VICTIM}.log").read_text()).group(1))
        time.sleep(random.Random(7).uniform(0.2, 1.5))
        t_kill = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        wait_for(log, rf"{VICTIM} \(peer load2\) lost at iteration \d+ .*waiting up to 30 s", time.monotonic() + 30, proc)
        detect_s = time.monotonic() - t_kill
        again = subprocess.Popen([*P2PM, "peer", "--coordinator", address, "--model", str(private["load2"]),
                                  "--host-id", VICTIM, "--keys", str(keys / VICTIM)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                 env=fault_env())
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        _, again_err = again.communicate(timeout=30)
        assert again.returncode == 0, again_err
    finally:
        for p in (proc, again):
            if p is not None and p.poll() is None:
                p.kill()
                p.communicate()
    s = json.loads((out / "summary.json").read_text())
    ref = solve_p2p(peer_models(load_scenario(scen))).social_welfare_eur.sum()
    rel = abs(s["social_welfare_eur"] - ref) / abs(ref)
    (back,) = s["rejoined_peers"]
    _report(f"SIGKILL wait exit={proc.returncode} detect_s={detect_s:.2f} it={back['iteration']} "
            f"back_after_s={back['back_s'] - back['lost_s']:.2f} welfare_rel_diff={rel:.2e}")
    assert back["host"] == VICTIM and back["peers"] == ["load2"]
    assert s["converged"] and s["dropped_peers"] == [] and rel <= 1e-4
    assert "load2" in (out / "dispatch.csv").read_text()


def test_a_killed_fork_server_is_named_not_its_peers(tmp_path):
    """The peer fork server killed during the clearing takes its peer processes with it: the run
    ends naming the fork server, and nothing is left."""
    scen = small_market(tmp_path / "small.yaml", 15, hours=3)
    out = tmp_path / "out"
    proc = _launch(scen, out, "abort")
    log = out / "logs" / "coordinator.log"
    try:
        wait_for(log, r"peers in 7 processes ready", time.monotonic() + 90, proc)
        pids = descendants(proc.pid)
        server = next(p for p in pids if "peer_node.zygote" in Path(f"/proc/{p}/cmdline").read_text(errors="replace"))
        time.sleep(0.5)
        os.kill(server, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        stop_run(proc)
    _report(f"fork server SIGKILL: exit {proc.returncode}, {err.strip().splitlines()[0] if err.strip() else ''}")
    assert proc.returncode == 1 and "the peer fork server" in err and "exited with code -9" in err, err
    assert leftovers(pids) == []


def _fuzz_tool():
    """tools/fuzz_running.py as a module."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "tools" / "fuzz_running.py"
    spec = importlib.util.spec_from_file_location("fuzz_running", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def test_fuzzed_copies_of_real_messages_on_every_listening_socket_are_each_counted_and_change_nothing(tmp_path):
    """A mesh clearing without CURVE (hostile bytes reach the decoders), a clean run then one with up
    to 2000 mutated, truncated, retyped, stale, forged and garbage messages (tools/fuzz_running.py)
    sent by strangers to the coordinator's ROUTER and every peer host's mesh socket: exit 0, the same
    iterations, welfare and dispatch, and summary.json and the roles' logs count exactly the
    messages each role was sent."""
    import random as rnd

    fuzz = _fuzz_tool()
    scen = small_market(tmp_path / "small.yaml", 15, hours=3)
    extra = ["--topology", "mesh", "--tolerance", "1e-7"]
    templates = fuzz.capture(str(scen), "mesh", 3)
    peers = sorted({p for _, _, m in templates for p in getattr(m, "peer_ids", ())})
    templates += fuzz.synthetic(peers, 3)
    ref = fuzz.Run("small", "insecure", "ref", tmp_path / "insecure-ref")
    ref.start(str(scen), extra, 3, None, 20)
    assert ref.wait_ready(90)
    r = ref.finish(90)
    assert r["code"] == 0, r["stderr"]
    run = fuzz.Run("small", "insecure", "fuzz", tmp_path / "insecure-fuzz")
    run.start(str(scen), extra, 3, None, 20)
    assert run.wait_ready(90) and run.mesh
    forge = fuzz.Forge(templates, run.run_id, [*run.mesh, "coordinator"], seed=7)
    window_s = max(1.0, ref.wall_s - (ref.t_ready - ref.t_start))
    sent = fuzz.fuzz_insecure(run, forge, 2000, window_s, 2000.0, rnd.Random(7), with_huge=False)
    f = run.finish(90)
    row = fuzz.row("small", "insecure", "fuzz", run, f, r, sent)
    _report(f"fuzzed: {sent['sent']} sent, accounting {row['accounting']}, iterations {row['iterations']}")
    assert sent["sent"]["coordinator"] >= 100 and sent["sent"]["peers"] >= 100, sent
    assert row["ok"], (row["checks"], row["accounting"], row["stderr"])


def test_a_stopped_peer_host_that_runs_again_registers_again_under_policy_wait(tmp_path):
    """Policy wait: the victim is stopped (SIGSTOP) until the coordinator has given it up, then
    continued: it finds its coordinator silent, registers again as a new host process would, and
    the run ends at the optimum of the whole market."""
    scen = small_market(tmp_path / "small.yaml", 15, hours=3)
    out = tmp_path / "out"
    proc = _launch(scen, out, "wait", "--grace-s", "30")
    log = out / "logs" / "coordinator.log"
    victim = None
    try:
        deadline = time.monotonic() + 90
        wait_for(log, r"peers in 7 processes ready", deadline, proc)
        victim = int(re.search(r"pid (\d+)", (out / "logs" / f"{VICTIM}.log").read_text()).group(1))
        time.sleep(random.Random(8).uniform(0.2, 1.5))
        os.kill(victim, signal.SIGSTOP)
        wait_for(log, rf"{VICTIM} \(peer load2\) lost at iteration \d+ .*waiting up to 30 s", time.monotonic() + 30, proc)
        os.kill(victim, signal.SIGCONT)
        _, err = proc.communicate(timeout=120)
    finally:
        stop_run(proc)
        if victim is not None:
            try:
                os.kill(victim, signal.SIGCONT)
            except ProcessLookupError:
                pass
    assert proc.returncode == 0, err
    s = json.loads((out / "summary.json").read_text())
    (back,) = s["rejoined_peers"]
    ref = solve_p2p(peer_models(load_scenario(scen))).social_welfare_eur.sum()
    assert back["host"] == VICTIM and s["converged"] and s["dropped_peers"] == []
    assert abs(s["social_welfare_eur"] - ref) <= 1e-4 * abs(ref)
    assert "registering again (policy wait)" in (out / "logs" / f"{VICTIM}.log").read_text()
