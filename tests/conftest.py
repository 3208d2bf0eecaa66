"""Shared helpers of the end-to-end tests: the ``p2pm`` command line in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    """``p2pm ARGS`` in a subprocess (real processes for every role of a distributed run)."""
    return subprocess.run([sys.executable, "-m", "common.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def admm_and_centralized(tmp_path):
    """Run a scenario distributed and centralized; (admm dir, centralized dir, their summaries)."""

    def run(scenario: Path):
        admm, central = tmp_path / "admm", tmp_path / "central"
        for out, extra in ((admm, ["--quiet"]), (central, ["--solver", "centralized"])):
            r = run_cli("run", scenario, "--out", out, *extra)
            assert r.returncode == 0, r.stderr + r.stdout
        return admm, central, *(json.loads((d / "summary.json").read_text()) for d in (admm, central))

    return run
