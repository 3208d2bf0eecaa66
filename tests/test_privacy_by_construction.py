"""Each role is built from its own data only: a peer process reads only its own private file and
receives nothing of another peer's; the coordinator, DSO and TSO read the public file alone; the
coordinator learns the peers' costs only as a sum (secure aggregation)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from common.protocol.control import Welcome
from common.protocol.market import Penalty, Round, Trades
from common.scenario import load_scenario
from common.secagg import MaskKeys, mask_label, unmask_sum
from p2pm.local import engines_for

AUDIT = textwrap.dedent('''
    import os, sys
    _log = os.environ.get("P2PM_AUDIT_LOG")
    _busy = []
    if _log:
        def _hook(event, args):
            if event == "open" and not _busy and isinstance(args[0], (str, bytes)):
                _busy.append(1)
                try:
                    fd = os.open(_log + "." + str(os.getpid()), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                    os.write(fd, os.fsencode(args[0]) + b"\\n")
                    os.close(fd)
                finally:
                    _busy.pop()
        sys.addaudithook(_hook)
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.e2e
def test_roles_started_by_hand_open_only_their_own_files(tmp_path):
    split = tmp_path / "split"
    p2pm = [sys.executable, "-m", "p2pm"]
    subprocess.run([*p2pm, "scenarios", "split", "mv37", "--out", str(split)], check=True, capture_output=True)
    private = sorted((split / "peers").glob("*.json"))
    assert len(private) == 50 and all(oct(p.stat().st_mode)[-3:] == "600" for p in private)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(AUDIT)
    audit = tmp_path / "audit"
    audit.mkdir()
    address = f"tcp://127.0.0.1:{_free_port()}"
    procs = {}

    def start(name, *args):
        env = dict(os.environ, PYTHONPATH=f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                   P2PM_AUDIT_LOG=str(audit / name))
        with open(tmp_path / f"{name}.log", "w") as log:
            procs[name] = subprocess.Popen([*p2pm, *args], env=env, stdout=subprocess.DEVNULL, stderr=log)

    public = str(split / "public.json")
    keys = tmp_path / "keys"  # a CURVE key per role; each role is given its own folder only
    subprocess.run([*p2pm, "keys", "mv37", "--out", str(keys), "--peers-per-process", "10"], check=True,
                   capture_output=True)
    start("coordinator", "coordinator", "--scenario", public, "--bind", address, "--out", str(tmp_path / "out"),
          "--max-iterations", "20", "--no-report", "--timeout-s", "60", "--keys", str(keys / "coordinator"))
    start("dso", "dso", "--scenario", public, "--coordinator", address, "--keys", str(keys / "dso"))
    start("tso", "tso", "--scenario", public, "--coordinator", address, "--keys", str(keys / "tso"))
    hosts = json.loads((keys / "roster.json").read_text())["hosts"]
    groups = {host: [split / "peers" / f"{pid}.json" for pid in pids] for host, pids in hosts.items()}
    assert len(groups) == 5 and sorted(p for g in groups.values() for p in g) == private
    for host, group in groups.items():
        start(host, "peer", "--coordinator", address, "--keys", str(keys / host),
              *[a for f in group for a in ("--model", str(f))])
    try:
        code = procs["coordinator"].wait(timeout=120)
        for p in procs.values():
            p.wait(timeout=60)
    finally:
        for p in procs.values():
            p.kill()
    assert code == 0, (tmp_path / "coordinator.log").read_text()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["converged"] and summary["social_welfare_eur"] > 0  # welfare from the masked costs

    def opened(name):
        files = set()
        for log in audit.glob(f"{name}.*"):
            files |= {Path(line).resolve() for line in log.read_text().splitlines() if line}
        return files

    private_set = {p.resolve() for p in private}
    secrets = {p.resolve() for p in keys.glob("*/*.key_secret")}
    assert len(secrets) == 3 + 5
    for name in ("coordinator", "dso", "tso"):
        files = opened(name)
        assert Path(public).resolve() in files, name
        assert not files & private_set, f"{name} opened a peer's private file"
        assert files & secrets == {(keys / name / f"{name}.key_secret").resolve()}, f"{name} opened another's key"
    for host, group in groups.items():
        files = opened(host)
        assert files & private_set == {p.resolve() for p in group}, f"{host} opened another peer's file"
        assert Path(public).resolve() not in files
        assert files & secrets == {(keys / host / f"{host}.key_secret").resolve()}, f"{host} opened another's key"


def test_a_peer_host_receives_nothing_of_another_peers():
    """Every message delivered to a peer host in a relay and a mesh run concerns its own peers only."""
    for topology in ("relay", "mesh"):
        # relay from the pool price (price rounds included), mesh from the plain start
        sc = load_scenario("mv37", max_iterations=2, pool_price_start=topology == "relay")
        _, engines = engines_for(sc, topology=topology, peers_per_process=25)
        hosted = {e.name: set(e.peer_ids) for e in engines if hasattr(e, "peer_ids")}
        seen = []

        def check(now_s, sender, to, k, message):
            if to not in hosted:
                return
            mine = hosted[to]
            if isinstance(message, Round):
                assert set(message.peers) <= mine
            elif isinstance(message, Penalty):
                assert set(message.peers) <= mine
            elif isinstance(message, Trades):
                assert set(message.to_peers) <= mine
            elif isinstance(message, Welcome):
                cfg = message.config
                assert set(cfg.get("partners", {})) <= mine
                allowed = {"run_id", "hours", "public_keys", "topology", "partners", "market",
                           "price_init_eur_per_mwh", "hosts", "addresses", "heartbeat_s", "rekey"}
                assert set(cfg) <= allowed, set(cfg) - allowed
            seen.append(type(message).__name__)

        from common.engine import InProcessDriver, RunFailed

        driver = InProcessDriver(engines, trace=check)
        try:
            driver.run()
        except RunFailed:
            pass
        assert {"Round", "Welcome"} <= set(seen)


def test_masked_costs_reveal_only_their_sum():
    rng = np.random.default_rng(1)
    ids = [f"p{i}" for i in range(7)]
    keys = {i: MaskKeys(i) for i in ids}
    public = {i: k.public_hex for i, k in keys.items()}
    for k in keys.values():
        k.agree(public)
    costs = {i: rng.normal(100.0, 50.0, 24) for i in ids}
    label = mask_label("run1", 42)
    masked = {i: keys[i].masked(costs[i], label) for i in ids}
    np.testing.assert_allclose(unmask_sum(list(masked.values())), sum(costs.values()), atol=1e-5)
    # one report alone looks uniform in int64: nowhere near the cost
    for i in ids:
        assert np.all(np.abs(masked[i] / 1e6 - costs[i]) > 1e3)
    # fresh masks per report: the difference of two reports of one peer reveals nothing either
    again = keys["p0"].masked(costs["p0"], mask_label("run1", 43))
    assert np.all(np.abs((again - masked["p0"]) / 1e6) > 1e3)
    # a missing peer leaves the sum masked
    assert np.all(np.abs(unmask_sum([masked[i] for i in ids[1:]]) - sum(costs[i] for i in ids[1:])) > 1e3)


def test_mask_is_the_sum_of_the_pairwise_shake_masks():
    """A host's mask is, modulo 2^64, the SHAKE-256 mask of each pair added (partner after it) or
    subtracted (partner before it): computed row by row here, as the protocol says."""
    import hashlib

    keys = {h: MaskKeys(h) for h in ("h1", "h0", "h3", "h2")}
    public = {h: k.public_hex for h, k in keys.items()}
    for k in keys.values():
        k.agree(public)
    for host, k in keys.items():
        expected = np.zeros(24, dtype=np.uint64)
        for other, secret in k._secrets.items():
            row = np.frombuffer(hashlib.shake_256(secret + b"run1/cost/3").digest(8 * 24), dtype="<u8")
            expected = expected + row if host < other else expected - row
        assert np.array_equal(k.mask("run1/cost/3", 24), expected.view(np.int64)), host
    assert not MaskKeys("alone").mask("x", 5).any()


def test_host_shares_sum_to_the_masked_host_total_and_alone_look_random():
    from common.secagg import add_masked, split_shares, to_fixed

    rng = np.random.default_rng(2)
    hosts = {"h0": ["a", "b", "c"], "h1": ["d"], "h2": ["e", "f"]}
    keys = {h: MaskKeys(h) for h in hosts}
    public = {h: k.public_hex for h, k in keys.items()}
    for k in keys.values():
        k.agree(public)
    costs = {p: rng.normal(100.0, 50.0, 24) for ps in hosts.values() for p in ps}
    label = mask_label("run1", 7)
    reports = {}
    for h, ps in hosts.items():
        total = keys[h].masked_fixed(add_masked([to_fixed(costs[p]) for p in ps]), label)
        reports.update(zip(ps, split_shares(total, len(ps))))
    np.testing.assert_allclose(unmask_sum(list(reports.values())), sum(costs.values()), atol=1e-5)
    for p, share in reports.items():  # a peer's share is nowhere near its cost
        assert np.all(np.abs(share / 1e6 - costs[p]) > 1e3)
    # one host's shares add up to its masked sum only: still far from its peers' costs
    h0 = unmask_sum([reports[p] for p in hosts["h0"]])
    assert np.all(np.abs(h0 - sum(costs[p] for p in hosts["h0"])) > 1e3)
