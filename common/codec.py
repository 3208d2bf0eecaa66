"""The single codec: :class:`~common.protocol.Envelope` <-> bytes, with limits and validation.

Wire format: a msgpack array ``[version, run_id, sender, type, iteration, body]``. Numpy arrays in
the body travel as msgpack ExtType :data:`EXT_NDARRAY` whose payload is::

    uint8 dtype code (1 float64, 2 int64, 3 bool) | uint8 ndim | ndim x uint32 LE shape | raw LE data

so a float costs 8 bytes, never a list of msgpack floats. Nothing is ever unpickled or executed.

``encode`` validates too (a sender learns of a bad body before it travels): it accepts numpy
arrays of any float/int/bool dtype and numpy scalars and normalizes them (floats -> float64,
integers -> int64), tuples become lists. ``decode`` is strict. Every failure of either raises
:class:`~common.protocol.ProtocolError` whose ``reason`` is one of ``common.protocol.REASONS``:

- ``oversized``: more than ``max_bytes``;
- ``malformed``: not msgpack, truncated, trailing bytes, not an envelope, a bad array payload, an
  unknown ext type, header fields of the wrong kind;
- ``version``: another protocol version;
- ``run``: another run id than ``expect_run``;
- ``type``: an unknown message type;
- ``body``: a body that does not match ``SCHEMAS[type]`` (missing/unknown field, wrong kind/shape);
- ``nonfinite``: a NaN or infinity anywhere in the body (float or array);
- ``stale``: raised by :func:`check_iteration` for a message of another iteration.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np

from common.protocol import (
    ANY_RUN,
    MAX_CONTAINER_LEN,
    MAX_DEPTH,
    MAX_ID_LEN,
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    SCHEMAS,
    Envelope,
    MsgType,
    ProtocolError,
)

__all__ = [
    "EXT_NDARRAY",
    "ProtocolError",
    "check_iteration",
    "decode",
    "encode",
    "validate_body",
]

EXT_NDARRAY = 1
"""msgpack ExtType code of a packed numpy array."""

MAX_NDIM = 8

_DTYPE_CODE = {"float64": 1, "int64": 2, "bool": 3}
_DTYPE_CHAR_CODE = {"d": 1, "q": 2, "l": 2, "?": 3}  # dtype.char is much cheaper than dtype.name
_CODE_DTYPE = {1: np.dtype("<f8"), 2: np.dtype("<i8"), 3: np.dtype("|b1")}
_HEAD = struct.Struct("<BB")
_INT64_MAX = 2**63 - 1


# ------------------------------------------------------------------------------------------ arrays


def _canonical_array(arr: np.ndarray, path: str) -> np.ndarray:
    kind = arr.dtype.kind
    if kind == "f":
        out = np.ascontiguousarray(arr, dtype="<f8")
        if not np.isfinite(out).all():
            raise ProtocolError("nonfinite", path)
        return out
    if kind in "iu":
        if kind == "u" and arr.size and int(arr.max()) > _INT64_MAX:
            raise ProtocolError("body", f"{path}: unsigned value beyond int64")
        return np.ascontiguousarray(arr, dtype="<i8")
    if kind == "b":
        return np.ascontiguousarray(arr, dtype="|b1")
    raise ProtocolError("body", f"{path}: arrays of dtype {arr.dtype} cannot travel (float64, int64, bool only)")


def _pack_array(arr: np.ndarray) -> msgpack.ExtType:
    if arr.ndim > MAX_NDIM:
        raise ProtocolError("body", f"array of {arr.ndim} dimensions (at most {MAX_NDIM})")
    if any(d > 0xFFFFFFFF for d in arr.shape):
        raise ProtocolError("body", f"array dimension too large: {arr.shape}")
    head = _HEAD.pack(_DTYPE_CHAR_CODE[arr.dtype.char], arr.ndim) + struct.pack(f"<{arr.ndim}I", *arr.shape)
    return msgpack.ExtType(EXT_NDARRAY, head + arr.tobytes())


def _unpack_array(payload: bytes) -> np.ndarray:
    if len(payload) < _HEAD.size:
        raise ProtocolError("malformed", "array payload too short")
    code, ndim = _HEAD.unpack_from(payload)
    dtype = _CODE_DTYPE.get(code)
    if dtype is None:
        raise ProtocolError("malformed", f"array dtype code {code} (allowed: float64, int64, bool)")
    if ndim > MAX_NDIM:
        raise ProtocolError("malformed", f"array of {ndim} dimensions (at most {MAX_NDIM})")
    offset = _HEAD.size + 4 * ndim
    if len(payload) < offset:
        raise ProtocolError("malformed", "array header truncated")
    shape = struct.unpack_from(f"<{ndim}I", payload, _HEAD.size)
    count = math.prod(shape)
    nbytes = len(payload) - offset
    if count * dtype.itemsize != nbytes:
        raise ProtocolError("malformed", f"array shape {shape} of {dtype.name} does not match {nbytes} bytes")
    if count == 0:
        return np.zeros(shape, dtype=dtype)
    if dtype.kind == "b" and np.frombuffer(payload, np.uint8, count, offset).max() > 1:
        raise ProtocolError("malformed", "bool array holds values other than 0/1")
    return np.frombuffer(payload, dtype, count, offset).reshape(shape).copy()


def _ext_hook(code: int, payload: bytes) -> np.ndarray:
    if code != EXT_NDARRAY:
        raise ProtocolError("malformed", f"unknown msgpack ext type {code}")
    return _unpack_array(payload)


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return _pack_array(obj)
    raise TypeError(f"cannot encode {type(obj).__name__}")


# ------------------------------------------------------------------------------------- body walks


def _normalize(value: Any, path: str, depth: int) -> Any:
    """Encode side: plain msgpack values and canonical arrays; NaN/inf and foreign types refused."""
    if value is None or isinstance(value, (bool, str, bytes)):
        return value
    if isinstance(value, float):  # also numpy float64
        if not math.isfinite(value):
            raise ProtocolError("nonfinite", path)
        return float(value)
    if isinstance(value, int):
        if not -(2**63) <= value <= 2**64 - 1:
            raise ProtocolError("body", f"{path}: int beyond 64 bits")
        return value
    if isinstance(value, np.ndarray):
        return _canonical_array(value, path)
    if isinstance(value, np.generic):
        if isinstance(value, np.bool_):
            return bool(value)
        if isinstance(value, np.integer):
            return _normalize(int(value), path, depth)
        if isinstance(value, np.floating):
            return _normalize(float(value), path, depth)
        raise ProtocolError("body", f"{path}: {type(value).__name__} cannot travel")
    if depth >= MAX_DEPTH:
        raise ProtocolError("body", f"{path}: nested deeper than {MAX_DEPTH}")
    if isinstance(value, (list, tuple)):
        return [_normalize(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ProtocolError("body", f"{path}: map key {k!r} is not a str")
            out[k] = _normalize(v, f"{path}.{k}", depth + 1)
        return out
    raise ProtocolError("body", f"{path}: {type(value).__name__} cannot travel")


def _scan(value: Any, path: str, depth: int) -> None:
    """Decode side: only plain values and arrays, str map keys, bounded depth, finite floats."""
    if value is None or isinstance(value, (bool, int, str, bytes)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ProtocolError("nonfinite", path)
        return
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise ProtocolError("nonfinite", path)
        return
    if depth >= MAX_DEPTH:
        raise ProtocolError("body", f"{path}: nested deeper than {MAX_DEPTH}")
    if isinstance(value, list):
        for i, v in enumerate(value):
            _scan(v, f"{path}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ProtocolError("body", f"{path}: map key {k!r} is not a str")
            _scan(v, f"{path}.{k}", depth + 1)
        return
    raise ProtocolError("body", f"{path}: {type(value).__name__} is not a plain value")


def validate_body(type: MsgType | str, body: Any) -> None:
    """Check a (decoded or normalized) body against ``SCHEMAS[type]``; ProtocolError if it fails."""
    try:
        t = MsgType(type)
    except ValueError:
        raise ProtocolError("type", f"unknown message type {type!r}") from None
    SCHEMAS[t].check(body, "body")


def _check_id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_ID_LEN:
        raise ProtocolError("malformed", f"{what} must be a non-empty str of at most {MAX_ID_LEN} characters")
    return value


def _check_iteration_field(value: Any) -> int:
    if isinstance(value, np.integer):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _INT64_MAX:
        raise ProtocolError("malformed", f"iteration must be a non-negative int, got {value!r}")
    return value


def _check_type(value: Any) -> MsgType:
    try:
        return MsgType(value)
    except (ValueError, TypeError):
        raise ProtocolError("type", f"unknown message type {value!r}") from None


# -------------------------------------------------------------------------------------- public API


def encode(env: Envelope, *, max_bytes: int = MAX_MESSAGE_BYTES, validate: bool = True) -> bytes:
    """The wire bytes of ``env``, after validating it exactly as :func:`decode` would.

    ``validate=False`` skips the schema walk (the envelope fields, finiteness and size are still
    checked): the hot ADMM path sends messages it built itself, and every receiver validates."""
    if not isinstance(env, Envelope):
        raise ProtocolError("malformed", f"expected an Envelope, got {type(env).__name__}")
    if env.version != PROTOCOL_VERSION:
        raise ProtocolError("version", f"got {env.version!r}, this is version {PROTOCOL_VERSION}")
    run_id = _check_id(env.run_id, "run_id")
    sender = _check_id(env.sender, "sender")
    mtype = _check_type(env.type)
    iteration = _check_iteration_field(env.iteration)
    if not isinstance(env.body, Mapping):
        raise ProtocolError("malformed", "body must be a map")
    body = _normalize(env.body, "body", 0)
    if validate:
        SCHEMAS[mtype].check(body, "body")
    try:
        data = msgpack.packb(
            [PROTOCOL_VERSION, run_id, sender, mtype.value, iteration, body],
            default=_default,
            use_bin_type=True,
        )
    except ProtocolError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError("body", f"cannot encode: {exc}") from None
    if len(data) > max_bytes:
        raise ProtocolError("oversized", f"{len(data)} bytes > {max_bytes}")
    return data


def decode(
    data: bytes | bytearray | memoryview,
    *,
    expect_run: str | None = None,
    max_bytes: int = MAX_MESSAGE_BYTES,
) -> Envelope:
    """The validated :class:`Envelope` carried by ``data``; :class:`ProtocolError` otherwise."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError("malformed", f"expected bytes, got {type(data).__name__}")
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size > max_bytes:
        raise ProtocolError("oversized", f"{size} bytes > {max_bytes}")
    if size == 0:
        raise ProtocolError("malformed", "empty message")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            ext_hook=_ext_hook,
            timestamp=0,
            max_str_len=max_bytes,
            max_bin_len=max_bytes,
            max_ext_len=max_bytes,
            max_array_len=MAX_CONTAINER_LEN,
            max_map_len=MAX_CONTAINER_LEN,
        )
    except ProtocolError:
        raise
    except Exception as exc:  # whatever msgpack raises on hostile input is "malformed"
        raise ProtocolError("malformed", f"{type(exc).__name__}: {exc}"[:200]) from None
    if not isinstance(obj, list) or not obj:
        raise ProtocolError("malformed", "not an envelope (expected a msgpack array)")
    version = obj[0]
    if isinstance(version, bool) or not isinstance(version, int) or version != PROTOCOL_VERSION:
        raise ProtocolError("version", f"got {version!r}, this is version {PROTOCOL_VERSION}")
    if len(obj) != 6:
        raise ProtocolError("malformed", f"envelope of {len(obj)} fields, expected 6")
    _, run_id, sender, mtype, iteration, body = obj
    run_id = _check_id(run_id, "run_id")
    if expect_run is not None and run_id != expect_run and not (run_id == ANY_RUN and mtype == MsgType.HELLO.value):
        raise ProtocolError("run", f"run {run_id!r}, expected {expect_run!r}")
    sender = _check_id(sender, "sender")
    mtype = _check_type(mtype)
    iteration = _check_iteration_field(iteration)
    if not isinstance(body, dict):
        raise ProtocolError("malformed", "body must be a map")
    _scan(body, "body", 0)
    SCHEMAS[mtype].check(body, "body")
    return Envelope(version, run_id, sender, mtype, iteration, body)


def check_iteration(env: Envelope, expected: int) -> None:
    """ProtocolError("stale") unless ``env`` belongs to ADMM iteration ``expected``."""
    if env.iteration != expected:
        raise ProtocolError(
            "stale", f"{env.type.value} from {env.sender} of iteration {env.iteration}, expected {expected}"
        )
