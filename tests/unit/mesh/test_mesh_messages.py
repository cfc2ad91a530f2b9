"""The wire envelope: round trips, and strict decoding that only ever raises DecodeError."""

from __future__ import annotations

import contextlib

import msgpack  # type: ignore[import-untyped,unused-ignore]
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdt.base import DecodeError
from mesh.messages import (
    Ack,
    Body,
    Envelope,
    MemberUpdate,
    Nack,
    NodeInfo,
    Notice,
    Ping,
    PingReq,
    Push,
    PushAck,
    Status,
    Sync,
    SyncReply,
    decode_envelope,
    encode_envelope,
    envelope_wire,
    kind_name,
)

ids = st.text(min_size=1, max_size=20)
u64 = st.integers(min_value=0, max_value=(1 << 63) - 1)
versions = st.tuples(u64, u64)
digests = st.dictionaries(ids, st.dictionaries(ids, versions, max_size=4), max_size=3)
wire_values = st.recursive(
    st.none()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.binary(max_size=8)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=10,
)
deltas = st.dictionaries(ids, wire_values, max_size=3)
updates = st.builds(
    MemberUpdate,
    node_id=ids,
    region=ids,
    addr=ids,
    generation=u64,
    incarnation=u64,
    status=st.sampled_from(Status),
    accuser=st.text(max_size=10),
)
bodies: st.SearchStrategy[Body] = st.one_of(
    st.builds(Ping, u64, st.text(max_size=10)),
    st.builds(Ack, u64),
    st.builds(PingReq, u64, ids, ids),
    st.builds(Nack, u64),
    st.builds(Push, u64, deltas, digests, st.booleans()),
    st.builds(
        PushAck,
        u64,
        digests,
        st.dictionaries(ids, st.lists(ids, max_size=3).map(tuple), max_size=2),
    ),
    st.builds(Sync, st.lists(updates, max_size=4).map(tuple), digests),
    st.builds(SyncReply, st.lists(updates, max_size=4).map(tuple), digests, deltas),
    st.just(Notice()),
)
envelopes = st.builds(
    Envelope,
    sender=st.builds(NodeInfo, ids, ids, ids),
    generation=u64,
    incarnation=u64,
    counter=u64,
    sent_at=st.integers(0, 1 << 40),
    body=bodies,
    updates=st.lists(updates, max_size=5).map(tuple),
)


@settings(max_examples=300, deadline=None)
@given(envelopes)
def test_round_trip(env: Envelope) -> None:
    back = decode_envelope(encode_envelope(env))
    assert back == env
    assert kind_name(back.body) == kind_name(env.body)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_decode_error(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode_envelope(data)


@settings(max_examples=300, deadline=None)
@given(envelopes, st.data())
def test_mutated_structures_raise_only_decode_error(env: Envelope, data: st.DataObject) -> None:
    """Replace one node of a valid envelope's structure with junk: decode or DecodeError."""
    wire = envelope_wire(env)
    path: list[int] = []
    node: object = wire
    while isinstance(node, list) and node and data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(node) - 1))
        path.append(i)
        node = node[i]
    junk = data.draw(wire_values)
    if not path:
        wire = junk  # type: ignore[assignment]
    else:
        parent: object = wire
        for i in path[:-1]:
            assert isinstance(parent, list)
            parent = parent[i]
        assert isinstance(parent, list)
        parent[path[-1]] = junk
    with contextlib.suppress(DecodeError):
        decode_envelope(msgpack.packb(wire, use_bin_type=True))


@pytest.mark.parametrize(
    "wire",
    [
        [2, "a", "r", "u", 1, 0, 1, 0, 1, [1, ""], []],  # future wire version
        [1, "a", "r", "u", 1, 0, 1, 0, 99, [], []],  # unknown kind
        [1, "a", "r", "u", -1, 0, 1, 0, 1, [1, ""], []],  # negative generation
        [1, "a", "r", "u", True, 0, 1, 0, 1, [1, ""], []],  # bool is not an int
        [1, "a" * 200, "r", "u", 1, 0, 1, 0, 1, [1, ""], []],  # id too long
        [1, "a", "r", "u", 1, 0, 1, 0, 7, [[], {"s": {"o": [1]}}], []],  # short version
        [1, "a", "r", "u", 1, 0, 1, 0, 7, [[["n", "r", "u", 1, 1, 9, ""]], {}], []],  # status
        [1, "a", "r", "u", 1, 0, 1, 0, 1, [1, ""]],  # missing field
        {"not": "a list"},
    ],
)
def test_specific_bad_envelopes(wire: object) -> None:
    with pytest.raises(DecodeError):
        decode_envelope(msgpack.packb(wire, use_bin_type=True))


def test_claims_order_by_generation_then_incarnation_then_status() -> None:
    def u(gen: int, inc: int, status: Status) -> MemberUpdate:
        return MemberUpdate("n", "r", "a", gen, inc, status)

    assert u(1, 5, Status.DEAD).rank() < u(2, 0, Status.ALIVE).rank()  # restart wins
    assert u(1, 1, Status.ALIVE).rank() < u(1, 1, Status.SUSPECT).rank()
    assert u(1, 1, Status.SUSPECT).rank() < u(1, 2, Status.ALIVE).rank()  # refutation
    assert u(1, 1, Status.DEAD).rank() < u(1, 1, Status.LEFT).rank()
