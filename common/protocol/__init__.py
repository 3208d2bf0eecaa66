"""The message contract shared by every role: constants, the envelope, the schema registry.

Wire format (SPEC section 4): one ZeroMQ frame holding a msgpack array
``[version, run_id, sender, type, iteration, body]``; the version comes first so that a receiver can
refuse a message of another version before looking at the rest. ``body`` is a map of plain msgpack
values (str, int, float, bool, nil, bin, lists, maps with str keys) in which every numeric vector or
matrix is a numpy array (float64, int64 or bool) packed as binary by :mod:`common.codec`.

The message sets live in one module each, with typed frozen definitions and their schemas:

- :mod:`common.protocol.control`: HELLO, WELCOME, ERROR, SHUTDOWN, HEARTBEAT, READY
- :mod:`common.protocol.market`: ROUND, UPDATE, TRADES, RESIDUALS, RESULT, PENALTY, DROP
- :mod:`common.protocol.grid`: DISPATCH, GRID_REPORT, NETWORK_UPDATE, NETWORK_RESULT
- :mod:`common.protocol.frequency`: FREQ_QUERY, FREQ_REQUEST

:data:`SCHEMAS` merges their schemas; it is the single definition the codec validates every body
against, on encode and on decode. A body may not carry fields that its schema does not name (add the
field to the schema; a change that old receivers cannot read needs a new :data:`PROTOCOL_VERSION`).
Optional fields may be absent or nil.

This package imports only numpy (no cvxpy, no pandapower): every role can import it cheaply.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Self

import numpy as np

PROTOCOL_VERSION = 1
# run id of a HELLO from a role that does not know the run yet (started by hand); the
# coordinator's WELCOME tells it the run id, and every later message must carry it.
ANY_RUN = "*"
"""Version of the wire format and of the schemas; a receiver refuses any other version."""

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""Largest encoded message accepted, in bytes (16 MiB); also the sockets' ZMQ MAXMSGSIZE."""

MAX_CONTAINER_LEN = 1 << 17
"""Largest msgpack list or map accepted by the decoder (elements)."""

MAX_DEPTH = 16
"""Deepest nesting of lists/maps accepted inside a body."""

MAX_ID_LEN = 256
"""Longest run id or sender id accepted (characters)."""

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
    ERROR = "error"
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


@dataclass(frozen=True, eq=False)
class Envelope:
    """One message: who sent it, in which run, of which type, at which ADMM iteration, and its body.

    ``iteration`` is the ADMM iteration the message belongs to (0 for control messages and before the
    first round); receivers drop messages of another iteration as stale. ``body`` is validated against
    ``SCHEMAS[type]``.
    """

    version: int
    run_id: str
    sender: str
    type: MsgType
    iteration: int
    body: dict[str, Any] = field(default_factory=dict)


def make_envelope(
    type: MsgType, body: Mapping[str, Any] | None = None, *, run_id: str, sender: str, iteration: int = 0
) -> Envelope:
    """An :class:`Envelope` of the current :data:`PROTOCOL_VERSION`."""
    return Envelope(PROTOCOL_VERSION, run_id, sender, MsgType(type), int(iteration), dict(body or {}))


# --------------------------------------------------------------------------------------------------
# Schema language: small, explicit, checked by common.codec.validate_body.
# --------------------------------------------------------------------------------------------------


class Spec:
    """Base of the value specifications below."""

    def check(self, value: Any, path: str) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def fail(path: str, what: str) -> ProtocolError:
        return ProtocolError("body", f"{path}: {what}")


@dataclass(frozen=True)
class Str(Spec):
    """A str, optionally one of ``choices``, at most ``max_len`` characters."""

    choices: tuple[str, ...] = ()
    max_len: int = 1 << 20

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, str):
            raise self.fail(path, f"expected str, got {type(value).__name__}")
        if len(value) > self.max_len:
            raise self.fail(path, f"str longer than {self.max_len}")
        if self.choices and value not in self.choices:
            raise self.fail(path, f"{value!r} is not one of {list(self.choices)}")


@dataclass(frozen=True)
class Int(Spec):
    """An int (not a bool) within ``[min, max]``; int64 range by default."""

    min: int = -(2**63)
    max: int = 2**63 - 1

    def check(self, value: Any, path: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(path, f"expected int, got {type(value).__name__}")
        if not self.min <= value <= self.max:
            raise self.fail(path, f"{value} outside [{self.min}, {self.max}]")


@dataclass(frozen=True)
class Float(Spec):
    """A finite float (an int is accepted too) not below ``min``."""

    min: float = -math.inf

    def check(self, value: Any, path: str) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(path, f"expected float, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ProtocolError("nonfinite", path)
        if value < self.min:
            raise self.fail(path, f"{value} below {self.min}")


@dataclass(frozen=True)
class Bool(Spec):
    """A bool."""

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, bool):
            raise self.fail(path, f"expected bool, got {type(value).__name__}")


_DTYPES = {"float64": np.dtype("float64"), "int64": np.dtype("int64"), "bool": np.dtype("bool")}


@dataclass(frozen=True)
class Array(Spec):
    """A numpy array of dtype ``dtype`` with a number of dimensions in ``ndim`` (empty: any)."""

    dtype: str = "float64"
    ndim: tuple[int, ...] = ()

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, np.ndarray):
            raise self.fail(path, f"expected {self.dtype} array, got {type(value).__name__}")
        if value.dtype != _DTYPES[self.dtype]:  # dtype equality is much cheaper than dtype.name
            raise self.fail(path, f"expected {self.dtype} array, got {value.dtype.name}")
        if self.ndim and value.ndim not in self.ndim:
            raise self.fail(path, f"expected an array with ndim in {list(self.ndim)}, got shape {value.shape}")
        # finiteness of float arrays is checked once, by the codec's scan of every decoded body


