"""Control dialog: registration, configuration, errors, liveness, shutdown.

The chatty part of the protocol (STYLE "Contracts first"): an ERROR here is answered, not dropped.
Control messages carry iteration 0 unless they concern a given ADMM iteration.

HELLO (role -> coordinator)
    ``role``: "peer" | "dso" | "tso"; ``peer_ids``: list[str], the peers this process hosts (empty for
    the DSO/TSO); ``pid``: int, the OS process id; ``host``: str, the host name; ``address``: str,
    optional, the process's own listening address (mesh topology), e.g. ``tcp://10.0.0.5:5601``;
    ``public_keys``: optional {peer_id: hex X25519 public key}, relayed to every peer in WELCOME
    (``public_keys``) for the masked cost sums (``common.secagg``).
WELCOME (coordinator -> role)
    ``config``: map, the run settings the role needs (free-form plain msgpack values).
ERROR (either way)
    ``code``: str, short machine-readable code (e.g. "unknown_peer", "solver_failed"); ``text``: str.
SHUTDOWN (coordinator -> role)
    ``reason``: str (e.g. "done", "aborted: peer p7 lost").
HEARTBEAT (either way)
    application-level liveness (ZMQ heartbeats do not notice a process stuck in Python), sent every
    heartbeat interval by every role, also while its engine computes; optional ``rejected``:
    {reason: count}, the messages the sending role has refused so far (for ``summary.json``).
READY (role -> coordinator)
    empty body; the role has built its models and waits for rounds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from common.protocol import AnyValue, Int, ListOf, MapOf, Message, MsgType, Record, Str

ROLES = ("peer", "dso", "tso")


@dataclass(frozen=True)
class Hello(Message):
    """A role registers with the coordinator."""

    TYPE: ClassVar[MsgType] = MsgType.HELLO
    role: str
    peer_ids: tuple[str, ...]
    pid: int
    host: str
    address: str | None = None
    public_keys: dict[str, str] | None = None  # peer id -> X25519 public key (hex), for masked cost sums

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "role": self.role,
            "peer_ids": list(self.peer_ids),
            "pid": int(self.pid),
            "host": self.host,
        }
        if self.address is not None:
            body["address"] = self.address
        if self.public_keys is not None:
            body["public_keys"] = dict(self.public_keys)
        return body

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Hello:
        keys = body.get("public_keys")
        return cls(body["role"], tuple(body["peer_ids"]), body["pid"], body["host"], body.get("address"),
                   dict(keys) if keys is not None else None)


@dataclass(frozen=True, eq=False)
class Welcome(Message):
    """The coordinator accepts a role and hands it the run settings."""

    TYPE: ClassVar[MsgType] = MsgType.WELCOME
    config: dict[str, Any] = field(default_factory=dict)

    def to_body(self) -> dict[str, Any]:
        return {"config": dict(self.config)}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Welcome:
        return cls(dict(body["config"]))


@dataclass(frozen=True)
class Error(Message):
    """An error answered in the control dialog."""

    TYPE: ClassVar[MsgType] = MsgType.ERROR
    code: str
    text: str

    def to_body(self) -> dict[str, Any]:
        return {"code": self.code, "text": self.text}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Error:
        return cls(body["code"], body["text"])


@dataclass(frozen=True)
class Shutdown(Message):
    """Stop: the receiver exits cleanly."""

    TYPE: ClassVar[MsgType] = MsgType.SHUTDOWN
    reason: str

    def to_body(self) -> dict[str, Any]:
        return {"reason": self.reason}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Shutdown:
        return cls(body["reason"])


@dataclass(frozen=True)
class Heartbeat(Message):
    """Application-level liveness."""

    TYPE: ClassVar[MsgType] = MsgType.HEARTBEAT
    rejected: dict[str, int] | None = None  # reason -> messages the sender has refused so far

    def to_body(self) -> dict[str, Any]:
        return {} if self.rejected is None else {"rejected": {str(k): int(v) for k, v in self.rejected.items()}}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Heartbeat:
        rejected = body.get("rejected")
        return cls(dict(rejected) if rejected is not None else None)


@dataclass(frozen=True)
class Ready(Message):
    """The role is ready for rounds."""

    TYPE: ClassVar[MsgType] = MsgType.READY

    def to_body(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Ready:
        return cls()


SCHEMAS: dict[MsgType, Record] = {
    MsgType.HELLO: Record(
        required={
            "role": Str(choices=ROLES),
            "peer_ids": ListOf(Str(max_len=256)),
            "pid": Int(min=0),
            "host": Str(max_len=1024),
        },
        optional={"address": Str(max_len=1024), "public_keys": MapOf(Str(max_len=64))},
    ),
    MsgType.WELCOME: Record(required={"config": MapOf(AnyValue())}),
    MsgType.ERROR: Record(required={"code": Str(max_len=256), "text": Str()}),
    MsgType.SHUTDOWN: Record(required={"reason": Str()}),
    MsgType.HEARTBEAT: Record(optional={"rejected": MapOf(Int(min=0))}),
    MsgType.READY: Record(),
}

MESSAGES: dict[MsgType, type[Message]] = {
    MsgType.HELLO: Hello,
    MsgType.WELCOME: Welcome,
    MsgType.ERROR: Error,
    MsgType.SHUTDOWN: Shutdown,
    MsgType.HEARTBEAT: Heartbeat,
    MsgType.READY: Ready,
}
