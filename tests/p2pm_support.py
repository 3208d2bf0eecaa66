"""Shared helpers of the tests (imported as ``p2pm_support``: ``conftest`` is not a unique module
name once a subfolder has its own conftest.py).

- ``run_cli``: ``p2pm ARGS`` in a subprocess (``python -m p2pm``): the distributed runs, with a real
  OS process for every role; tests that use it are marked ``e2e``;
- ``invoke``: ``p2pm ARGS`` in this process (typer's CliRunner): the centralized reference runs and
  anything that starts no process;
- ``small_market``: a random P2P market on the IEEE 33-bus feeder;
- ``split``: ``p2pm scenarios split``; ``assert_no_private_data``: a results folder holds none of
  the peers' private data.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from typer.testing import CliRunner

PY = sys.executable
P2PM = [PY, "-m", "p2pm"]


def run_cli(*args, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """``p2pm ARGS`` in a subprocess (real processes for every role of a distributed run)."""
    return subprocess.run([*P2PM, *map(str, args)], capture_output=True, text=True, timeout=timeout, **kw)


def invoke(*args):
    """``p2pm ARGS`` in this process (no subprocess: for the centralized runs and bad input)."""
    from p2pm.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


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


def split(scenario, out: Path) -> tuple[Path, dict[str, Path]]:
    """``p2pm scenarios split SCENARIO --out OUT``: (public.json, {peer id: its private file})."""
    r = invoke("scenarios", "split", scenario, "--out", out)
    assert r.exit_code == 0, r.output
    return out / "public.json", {p.stem: p for p in sorted((out / "peers").glob("*.json"))}


def _distinctive(value: float) -> list[str]:
    """How a value could be written out, if it is distinctive enough not to appear by chance (a
    0.0, 4.0 or 0.3 would: those are checked through the field names only)."""
    if not math.isfinite(value):
        return []
    forms = {repr(float(value)), f"{value:.8g}", f"{value:.10g}"}
    return sorted(t for t in forms if "." in t and "e" not in t and len(re.sub(r"[^0-9]", "", t).strip("0")) >= 7)


def _keys(data) -> set[str]:
    if isinstance(data, dict):
        return set(data).union(*(_keys(v) for v in data.values()))
    if isinstance(data, list):
        return set().union(*(_keys(v) for v in data))
    return set()


def private_signature(public_file: Path, private_files: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(field names only the private files hold, distinctive cost values) of the peers."""
    public_fields = _keys(json.loads(public_file.read_text()))  # e.g. "hours", "tan_phi": public too
    names, values = set(), set()
    for path in private_files.values():
        data = json.loads(path.read_text())
        names |= set(data) - public_fields
        for key, v in data.items():
            if key.startswith("cost_") or "price" in key or "degradation" in key or "utility" in key:
                for x in np.ravel(np.asarray(v, dtype=float)):
                    values.update(_distinctive(float(x)))
    return names, values


def assert_no_private_data(out: Path, scenario, tmp: Path, logs: bool = True) -> None:
    """No file of the results folder ``out`` (tables, summary, scenario.json, logs, report) holds a
    private field name or a distinctive cost value of any peer's private file. ``logs``: the run
    was launched by ``p2pm run`` (which keeps every role's log in the folder), not by hand."""
    public, private = split(scenario, tmp / "private-split")
    names, values = private_signature(public, private)
    assert {"cost_a_eur_per_mw2h", "cost_b_eur_per_mwh"} <= names
    assert values, "the scenario has no distinctive cost value to look for"
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {"scenario.json", "summary.json", "dispatch.csv"} <= {p.name for p in files}
    assert any(p.parent.name == "logs" for p in files) == logs
    scenario_json = json.loads((out / "scenario.json").read_text())
    assert "roster" in scenario_json and "peers" not in scenario_json
    for p in files:
        text = p.read_text(errors="replace")
        leaked = sorted(n for n in names if n in text) + sorted(v for v in values if v in text)
        assert not leaked, f"{p.relative_to(out)} holds private data: {leaked[:5]}"


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def free_port() -> int:
    """A TCP port free on loopback now (for roles started at once that must know the address)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


# Faults of real processes (tests/test_faults.py and tools/fault_matrix.py): a small market slowed
# by a 3 ms link latency so that a fault falls inside the ADMM rounds.
FAULT_NETWORK = json.dumps({"default": {"latency_ms": 3.0}})


def fault_env(latency_ms: float | None = None) -> dict:
    """The environment of a faulted run's processes (the link latency of ``FAULT_NETWORK``, or
    ``latency_ms``)."""
    network = FAULT_NETWORK if latency_ms is None else json.dumps({"default": {"latency_ms": latency_ms}})
    return {**os.environ, "P2PM_NETWORK": network}


def launch_run(scen: Path, out: Path, policy: str, *extra, heartbeat_s: float = 0.5,
               timeout_s: float = 20, tolerance: float = 1e-6) -> subprocess.Popen:
    """``p2pm run SCEN`` in its own session (stdout and stderr piped), with ``--on-peer-loss policy``."""
    return subprocess.Popen([*P2PM, "run", str(scen), "--out", str(out), "--quiet", "--no-report", "--no-pool-price",
                             "--tolerance", str(tolerance), "--heartbeat-s", str(heartbeat_s), "--on-peer-loss", policy,
                             "--timeout-s", str(timeout_s), *map(str, extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=fault_env(),
                            start_new_session=True)


def stop_run(proc: subprocess.Popen) -> None:
    """End a run started in its own session (``launch_run``) if it still runs: its whole process
    group, then reap it."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def wait_for(path: Path, pattern: str, deadline: float, proc: subprocess.Popen | None = None) -> re.Match:
    """The first match of ``pattern`` in the file ``path`` once it appears (polled); AssertionError
    if ``proc`` ends first or at ``deadline`` (a ``time.monotonic()`` value)."""
    import time

    while True:
        text = path.read_text(errors="replace") if path.exists() else ""
        m = re.search(pattern, text)
        if m:
            return m
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr and not proc.stderr.closed else ""
            raise AssertionError(f"ended (code {proc.returncode}) before {pattern!r}:\n{err}")
        assert time.monotonic() < deadline, f"no {pattern!r} in {path}:\n{text[-2000:]}"
        time.sleep(0.01)


def leftovers(pids: list[int], timeout_s: float = 10.0) -> list[int]:
    """The processes of ``pids`` still alive after up to ``timeout_s`` (zombies count as gone)."""
    import time

    end = time.monotonic() + timeout_s
    while [p for p in pids if alive(p)] and time.monotonic() < end:
        time.sleep(0.05)
    return [p for p in pids if alive(p)]
