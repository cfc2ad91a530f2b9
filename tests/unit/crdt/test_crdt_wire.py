"""The wire form: round trips, limits, and fuzzing -- only DecodeError may escape a decoder."""

from __future__ import annotations

import contextlib
import random

import msgpack  # type: ignore[import-untyped,unused-ignore]
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crdt import wire
from crdt.base import DecodeError
from crdt.load_vector import LoadVector
from crdt.lww_map import LWWMap
from crdt.prefix_index import PrefixIndex


def sample_messages() -> list[bytes]:
    """Valid encodings of every delta type (and a digest), to mutate."""
    idx = PrefixIndex()
    idx.reset("http://e1:8000", 3)
    idx.store("http://e1:8000", (3, 0), [1, 2, (1 << 64) - 1])
    idx.remove("http://e1:8000", (3, 1), [2])
    idx.reset("http://e2:8000", 1, partial=True)
    idx.store("http://e2:8000", (1, 4), [7])
    other = PrefixIndex()
    other.reset("http://e3:8000", 1)
    other.store("http://e3:8000", (1, 0), [5])
    other.drop("http://e3:8000", now=0.0)
    lww = LWWMap()
    lww.set("node-a", {"region": "eu", "engines": ["http://e1:8000"]}, (1, 2), now=0.0)
    lww.delete("node-b", (4, 1), now=0.0)
    lv = LoadVector()
    lv.report(
        "http://e1:8000",
        "node-a",
        (1, 1),
        waiting=2,
        running=3,
        kv_usage=0.25,
        tokens_queued=512,
        healthy=True,
        now=0.0,
    )
    lv.set_inflight("node-a", (1, 2), {"http://e1:8000": 4}, now=0.0)
    return [
        wire.encode(idx.full_delta().to_wire()),
        wire.encode(idx.delta_since({"http://e1:8000": (3, 4)}, 0.0).to_wire()),
        wire.encode(other.full_delta().to_wire()),
        wire.encode(lww.full_delta().to_wire()),
        wire.encode(lv.full_delta(0.0).to_wire()),
        wire.encode(wire.digest_to_wire(idx.digest())),
    ]


SAMPLES = sample_messages()


def feed(data: bytes) -> None:
    """Decode ``data`` with every decoder and merge what survives; only DecodeError may escape."""
    try:
        obj = wire.decode(data)
    except DecodeError:
        return
    idx = PrefixIndex()
    idx.reset("http://e1:8000", 3)
    idx.store("http://e1:8000", (3, 0), [1, 9])
    targets: list[PrefixIndex | LWWMap | LoadVector] = [idx, LWWMap(), LoadVector()]
    for target in targets:
        try:
            delta = target.delta_from_wire(obj)
        except DecodeError:
            continue
        target.merge(delta, 1.0)  # type: ignore[arg-type]
        target.delta_since({}, 2.0)
    with contextlib.suppress(DecodeError):
        wire.digest_from_wire(obj)
    idx.check_invariants()


def test_round_trip_of_every_delta_type() -> None:
    idx = PrefixIndex()
    delta = idx.delta_from_wire(wire.decode(SAMPLES[0]))
    assert idx.merge(delta, 0.0)
    assert idx.keys("http://e1:8000") == {1, (1 << 64) - 1}
    assert idx.keys("http://e2:8000") == {7}
    assert wire.digest_from_wire(wire.decode(SAMPLES[5])) == {
        "http://e1:8000": (3, 7),
        "http://e2:8000": (1, 15),
    }
    lww = LWWMap()
    lww.merge(lww.delta_from_wire(wire.decode(SAMPLES[3])), 0.0)
    assert lww.items() == {"node-a": {"region": "eu", "engines": ["http://e1:8000"]}}
    lv = LoadVector()
    lv.merge(lv.delta_from_wire(wire.decode(SAMPLES[4])), 0.0)
    assert lv.inflight("http://e1:8000") == 4


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # never-used msgpack byte
        b"\x92\x01",  # truncated
        msgpack.packb([1, "x"]) + b"\x00",  # trailing garbage
        msgpack.packb([2, []]),  # future schema
        msgpack.packb([True, []]),  # bool is not a schema number
        msgpack.packb({"a": 1}),
        msgpack.packb([1, msgpack.ExtType(5, b"xx")]),
        msgpack.packb([1, {1: 2}], strict_types=False),
        b"\x91" * 100_000 + b"\x01",  # nested far too deep
        b"\xdd\xff\xff\xff\xff",  # claims 4G array items
        b"\xc6\xff\xff\xff\xff",  # claims a 4 GB bin
    ],
)
def test_corrupt_or_foreign_bytes_raise_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        wire.decode(data)


