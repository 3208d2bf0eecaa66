"""The TSO engine: answers FREQ_QUERY with its frequency-regulation request, a virtual load at the
transformer's primary per hour (MW, positive = regulation up: the community must consume more /
produce less; zero when the scenario asks for none). Built from its own settings only."""

from __future__ import annotations

import numpy as np

from common.engine import COORDINATOR, Finish, Log, Received, Send, Started
from common.protocol.control import Hello, Shutdown, Welcome
from common.protocol.frequency import FreqQuery, FreqRequest


class TSOEngine:
    name = "tso"

    def __init__(self, virtual_load_mw, pid: int = 0, host: str = ""):
        self.request_mw = np.asarray(virtual_load_mw, dtype=float)
        self.pid, self.host = pid, host

    def handle(self, event) -> list:
        if isinstance(event, Started):
            return [Send(COORDINATOR, Hello(role="tso", peer_ids=(), pid=self.pid, host=self.host))]
        if not isinstance(event, Received) or event.sender != COORDINATOR:
            return []
        msg = event.message
        if isinstance(msg, Welcome):
            return []
        if isinstance(msg, Shutdown):
            return [Log(f"shutdown: {msg.reason}"), Finish()]
        if isinstance(msg, FreqQuery):
            answer = self.request_mw if len(self.request_mw) == msg.hours else np.resize(self.request_mw, msg.hours)
            return [Log(f"regulation request: {float(np.sum(np.abs(answer))):.3f} MWh over {msg.hours} h"),
                    Send(COORDINATOR, FreqRequest(virtual_load_mw=answer), event.iteration)]
        return [Log(f"ignored an unexpected {msg.TYPE.value}")]
