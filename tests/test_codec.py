"""The codec: every message type round-trips, arrays travel as binary, bad input is refused by reason."""

from __future__ import annotations

import math
import pickle
import struct
from typing import Any

import msgpack
import msgspec
import numpy as np
import pytest

from common import codec
from common.codec import EXT_NDARRAY, ProtocolError, check_iteration, decode, encode
from common.protocol import (
    MESSAGES,
    PROTOCOL_VERSION,
    Envelope,
    MsgType,
    control,
    frequency,
    grid,
    make_envelope,
    market,
    parse,
)

pytestmark = pytest.mark.timeout(30)

RUN = "run-1"
H = 24
rng = np.random.default_rng(7)


def arr(*shape: int) -> np.ndarray:
    return rng.normal(size=shape)


def samples() -> dict[MsgType, Any]:
    """One typed message of every type, with arrays wherever the type has them."""
    return {
        MsgType.HELLO: control.Hello("peer", ("p1", "p2"), 1234, "lab-1", "tcp://127.0.0.1:5601"),
        MsgType.WELCOME: control.Welcome({"hours": H, "rho": 1.5, "partners": {"p1": ["p2"]}, "bus": np.arange(3)}),
        MsgType.SHUTDOWN: control.Shutdown("done"),
        MsgType.HEARTBEAT: control.Heartbeat(rejected={"stale": 3, "body": 1}),
        MsgType.READY: control.Ready(),
        MsgType.ROUND: market.Round(
            1.5, False, {"p1": market.RoundPeer(arr(2, H)), "p2": market.RoundPeer(arr(1, H), arr(1, H))},
            np.array([0, 2, 3], dtype=np.int64),
        ),
        MsgType.UPDATE: market.Update(
            {"p1": market.UpdatePeer(arr(2, H), np.full(H, 0.5), 0.003),
             "p2": market.UpdatePeer(arr(1, 3), np.zeros(3), 0.0, "failed")}
        ),
        MsgType.TRADES: market.Trades(("p1", "p3"), ("p2", "p2"), arr(2, H)),
        MsgType.RESIDUALS: market.Residuals({"p1": market.ResidualsPeer(np.array([0.1, 0.3]), np.array([0.2, 0.0]), 0.01)}),
        MsgType.RESULT: market.Result(
            {
                "p1": market.ResultPeer(arr(H), arr(2, H), arr(2, H), arr(H), np.arange(H) - 5, arr(H)),
                "p2": market.ResultPeer(arr(H), arr(1, H), arr(1, H), arr(H), np.arange(H) * 7, diff_cost_eur=arr(H),
                                        flex_penalty_eur=arr(H), trade_fee_eur=arr(1, H)),
            },
            ((3, "trades", 2, 480), (4, "trades", 2, 480)),
        ),
        MsgType.PENALTY: market.Penalty({"p1": {"diff_eur_per_mwh": arr(2, H), "tan_phi": arr(H)}}),
        MsgType.DROP: market.Drop(peers=("p7", "p8"), hosts=("h0007-p7",)),
        MsgType.PRICE_PROBE: market.PriceProbe(arr(8, H)),
        MsgType.QUANTITY_SUM: market.QuantitySum(np.arange(8 * H, dtype=np.int64).reshape(8, H) - 7,
                                                 np.arange(8 * H, dtype=np.int64).reshape(8, H) * 3),
        MsgType.POOL_PRICE: market.PoolPrice(arr(H), arr(H) + 1.0, np.full(H, 0.25)),
        MsgType.POOL_QUANTITY: market.PoolQuantity({"p1": arr(H), "p2": -arr(H)}),
        MsgType.DISPATCH: grid.Dispatch(("p1", "p2", "p3"), ("pv", "load", "ev"), (3, 7, 12), arr(3, H), arr(3, H), True),
        MsgType.GRID_REPORT: grid.GridReport(
            (grid.Violation("vm_min", 17, 18, 0.93, 0.95), grid.Violation("line_loading", "trafo 1", 3, 101.5, 100.0)),
            {
                "buses": {"bus": np.arange(33 * H), "vm_pu": 1.0 + 0.01 * arr(33 * H), "name": [f"b{i}" for i in range(33 * H)],
                          "__columns__": ["bus", "vm_pu", "name"]},
                "hours": {"hour": np.arange(H), "losses_mw": np.abs(arr(H)), "losses_mw__nan": np.arange(H) == 5,
                          "converged": np.arange(H) != 5, "__columns__": ["hour", "losses_mw", "converged"]},
            },
            penalties={"p1": {"diff_eur_per_mwh": arr(2, H)}},
            outer_status="continue",
            outer_reason="2 hours with violations",
            actions=("hour 3: line 7 at 101 %", "hour 18: bus 17 at 0.93 pu"),
        ),
        MsgType.NETWORK_UPDATE: grid.NetworkUpdate(2.0, {"p_mw": arr(33, H), "price_eur_per_mwh": arr(33, H)}),
        MsgType.NETWORK_RESULT: grid.NetworkResult({"p_mw": arr(33, H)}, "infeasible"),
        MsgType.FREQ_QUERY: frequency.FreqQuery(H),
        MsgType.FREQ_REQUEST: frequency.FreqRequest(arr(H)),
    }