def test_size_and_depth_limits() -> None:
    big = wire.encode([b"x" * 2000])
    with pytest.raises(DecodeError):
        wire.decode(big, max_bytes=1000)
    nested: object = 1
    for _ in range(20):
        nested = [nested]
    with pytest.raises(DecodeError):
        wire.decode(wire.encode(nested), max_depth=10)
    assert wire.decode(wire.encode(nested), max_depth=30) == nested
    with pytest.raises(DecodeError):
        wire.decode("not bytes")  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    feed(data)
    feed(wire.encode(msgpack.unpackb(data, strict_map_key=False)) if _plain(data) else data)


def _plain(data: bytes) -> bool:
    try:
        wire.check_plain(msgpack.unpackb(data, strict_map_key=False))
    except Exception:
        return False
    return True


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(range(len(SAMPLES))), st.integers(0, 2**32 - 1))
def test_fuzz_mutated_valid_messages(which: int, seed: int) -> None:
    rnd = random.Random(seed)
    data = bytearray(SAMPLES[which])
    for _ in range(rnd.randint(1, 4)):
        op = rnd.random()
        pos = rnd.randrange(len(data))
        if op < 0.4:
            data[pos] = rnd.randrange(256)
        elif op < 0.6:
            del data[pos:]
            if not data:
                data.append(0x90)
        elif op < 0.8:
            data.insert(pos, rnd.randrange(256))
        else:
            data[pos] ^= 1 << rnd.randrange(8)
    feed(bytes(data))


value_st = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(value_st)
def test_structured_garbage_reaches_the_type_checks_and_is_rejected_cleanly(obj: object) -> None:
    assert wire.decode(wire.encode(obj)) == obj
    for tag in ("pfx", "lww", "load"):
        feed(wire.encode([tag, 1, obj, obj]))
        feed(wire.encode([tag, 1, [obj], [obj]]))
        feed(wire.encode([tag, 1, obj]))


INTERESTING_INTS = [
    -(1 << 63),
    -2,
    -1,
    0,
    1,
    2,
    3,
    7,
    (1 << 62) - 1,
    1 << 62,
    1 << 63,
    (1 << 64) - 1,
]


def mutate(obj: object, rnd: random.Random) -> object:
    """The same shape with a few leaves changed (ints to edge values, bytes cut, items lost)."""
    if type(obj) is list:
        items = [mutate(x, rnd) if rnd.random() < 0.3 else x for x in obj]
        if items and rnd.random() < 0.05:
            del items[rnd.randrange(len(items))]
        return items
    if type(obj) is dict:
        return {k: mutate(v, rnd) if rnd.random() < 0.3 else v for k, v in obj.items()}
    if type(obj) is int:
        near = [x for x in (obj - 1, obj + 1) if -(1 << 63) <= x < 1 << 64]
        return rnd.choice([*INTERESTING_INTS, *near])
    if type(obj) is bytes:
        cut = rnd.randrange(len(obj) + 1)
        data = bytearray(obj[:cut] + obj[cut:])
        if data and rnd.random() < 0.7:
            data[rnd.randrange(len(data))] = rnd.randrange(256)
        elif rnd.random() < 0.5:
            data = data[:cut]
        return bytes(data)
    if type(obj) is bool:
        return not obj if rnd.random() < 0.8 else 1
    if type(obj) is float:
        return rnd.choice([-1.0, 0.0, 0.5, 1.0, 2.0, float("inf"), float("nan")])
    if type(obj) is str:
        return rnd.choice(["", obj + "\x1f", obj, "x" * 2000])
    return obj


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(range(len(SAMPLES))), st.integers(0, 2**32 - 1))
def test_fuzz_shape_preserving_mutations(which: int, seed: int) -> None:
    rnd = random.Random(seed)
    obj = wire.decode(SAMPLES[which])
    for _ in range(rnd.randint(1, 3)):
        obj = mutate(obj, rnd)
    feed(wire.encode(obj))
