"""The local launcher's supervision after the coordinator has written the results (no process)."""

from __future__ import annotations

import json
import queue
import signal
import threading
from pathlib import Path

from p2pm.launcher import Launch, Role, _Progress, supervise


class _Recorded(Role):
    def stop(self, sig=signal.SIGTERM) -> None:
        self.signals = [*getattr(self, "signals", []), sig]
        self.exitcode = -sig


def test_a_dropped_peer_host_is_stopped_once_the_results_are_written():
    """A dropped host may be a stopped (SIGSTOP) process that never reads its SHUTDOWN, and the fork
    server waits for it: the launcher stops it instead of waiting out its timeout."""
    coord = Role("coordinator", Path("coordinator.log"), exitcode=0)
    dropped = _Recorded("peer load2", Path("h0006-load2.log"), is_peer=True, forked_pid=123)
    other = _Recorded("peer load1", Path("h0005-load1.log"), is_peer=True, forked_pid=124, exitcode=0)
    events: queue.Queue = queue.Queue()
    for ev in ({"event": "dropped", "host": "h0006-load2"}, {"event": "done"}):
        events.put(("coordinator", json.dumps(ev)))
    supervise(Launch([coord, dropped, other]), coord, events, _Progress(quiet=True), threading.Event(),
              timeout_s=3600, dropped_ok=True)
    assert dropped.signals == [signal.SIGTERM]
    assert not hasattr(other, "signals")
