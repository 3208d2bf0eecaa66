"""The single codec: :class:`~common.protocol.Envelope` <-> bytes, with limits and validation.

Wire format: a msgpack array ``[version, run_id, sender, type, iteration, body]``; the body is the
map of the message's fields (:mod:`common.protocol`). Numpy arrays in the body travel as msgpack
ExtType :data:`EXT_NDARRAY` whose payload is::

    uint8 dtype code (1 float64, 2 int64, 3 bool) | uint8 ndim | ndim x uint32 LE shape | raw LE data

so a float costs 8 bytes, never a list of msgpack floats. A float64 array in which enough values
are zero travels sparse, with code 4 (float64, zeros left out)::

    4 | uint8 ndim | ndim x uint32 LE shape | bitmap of the non-zero values (LSB first, one bit
    per value, padding bits 0) | the non-zero values, float64 LE, in order

A value is zero when all its bits are (``-0.0`` is kept as a value), so decoding gives back the
same bits: the encoding loses nothing. The encoder picks it when it saves at least an eighth of
the dense size (a quarter of a relay ROUND's trades are zero: hours a peer does not trade in).
Nothing is ever unpickled or executed.

``decode`` reads the header, then decodes the body straight into the message type the header
names (msgspec checks types, bounds, required and unknown fields; the message checks array
dtypes, dimensions and cross-field consistency; free-form values are scanned). When anything
fails, the message is read again as plain values and checked step by step, in the order of the
wire format, to name the reason. ``encode`` normalizes arrays (floats -> float64, integers ->
int64) and numpy scalars; with ``validate`` it also decodes what it produced, so a sender learns of
a bad body before it travels. Every failure raises :class:`~common.protocol.ProtocolError` whose
``reason`` is one of ``common.protocol.REASONS``:

- ``oversized``: more than ``max_bytes``;
- ``malformed``: not msgpack, truncated, trailing bytes, not an envelope, a bad array payload, an
  unknown ext type, header fields of the wrong kind, a list or map longer than ``MAX_CONTAINER_LEN``;
- ``version``: another protocol version;
- ``run``: another run id than ``expect_run``;
- ``type``: an unknown message type;
- ``body``: a body that does not fit its message type (missing/unknown field, wrong kind, bound,
  dtype or shape, nested deeper than ``MAX_DEPTH``);
- ``nonfinite``: a NaN or infinity anywhere in the body (float or array);
- ``stale``: raised by :func:`check_iteration` for a message of another iteration.
"""

from __future__ import annotations

import math
import struct
from typing import Annotated, Any

import msgspec
import numpy as np

from common.protocol import (
    ANY_RUN,
    MAX_CONTAINER_LEN,
    MAX_DEPTH,
    MAX_ID_LEN,
    MAX_MESSAGE_BYTES,
    MESSAGES,
    PROTOCOL_VERSION,
    Envelope,
    Message,
    MsgType,
    ProtocolError,
)

__all__ = [
    "EXT_NDARRAY",
    "ProtocolError",
    "body_from_plain",
    "check_iteration",
    "decode",
    "encode",
    "plain_body",
]

EXT_NDARRAY = 1
"""msgpack ExtType code of a packed numpy array."""

MAX_NDIM = 8

_DTYPE_CHAR_CODE = {"d": 1, "q": 2, "l": 2, "?": 3}  # dtype.char is much cheaper than dtype.name
_CODE_DTYPE = {1: np.dtype("<f8"), 2: np.dtype("<i8"), 3: np.dtype("|b1"), 4: np.dtype("<f8")}
SPARSE_F8 = 4
"""The dtype code of a float64 array sent without its zeros (a bitmap, then the other values)."""
SPARSE_MIN_VALUES = 64  # smaller arrays always travel dense (the test costs more than it saves)
_HEAD = struct.Struct("<BB")
_SHAPES = {n: struct.Struct(f"<{n}I") for n in range(MAX_NDIM + 1)}
_HEADS = {n: struct.Struct(f"<BB{n}I") for n in range(MAX_NDIM + 1)}  # dtype code, ndim, shape
_F8 = np.dtype("<f8")
_INT64_MAX = 2**63 - 1


def _all_finite(a: np.ndarray) -> bool:
    """No NaN or infinity in the float array ``a``."""
    return bool(np.isfinite(a).all())


# ------------------------------------------------------------------------------------------ arrays


