"""The DSO service process: the DSO engine in the socket shell, built from the public scenario."""

from __future__ import annotations

import os
import socket

from common.deferred import defer
from common.logs import setup_logging
from common.shell import run_role

# what pandapower imports as it starts and the DSO never uses (it neither draws nor estimates): about
# 0.8 s of the service's start-up, deferred until first use (common.deferred)
UNUSED = ("pandapower.plotting", "pandapower.estimation", "matplotlib.pyplot", "scipy.stats")


def main(public, coordinator: str, timeout_s: float, idle_timeout_s: float, curve=None) -> int:
    defer(*UNUSED)
    from dso_service.engine import DSOEngine

    setup_logging("dso").info(f"connecting to {coordinator}")
    return run_role(DSOEngine(public, pid=os.getpid(), host=socket.gethostname()), coordinator, idle_timeout_s,
                    curve=curve, welcome_timeout_s=timeout_s)
