"""Frequency requests: the coordinator and the TSO service (P2P_Freq and P2P_Full models).

FREQ_QUERY (coordinator -> TSO)
    ``hours``: int, the number of market hours the request must cover.
FREQ_REQUEST (TSO -> coordinator)
    ``virtual_load_mw``: float64 (hours,), a virtual load at the transformer's primary, per hour, in
    the consumer view: positive asks the community to consume more (or produce less), negative to
    consume less (or produce more); zero where no regulation is needed.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

import msgspec

from common.protocol import F1, Message, MsgType


class FreqQuery(Message, frozen=True, eq=True):
    """Coordinator -> TSO: ask for the frequency-regulation request."""

    TYPE: ClassVar[MsgType] = MsgType.FREQ_QUERY
    hours: Annotated[int, msgspec.Meta(ge=1, le=8784)]


class FreqRequest(Message, frozen=True):
    """TSO -> coordinator: the virtual load per hour."""

    TYPE: ClassVar[MsgType] = MsgType.FREQ_REQUEST
    virtual_load_mw: F1