def _canonical_array(arr: np.ndarray) -> np.ndarray:
    kind = arr.dtype.kind
    if kind == "f":
        out = np.ascontiguousarray(arr, dtype=_F8)
        if not _all_finite(out):
            raise ProtocolError("nonfinite", f"an array of shape {arr.shape}")
        return out
    if kind in "iu":
        if kind == "u" and arr.size and int(arr.max()) > _INT64_MAX:
            raise ProtocolError("body", "unsigned value beyond int64")
        return np.ascontiguousarray(arr, dtype="<i8")
    if kind == "b":
        return np.ascontiguousarray(arr, dtype="|b1")
    raise ProtocolError("body", f"arrays of dtype {arr.dtype} cannot travel (float64, int64, bool only)")


def _pack_array(arr: np.ndarray) -> msgspec.msgpack.Ext:
    arr = _canonical_array(arr)
    if arr.ndim > MAX_NDIM:
        raise ProtocolError("body", f"array of {arr.ndim} dimensions (at most {MAX_NDIM})")
    if arr.ndim and max(arr.shape) > 0xFFFFFFFF:
        raise ProtocolError("body", f"array dimension too large: {arr.shape}")
    code = _DTYPE_CHAR_CODE[arr.dtype.char]
    if code == 1 and arr.size >= SPARSE_MIN_VALUES:
        flat = arr.reshape(-1)
        nonzero = flat.view(np.uint64) != 0  # bits, not values: -0.0 travels as a value
        kept = int(np.count_nonzero(nonzero))
        if (arr.size + 7) // 8 + 8 * kept <= 7 * arr.size:  # saves at least an eighth
            head = _HEADS[arr.ndim].pack(SPARSE_F8, arr.ndim, *arr.shape)
            bitmap = np.packbits(nonzero, bitorder="little")
            return msgspec.msgpack.Ext(EXT_NDARRAY, b"".join((head, bitmap.tobytes(), flat[nonzero].tobytes())))
    head = _HEADS[arr.ndim].pack(code, arr.ndim, *arr.shape)
    return msgspec.msgpack.Ext(EXT_NDARRAY, head + arr.tobytes())


def _unpack_array(payload: memoryview, finite: bool, copy: bool = True) -> np.ndarray:
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
    shape = _SHAPES[ndim].unpack_from(payload, _HEAD.size)
    count = math.prod(shape)
    if code == SPARSE_F8:
        return _unpack_sparse(payload, offset, shape, count, finite)
    nbytes = len(payload) - offset
    if count * dtype.itemsize != nbytes:
        raise ProtocolError("malformed", f"array shape {shape} of {dtype.name} does not match {nbytes} bytes")
    if count == 0:
        return np.zeros(shape, dtype=dtype)
    if code == 3 and np.frombuffer(payload, np.uint8, count, offset).max() > 1:
        raise ProtocolError("malformed", "bool array holds values other than 0/1")
    out = np.frombuffer(payload, dtype, count, offset).reshape(shape)
    if copy:
        out = out.copy()
    if finite and code == 1 and not _all_finite(out):
        raise ProtocolError("nonfinite", f"an array of shape {shape}")
    return out


def _unpack_sparse(payload: memoryview, offset: int, shape: tuple, count: int, finite: bool) -> np.ndarray:
    """A float64 array sent without its zeros: the bitmap must cover ``count`` values with zero
    padding, and exactly one non-zero float64 must follow per set bit."""
    nmap = (count + 7) // 8
    if len(payload) < offset + nmap:
        raise ProtocolError("malformed", f"sparse array of shape {shape}: bitmap truncated")
    bits = np.unpackbits(np.frombuffer(payload, np.uint8, nmap, offset), bitorder="little")
    if bits[count:].any():
        raise ProtocolError("malformed", "sparse array: bitmap padding is not zero")
    nonzero = bits[:count].view(np.bool_)
    kept = int(np.count_nonzero(nonzero))
    if len(payload) - offset - nmap != 8 * kept:
        raise ProtocolError("malformed", f"sparse array of shape {shape}: {kept} values flagged, "
                                         f"{len(payload) - offset - nmap} bytes follow")
    values = np.frombuffer(payload, _F8, kept, offset + nmap)
    if kept and not (values.view(np.uint64) != 0).all():
        raise ProtocolError("malformed", "sparse array: a zero among the values it keeps")
    if finite and not _all_finite(values):
        raise ProtocolError("nonfinite", f"an array of shape {shape}")
    out = np.zeros(count, dtype=_F8)
    out[nonzero] = values
    return out.reshape(shape)


def _ext_hook(code: int, payload: memoryview) -> np.ndarray:
    """Decoding a message: a valid array of finite values, or ProtocolError."""
    if code != EXT_NDARRAY:
        raise ProtocolError("malformed", f"unknown msgpack ext type {code}")
    return _unpack_array(payload, True)