@dataclass(frozen=True)
class ListOf(Spec):
    """A list whose items all match ``item``."""

    item: Spec

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, list):
            raise self.fail(path, f"expected list, got {type(value).__name__}")
        for i, v in enumerate(value):
            self.item.check(v, f"{path}[{i}]")


@dataclass(frozen=True)
class MapOf(Spec):
    """A map from str keys (peer ids, array names, ...) to values matching ``value``."""

    value: Spec

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise self.fail(path, f"expected map, got {type(value).__name__}")
        for k, v in value.items():
            if not isinstance(k, str):
                raise self.fail(path, f"map key {k!r} is not a str")
            self.value.check(v, f"{path}.{k}")


@dataclass(frozen=True)
class AnyValue(Spec):
    """Any plain msgpack value (the codec has already checked types, depth and finiteness)."""

    def check(self, value: Any, path: str) -> None:
        return None


@dataclass(frozen=True)
class Record(Spec):
    """A map with named ``required`` and ``optional`` fields and no others.

    ``check`` (optional) receives the record after its fields passed and returns an error text for
    a cross-field inconsistency (e.g. two arrays whose shapes disagree), or None.
    """

    required: Mapping[str, Spec] = field(default_factory=dict)
    optional: Mapping[str, Spec] = field(default_factory=dict)
    check_fn: Callable[[dict[str, Any]], str | None] | None = None

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise self.fail(path, f"expected map, got {type(value).__name__}")
        for name, spec in self.required.items():
            if name not in value:
                raise self.fail(path, f"missing field {name!r}")
            spec.check(value[name], f"{path}.{name}")
        for name, spec in self.optional.items():
            if value.get(name) is not None:
                spec.check(value[name], f"{path}.{name}")
        unknown = [k for k in value if k not in self.required and k not in self.optional]
        if unknown:
            raise self.fail(path, f"unknown field(s) {sorted(map(str, unknown))}")
        if self.check_fn is not None:
            error = self.check_fn(value)
            if error:
                raise self.fail(path, error)

    @property
    def fields(self) -> dict[str, tuple[Spec, bool]]:
        """Every field name with its spec and whether it is required."""
        out = {k: (v, True) for k, v in self.required.items()}
        out.update({k: (v, False) for k, v in self.optional.items()})
        return out


def float_array(*ndim: int) -> Array:
    """A float64 array spec with the given numbers of dimensions."""
    return Array("float64", tuple(ndim))


# --------------------------------------------------------------------------------------------------
# Typed messages
# --------------------------------------------------------------------------------------------------


class Message:
    """Base of the typed frozen message definitions: a thin ``to_body``/``from_body`` pair.

    ``from_body`` expects a body that the codec has already validated against ``SCHEMAS[TYPE]``.
    """

    TYPE: ClassVar[MsgType]

    def to_body(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Self:  # pragma: no cover - abstract
        raise NotImplementedError

    def envelope(self, *, run_id: str, sender: str, iteration: int = 0) -> Envelope:
        """This message in an envelope of the current protocol version."""
        return make_envelope(self.TYPE, self.to_body(), run_id=run_id, sender=sender, iteration=iteration)

    @classmethod
    def from_envelope(cls, env: Envelope) -> Self:
        """The typed message carried by ``env``; ProtocolError("type") if it is another type."""
        if env.type != cls.TYPE:
            raise ProtocolError("type", f"expected {cls.TYPE.value}, got {env.type.value}")
        return cls.from_body(env.body)


def f64(value: Any) -> np.ndarray:
    """``value`` as a C-contiguous float64 numpy array (a helper for ``to_body``)."""
    return np.ascontiguousarray(value, dtype=np.float64)


# The message-set modules import the names above, so they are imported last.
from common.protocol import control, frequency, grid, market  # noqa: E402

SCHEMAS: dict[MsgType, Record] = {
    **control.SCHEMAS,
    **market.SCHEMAS,
    **grid.SCHEMAS,
    **frequency.SCHEMAS,
}
"""Body schema of every message type: the single definition the codec validates against."""

MESSAGES: dict[MsgType, type[Message]] = {
    **control.MESSAGES,
    **market.MESSAGES,
    **grid.MESSAGES,
    **frequency.MESSAGES,
}
"""The typed definition of every message type (for ``parse``)."""

_missing = set(MsgType) - set(SCHEMAS)
if _missing or set(MESSAGES) != set(SCHEMAS):  # pragma: no cover - a programming error
    raise RuntimeError(f"message types without schema or typed definition: {sorted(_missing)}")


def parse(env: Envelope) -> Message:
    """The typed message carried by a validated envelope."""
    return MESSAGES[env.type].from_body(env.body)


__all__ = [
    "ANY_RUN",
    "ARRAY_DTYPES",
    "MAX_CONTAINER_LEN",
    "MAX_DEPTH",
    "MAX_ID_LEN",
    "MAX_MESSAGE_BYTES",
    "MESSAGES",
    "PROTOCOL_VERSION",
    "REASONS",
    "SCHEMAS",
    "AnyValue",
    "Array",
    "Bool",
    "Envelope",
    "Float",
    "Int",
    "ListOf",
    "MapOf",
    "Message",
    "MsgType",
    "ProtocolError",
    "Record",
    "Spec",
    "Str",
    "control",
    "f64",
    "float_array",
    "frequency",
    "grid",
    "make_envelope",
    "market",
    "parse",
]
