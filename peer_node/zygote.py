"""A clean fork server for local runs: imports only the peer code, then forks one peer process
per request, so that dozens of peers start in a fraction of a second (a fresh interpreter per
peer costs ~0.3 s of CPU in imports alone).

Protocol on stdin/stdout, one JSON object per line:
  in:  {"host_id", "model_files": [paths of the hosted peers' private files], "coordinator", "timeout_s",
        "heartbeat_s", "log", "keys": the host's own CURVE key folder or null}
  out: {"event": "started", "host_id", "pid"} / {"event": "exit", "pid", "code", "peak_rss_kib", "cpu_s"}
After stdin closes, the zygote reaps its children and exits when the last one has.
Each child reads only its own peers' private files (the zygote never loads a scenario).
"""

from __future__ import annotations

import json
import os
import signal
import sys

# The imports are the point: every forked peer inherits them (the community market's local
# solvers need scipy.sparse, OSQP and Clarabel for the EVs).
import clarabel  # noqa: F401
import osqp  # noqa: F401

import common.community  # noqa: F401
import peer_node.engine  # noqa: F401
from common.process import die_with_parent
from common.protocol import prepare_checks
from common.secagg import MaskKeys
from peer_node.main import child_main

MaskKeys("warm-up")  # OpenSSL's lazy set-up (~30 ms) once here, not in every forked peer
prepare_checks()  # the messages' array checks (~15 ms of CPU per peer process otherwise)


def _say(**event) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def main() -> int:
    die_with_parent()
    children = 0
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the peer process
            die_with_parent()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            try:
                sys.stdin.close()
                os.close(0)
            except OSError:
                pass
            child_main(req["model_files"], req["coordinator"], req["host_id"], float(req["timeout_s"]), req["log"],
                       req.get("keys"), float(req.get("heartbeat_s", 1.0)))
            os._exit(1)  # child_main never returns
        children += 1
        _say(event="started", host_id=req["host_id"], pid=pid)
    while children:
        try:
            pid, status, rusage = os.wait4(-1, 0)
        except ChildProcessError:
            break
        children -= 1
        _say(event="exit", pid=pid, code=os.waitstatus_to_exitcode(status), peak_rss_kib=rusage.ru_maxrss,
             cpu_s=rusage.ru_utime + rusage.ru_stime)
    return 0


if __name__ == "__main__":
    sys.exit(main())
