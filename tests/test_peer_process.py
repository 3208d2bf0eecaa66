"""A forked peer process never loses its reason: an exception in it reaches its log with the
traceback, and the fork server reports its exit code."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def test_a_forked_peer_that_fails_leaves_its_traceback_in_its_log(tmp_path):
    log = tmp_path / "h0000-x.log"
    zygote = subprocess.Popen([sys.executable, "-m", "peer_node.zygote"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    request = {"host_id": "h0000-x", "model_files": [str(tmp_path / "missing.json")],
               "coordinator": "tcp://127.0.0.1:9", "timeout_s": 1.0, "log": str(log)}
    out, _ = zygote.communicate(json.dumps(request) + "\n", timeout=60)
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["event"] for e in events] == ["started", "exit"]
    assert events[1]["code"] == 1
    text = log.read_text()
    assert "Traceback" in text and "FileNotFoundError" in text and "missing.json" in text
