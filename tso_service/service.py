"""The TSO frequency service process: answers FREQ_QUERY with its regulation request, a virtual
load at the transformer's primary per hour (MW, positive = regulation up: the community must
consume more / produce less; zero when the scenario asks for none)."""

from __future__ import annotations

import os
import socket
import sys
import time

import numpy as np

from common.protocol import ANY_RUN, Envelope, MsgType, ProtocolError
from common.protocol.control import Hello
from common.protocol.frequency import FreqRequest
from common.transport import Transport


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] tso: {msg}", file=sys.stderr, flush=True)


def regulation_request_mw(scenario) -> np.ndarray:
    if scenario.tso is None:
        return np.zeros(scenario.market.hours)
    return scenario._resolve(scenario.tso.virtual_load_mw, "tso.virtual_load_mw")


def serve(scenario_path: str, coordinator: str, timeout_s: float, idle_timeout_s: float) -> int:
    log(f"pid {os.getpid()} connecting to {coordinator}")
    from common.scenario import load_scenario

    scenario = load_scenario(scenario_path)
    request = regulation_request_mw(scenario)
    transport = Transport()
    dealer = transport.dealer(coordinator, identity="tso")
    try:
        transport.send(dealer, Hello(role="tso", peer_ids=(), pid=os.getpid(), host=socket.gethostname())
                       .envelope(run_id=ANY_RUN, sender="tso"))
        _, env = transport.recv(dealer, timeout_s, waiting_for="WELCOME from the coordinator")
        if env.type != MsgType.WELCOME:
            log(f"registration refused: {env.body}")
            return 1
        run_id = env.body["config"]["run_id"]
        transport.run_id = run_id

        def check(e: Envelope) -> None:
            if e.type not in (MsgType.FREQ_QUERY, MsgType.SHUTDOWN):
                raise ProtocolError("type", f"unexpected {e.type}")

        while True:
            _, env = transport.recv(dealer, idle_timeout_s, check=check, waiting_for="a FREQ_QUERY or SHUTDOWN from the coordinator")
            if env.type == MsgType.SHUTDOWN:
                log(f"shutdown: {env.body.get('reason', '')}")
                return 0
            hours = int(env.body["hours"])
            answer = np.resize(request, hours) if len(request) != hours else request
            transport.send(dealer, FreqRequest(virtual_load_mw=answer).envelope(run_id=run_id, sender="tso", iteration=env.iteration))
            log(f"regulation request sent: {float(np.sum(np.abs(answer))):.3f} MWh over {hours} h")
    except (TimeoutError, ConnectionError) as exc:
        log(f"stopped: {exc}")
        return 1
    finally:
        if transport.rejected:
            log(f"rejected messages: {dict(transport.rejected)}")
        transport.close()
