"""The message contract shared by every role: constants, the envelope, the message base.

Wire format (SPEC section 4): one ZeroMQ frame holding a msgpack array
``[version, run_id, sender, type, iteration, body]``; the version comes first so that a receiver can
refuse a message of another version before looking at the rest. ``body`` is a map of plain msgpack
values (str, int, float, bool, nil, lists, maps with str keys) in which every numeric vector or
matrix is a numpy array (float64, int64 or bool) packed as binary by :mod:`common.codec`.

Every message type has one definition: a frozen :class:`msgspec.Struct` (a subclass of
:class:`Message`) whose fields are the body's fields, with their types and bounds
(``msgspec.Meta``), array dtypes and numbers of dimensions (:class:`Arr`) and cross-field checks
(``check``). The codec decodes a body straight into its message type, chosen by the envelope's
``type`` (the tag of the union of all message types, :data:`MESSAGES`). A body may not carry
fields that its message does not name; optional fields may be absent or nil and are left out when
they hold their default. The message sets live in one module each:

- :mod:`common.protocol.control`: HELLO, WELCOME, SHUTDOWN, HEARTBEAT, READY
- :mod:`common.protocol.market`: ROUND, UPDATE, TRADES, RESIDUALS, RESULT, PENALTY, DROP, PRICE_PROBE,
  QUANTITY_SUM, POOL_PRICE, POOL_QUANTITY
- :mod:`common.protocol.grid`: DISPATCH, GRID_REPORT, NETWORK_UPDATE, NETWORK_RESULT
- :mod:`common.protocol.frequency`: FREQ_QUERY, FREQ_REQUEST

This package imports only numpy and msgspec (no cvxpy, no pandapower): every role can import it cheaply.
"""

from __future__ import annotations

import sys
import types
import typing
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Self

import msgspec
import numpy as np

PROTOCOL_VERSION = 3
"""Version of the wire format and of the messages; a receiver refuses any other version."""

ANY_RUN = "*"
"""Run id of a HELLO from a role that does not know the run yet (started by hand); the coordinator's
WELCOME tells it the run id, and every later message must carry it."""

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""Largest encoded message accepted, in bytes (16 MiB); also the sockets' ZMQ MAXMSGSIZE."""

MAX_CONTAINER_LEN = 1 << 17
"""Largest list or map accepted inside a body (elements)."""

MAX_DEPTH = 16
"""Deepest nesting of lists/maps accepted inside a body."""

MAX_ID_LEN = 256
"""Longest run id, sender id or peer id accepted (characters)."""

MAX_TEXT_LEN = 1 << 20
"""Longest free text accepted (characters)."""

ARRAY_DTYPES = ("float64", "int64", "bool")
"""The only array dtypes that travel; everything is little-endian on the wire."""

REASONS = ("oversized", "malformed", "version", "run", "type", "body", "nonfinite", "stale")
"""Reason codes of :class:`ProtocolError`, used as keys of the transport's ``rejected`` counter."""


