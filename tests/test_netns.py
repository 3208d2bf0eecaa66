"""Two hosts on one machine: the coordinator in one Linux network namespace, the DSO, the TSO and
the peer processes in another, joined by a veth pair; mesh topology, so the peers also reach each
other over the link. The roles are started by hand from ``p2pm scenarios split``: the coordinator,
DSO and TSO get the public part, each peer process only its own peers' private files. Skipped where
network namespaces cannot be made (not root, no iproute2, no veth)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid

import pytest

from p2pm_support import P2PM, assert_no_private_data, invoke, small_market, split

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def two_hosts():
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("network namespaces need root and iproute2")
    tag = uuid.uuid4().hex[:6]
    a, b = f"p2pa{tag}", f"p2pb{tag}"
    try:
        try:
            _ip("netns", "add", a)
            _ip("netns", "add", b)
            _ip("link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vb{tag}")
            _ip("link", "set", f"va{tag}", "netns", a)
            _ip("link", "set", f"vb{tag}", "netns", b)
            for ns, dev, addr in ((a, f"va{tag}", "10.78.0.1/24"), (b, f"vb{tag}", "10.78.0.2/24")):
                _ip("-n", ns, "addr", "add", addr, "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
            pytest.skip(f"cannot make two network namespaces joined by a veth pair here: {exc}")
        yield a, b
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_roles_on_two_hosts_clear_the_market(tmp_path, two_hosts):
    a, b = two_hosts
    scen = small_market(tmp_path / "small.yaml", 3, hours=3)
    public, private = split(scen, tmp_path / "split")
    keys = tmp_path / "keys"  # CURVE across the two hosts: each role its own key folder
    assert invoke("keys", scen, "--out", keys, "--peers-per-process", 4).exit_code == 0
    out = tmp_path / "out"
    coord = "tcp://10.78.0.1:5555"
    procs = []
    try:
        # every role starts at once: the others connect (and retry) until the coordinator listens
        procs.append(subprocess.Popen(["ip", "netns", "exec", a, *P2PM, "coordinator", "--scenario", str(public),
                                       "--bind", coord, "--out", str(out), "--timeout-s", "60", "--topology", "mesh",
                                       "--no-report", "--keys", str(keys / "coordinator")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for role in ("dso", "tso"):
            procs.append(subprocess.Popen(["ip", "netns", "exec", b, *P2PM, role, "--scenario", str(public),
                                           "--coordinator", coord, "--keys", str(keys / role)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        # two peer processes (sellers, buyers), each with its own peers' private files only
        groups = {"h0000-grid": ["grid", "chp1", "pv1", "wind1"], "h0001-load0": ["load0", "load1", "load2"]}
        assert sorted(sum(groups.values(), [])) == sorted(private)
        for host, ids in groups.items():
            models = [x for pid in ids for x in ("--model", str(private[pid]))]
            procs.append(subprocess.Popen(["ip", "netns", "exec", b, *P2PM, "peer", *models, "--keys", str(keys / host),
                                           "--coordinator", coord, "--bind-host", "10.78.0.2",
                                           "--advertise-host", "10.78.0.2", "--timeout-s", "60"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        codes = [p.wait(timeout=90) for p in procs]
        assert codes == [0] * len(procs)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["converged"] and summary["processes"] == 2 + 3 and summary["peer_processes"] == 2
        assert summary["topology"] == "mesh" and summary["messages"] > 0
        assert_no_private_data(out, scen, tmp_path, logs=False)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
