"""The TSO frequency service process: answers FREQ_QUERY with its regulation request, a virtual
load at the transformer's primary per hour (MW, positive = regulation up: the community must
consume more / produce less; zero when the scenario asks for none)."""

from __future__ import annotations

import os

import numpy as np

from common.protocol import MsgType
from common.protocol.frequency import FreqRequest
from common.service import run_service, service_log

log = service_log("tso")


def regulation_request_mw(scenario) -> np.ndarray:
    if scenario.tso is None:
        return np.zeros(scenario.market.hours)
    return scenario._resolve(scenario.tso.virtual_load_mw, "tso.virtual_load_mw")


def serve(scenario_path: str, coordinator: str, timeout_s: float, idle_timeout_s: float) -> int:
    log(f"pid {os.getpid()} connecting to {coordinator}")
    from common.scenario import load_scenario

    request = regulation_request_mw(load_scenario(scenario_path))

    def on_query(env):
        hours = int(env.body["hours"])
        answer = request if len(request) == hours else np.resize(request, hours)
        log(f"regulation request: {float(np.sum(np.abs(answer))):.3f} MWh over {hours} h")
        return FreqRequest(virtual_load_mw=answer)

    return run_service("tso", coordinator, timeout_s, idle_timeout_s, {MsgType.FREQ_QUERY: on_query})