def assert_same(a: Any, b: Any, path: str = "body") -> None:
    """Deep equality where arrays must match in dtype, shape and values (and messages in type and fields)."""
    if isinstance(a, msgspec.Struct) or isinstance(b, msgspec.Struct):
        assert type(a) is type(b), path
        for name in a.__struct_fields__:
            assert_same(getattr(a, name), getattr(b, name), f"{path}.{name}")
    elif isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        np.testing.assert_array_equal(a, b, err_msg=path)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b and type(a) is type(b), f"{path}: {a!r} != {b!r}"


def pack_array(a: np.ndarray, code: int | None = None, shape: tuple[int, ...] | None = None) -> msgpack.ExtType:
    """An array in the documented wire format, built independently of the codec (to forge bad input)."""
    codes = {"float64": 1, "int64": 2, "bool": 3}
    shape = a.shape if shape is None else shape
    head = struct.pack("<BB", codes[a.dtype.name] if code is None else code, len(shape))
    head += struct.pack(f"<{len(shape)}I", *shape)
    return msgpack.ExtType(EXT_NDARRAY, head + a.astype(a.dtype.newbyteorder("<")).tobytes())


def raw(*fields: Any) -> bytes:
    """Msgpack bytes of an arbitrary envelope-like list; numpy arrays become array ExtTypes."""

    def default(o: Any) -> Any:
        if isinstance(o, np.ndarray):
            return pack_array(o)
        raise TypeError(type(o))

    return msgpack.packb(list(fields), default=default, use_bin_type=True)


def reason_of(data: bytes, **kw: Any) -> str:
    with pytest.raises(ProtocolError) as info:
        decode(data, **kw)
    return info.value.reason


def good_round(**overrides: Any) -> dict[str, Any]:
    body = {"rho": 1.0, "stop": False, "peers": {"p1": {"p_in_mw": np.ones((2, H))}}}
    body.update(overrides)
    return body


# ----------------------------------------------------------------------------------- round trips


def test_every_message_type_has_a_typed_definition_and_a_sample() -> None:
    assert set(MsgType) == set(MESSAGES) == set(samples())
    assert all(MESSAGES[t].TYPE is t for t in MsgType)


@pytest.mark.parametrize("mtype", list(MsgType), ids=lambda t: t.value)
def test_round_trip_every_message_type(mtype: MsgType) -> None:
    msg = samples()[mtype]
    env = msg.envelope(run_id=RUN, sender="coordinator", iteration=17)
    out = decode(encode(env), expect_run=RUN)
    assert (out.version, out.run_id, out.sender, out.type, out.iteration) == (
        PROTOCOL_VERSION,
        RUN,
        "coordinator",
        mtype,
        17,
    )
    assert_same(msg, out.body)
    typed = parse(out)
    assert type(typed) is type(msg)
    assert_same(msg.to_body(), typed.to_body())
    # the same body given as a map of plain values
    assert_same(make_envelope(mtype, msg.to_body(), run_id=RUN, sender="c").body, msg)


