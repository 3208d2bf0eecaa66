"""The network model: latency, jitter and bandwidth per link, deterministic with a seed.

One model for both drivers: the in-process driver (``common.engine.InProcessDriver``) adds its
arrival times to the simulated clock; the socket shell (``common.shell``) holds each outgoing
message until its arrival time on the wall clock before handing it to ZeroMQ (environment
variable ``P2PM_NETWORK``, a JSON object, set by ``p2pm experiment`` for the processes it starts).

A *link* is a directed pair (sender, receiver) of role addresses. Its *kind* is one of
``coordinator-peer`` (either direction between the coordinator and a peer host),
``peer-peer`` (mesh trades) and ``coordinator-service`` (the DSO and the TSO); each kind has its
own :class:`LinkSpec` (``default`` for the kinds not given).

For the k-th message of ``nbytes`` bytes sent on a link at time ``now_s``:

- transmission: the link sends one message at a time at ``bandwidth_mbit_s`` (none: instantly):
  ``start = max(now_s, link free)``, ``link free = start + 8 * nbytes / (bandwidth_mbit_s * 1e6)``;
- propagation: ``latency_ms * (1 + jitter * u)`` with u uniform in [-1, 1], drawn from the link's
  own generator ``random.Random("<seed>|<sender>|<receiver>")`` (one draw per message on the link,
  whether or not the latency is zero, so the k-th draw never depends on other links);
- order: a link delivers in order (as TCP does): ``arrival = max(arrival, previous arrival on the
  link)``.

The same seed, message sequence per link and sizes give the same arrival times in both drivers.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field

ENV = "P2PM_NETWORK"
LINK_KINDS = ("coordinator-peer", "peer-peer", "coordinator-service")
SERVICES = ("dso", "tso")
COORDINATOR = "coordinator"


def link_kind(sender: str, receiver: str) -> str:
    ends = {sender, receiver}
    if COORDINATOR in ends:
        other = (ends - {COORDINATOR}).pop() if len(ends) > 1 else COORDINATOR
        return "coordinator-service" if other in SERVICES else "coordinator-peer"
    if ends & set(SERVICES):
        return "coordinator-service"
    return "peer-peer"


@dataclass(frozen=True)
class LinkSpec:
    latency_ms: float = 0.0
    jitter: float = 0.0  # fraction of the latency: uniform in latency x [1 - jitter, 1 + jitter]
    bandwidth_mbit_s: float | None = None  # None: unlimited

    def __post_init__(self):
        if self.latency_ms < 0 or not 0 <= self.jitter <= 1 or (self.bandwidth_mbit_s is not None
                                                                  and self.bandwidth_mbit_s <= 0):
            raise ValueError("latency_ms >= 0, 0 <= jitter <= 1 and bandwidth_mbit_s > 0 are required")

    @property
    def idle(self) -> bool:
        return self.latency_ms == 0 and self.bandwidth_mbit_s is None


@dataclass
class LinkNetwork:
    """Per-link latency, jitter and bandwidth (module docstring); ``arrival_s`` is the one entry point."""

    links: dict[str, LinkSpec] = field(default_factory=dict)
    default: LinkSpec = field(default_factory=LinkSpec)
    seed: int = 0

    def __post_init__(self):
        unknown = set(self.links) - set(LINK_KINDS)
        if unknown:
            raise ValueError(f"unknown link kind(s) {sorted(unknown)}; known: {', '.join(LINK_KINDS)}")
        self._rng: dict[tuple[str, str], random.Random] = {}
        self._free: dict[tuple[str, str], float] = {}
        self._last: dict[tuple[str, str], float] = {}

    @property
    def idle(self) -> bool:
        return self.default.idle and all(s.idle for s in self.links.values())

    def spec(self, sender: str, receiver: str) -> LinkSpec:
        return self.links.get(link_kind(sender, receiver), self.default)

    def arrival_s(self, sender: str, receiver: str, nbytes: int, now_s: float) -> float:
        key = (sender, receiver)
        spec = self.spec(sender, receiver)
        rng = self._rng.get(key)
        if rng is None:
            rng = self._rng[key] = random.Random(f"{self.seed}|{sender}|{receiver}")
        u = rng.uniform(-1.0, 1.0)
        start = now_s
        if spec.bandwidth_mbit_s is not None:
            start = max(now_s, self._free.get(key, 0.0))
            self._free[key] = start + 8.0 * nbytes / (spec.bandwidth_mbit_s * 1e6)
            start = self._free[key]
        arrival = start + spec.latency_ms * 1e-3 * (1.0 + spec.jitter * u)
        arrival = max(arrival, self._last.get(key, arrival))
        self._last[key] = arrival
        return arrival

    # -- passing the model to processes ---------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"seed": self.seed, "default": asdict(self.default),
                           "links": {k: asdict(v) for k, v in self.links.items()}})

    @classmethod
    def from_json(cls, text: str) -> "LinkNetwork":
        d = json.loads(text)
        return cls(links={k: LinkSpec(**v) for k, v in d.get("links", {}).items()},
                   default=LinkSpec(**d.get("default", {})), seed=int(d.get("seed", 0)))

    @classmethod
    def from_env(cls) -> "LinkNetwork | None":
        text = os.environ.get(ENV)
        if not text:
            return None
        model = cls.from_json(text)
        return None if model.idle else model
