"""Role engines and the in-process driver.

Every role (coordinator, peer host, DSO, TSO) is an *engine*: a plain object built only from the
data its role owns, with one entry point ``handle(event) -> list[Instruction]``. Engines never touch
a socket, a file, a process or the wall clock: time comes in with each event (``now_s``) and the
work they report (local solve times) is measured with a timer handed to them.

Two drivers run engines:
- :class:`InProcessDriver` (here): one queue in one process, messages optionally through the real
  codec so that they and their bytes are counted exactly as on the wire, a simulated clock with an
  optional network model (latency per message);
- :mod:`common.shell`: the socket shell that runs one engine per OS process over ZeroMQ.

Addresses are role names: ``"coordinator"``, ``"dso"``, ``"tso"`` and the peer hosts' ids.
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from common.codec import decode, encode
from common.protocol import Message, ProtocolError, parse
from common.transport import TrafficCounter

COORDINATOR = "coordinator"


# ----------------------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Started:
    """The engine's process (or the in-process run) has started."""

    now_s: float = 0.0


@dataclass(frozen=True)
class Received:
    """A valid message arrived from ``sender`` (its routing identity), for ADMM ``iteration``."""

    sender: str
    message: Message
    iteration: int = 0
    now_s: float = 0.0


@dataclass(frozen=True)
class Deadline:
    """Nothing the engine waits for arrived within the driver's timeout."""

    timeout_s: float
    now_s: float = 0.0


@dataclass(frozen=True)
class PeerLost:
    """The driver learnt that a role's connection or process is gone (``reason`` says how: a send
    that could not leave, a disconnection)."""

    host: str
    now_s: float = 0.0
    reason: str = ""


@dataclass(frozen=True)
class Tick:
    """Time passes (every heartbeat interval in the socket shell): the engine checks its deadlines
    and the liveness of the roles it waits for, and may send heartbeats."""

    now_s: float = 0.0


Event = Started | Received | Deadline | PeerLost | Tick


# ----------------------------------------------------------------------------------- instructions


@dataclass(frozen=True)
class Send:
    to: str
    message: Message
    iteration: int = 0


@dataclass(frozen=True)
class Finish:
    """The engine is done; ``outcome`` is what the driver hands back (results, or None)."""

    outcome: Any = None


@dataclass(frozen=True)
class Fail:
    """The run cannot go on: ``role`` names who is to blame, ``reason`` says why."""

    role: str
    reason: str
    outcome: Any = None  # what was computed before the failure (partial results), if anything


@dataclass(frozen=True)
class Note:
    """A progress event for the user (the launcher's progress line), e.g. ``iteration``."""

    event: str
    fields: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Log:
    """A line for the role's log; ``level``: "debug" | "info" | "warning" | "error"."""

    text: str
    level: str = "info"


@dataclass(frozen=True)
class Checkpoint:
    """State to write atomically so that the run can resume from it (``common.checkpoint``)."""

    state: Any


Instruction = Send | Finish | Fail | Note | Log | Checkpoint


class Engine(Protocol):
    name: str

    def handle(self, event: Event) -> list[Instruction]: ...


# ----------------------------------------------------------------------------------- the driver


@dataclass
class NetworkModel:
    """Latency per message on the simulated clock: ``base_s`` plus ``per_byte_s`` per encoded byte.
    (``common.network.LinkNetwork`` is the per-link model with jitter and bandwidth; the driver takes
    either.)"""

    base_s: float = 0.0
    per_byte_s: float = 0.0

    def delay_s(self, nbytes: int) -> float:
        return self.base_s + self.per_byte_s * nbytes


class RunFailed(RuntimeError):
    def __init__(self, role: str, reason: str, outcome: Any = None):
        super().__init__(f"{role}: {reason}")
        self.role, self.reason, self.outcome = role, reason, outcome


