"""LWWMap: one writer per key, version-ordered, tombstones with a grace period."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdt import wire
from crdt.base import DecodeError
from crdt.lww_map import LWWDelta, LWWMap
from crdt.versions import VersionClock

value_st = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=6,
)
# A write: (writer key, is_delete, value). Each key has one writer whose counter only grows.
write_st = st.tuples(st.sampled_from(["n1", "n2", "n3", "n4"]), st.booleans(), value_st)


def apply_writes(writes: list[tuple[str, bool, object]], generation: int = 1) -> list[LWWMap]:
    """Each write at its writer's next version; returns one map per prefix of the history."""
    clocks: dict[str, VersionClock] = {}
    maps = []
    m = LWWMap()
    for key, delete, value in writes:
        clock = clocks.setdefault(key, VersionClock(generation))
        if delete:
            m.delete(key, clock.next(), now=0.0)
        else:
            m.set(key, value, clock.next(), now=0.0)
        snapshot = LWWMap()
        snapshot.merge(m.full_delta(), 0.0)
        maps.append(snapshot)
    return maps


def rt(m: LWWMap, d: LWWDelta) -> LWWDelta:
    return m.delta_from_wire(wire.decode(wire.encode(d.to_wire())))


def join(*maps: LWWMap) -> LWWMap:
    out = LWWMap()
    for m in maps:
        out.merge(rt(out, m.full_delta()), 0.0)
    return out


def test_later_version_wins_and_older_is_ignored() -> None:
    m = LWWMap()
    assert m.set("node-a", {"region": "eu", "addr": "10.0.0.1:8000"}, (1, 1), now=0.0)
    assert not m.set("node-a", {"region": "us"}, (1, 0), now=0.0)
    assert m.get("node-a") == {"region": "eu", "addr": "10.0.0.1:8000"}
    assert m.set("node-a", {"region": "eu", "addr": "10.0.0.2:8000"}, (2, 0), now=0.0)  # restart
    assert m.version("node-a") == (2, 0)
    assert m.delete("node-a", (2, 1), now=5.0)
    assert "node-a" not in m and m.get("node-a") is None and len(m) == 0
    assert m.version("node-a") == (2, 1)  # the tombstone is still held


def test_tombstone_blocks_stale_copies_until_gc_after_grace() -> None:
    a, b = LWWMap(), LWWMap()
    a.set("k", "v", (1, 1), now=0.0)
    b.merge(a.full_delta(), now=0.0)
    a.delete("k", (1, 2), now=10.0)
    assert not a.merge(b.full_delta(), now=11.0)  # stale value does not resurrect
    assert "k" not in a
    assert a.gc(now=30.0, grace=60.0) == 0
    assert a.gc(now=71.0, grace=60.0) == 1 and a.version("k") is None


def test_bad_writes_are_rejected() -> None:
    m = LWWMap()
    with pytest.raises(ValueError):
        m.set("k", (1, 2), (1, 1), now=0.0)  # tuples would come back as lists
    with pytest.raises(ValueError):
        m.set("k", {1: "x"}, (1, 1), now=0.0)
    with pytest.raises(ValueError):
        m.set("", 1, (1, 1), now=0.0)
    with pytest.raises(ValueError):
        m.set("k", 1, (-1, 1), now=0.0)
    assert len(m) == 0


@pytest.mark.parametrize(
    "obj",
    [
        ["lww", 1, [["k", 1, 1, True, "value on a tombstone"]]],
        ["lww", 1, [["k", -1, 1, False, None]]],
        ["lww", 1, [["k", 1, 1, 0, None]]],
        ["lww", 2, []],
        ["pfx", 1, []],
        ["lww", 1, [["", 1, 1, False, None]]],
        ["lww", 1, [["k", 1, 1, False, None, "extra"]]],
        {"lww": 1},
    ],
)
def test_delta_from_wire_rejects_malformed_shapes(obj: object) -> None:
    with pytest.raises(DecodeError):
        LWWMap().delta_from_wire(obj)


@settings(max_examples=80, deadline=None)
@given(st.lists(write_st, max_size=20), st.data())
def test_join_laws_and_delta_equals_full_state(
    writes: list[tuple[str, bool, object]], data: st.DataObject
) -> None:
    history = [LWWMap(), *apply_writes(writes)]
    a, b, c = (data.draw(st.sampled_from(history)) for _ in range(3))
    assert join(a, b).entries() == join(b, a).entries()
    assert join(join(a, b), c).entries() == join(a, join(b, c)).entries()
    assert join(a, a).entries() == a.entries()
    # what b lacks, as a delta, gives the same state as merging a's full state
    via_delta = join(b)
    via_delta.merge(rt(via_delta, a.delta_since(b.digest(), 0.0)), 0.0)
    assert via_delta.entries() == join(b, a).entries()
    # the latest map of the history is what every join converges to
    assert join(*history).entries() == history[-1].entries()


@settings(max_examples=60, deadline=None)
@given(st.lists(write_st, max_size=25), st.integers(0, 2**32 - 1), st.sampled_from([None, 30, 80]))
def test_replicas_converge_under_loss_and_reordering_to_the_model(
    writes: list[tuple[str, bool, object]], seed: int, budget: int | None
) -> None:
    rnd = random.Random(seed)
    # writer of key n{i} is node i-1 (one writer per key)
    nodes = [LWWMap() for _ in range(4)]
    clocks = {f"n{i + 1}": VersionClock(3) for i in range(4)}
    model: dict[str, object] = {}
    inbox: list[tuple[int, LWWDelta]] = []
    for key, delete, value in writes:
        owner = nodes[int(key[1]) - 1]
        if delete:
            owner.delete(key, clocks[key].next(), now=0.0)
            model.pop(key, None)
        else:
            owner.set(key, value, clocks[key].next(), now=0.0)
            model[key] = value
        for _ in range(rnd.randint(0, 2)):
            a, b = rnd.sample(range(4), 2)
            inbox.append((b, nodes[a].delta_since(nodes[b].digest(), 0.0, budget)))
        rnd.shuffle(inbox)
        while inbox and rnd.random() < 0.5:
            to, d = inbox.pop()
            if rnd.random() < 0.8:
                nodes[to].merge(d, 0.0)
    for _ in range(200):  # anti-entropy until quiet
        changed = False
        for src in nodes:
            for dst in nodes:
                if src is not dst:
                    d = src.delta_since(dst.digest(), 0.0, budget)
                    changed |= dst.merge(rt(dst, d), 0.0)
        if not changed:
            break
    for node in nodes:
        assert node.entries() == nodes[0].entries()
        assert node.items() == dict(sorted(model.items()))
