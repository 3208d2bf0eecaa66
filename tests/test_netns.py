"""Two hosts on one machine: the coordinator in one Linux network namespace, the DSO, the TSO and
every peer in another, joined by a veth pair; mesh topology, so the peers also reach each other
over the link. Skipped where network namespaces cannot be made (not root, no iproute2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_distributed import small_market  # noqa: E402

PY = sys.executable


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def two_hosts():
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("network namespaces need root and iproute2")
    tag = uuid.uuid4().hex[:6]
    a, b = f"p2pa{tag}", f"p2pb{tag}"
    try:
        _ip("netns", "add", a)
        _ip("netns", "add", b)
    except (subprocess.CalledProcessError, OSError):
        subprocess.run(["ip", "netns", "del", a], capture_output=True)
        pytest.skip("cannot create network namespaces here")
    try:
        _ip("link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vb{tag}")
        _ip("link", "set", f"va{tag}", "netns", a)
        _ip("link", "set", f"vb{tag}", "netns", b)
        for ns, dev, addr in ((a, f"va{tag}", "10.78.0.1/24"), (b, f"vb{tag}", "10.78.0.2/24")):
            _ip("-n", ns, "addr", "add", addr, "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield a, b
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_roles_on_two_hosts_clear_the_market(tmp_path, two_hosts):
    a, b = two_hosts
    scen = small_market(tmp_path / "small.yaml", 2, hours=3)
    out = tmp_path / "out"
    coord = "tcp://10.78.0.1:5555"
    cli = [PY, "-m", "common.cli"]
    procs = []
    try:
        procs.append(subprocess.Popen(["ip", "netns", "exec", a, *cli, "coordinator", "--scenario", str(scen), "--bind", coord,
                                       "--out", str(out), "--timeout-s", "60", "--topology", "mesh"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for role in ("dso", "tso"):
            procs.append(subprocess.Popen(["ip", "netns", "exec", b, *cli, role, "--scenario", str(scen), "--coordinator", coord],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for pid in ("grid", "chp1", "pv1", "wind1", "load0", "load1", "load2"):
            procs.append(subprocess.Popen(["ip", "netns", "exec", b, *cli, "peer", "--scenario", str(scen), "--peer-id", pid,
                                           "--coordinator", coord, "--bind-host", "10.78.0.2", "--advertise-host", "10.78.0.2",
                                           "--timeout-s", "60"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        codes = [p.wait(timeout=240) for p in procs]
        assert codes == [0] * len(procs)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["converged"] and summary["processes"] == 10 and summary["messages"] > 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