def _ext_hook_plain(code: int, payload: memoryview) -> np.ndarray:
    """Diagnosing a message: a valid array (finiteness is checked later, in wire order)."""
    if code != EXT_NDARRAY:
        raise ProtocolError("malformed", f"unknown msgpack ext type {code}")
    return _unpack_array(payload, False)


def _ext_hook_view(code: int, payload: memoryview) -> np.ndarray:
    """Checking what :func:`encode` produced: a read-only view (the encoder checked finiteness)."""
    if code != EXT_NDARRAY:
        raise ProtocolError("malformed", f"unknown msgpack ext type {code}")
    return _unpack_array(payload, False, False)


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return _pack_array(obj)
    if isinstance(obj, np.generic):
        if isinstance(obj, np.bool_):
            return bool(obj)
        if isinstance(obj, np.integer):
            value = int(obj)
            if value > _INT64_MAX:
                raise ProtocolError("body", f"{value} beyond int64")
            return value
        if isinstance(obj, np.floating):
            return float(obj)
    raise ProtocolError("body", f"{type(obj).__name__} cannot travel")


def _dec_hook(typ: type, obj: Any) -> Any:
    if typ is np.ndarray and isinstance(obj, np.ndarray):
        return obj
    raise TypeError(f"expected an array, got {type(obj).__name__}")


# --------------------------------------------------------------------------------- msgspec objects

_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LEN)]