def test_decoded_arrays_are_writeable_copies() -> None:
    out = decode(encode(make_envelope(MsgType.TRADES, {"from_peers": ["a"], "to_peers": ["b"], "p_mw": np.zeros((1, H))}, run_id=RUN, sender="a")))
    p = out.body.p_mw
    assert p.dtype == np.float64 and p.flags.writeable and p.flags.c_contiguous
    p[0] = 1.0


def test_array_dtypes_travel_and_are_normalized() -> None:
    config = {
        "f32": np.ones(3, dtype=np.float32),
        "i32": np.arange(4, dtype=np.int32).reshape(2, 2),
        "u8": np.arange(3, dtype=np.uint8),
        "flags": np.array([True, False, True]),
        "empty": np.zeros((0, H)),
        "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "big_endian": np.arange(3, dtype=">f8"),
        "scalars": [np.float64(1.5), np.int64(3), np.bool_(True)],
    }
    out = decode(encode(make_envelope(MsgType.WELCOME, {"config": config}, run_id=RUN, sender="c"))).body.config
    assert out["f32"].dtype == np.float64
    assert out["i32"].dtype == np.int64 and out["i32"].shape == (2, 2)
    assert out["u8"].dtype == np.int64
    assert out["flags"].dtype == np.bool_ and out["flags"].tolist() == [True, False, True]
    assert out["empty"].shape == (0, H)
    np.testing.assert_array_equal(out["fortran"], np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(out["big_endian"], [0.0, 1.0, 2.0])
    assert out["scalars"] == [1.5, 3, True]


def test_unsupported_array_dtype_is_refused_on_encode() -> None:
    env = control.Welcome({"c": np.ones(2, dtype=complex)}).envelope(run_id=RUN, sender="c")
    with pytest.raises(ProtocolError) as info:
        encode(env)
    assert info.value.reason == "body"


def test_arrays_travel_as_binary_not_lists() -> None:
    n_partners, n_peers = 10, 100
    peers = {f"p{i}": {"p_in_mw": arr(n_partners, H)} for i in range(n_peers)}
    env = make_envelope(MsgType.ROUND, {"rho": 1.0, "stop": False, "peers": peers}, run_id=RUN, sender="c")
    n_floats = n_peers * n_partners * H
    size = len(encode(env))
    as_lists = len(msgpack.packb({k: v["p_in_mw"].tolist() for k, v in peers.items()}))
    assert 8 * n_floats <= size <= 8 * n_floats * 1.02 + 1024
    assert as_lists > 1.1 * size  # a list of msgpack floats costs 9 bytes per float


def sparse_ext(a: np.ndarray, *, pad: int = 0, drop: int = 0, extra: bytes = b"", keep_zero: bool = False) -> msgpack.ExtType:
    """A float64 array in the documented sparse wire format (code 4), built independently of the
    codec; the keywords forge a bad one."""
    flat = a.reshape(-1)
    nonzero = flat.view(np.uint64) != 0
    if keep_zero:
        nonzero[np.flatnonzero(~nonzero)[0]] = True
    bitmap = bytearray(np.packbits(nonzero, bitorder="little").tobytes())
    bitmap[-1] |= pad
    values = flat[nonzero].astype("<f8").tobytes()
    head = struct.pack("<BB", 4, a.ndim) + struct.pack(f"<{a.ndim}I", *a.shape)
    return msgpack.ExtType(EXT_NDARRAY, head + bytes(bitmap) + values[: len(values) - 8 * drop] + extra)


def test_float_arrays_with_enough_zeros_travel_sparse_and_come_back_bit_for_bit() -> None:
    rng = np.random.default_rng(3)
    trades = rng.normal(size=(30, H))
    trades[rng.random(trades.shape) < 0.3] = 0.0
    trades[0, :3] = -0.0  # kept as a value: the bits come back, not just the number
    trades[1, 0] = 5e-324
    env = make_envelope(MsgType.ROUND, good_round(peers={"p1": {"p_in_mw": trades}}), run_id=RUN, sender="c")
    data = encode(env)
    back = decode(data).body.peers["p1"].p_in_mw
    assert back.dtype == np.float64 and back.shape == trades.shape and back.flags.writeable
    assert back.tobytes() == trades.tobytes()
    dense = encode(make_envelope(MsgType.ROUND, good_round(peers={"p1": {"p_in_mw": trades + 1.0}}), run_id=RUN,
                                 sender="c"))
    kept = int(np.count_nonzero(trades.view(np.uint64)))
    assert len(dense) - len(data) == 8 * (trades.size - kept) - (trades.size + 7) // 8
    assert raw(PROTOCOL_VERSION, RUN, "c", "round", 0, good_round(peers={"p1": {"p_in_mw": sparse_ext(trades)}})) \
        == data  # the documented format, byte for byte


@pytest.mark.parametrize("shape", [(0,), (3,), (63,), (64,), (65,), (2, 40), (24, 1, 3)])
@pytest.mark.parametrize("zeros", [0.0, 0.1, 0.2, 1.0])
def test_sparse_and_dense_arrays_round_trip(shape: tuple[int, ...], zeros: float) -> None:
    a = np.random.default_rng(len(shape)).normal(size=shape)
    a[np.random.default_rng(7).random(shape) < zeros] = 0.0
    env = control.Welcome({"a": a}).envelope(run_id=RUN, sender="c")
    assert decode(encode(env)).body.config["a"].tobytes() == a.tobytes()


@pytest.mark.parametrize(
    "ext",
    [
        sparse_ext(np.array([0.0, 1.0] * 40).reshape(2, 40), pad=0),  # fine: the control case
        sparse_ext(np.array([[0.0, 1.0] * 36 + [0.0, 1.0, 0.0]]), pad=0x80),  # a padding bit set
        sparse_ext(np.array([0.0, 1.0] * 40).reshape(2, 40), drop=1),  # a flagged value missing
        sparse_ext(np.array([0.0, 1.0] * 40).reshape(2, 40), extra=b"\x00" * 8),  # a value more than flagged
        sparse_ext(np.array([0.0, 1.0] * 40).reshape(2, 40), keep_zero=True),  # a zero among the values it keeps
        msgpack.ExtType(EXT_NDARRAY, struct.pack("<BBII", 4, 2, 2, 40) + b"\xff" * 3),  # bitmap truncated
    ],
    ids=["good", "padding", "missing", "extra", "zero", "bitmap"],
)
def test_bad_sparse_arrays_are_malformed(ext: msgpack.ExtType) -> None:
    data = raw(PROTOCOL_VERSION, RUN, "c", "round", 1, good_round(peers={"p1": {"p_in_mw": ext}}))
    if ext.data == sparse_ext(np.array([0.0, 1.0] * 40).reshape(2, 40)).data:
        assert decode(data).body.peers["p1"].p_in_mw.reshape(-1).tolist() == [0.0, 1.0] * 40
    else:
        assert reason_of(data) == "malformed"


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_in_a_sparse_array_is_refused(bad: float) -> None:
    a = np.zeros((2, 40))
    a[0, 5] = bad
    assert reason_of(raw(PROTOCOL_VERSION, RUN, "c", "round", 1, good_round(peers={"p1": {"p_in_mw": sparse_ext(a)}}))) \
        == "nonfinite"


# ------------------------------------------------------------------------------------ rejections


@pytest.mark.parametrize(
    "data",
    [b"", b"garbage", b"\xc1", b"\xff" * 64, pickle.dumps(object()), msgpack.packb({"not": "an envelope"})],
    ids=["empty", "text", "reserved-byte", "ff", "pickle", "map"],
)
def test_garbage_is_malformed(data: bytes) -> None:
    assert reason_of(data) == "malformed"


def test_truncated_and_trailing_bytes_are_malformed() -> None:
    data = encode(make_envelope(MsgType.ROUND, good_round(), run_id=RUN, sender="c", iteration=1))
    for cut in (1, len(data) // 2, len(data) - 1):
        assert reason_of(data[:cut]) == "malformed"
    assert reason_of(data + b"\x00") == "malformed"


def test_wrong_version_is_refused() -> None:
    assert reason_of(raw(PROTOCOL_VERSION + 1, RUN, "c", "round", 1, good_round())) == "version"
    assert reason_of(raw("1", RUN, "c", "round", 1, good_round())) == "version"
    assert reason_of(raw(PROTOCOL_VERSION + 1, "other", "layout")) == "version"
    with pytest.raises(ProtocolError) as info:
        encode(Envelope(PROTOCOL_VERSION + 1, RUN, "c", MsgType.READY, 0, control.Ready()))
    assert info.value.reason == "version"


def test_wrong_run_is_refused() -> None:
    data = encode(make_envelope(MsgType.READY, run_id="old-run", sender="p1"))
    assert reason_of(data, expect_run=RUN) == "run"
    assert decode(data).run_id == "old-run"  # no expectation: accepted


def test_unknown_type_is_refused() -> None:
    assert reason_of(raw(PROTOCOL_VERSION, RUN, "c", "bogus", 0, {})) == "type"
    assert reason_of(raw(PROTOCOL_VERSION, RUN, "c", 3, 0, {})) == "type"


@pytest.mark.parametrize(
    "fields",
    [
        (PROTOCOL_VERSION, RUN, "c", "ready", 0),  # 5 fields
        (PROTOCOL_VERSION, "", "c", "ready", 0, {}),  # empty run id
        (PROTOCOL_VERSION, RUN, 7, "ready", 0, {}),  # sender not a str
        (PROTOCOL_VERSION, RUN, "c", "ready", -1, {}),  # negative iteration
        (PROTOCOL_VERSION, RUN, "c", "ready", 1.0, {}),  # float iteration
        (PROTOCOL_VERSION, RUN, "c", "ready", 0, [1, 2]),  # body not a map
    ],
)
def test_bad_envelope_fields_are_malformed(fields: tuple[Any, ...]) -> None:
    assert reason_of(raw(*fields)) == "malformed"


@pytest.mark.parametrize(
    "body",
    [
        {"stop": False, "peers": {}},  # missing rho
        good_round(rho="fast"),  # wrong kind
        good_round(stop=1),  # int is not a bool
        good_round(peers={"p1": {}}),  # missing nested field
        good_round(peers={"p1": {"p_in_mw": np.ones(H)}}),  # wrong ndim
        good_round(peers={"p1": {"p_in_mw": np.ones((2, H), dtype=np.int64)}}),  # wrong dtype
        good_round(peers={"p1": {"p_in_mw": np.ones((2, H)), "price_eur_per_mwh": np.ones((3, H))}}),  # shapes
        good_round(extra=1),  # unknown field
        good_round(rho=-1.0),  # below minimum
        good_round(aa_drift=np.ones(2)),  # drift steps without coefficients
        good_round(aa_gamma=np.zeros((2, 3)), aa_rejected=np.zeros(0, dtype=np.int64), aa_drift=np.ones(3)),  # rows
        good_round(aa_gamma=np.zeros((2, 3)), aa_rejected=np.zeros(0, dtype=np.int64), aa_drift=-np.ones(2)),  # sign
    ],
    ids=["missing", "kind", "bool", "nested", "ndim", "dtype", "cross-field", "unknown", "min", "drift-alone",
         "drift-rows", "drift-sign"],
)
def test_body_not_matching_schema_is_refused(body: dict[str, Any]) -> None:
    assert reason_of(raw(PROTOCOL_VERSION, RUN, "c", "round", 1, body)) == "body"
    with pytest.raises(ProtocolError) as info:
        encode(make_envelope(MsgType.ROUND, body, run_id=RUN, sender="c", iteration=1))
    assert info.value.reason == "body"


def test_cross_field_checks_of_grid_and_result() -> None:
    dispatch = samples()[MsgType.DISPATCH].to_body()
    dispatch["buses"] = [3, 7]
    assert reason_of(raw(PROTOCOL_VERSION, RUN, "c", "dispatch", 0, dispatch)) == "body"
    result = samples()[MsgType.RESULT].to_body()
    result["peers"]["p1"]["price_eur_per_mwh"] = np.ones((3, H))
    assert reason_of(raw(PROTOCOL_VERSION, RUN, "c", "result", 0, result)) == "body"
    report = samples()[MsgType.GRID_REPORT].to_body()
    report["tables"]["hours"]["converged"] = np.array([True])
    assert reason_of(raw(PROTOCOL_VERSION, RUN, "c", "grid_report", 0, report)) == "body"


def test_optional_fields_may_be_nil() -> None:
    body = {"role": "dso", "peer_ids": [], "pid": 1, "host": "h", "address": None}
    out = decode(raw(PROTOCOL_VERSION, RUN, "dso", "hello", 0, body))
    assert parse(out) == control.Hello("dso", (), 1, "h", None)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_nonfinite_float_is_refused(bad: float) -> None:
    assert reason_of(raw(PROTOCOL_VERSION, RUN, "c", "round", 1, good_round(rho=bad))) == "nonfinite"
    # also where the schema does not look (free-form config)
    assert reason_of(raw(PROTOCOL_VERSION, RUN, "c", "welcome", 0, {"config": {"x": [1.0, bad]}})) == "nonfinite"
    with pytest.raises(ProtocolError) as info:
        encode(make_envelope(MsgType.ROUND, good_round(rho=bad), run_id=RUN, sender="c"))
    assert info.value.reason == "nonfinite"


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_nonfinite_in_array_is_refused(bad: float) -> None:
    p = np.ones((2, H))
    p[1, 5] = bad
    body = good_round(peers={"p1": {"p_in_mw": p}})
    assert reason_of(raw(PROTOCOL_VERSION, RUN, "c", "round", 1, body)) == "nonfinite"
    assert reason_of(raw(PROTOCOL_VERSION, RUN, "c", "welcome", 0, {"config": {"a": p}})) == "nonfinite"
    with pytest.raises(ProtocolError) as info:
        encode(make_envelope(MsgType.ROUND, body, run_id=RUN, sender="c"))
    assert info.value.reason == "nonfinite"


def test_oversized_is_refused_before_parsing() -> None:
    data = encode(make_envelope(MsgType.ROUND, good_round(), run_id=RUN, sender="c"))
    assert reason_of(data, max_bytes=len(data) - 1) == "oversized"
    assert decode(data, max_bytes=len(data)).type == MsgType.ROUND
    assert reason_of(b"\x00" * 100, max_bytes=99) == "oversized"
    with pytest.raises(ProtocolError) as info:
        encode(make_envelope(MsgType.ROUND, good_round(), run_id=RUN, sender="c"), max_bytes=len(data) - 1)
    assert info.value.reason == "oversized"


@pytest.mark.parametrize(
    "ext",
    [
        pack_array(np.ones(4), shape=(5,)),  # shape claims more than the bytes
        pack_array(np.ones(4), shape=(2, 1)),  # shape claims less
        pack_array(np.ones(4), shape=(2**31, 2**31)),  # huge claim
        pack_array(np.ones(4), code=9),  # unknown dtype code
        pack_array(np.ones(4), code=0),
        msgpack.ExtType(EXT_NDARRAY, b"\x01"),  # header truncated
        msgpack.ExtType(EXT_NDARRAY, b"\x01\x03\x01\x00"),  # shape truncated
        msgpack.ExtType(EXT_NDARRAY, b"\x01\x20" + b"\x01\x00\x00\x00" * 32 + b"\x00" * 8),  # too many dims
        msgpack.ExtType(EXT_NDARRAY, b"\x03\x01\x02\x00\x00\x00\x01\x02"),  # bool byte 2
        msgpack.ExtType(42, b"whatever"),  # unknown ext type
    ],
    ids=["long", "short", "huge", "dtype9", "dtype0", "head", "shape", "ndim", "bool", "ext"],
)
def test_bad_array_payloads_are_malformed(ext: msgpack.ExtType) -> None:
    body = good_round(peers={"p1": {"p_in_mw": ext}})
    assert reason_of(raw(PROTOCOL_VERSION, RUN, "c", "round", 1, body)) == "malformed"


def test_foreign_msgpack_values_are_refused() -> None:
    int_key = raw(PROTOCOL_VERSION, RUN, "c", "welcome", 0, {"config": {1: "x"}})
    assert reason_of(int_key) in ("malformed", "body")
    timestamp = msgpack.packb(
        [PROTOCOL_VERSION, RUN, "c", "welcome", 0, {"config": {"t": msgpack.Timestamp(1, 0)}}], datetime=False
    )
    assert reason_of(timestamp) in ("malformed", "body")
    deep: Any = 1.0
    for _ in range(40):
        deep = [deep]
    assert reason_of(raw(PROTOCOL_VERSION, RUN, "c", "welcome", 0, {"config": {"d": deep}})) == "body"


def test_check_iteration() -> None:
    env = make_envelope(MsgType.READY, run_id=RUN, sender="p1", iteration=4)
    check_iteration(env, 4)
    with pytest.raises(ProtocolError) as info:
        check_iteration(env, 5)
    assert info.value.reason == "stale" and "p1" in str(info.value)


def test_from_envelope_checks_the_type() -> None:
    env = control.Shutdown("done").envelope(run_id=RUN, sender="c")
    assert control.Shutdown.from_envelope(env) == control.Shutdown("done")
    with pytest.raises(ProtocolError) as info:
        control.Hello.from_envelope(env)
    assert info.value.reason == "type"


def test_protocol_error_reasons_are_closed() -> None:
    with pytest.raises(ValueError):
        ProtocolError("whatever")


def test_huge_finite_values_travel_and_nonfinite_ones_do_not() -> None:
    big = np.full((2, H), 1e200)  # its sum of squares overflows: the exact test decides
    out = decode(encode(make_envelope(MsgType.ROUND, good_round(peers={"p1": {"p_in_mw": big}}), run_id=RUN, sender="c")))
    np.testing.assert_array_equal(out.body.peers["p1"].p_in_mw, big)
    big[1, 3] = math.nan
    assert reason_of(raw(PROTOCOL_VERSION, RUN, "c", "round", 1, good_round(peers={"p1": {"p_in_mw": big}}))) == "nonfinite"


@pytest.mark.parametrize("mtype", list(MsgType), ids=lambda t: t.value)
def test_fuzzed_bytes_decode_or_are_refused_with_a_reason(mtype: MsgType) -> None:
    """Flipped, dropped and inserted bytes anywhere in a valid message of every type: decode returns
    a message that encodes again, or raises ProtocolError with one of the reasons, never anything else."""
    fuzz = np.random.default_rng(sorted(MsgType).index(mtype))
    data = encode(samples()[mtype].envelope(run_id=RUN, sender="c", iteration=2))
    outcomes = set()
    for _ in range(300):
        b = bytearray(data)
        for _ in range(int(fuzz.integers(1, 4))):
            i = int(fuzz.integers(0, len(b)))
            op = fuzz.integers(0, 3)
            if op == 0:
                b[i] = int(fuzz.integers(0, 256))
            elif op == 1:
                del b[i]
            else:
                b.insert(i, int(fuzz.integers(0, 256)))
        try:
            env = decode(bytes(b), expect_run=RUN)
        except ProtocolError as exc:
            outcomes.add(exc.reason)
        else:
            encode(env)  # what was accepted is a valid message
            outcomes.add("accepted")
    assert outcomes - {"accepted"}, outcomes  # some mutations are refused


def test_array_checks_prepared_for_every_message_class():
    """A fork server prepares the array checks of every record class once (its peers inherit them);
    they are the ones each class would find at its first message."""
    import common.protocol as protocol

    protocol.prepare_checks()
    for cls in protocol.MESSAGES.values():
        assert cls in protocol._ARRAY_FIELDS
        assert protocol._ARRAY_FIELDS[cls] == protocol._arrays_of(cls)
    assert any(protocol._ARRAY_FIELDS[cls] for cls in protocol.MESSAGES.values())
