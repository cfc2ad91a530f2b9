"""Decoder tests against every producer schema version, both encodings, and garbage.

The fixtures are msgspec structs declared the way each engine version declares its own
(``array_like`` events up to vLLM 0.23 and in older SGLang, tagged maps afterwards; the outer
batch stays an array), so the bytes under test are what those producers put on the wire.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvevents.decode import (
    END_SEQ,
    RawMessage,
    WireError,
    decode_batch,
    decode_batch_generic,
    fold_hash,
    split_message,
    split_replay_reply,
)
from kvevents.decode_fast import decode_fast
from kvevents.events import AllBlocksCleared, BlockRemoved, BlockStored

Hash = bytes | int

# --------------------------------------------------------------------------- vLLM schemas


class V09Batch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """vLLM ~0.9: batch without DP rank."""

    ts: float
    events: list[Any]


class DPBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class MapBatch(msgspec.Struct, omit_defaults=True, gc=False):
    """The intermediate revision where the outer batch lost array_like too."""

    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class ArrayEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class MapEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class V09Stored(ArrayEvent, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None


class V09Removed(ArrayEvent, tag="BlockRemoved"):
    block_hashes: list[int]


class V010Stored(ArrayEvent, tag="BlockStored"):
    """+ medium (PR #19737); bytes or int hashes from v0.10.2."""

    block_hashes: list[Hash]
    parent_block_hash: Hash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


class V010Removed(ArrayEvent, tag="BlockRemoved"):
    block_hashes: list[Hash]
    medium: str | None


class V023Stored(ArrayEvent, tag="BlockStored"):
    """+ lora_name, extra_keys, group_idx, kv_cache_spec_* (the last array-era schema)."""

    block_hashes: list[Hash]
    parent_block_hash: Hash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None


class V023Removed(ArrayEvent, tag="BlockRemoved"):
    block_hashes: list[Hash]
    medium: str | None
    group_idx: int | None = None


class ArrayCleared(ArrayEvent, tag="AllBlocksCleared"):
    pass


class V026Stored(MapEvent, tag="BlockStored"):
    """Map era (PR #42892) with locality (v0.26) and the fields that came after."""

    block_hashes: list[Hash]
    parent_block_hash: Hash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None
    lookahead_token_ids: list[int] | None = None


class V026Removed(MapEvent, tag="BlockRemoved"):
    block_hashes: list[Hash]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None


class MapCleared(MapEvent, tag="AllBlocksCleared"):
    pass


# --------------------------------------------------------------------------- SGLang schemas


class SGLBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[Any]
    attn_dp_rank: int | None = None


class SGLStored(ArrayEvent, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None = None


class SGLMetadata(msgspec.Struct, omit_defaults=True, gc=False):
    cache_salt: str


class SGLStoredWithMetadata(SGLStored, tag="BlockStored", kw_only=True):
    metadata: SGLMetadata


class SGLRemoved(ArrayEvent, tag="BlockRemoved"):
    block_hashes: list[int]
    medium: str | None = None


class SGLMapStored(MapEvent, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None = None
    metadata: SGLMetadata | None = None
    session_id: str | None = None


class SGLMapRemoved(MapEvent, tag="BlockRemoved"):
    block_hashes: list[int]
    medium: str | None = None


encode = msgspec.msgpack.Encoder().encode
BIG = 2**64 - 1
SGL_NEG = -6738917275443968386  # SGLang sends signed int64


# --------------------------------------------------------------------------- reference bytes


def test_reference_hand_written_bytes_decode() -> None:
    """The byte example of the wire reference (§1.4), written out by hand."""
    hexs = (
        "93 cb3ff8000000000000 93"
        " 9c ab" + b"BlockStored".hex() + " 91 cfffffffffffffffff c0 92 01 02 02 c0"
        " a3" + b"GPU".hex() + " c0 c0 00 ae" + b"full_attention".hex() + " c0"
        " 94 ac" + b"BlockRemoved".hex() + " 91 07 a3" + b"GPU".hex() + " c0"
        " 91 b0" + b"AllBlocksCleared".hex() + " 00"
    )
    wire = bytes.fromhex(hexs.replace(" ", ""))
    # The fixture structs reproduce these bytes exactly: they mirror the producer.
    batch = DPBatch(
        1.5,
        [
            V023Stored([BIG], None, [1, 2], 2, None, "GPU", None, None, 0, "full_attention"),
            V023Removed([7], "GPU"),
            ArrayCleared(),
        ],
        0,
    )
    assert encode(batch) == wire
    out = decode_batch(wire)
    assert out.ts == 1.5 and out.data_parallel_rank == 0
    stored, removed, cleared = out.events
    assert stored == BlockStored([BIG], None, [1, 2], 2, None, "GPU", None, None, 0)
    assert removed == BlockRemoved([7], "GPU", None)
    assert isinstance(cleared, AllBlocksCleared)
    assert (out.unknown_events, out.unknown_fields, out.malformed_events) == (0, 0, 0)


def test_reference_map_form_decodes_to_same_events() -> None:
    batch = DPBatch(
        1.5,
        [
            V026Stored([BIG], None, [1, 2], 2, None, "GPU", None, None, 0, "full_attention"),
            V026Removed([7], "GPU"),
            MapCleared(),
        ],
        0,
    )
    wire = encode(batch)
    assert msgpack.unpackb(wire)[1][0] == {
        "type": "BlockStored",
        "block_hashes": [BIG],
        "parent_block_hash": None,
        "token_ids": [1, 2],
        "block_size": 2,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
        "group_idx": 0,
        "kv_cache_spec_kind": "full_attention",
    }
    out = decode_batch(wire)
    assert out.events[0] == BlockStored([BIG], None, [1, 2], 2, None, "GPU", None, None, 0)
    assert out.events[1] == BlockRemoved([7], "GPU", None)
    assert isinstance(out.events[2], AllBlocksCleared)


# --------------------------------------------------------------------------- every version

SCHEMAS: list[tuple[str, bytes, list[object]]] = [
    (
        "vllm-0.9 array, 2-element batch",
        encode(V09Batch(2.0, [V09Stored([11, 12], None, [1, 2, 3, 4], 2, None), V09Removed([11])])),
        [BlockStored([11, 12], None, [1, 2, 3, 4], 2), BlockRemoved([11])],
    ),
    (
        "vllm dp rank",
        encode(DPBatch(2.0, [V09Stored([5], 4, [9, 9], 2, 3)], 1)),
        [BlockStored([5], 4, [9, 9], 2, lora_id=3)],
    ),
    (
        "vllm-0.10 medium, int hashes",
        encode(DPBatch(2.0, [V010Stored([BIG], 1, [1], 1, None, "GPU"), V010Removed([2], "CPU")])),
        [BlockStored([BIG], 1, [1], 1, medium="GPU"), BlockRemoved([2], "CPU")],
    ),
    (
        "vllm-0.10.2 bytes hashes (32-byte sha256)",
        encode(
            DPBatch(
                2.0,
                [
                    V010Stored(
                        [b"\x01" * 24 + b"\x00" * 7 + b"\x05"], b"\xaa" * 32, [1], 1, None, "GPU"
                    ),
                    V010Removed([b"\x00" * 31 + b"\x07"], "GPU"),
                ],
                0,
            )
        ),
        [
            BlockStored([5], int.from_bytes(b"\xaa" * 8, "big"), [1], 1, medium="GPU"),
            BlockRemoved([7], "GPU"),
        ],
    ),
    (
        "vllm-0.23 array, lora + extra keys + group",
        encode(
            DPBatch(
                3.0,
                [
                    V023Stored(
                        [1, 2],
                        None,
                        [1, 2, 3, 4],
                        2,
                        7,
                        "GPU",
                        "ad",
                        [("ad",), None],
                        1,
                        "full_attention",
                        None,
                    ),
                    V023Removed([1], "GPU", 1),
                    ArrayCleared(),
                ],
                0,
            )
        ),
        [
            BlockStored([1, 2], None, [1, 2, 3, 4], 2, 7, "GPU", "ad", [["ad"], None], 1),
            BlockRemoved([1], "GPU", 1),
            AllBlocksCleared(),
        ],
    ),
    (
        "vllm-0.26 map events with locality and newer fields",
        encode(
            DPBatch(
                4.0,
                [
                    V026Stored(
                        [3],
                        2,
                        [5, 6],
                        2,
                        None,
                        "CPU",
                        None,
                        None,
                        0,
                        "sliding_window",
                        128,
                        "LOCAL",
                        "owner-1",
                        "sess-9",
                        [7, 8],
                    ),
                    V026Removed([3], "CPU", 0, "LOCAL"),
                    MapCleared(),
                ],
                0,
            )
        ),
        [
            BlockStored([3], 2, [5, 6], 2, None, "CPU", None, None, 0),
            BlockRemoved([3], "CPU", 0),
            AllBlocksCleared(),
        ],
    ),
    (
        "vllm map-shaped outer batch (intermediate revision)",
        encode(MapBatch(5.0, [V026Stored([4], None, [1], 1, None, "GPU", None)], 2)),
        [BlockStored([4], None, [1], 1, None, "GPU", None)],
    ),
    (
        "sglang array, 2-element batch, int64 hashes",
        encode(
            V09Batch(
                6.0,
                [SGLStored([SGL_NEG], None, [1, 2], 2, None, "GPU"), SGLRemoved([SGL_NEG], "GPU")],
            )
        ),
        [
            BlockStored([SGL_NEG & BIG], None, [1, 2], 2, medium="GPU"),
            BlockRemoved([SGL_NEG & BIG], "GPU"),
        ],
    ),
    (
        "sglang array with attn_dp_rank and salted metadata",
        encode(
            SGLBatch(
                6.0,
                [
                    SGLStoredWithMetadata(
                        [1], None, [1, 2], 2, None, "CPU_PINNED", metadata=SGLMetadata("s1")
                    )
                ],
                3,
            )
        ),
        [BlockStored([1], None, [1, 2], 2, None, "CPU_PINNED", cache_salt="s1")],
    ),
    (
        "sglang map era with metadata and session_id",
        encode(
            SGLBatch(
                7.0,
                [
                    SGLMapStored([-1], 9, [1], 1, None, "GPU", SGLMetadata("salt"), "sess"),
                    SGLMapRemoved([-1], "GPU"),
                ],
                0,
            )
        ),
        [BlockStored([BIG], 9, [1], 1, None, "GPU", cache_salt="salt"), BlockRemoved([BIG], "GPU")],
    ),
]


@pytest.mark.parametrize(("name", "wire", "expected"), SCHEMAS, ids=[s[0] for s in SCHEMAS])
def test_every_schema_version_decodes(name: str, wire: bytes, expected: list[object]) -> None:
    out = decode_batch(wire)
    assert list(out.events) == expected
    assert out.unknown_events == 0 and out.unknown_fields == 0 and out.malformed_events == 0
    assert math.isfinite(out.ts)


def test_ranks_are_read_from_each_batch_shape() -> None:
    assert decode_batch(encode(V09Batch(1.0, []))).data_parallel_rank is None
    assert decode_batch(encode(DPBatch(1.0, [], 4))).data_parallel_rank == 4
    assert decode_batch(encode(SGLBatch(1.0, [], 2))).data_parallel_rank == 2
    assert decode_batch(encode(MapBatch(1.0, [], 3))).data_parallel_rank == 3
    attn = msgpack.packb({"ts": 1.0, "events": [], "attn_dp_rank": 5})
    assert decode_batch(attn).data_parallel_rank == 5


# --------------------------------------------------------------------------- tolerance


def test_unknown_fields_and_types_are_counted_not_fatal() -> None:
    wire = msgpack.packb(
        [
            1.0,
            [
                {
                    "type": "BlockStored",
                    "block_hashes": [1],
                    "token_ids": [1],
                    "block_size": 1,
                    "future": 1,
                },
                [
                    "BlockStored",
                    [2],
                    None,
                    [1],
                    1,
                    None,
                    "GPU",
                    None,
                    None,
                    0,
                    None,
                    None,
                    "LOCAL",
                    "x",
                    "y",
                ],
                {"type": "BlockRemoved", "block_hashes": [1], "medium": "GPU", "next_gen": True},
                {"type": "KVCacheCompacted", "ranges": []},
                ["TierMoved", [1]],
                {"type": "AllBlocksCleared", "why": "reset"},
            ],
            0,
            "an extra batch field",
        ]
    )
    out = decode_batch(wire)
    assert [type(e).__name__ for e in out.events] == [
        "BlockStored",
        "BlockStored",
        "BlockRemoved",
        "AllBlocksCleared",
    ]
    assert out.unknown_events == 2
    assert out.unknown_fields == 1 + 2 + 1 + 1 + 1
    assert out.events[0] == BlockStored([1], None, [1], 1)


def test_malformed_events_are_skipped_and_counted() -> None:
    wire = msgpack.packb(
        [
            1.0,
            [
                ["BlockStored", [1], None],  # too short
                ["BlockStored", "nope", None, [1], 1],  # hashes not an array
                ["BlockStored", [1.5], None, [1], 1],  # float hash
                ["BlockStored", [b""], None, [1], 1],  # empty bytes hash
                ["BlockStored", [1], None, [1], 0],  # block size 0
                ["BlockStored", [1], None, "tok", 1],  # tokens not an array
                {"type": "BlockStored", "token_ids": [1], "block_size": 1},  # no hashes
                {"type": "BlockRemoved", "block_hashes": [1], "medium": 5},  # medium not a string
                [],
                [7, 8],
                "BlockStored",
                None,
                ["BlockRemoved", [3], "GPU"],  # the one good event
            ],
        ]
    )
    out = decode_batch(wire)
    assert out.events == [BlockRemoved([3], "GPU")]
    assert out.malformed_events == 12


def test_hash_folding_matches_the_engines() -> None:
    digest = bytes(range(32))
    assert fold_hash(digest) == int.from_bytes(digest[-8:], "big")
    assert fold_hash(b"\x01\x02") == 0x0102  # short bytes: left-padded
    assert fold_hash(-1) == BIG  # SGLang int64
    assert fold_hash(BIG) == BIG
    with pytest.raises(WireError):
        fold_hash("abc")


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",  # never-used msgpack byte
        msgpack.packb([1.0]),
        msgpack.packb("batch"),
        msgpack.packb([float("nan"), []]),
        msgpack.packb([float("inf"), [], 0]),
        msgpack.packb(["1.0", []]),
        msgpack.packb([True, []]),
        msgpack.packb([1.0, {"not": "a list"}]),
        msgpack.packb([1.0, [], "rank"]),
        msgpack.packb({"ts": 1.0}),
        msgpack.packb([1.0, []]) + b"\x00",  # trailing bytes
        b"\x92\xcb",  # truncated
        b"\xa2\xff\xfe",  # invalid utf-8 string
    ],
)
def test_malformed_payloads_raise_the_one_error(payload: bytes) -> None:
    with pytest.raises(WireError):
        decode_batch(payload)


def test_frames_are_checked() -> None:
    assert split_message([b"kv@a", (5).to_bytes(8, "big"), b"p"]) == RawMessage(b"kv@a", 5, b"p")
    for frames in ([b"t", b"p"], [b"t", b"\x00" * 7, b"p"], [b"t", b"\x00" * 8, b"p", b"x"]):
        with pytest.raises(WireError):
            split_message(frames)


def test_replay_replies_in_both_shapes() -> None:
    seq = (9).to_bytes(8, "big")
    end = END_SEQ.to_bytes(8, "big")
    assert split_replay_reply([b"", b"topic", seq, b"p"]) == RawMessage(b"topic", 9, b"p")
    assert split_replay_reply([b"", seq, b"p"]) == RawMessage(b"", 9, b"p")  # no topic frame
    assert split_replay_reply([seq, b"p"]) == RawMessage(b"", 9, b"p")  # REQ-style
    assert split_replay_reply([b"", b"", end, b""]) is None
    assert split_replay_reply([b"", end, b""]) is None
    for bad in (
        [b"x", b"t", seq, b"p"],
        [b""],
        [b"", b"t", b"123", b"p"],
        [b"a", b"b", b"c", b"d", b"e"],
    ):
        with pytest.raises(WireError):
            split_replay_reply(bad)


# --------------------------------------------------------------------------- fuzz


def _check_decodes_or_rejects(payload: bytes) -> None:
    """Garbage is either rejected with WireError or yields well-typed events; nothing else."""
    try:
        out = decode_batch(payload)
    except WireError as exc:
        assert str(exc)
        return
    assert math.isfinite(out.ts)
    assert out.data_parallel_rank is None or isinstance(out.data_parallel_rank, int)
    for ev in out.events:
        assert isinstance(ev, BlockStored | BlockRemoved | AllBlocksCleared)
        if not isinstance(ev, AllBlocksCleared):
            assert all(0 <= h < 2**64 for h in ev.block_hashes)
        if isinstance(ev, BlockStored):
            assert ev.block_size > 0 and isinstance(ev.token_ids, list)


_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.binary(max_size=12),
    st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared", "type", "GPU"]),
)
_tree = st.recursive(
    _leaf,
    lambda inner: (
        st.lists(inner, max_size=6)
        | st.dictionaries(st.one_of(st.text(max_size=6), _leaf), inner, max_size=5)
    ),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(obj=_tree)
def test_fuzz_structured_garbage_never_escapes_as_another_error(obj: object) -> None:
    try:
        payload = msgpack.packb(obj)
    except (TypeError, ValueError, OverflowError):
        return
    _check_decodes_or_rejects(payload)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=64))