class ProtocolError(ValueError):
    """A message that breaks the contract. ``reason`` is one of :data:`REASONS`; ``detail`` says where."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown ProtocolError reason {reason!r}")
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class MsgType(StrEnum):
    """Every message type. The value is what travels and what ``messages.csv`` shows."""

    # control (common.protocol.control)
    HELLO = "hello"
    WELCOME = "welcome"
    SHUTDOWN = "shutdown"
    HEARTBEAT = "heartbeat"
    READY = "ready"
    # market rounds (common.protocol.market)
    ROUND = "round"
    UPDATE = "update"
    TRADES = "trades"
    RESIDUALS = "residuals"
    RESULT = "result"
    PENALTY = "penalty"
    DROP = "drop"
    PRICE_PROBE = "price_probe"
    QUANTITY_SUM = "quantity_sum"
    POOL_PRICE = "pool_price"
    POOL_QUANTITY = "pool_quantity"
    # grid checks (common.protocol.grid)
    DISPATCH = "dispatch"
    GRID_REPORT = "grid_report"
    NETWORK_UPDATE = "network_update"
    NETWORK_RESULT = "network_result"
    # frequency requests (common.protocol.frequency)
    FREQ_QUERY = "freq_query"
    FREQ_REQUEST = "freq_request"


# --------------------------------------------------------------------------------------------------
# Field types: msgspec checks them (and their Meta bounds) while decoding.
# --------------------------------------------------------------------------------------------------

_DBL_MAX = sys.float_info.max
_LEN = msgspec.Meta(max_length=MAX_CONTAINER_LEN)

Float = Annotated[float, msgspec.Meta(ge=-_DBL_MAX, le=_DBL_MAX)]
"""A finite float (an int is accepted too); NaN and infinities are refused (reason ``nonfinite``)."""
NonNegFloat = Annotated[float, msgspec.Meta(ge=0.0, le=_DBL_MAX)]
"""A finite float >= 0."""
Int = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
"""An int64 (not a bool)."""
NonNegInt = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
"""An int64 >= 0."""
Id = Annotated[str, msgspec.Meta(max_length=MAX_ID_LEN)]
"""A peer, host or role id."""
Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT_LEN)]
"""Free text (reasons, statuses, ...)."""
Ids = Annotated[tuple[Id, ...], _LEN]
"""A list of ids (a tuple in Python)."""


class Arr:
    """What an array field holds: ``Annotated[np.ndarray, Arr("float64", 2)]`` is a float64 array of
    2 dimensions (no ``ndim``: any number). Checked by :meth:`Record.__post_init__`."""

    __slots__ = ("dtype", "ndim")

    def __init__(self, dtype: str, *ndim: int) -> None:
        if dtype not in ARRAY_DTYPES:
            raise ValueError(f"arrays of {dtype} cannot travel")
        self.dtype = np.dtype(dtype)
        self.ndim = ndim


def check_array(name: str, a: Any, spec: Arr) -> None:
    """ProtocolError("body") unless ``a`` is an array as ``spec`` says."""
    if not isinstance(a, np.ndarray):
        raise ProtocolError("body", f"{name}: expected a {spec.dtype.name} array, got {type(a).__name__}")
    if a.dtype != spec.dtype:
        raise ProtocolError("body", f"{name}: expected a {spec.dtype.name} array, got {a.dtype.name}")
    if spec.ndim and a.ndim not in spec.ndim:
        raise ProtocolError("body", f"{name}: expected {'/'.join(map(str, spec.ndim))} dimensions, got shape {a.shape}")


def check_arrays(name: str, arrays: Mapping[str, Any], spec: Arr) -> None:
    """:func:`check_array` on every value of a map of arrays."""
    for key, a in arrays.items():
        check_array(f"{name}.{key}", a, spec)


F1 = Annotated[np.ndarray, Arr("float64", 1)]
"""A float64 vector (hours, ...)."""
F2 = Annotated[np.ndarray, Arr("float64", 2)]
"""A float64 matrix (partners x hours, ...)."""
FN = Annotated[np.ndarray, Arr("float64")]
"""A float64 array of any number of dimensions."""
I1 = Annotated[np.ndarray, Arr("int64", 1)]
"""An int64 vector."""
I2 = Annotated[np.ndarray, Arr("int64", 2)]
"""An int64 matrix."""
Arrays = Annotated[dict[Id, FN], _LEN]
"""Named float64 arrays."""


def _arrays_of(cls: type) -> tuple[tuple[str, Arr, bool], ...]:
    """(field name, array spec, may be None) of every array field of a Struct class."""
    out = []
    for name, hint in typing.get_type_hints(cls, include_extras=True).items():
        if name not in cls.__struct_fields__:
            continue
        optional = False
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            optional, hint = True, args[0] if len(args) == 1 else hint
        if typing.get_origin(hint) is Annotated:
            spec = next((m for m in hint.__metadata__ if isinstance(m, Arr)), None)
            if spec is not None:
                out.append((name, spec, optional))
    return tuple(out)


_ARRAY_FIELDS: dict[type, tuple[tuple[str, Arr, bool], ...]] = {}


def prepare_checks() -> None:
    """Find the array fields of every record class imported so far, now rather than at each class's
    first message (evaluating the annotations costs ~1 ms a class): a fork server does it once for
    all the processes it forks."""
    todo = [Record]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls not in _ARRAY_FIELDS:
            _ARRAY_FIELDS[cls] = _arrays_of(cls)


class Record(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True, eq=False):
    """Base of every message and of the records inside messages.

    After construction and after decoding, :meth:`__post_init__` checks the array fields' dtypes
    and dimensions (their :class:`Arr`) and then :meth:`check`, the cross-field consistency; both
    raise ``ProtocolError("body")``.
    """

    def __post_init__(self) -> None:
        cls = type(self)
        fields = _ARRAY_FIELDS.get(cls)
        if fields is None:
            fields = _ARRAY_FIELDS[cls] = _arrays_of(cls)
        for name, spec, optional in fields:
            a = getattr(self, name)
            if a is not None or not optional:
                check_array(name, a, spec)
        self.check()

    def check(self) -> None:
        """Cross-field consistency; raises ``ProtocolError("body", ...)``."""


class Message(Record, frozen=True, forbid_unknown_fields=True, omit_defaults=True, eq=False):
    """Base of the message types. ``TYPE`` is the envelope's type (the tag) of the message."""

    TYPE: ClassVar[MsgType]
    FREE: ClassVar[tuple[str, ...]] = ()
    """Fields holding free-form plain values (``Any``), which the codec scans (depth, finiteness)."""

    def envelope(self, *, run_id: str, sender: str, iteration: int = 0) -> Envelope:
        """This message in an envelope of the current protocol version."""
        return Envelope(PROTOCOL_VERSION, run_id, sender, self.TYPE, iteration, self)

    @classmethod
    def from_envelope(cls, env: Envelope) -> Self:
        """The typed message carried by ``env``; ProtocolError("type") if it is another type."""
        if env.type != cls.TYPE:
            raise ProtocolError("type", f"expected {cls.TYPE.value}, got {env.type.value}")
        return env.body

    def to_body(self) -> dict[str, Any]:
        """The body as it travels, as plain values (maps, lists, arrays)."""
        from common.codec import plain_body

        return plain_body(self)