class _Header(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    """The envelope as it travels, the body left undecoded (the fast path of :func:`decode`)."""

    version: int
    run_id: _Id
    sender: _Id
    type: MsgType
    iteration: Annotated[int, msgspec.Meta(ge=0, le=_INT64_MAX)]
    body: msgspec.Raw


_ENCODER = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_HEADER = msgspec.msgpack.Decoder(_Header)
_BODIES = {t: msgspec.msgpack.Decoder(cls, ext_hook=_ext_hook, dec_hook=_dec_hook) for t, cls in MESSAGES.items()}
_CHECKS = {t: msgspec.msgpack.Decoder(cls, ext_hook=_ext_hook_view, dec_hook=_dec_hook) for t, cls in MESSAGES.items()}
_PLAIN = msgspec.msgpack.Decoder(ext_hook=_ext_hook_plain)


# ------------------------------------------------------------------------------------- body walks

_LEAVES = {str, int, bool, bytes, type(None)}  # plain values with nothing more to check


def _scan(value: Any, path: str, depth: int) -> None:
    """Free-form values: only plain values and arrays, str map keys, bounded depth and length,
    finite floats."""
    if value is None or isinstance(value, (bool, int, str, bytes)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ProtocolError("nonfinite", path)
        return
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "f" and not _all_finite(value):
            raise ProtocolError("nonfinite", path)
        return
    if depth >= MAX_DEPTH:
        raise ProtocolError("body", f"{path}: nested deeper than {MAX_DEPTH}")
    if isinstance(value, (list, dict)) and len(value) > MAX_CONTAINER_LEN:
        raise ProtocolError("malformed", f"{path}: {len(value)} elements (at most {MAX_CONTAINER_LEN})")
    if isinstance(value, list):
        if set(map(type, value)) <= _LEAVES:  # a column of names, ...: nothing to look into
            return
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


def _body_error(mtype: MsgType, plain: Any, exc: Exception) -> ProtocolError:
    """Why a body (read as plain values: ``plain``) does not decode into its message type."""
    if not isinstance(plain, dict):
        return ProtocolError("malformed", "body must be a map")
    _scan(plain, "body", 0)
    if isinstance(exc, ProtocolError):
        return exc
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ProtocolError):
        return cause
    return ProtocolError("body", f"{mtype.value}: {exc}"[:300])


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
    if type(value) is MsgType:
        return value
    try:
        return MsgType(value)
    except (ValueError, TypeError):
        raise ProtocolError("type", f"unknown message type {value!r}") from None


def _diagnose(data: Any, expect_run: str | None, exc: Exception) -> ProtocolError:
    """The reason a message failed the fast path, found by checking it step by step in wire order."""
    try:
        obj = _PLAIN.decode(data)
    except ProtocolError as err:
        return err
    except Exception as err:  # whatever msgspec raises on hostile input is "malformed"
        return ProtocolError("malformed", f"{type(err).__name__}: {err}"[:200])
    try:
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
        _check_id(sender, "sender")
        mtype = _check_type(mtype)
        _check_iteration_field(iteration)
        return _body_error(mtype, body, exc)
    except ProtocolError as err:
        return err


# -------------------------------------------------------------------------------------- public API


def encode(env: Envelope, *, max_bytes: int = MAX_MESSAGE_BYTES, validate: bool = True) -> bytes:
    """The wire bytes of ``env``.

    The envelope fields, the finiteness of every array and the size are always checked;
    ``validate`` (the default) also decodes the bytes exactly as :func:`decode` would, so that a bad
    body never leaves. The hot ADMM path sends messages it built itself with ``validate=False``
    (every receiver validates)."""
    if not isinstance(env, Envelope):
        raise ProtocolError("malformed", f"expected an Envelope, got {type(env).__name__}")
    if env.version != PROTOCOL_VERSION:
        raise ProtocolError("version", f"got {env.version!r}, this is version {PROTOCOL_VERSION}")
    run_id = _check_id(env.run_id, "run_id")
    sender = _check_id(env.sender, "sender")
    mtype = _check_type(env.type)
    iteration = _check_iteration_field(env.iteration)
    if type(env.body) is not MESSAGES[mtype]:
        raise ProtocolError("body", f"a {type(env.body).__name__} in a {mtype.value} envelope")
    try:
        data = _ENCODER.encode((PROTOCOL_VERSION, run_id, sender, mtype.value, iteration, env.body))
    except ProtocolError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError("body", f"cannot encode: {exc}") from None
    if len(data) > max_bytes:
        raise ProtocolError("oversized", f"{len(data)} bytes > {max_bytes}")
    if validate:
        try:  # the body as a receiver decodes it (arrays as views: their values were checked above)
            body = _CHECKS[mtype].decode(_HEADER.decode(data).body)
            for name in body.FREE:
                _scan(getattr(body, name), f"body.{name}", 1)
        except (msgspec.DecodeError, ValueError, TypeError, RecursionError):
            decode(data, max_bytes=max_bytes)  # raises the receiver's reason
            raise
    return data


def decode(
    data: bytes | bytearray | memoryview,
    *,
    expect_run: str | None = None,
    max_bytes: int = MAX_MESSAGE_BYTES,
) -> Envelope:
    """The validated :class:`Envelope` carried by ``data`` (its body the typed message);
    :class:`ProtocolError` otherwise."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError("malformed", f"expected bytes, got {type(data).__name__}")
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size > max_bytes:
        raise ProtocolError("oversized", f"{size} bytes > {max_bytes}")
    if size == 0:
        raise ProtocolError("malformed", "empty message")
    try:
        head = _HEADER.decode(data)
        if head.version != PROTOCOL_VERSION:
            raise ProtocolError("version", f"got {head.version!r}")
        if expect_run is not None and head.run_id != expect_run and not (
            head.run_id == ANY_RUN and head.type is MsgType.HELLO
        ):
            raise ProtocolError("run", f"run {head.run_id!r}, expected {expect_run!r}")
        body = _BODIES[head.type].decode(head.body)
        for name in body.FREE:
            _scan(getattr(body, name), f"body.{name}", 1)
    except (msgspec.DecodeError, ValueError, TypeError, RecursionError) as exc:  # ProtocolError too
        raise _diagnose(data, expect_run, exc) from None
    return Envelope(PROTOCOL_VERSION, head.run_id, head.sender, head.type, head.iteration, body)


def check_iteration(env: Envelope, expected: int) -> None:
    """ProtocolError("stale") unless ``env`` belongs to ADMM iteration ``expected``."""
    if env.iteration != expected:
        raise ProtocolError(
            "stale", f"{env.type.value} from {env.sender} of iteration {env.iteration}, expected {expected}"
        )


def body_from_plain(mtype: MsgType, body: dict[str, Any]) -> Message:
    """The message of type ``mtype`` whose body is the map ``body`` (plain values and arrays), checked
    as a receiver would check it; ProtocolError otherwise."""
    try:
        raw = _ENCODER.encode(body)
    except ProtocolError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError("body", f"cannot encode: {exc}") from None
    try:
        msg = _BODIES[mtype].decode(raw)
        for name in msg.FREE:
            _scan(getattr(msg, name), f"body.{name}", 1)
        return msg
    except (msgspec.DecodeError, ValueError, TypeError, RecursionError) as exc:  # ProtocolError too
        try:
            plain = _PLAIN.decode(raw)
        except ProtocolError as err:
            raise err from None
        raise _body_error(mtype, plain, exc) from None


def plain_body(msg: Message) -> dict[str, Any]:
    """The body of ``msg`` as it travels, as plain values (maps, lists, arrays)."""
    return _PLAIN.decode(_ENCODER.encode(msg))