def test_fuzz_random_bytes(data: bytes) -> None:
    _check_decodes_or_rejects(data)


@settings(max_examples=200, deadline=None)
@given(
    ts=st.floats(allow_nan=False, allow_infinity=False, width=64),
    events=st.lists(
        st.one_of(
            st.builds(
                lambda h, p, bs, n: ["BlockStored", h, p, list(range(bs * n)), bs, None, "GPU"],
                st.lists(st.integers(0, 2**64 - 1), max_size=4),
                st.none() | st.integers(0, 2**64 - 1),
                st.integers(1, 16),
                st.integers(0, 4),
            ),
            st.builds(
                lambda h: {"type": "BlockRemoved", "block_hashes": h, "medium": "GPU"},
                st.lists(st.binary(min_size=1, max_size=32), max_size=4),
            ),
        ),
        max_size=6,
    ),
    mutate=st.integers(0, 200),
)
def test_fuzz_mutated_valid_batches(ts: float, events: list[object], mutate: int) -> None:
    payload = bytearray(msgpack.packb([ts, events, 0]))
    if mutate < len(payload):
        payload[mutate] ^= 0x5A
    _check_decodes_or_rejects(bytes(payload))


# --------------------------------------------------------------------------- fast path


def _same(a: object, b: object) -> None:
    assert a == b
    for counter in ("unknown_events", "unknown_fields", "malformed_events"):
        assert getattr(a, counter) == getattr(b, counter)
    for x, y in zip(getattr(a, "events", []), getattr(b, "events", []), strict=True):
        assert type(x) is type(y)