class Envelope(msgspec.Struct, frozen=True, eq=False):
    """One message: who sent it, in which run, of which type, at which ADMM iteration, and its body.

    ``iteration`` is the ADMM iteration the message belongs to (0 for control messages and before the
    first round); receivers drop messages of another iteration as stale. ``body`` is the typed
    message (a :class:`Message` of type ``type``).
    """

    version: int
    run_id: str
    sender: str
    type: MsgType
    iteration: int
    body: Message


def make_envelope(
    type: MsgType, body: Message | Mapping[str, Any] | None = None, *, run_id: str, sender: str, iteration: int = 0
) -> Envelope:
    """An :class:`Envelope` of the current :data:`PROTOCOL_VERSION`. ``body`` is the typed message,
    or a map of its fields (converted and checked: ProtocolError "body" or "nonfinite" if it does not fit)."""
    mtype = MsgType(type)
    if not isinstance(body, Message):
        from common.codec import body_from_plain

        body = body_from_plain(mtype, dict(body or {}))
    return Envelope(PROTOCOL_VERSION, run_id, sender, mtype, int(iteration), body)


# The message-set modules import the names above, so they are imported last.
from common.protocol import control, frequency, grid, market  # noqa: E402

MESSAGES: dict[MsgType, type[Message]] = {
    cls.TYPE: cls
    for module in (control, market, grid, frequency)
    for cls in vars(module).values()
    if isinstance(cls, type) and issubclass(cls, Message) and cls.__module__ == module.__name__
}
"""The message type of every envelope type: the tagged union the codec decodes into."""

if set(MESSAGES) != set(MsgType):  # pragma: no cover - a programming error
    raise RuntimeError(f"message types without a definition: {sorted(set(MsgType) - set(MESSAGES))}")


def parse(env: Envelope) -> Message:
    """The typed message carried by a decoded envelope (its body)."""
    return env.body


__all__ = [
    "ANY_RUN",
    "ARRAY_DTYPES",
    "MAX_CONTAINER_LEN",
    "MAX_DEPTH",
    "MAX_ID_LEN",
    "MAX_MESSAGE_BYTES",
    "MAX_TEXT_LEN",
    "MESSAGES",
    "PROTOCOL_VERSION",
    "REASONS",
    "Arr",
    "Envelope",
    "F1",
    "F2",
    "FN",
    "Float",
    "I1",
    "I2",
    "Id",
    "Ids",
    "Int",
    "Message",
    "MsgType",
    "NonNegFloat",
    "NonNegInt",
    "ProtocolError",
    "Record",
    "Text",
    "check_array",
    "check_arrays",
    "control",
    "frequency",
    "grid",
    "make_envelope",
    "market",
    "parse",
]
