"""Frequency requests: the coordinator and the TSO service (P2P_Freq and P2P_Full models).

FREQ_QUERY (coordinator -> TSO)
    ``hours``: int, the number of market hours the request must cover.
FREQ_REQUEST (TSO -> coordinator)
    ``virtual_load_mw``: float64 (hours,), a virtual load at the transformer's primary, per hour, in
    the consumer view: positive asks the community to consume more (or produce less), negative to
    consume less (or produce more); zero where no regulation is needed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from common.protocol import Int, Message, MsgType, Record, f64, float_array


@dataclass(frozen=True)
class FreqQuery(Message):
    """Coordinator -> TSO: ask for the frequency-regulation request."""

    TYPE: ClassVar[MsgType] = MsgType.FREQ_QUERY
    hours: int

    def to_body(self) -> dict[str, Any]:
        return {"hours": int(self.hours)}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> FreqQuery:
        return cls(body["hours"])


@dataclass(frozen=True, eq=False)
class FreqRequest(Message):
    """TSO -> coordinator: the virtual load per hour."""

    TYPE: ClassVar[MsgType] = MsgType.FREQ_REQUEST
    virtual_load_mw: np.ndarray

    def to_body(self) -> dict[str, Any]:
        return {"virtual_load_mw": f64(self.virtual_load_mw)}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> FreqRequest:
        return cls(body["virtual_load_mw"])


SCHEMAS: dict[MsgType, Record] = {
    MsgType.FREQ_QUERY: Record(required={"hours": Int(min=1, max=8784)}),
    MsgType.FREQ_REQUEST: Record(required={"virtual_load_mw": float_array(1)}),
}

MESSAGES: dict[MsgType, type[Message]] = {
    MsgType.FREQ_QUERY: FreqQuery,
    MsgType.FREQ_REQUEST: FreqRequest,
}