_hash = st.one_of(st.integers(-(2**63), 2**64 - 1), st.binary(min_size=1, max_size=32))
_opt_str = st.one_of(st.none(), st.sampled_from(["GPU", "CPU", "STORAGE", "x"]), st.integers(0, 3))
_field_values = {
    "block_hashes": st.lists(_hash, max_size=3),
    "parent_block_hash": st.one_of(st.none(), _hash),
    "token_ids": st.one_of(st.none(), st.lists(st.integers(-2, 2**33), max_size=8)),
    "block_size": st.integers(-1, 16),
    "lora_id": st.one_of(st.none(), st.integers(0, 5), st.booleans()),
    "medium": _opt_str,
    "lora_name": st.one_of(_opt_str, st.just({"cache_salt": "s"})),
    "extra_keys": st.one_of(
        st.none(), st.lists(st.one_of(st.none(), st.lists(st.text(max_size=3))))
    ),
    "group_idx": st.one_of(st.none(), st.integers(0, 3)),
    "kv_cache_spec_kind": _opt_str,
    "locality": _opt_str,
    "session_id": _opt_str,
    "cache_salt": _opt_str,
    "metadata": st.one_of(
        st.none(), st.just({"cache_salt": "m"}), st.just({"other": 1}), st.just(3)
    ),
    "surprise": st.integers(-(2**63), 2**64 - 1),
}
_STORED_ORDER = list(_field_values)[:10]


