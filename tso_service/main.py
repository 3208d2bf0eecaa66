"""The TSO service process: the TSO engine in the socket shell, built from its own settings (the
public scenario's request)."""

from __future__ import annotations

import os
import socket

from common.logs import setup_logging
from common.shell import run_role
from tso_service.engine import TSOEngine


def main(public, coordinator: str, timeout_s: float, idle_timeout_s: float, curve=None) -> int:
    setup_logging("tso").info(f"connecting to {coordinator}")
    return run_role(TSOEngine(public.tso_virtual_load_mw, pid=os.getpid(), host=socket.gethostname()), coordinator,
                    idle_timeout_s, curve=curve, welcome_timeout_s=timeout_s)
