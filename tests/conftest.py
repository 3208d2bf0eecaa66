"""Fixtures shared by the tests; the helpers are in ``p2pm_support``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from p2pm_support import invoke, run_cli

_NETWORKS: dict = {}


@pytest.fixture
def networks_built_once(monkeypatch):
    """``dso_service.networks.build_network`` memoized on the network section and the network
    file's content; every call still gets a fresh, independent copy of the net. (pandapower takes
    ~0.5 s to build even a 4-bus feeder from JSON, and the in-process runs of a test build the same
    network for the DSO engine and the AC checks of the reference again and again.)"""
    import copy

    import dso_service.networks as networks

    build = networks.build_network

    def build_once(spec):
        key = (spec.model_dump_json(exclude={"file"}), Path(spec.file).read_bytes() if spec.file else b"")
        if key not in _NETWORKS:
            _NETWORKS[key] = build(spec)
        return copy.deepcopy(_NETWORKS[key])

    monkeypatch.setattr(networks, "build_network", build_once)


@pytest.fixture
def admm_and_centralized(tmp_path):
    """Run a scenario distributed (real processes; ``--no-report`` unless ``report``) and
    centralized (in this process); (admm dir, centralized dir, their summaries)."""

    def run(scenario: Path, *extra, report: bool = False):
        admm, central = tmp_path / "admm", tmp_path / "central"
        r = run_cli("run", scenario, "--out", admm, "--quiet", *([] if report else ["--no-report"]), *extra)
        assert r.returncode == 0, r.stderr + r.stdout
        c = invoke("run", scenario, "--solver", "centralized", "--out", central, "--no-report")
        assert c.exit_code == 0, c.output
        return admm, central, *(json.loads((d / "summary.json").read_text()) for d in (admm, central))

    return run