@st.composite
def _event(draw: st.DrawFn) -> object:
    tag = draw(st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared", "Other"]))
    names = _STORED_ORDER if tag == "BlockStored" else ["block_hashes", "medium", "group_idx"]
    if tag in ("AllBlocksCleared", "Other"):
        names = []
    if draw(st.booleans()):  # map encoding: any subset of the known fields, maybe extra ones
        keys = draw(st.lists(st.sampled_from(list(_field_values)), unique=True, max_size=8))
        keys = [*names[:1], *(k for k in keys if k != "block_hashes")] if names else keys
        if tag == "BlockStored" and "block_size" not in keys and draw(st.booleans()):
            keys.append("block_size")
        return {"type": tag, **{k: draw(_field_values[k]) for k in keys}}
    n = draw(st.integers(0, len(names) + 2))
    return [tag, *(draw(_field_values[_STORED_ORDER[i % 10]]) for i in range(n))]


@settings(max_examples=400, deadline=None)
@given(
    ts=st.one_of(st.floats(allow_nan=True), st.integers(-5, 5)),
    events=st.lists(_event(), max_size=5),
    rank=st.one_of(st.none(), st.integers(0, 3), st.just("r")),
    extra=st.booleans(),
)
def test_fast_path_agrees_with_the_generic_decoder(
    ts: float, events: list[object], rank: object, extra: bool
) -> None:
    payload = msgpack.packb([ts, events, rank, *([1] if extra else [])])
    fast = decode_fast(payload)
    try:
        generic = decode_batch_generic(payload)
    except WireError:
        assert fast is None
        return
    if fast is not None:
        _same(fast, generic)
    _same(decode_batch(payload), generic)


def test_fast_path_takes_the_usual_batches() -> None:
    slow_shapes = ("bytes hashes", "salted metadata", "map-shaped")
    for name, wire, _expected in SCHEMAS:
        fast = decode_fast(wire)
        if any(shape in name for shape in slow_shapes):
            assert fast is None, name  # left to the generic decoder
            continue
        assert fast is not None, name
        _same(fast, decode_batch_generic(wire))
