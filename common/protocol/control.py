"""Control dialog: registration, configuration, shutdown.

Control messages carry iteration 0 unless they concern a given ADMM iteration.

HELLO (role -> coordinator)
    ``role``: "peer" | "dso" | "tso"; ``peer_ids``: list[str], the peers this process hosts (empty for
    the DSO/TSO); ``pid``: int, the OS process id; ``host``: str, the host name; ``address``: str,
    optional, the process's own listening address (mesh topology), e.g. ``tcp://10.0.0.5:5601``;
    ``public_keys``: optional {host name: hex X25519 public key} (one per peer host), relayed to every peer in WELCOME
    (``public_keys``) for the masked cost sums (``common.secagg``).
WELCOME (coordinator -> role)
    ``config``: map, the run settings the role needs (free-form plain msgpack values).
SHUTDOWN (coordinator -> role)
    ``reason``: str (e.g. "done", "aborted: peer p7 lost").
HEARTBEAT (role -> coordinator; coordinator -> role)
    application-level liveness (ZMQ heartbeats do not notice a process stuck in Python), sent every
    heartbeat interval by every role, also while its engine computes; optional ``rejected``:
    {reason: count}, the messages the sending role has refused so far (for ``summary.json``).
READY (role -> coordinator)
    empty body; the role has built its models and waits for rounds.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import msgspec

from common.protocol import MAX_CONTAINER_LEN, Id, Ids, Message, MsgType, NonNegInt, Text

Role = Literal["peer", "dso", "tso"]
Address = Annotated[str, msgspec.Meta(max_length=1024)]
PublicKeys = Annotated[dict[Id, Annotated[str, msgspec.Meta(max_length=64)]], msgspec.Meta(max_length=MAX_CONTAINER_LEN)]


class Hello(Message, frozen=True, eq=True):
    """A role registers with the coordinator."""

    TYPE: ClassVar[MsgType] = MsgType.HELLO
    role: Role
    peer_ids: Ids
    pid: NonNegInt
    host: Address
    address: Address | None = None
    public_keys: PublicKeys | None = None  # host name -> X25519 public key (hex), for masked cost sums


class Welcome(Message, frozen=True):
    """The coordinator accepts a role and hands it the run settings."""

    TYPE: ClassVar[MsgType] = MsgType.WELCOME
    FREE: ClassVar[tuple[str, ...]] = ("config",)
    config: dict[str, Any]


class Shutdown(Message, frozen=True, eq=True):
    """Stop: the receiver exits cleanly."""

    TYPE: ClassVar[MsgType] = MsgType.SHUTDOWN
    reason: Text


class Heartbeat(Message, frozen=True, eq=True):
    """Application-level liveness, with the sender's counts of refused messages."""

    TYPE: ClassVar[MsgType] = MsgType.HEARTBEAT
    rejected: Annotated[dict[Id, NonNegInt], msgspec.Meta(max_length=MAX_CONTAINER_LEN)] | None = None


class Ready(Message, frozen=True, eq=True):
    """The role is ready for rounds."""

    TYPE: ClassVar[MsgType] = MsgType.READY