class InProcessDriver:
    """Runs a set of engines in one process until ``main`` (the coordinator) finishes.

    With ``wire=True`` every message is encoded and decoded by the codec (run id, sender, iteration,
    schema, size and finiteness checks) and ``traffic`` counts messages and bytes per (iteration,
    type) exactly as the sockets would. ``network`` delays each message on the simulated clock.
    ``trace``, if given, is called with ``(now_s, sender, to, iteration, message)`` for every delivery.
    ``lose``: ``{host: iteration}``, fault injection: the host is gone (it gets no more messages) once
    a message of that iteration is sent to it, and the main engine learns it with ``PeerLost``;
    ``restart``: ``{host: factory}``, a lost host started again at once (a new engine from ``factory()``
    under the same name, e.g. ``p2pm peer`` run again). ``checkpoints`` keeps every ``Checkpoint``'s state.
    """

    def __init__(self, engines: list, *, main: str = COORDINATOR, wire: bool = True, run_id: str = "inproc",
                 network: NetworkModel | None = None, trace: Callable | None = None, max_events: int = 50_000_000,
                 lose: dict[str, int] | None = None, restart: dict[str, Callable] | None = None):
        self.engines = {e.name: e for e in engines}
        self.main = main
        self.wire = wire
        self.run_id = run_id
        self.network = network or NetworkModel()
        self.trace = trace
        self.max_events = max_events
        self.traffic = TrafficCounter()
        self.rejected: Counter = Counter()
        self.notes: list[Note] = []
        self.logs: list[tuple[str, str]] = []
        self.checkpoints: list = []  # every Checkpoint's state, in order
        self.now_s = 0.0
        self._queue: list = []
        self._seq = 0
        self.finished: dict[str, Any] = {}
        self.lose = dict(lose or {})
        self.restart = dict(restart or {})
        self.lost: dict[str, float] = {}  # host -> when it was lost (simulated clock)

    def _push(self, at_s: float, to: str, event) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (at_s, self._seq, to, event))

    def _execute(self, source: str, instructions: list) -> None:
        for ins in instructions:
            if isinstance(ins, Send):
                self._send(source, ins)
            elif isinstance(ins, Finish):
                self.finished[source] = ins.outcome
            elif isinstance(ins, Fail):
                raise RunFailed(ins.role, ins.reason, ins.outcome)
            elif isinstance(ins, Note):
                self.notes.append(ins)
            elif isinstance(ins, Log):
                self.logs.append((source, ins.text))
            elif isinstance(ins, Checkpoint):
                self.checkpoints.append(ins.state)

    def _send(self, source: str, ins: Send) -> None:
        if ins.to in self.lost:
            return
        if ins.to in self.lose and ins.iteration >= self.lose[ins.to]:
            self.lost[ins.to] = self.now_s
            self._push(self.now_s, self.main, PeerLost(ins.to, self.now_s, "lost (fault injection)"))
            factory = self.restart.pop(ins.to, None)
            if factory is not None:
                del self.lose[ins.to], self.lost[ins.to]
                self.engines[ins.to] = factory()
                self._execute(ins.to, self.engines[ins.to].handle(Started(self.now_s)))
            return
        if ins.to not in self.engines:
            raise RunFailed(source, f"sent {ins.message.TYPE.value} to {ins.to!r}, which is not part of the run")
        message, nbytes = ins.message, 0
        if self.wire:
            data = encode(ins.message.envelope(run_id=self.run_id, sender=source, iteration=ins.iteration))
            nbytes = len(data)
            try:
                message = parse(decode(data, expect_run=self.run_id))
            except ProtocolError as exc:
                self.rejected[exc.reason] += 1
                return
        self.traffic.add(ins.iteration, ins.message.TYPE.value, nbytes)
        if self.trace is not None:
            self.trace(self.now_s, source, ins.to, ins.iteration, message)
        if hasattr(self.network, "arrival_s"):  # common.network.LinkNetwork: per link, seeded
            at_s = self.network.arrival_s(source, ins.to, nbytes, self.now_s)
        else:
            at_s = self.now_s + self.network.delay_s(nbytes)
        self._push(at_s, ins.to, Received(source, message, ins.iteration))

    def run(self) -> Any:
        """Start every engine and deliver messages until the main engine finishes; returns its
        outcome. Raises :class:`RunFailed` when an engine fails (or the run stalls)."""
        for name, engine in self.engines.items():
            self._execute(name, engine.handle(Started(self.now_s)))
        events = 0
        while self.main not in self.finished:
            if not self._queue:
                engine = self.engines[self.main]
                self._execute(self.main, engine.handle(Deadline(0.0, self.now_s)))
                if self.main in self.finished:
                    break
                raise RunFailed(self.main, "the run stalled: no message in flight and nothing finished")
            at_s, _, to, event = heapq.heappop(self._queue)
            self.now_s = max(self.now_s, at_s)
            if isinstance(event, PeerLost):
                self._execute(to, self.engines[to].handle(event))
                continue
            if event.sender in self.lost:
                continue  # in flight when its sender was lost
            event = Received(event.sender, event.message, event.iteration, self.now_s)
            events += 1
            if events > self.max_events:
                raise RunFailed(self.main, f"more than {self.max_events} messages")
            if (to in self.finished and to != self.main) or to in self.lost:
                continue  # a role that has shut down gets no more messages
            self._execute(to, self.engines[to].handle(event))
        # deliver what is still in flight (SHUTDOWNs), so that every engine ends cleanly
        while self._queue:
            at_s, _, to, event = heapq.heappop(self._queue)
            if to not in self.finished and to not in self.lost and isinstance(event, Received):
                self.now_s = max(self.now_s, at_s)
                self._execute(to, self.engines[to].handle(Received(event.sender, event.message, event.iteration,
                                                                   self.now_s)))
        return self.finished[self.main]
