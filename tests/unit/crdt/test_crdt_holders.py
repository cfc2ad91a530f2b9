"""HolderMap against a plain ``key -> set of slots`` model, with a tiny table so that keys
collide, move between the table and the dict, and the table grows and shrinks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdt.holders import HolderMap
from crdt.prefix_index import PrefixIndex

BIG = (1 << 64) - 1
SLOTS = 70  # masks wider than 64 bits (the word-sized compiled query takes up to 64 slots)
NAMES = [f"http://r{s}" for s in range(SLOTS)]
# Small keys collide at small sizes (k and k + size share a position); big ones test u64 edges.
key_st = st.one_of(
    st.integers(0, 40), st.sampled_from([BIG, BIG - 1, BIG - 2, 1 << 63, (1 << 63) + 3, 1 << 40])
)
op_st = st.tuples(
    st.sampled_from(["add", "discard"]),
    st.lists(key_st, max_size=12),
    st.integers(0, SLOTS - 1),
)


def bits() -> list[int]:
    return [1 << s for s in range(SLOTS)]


def mask_of(model: dict[int, set[int]], key: int) -> int:
    return sum(1 << s for s in model.get(key, ()))


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(op_st, max_size=60),
    min_size=st.sampled_from([2, 3, 7]),
    runs=st.lists(st.lists(key_st, max_size=10), max_size=6),
    nslots=st.sampled_from([SLOTS, 64, 3]),
)
def test_holder_map_matches_a_model(
    ops: list[tuple[str, list[int], int]], min_size: int, runs: list[list[int]], nslots: int
) -> None:
    hm = HolderMap(bits()[:nslots], min_size=min_size)
    model: dict[int, set[int]] = {}
    for kind, keys, raw_slot in ops:
        slot = raw_slot % nslots
        if kind == "add":
            fresh = {k for k in keys if slot not in model.get(k, set())}
            assert hm.add(keys, slot) == len(fresh)
            for k in keys:
                model.setdefault(k, set()).add(slot)
        else:
            held = {k for k in keys if slot in model.get(k, set())}
            assert hm.discard(keys, slot) == len(held)
            for k in held:
                model[k].discard(slot)
                if not model[k]:
                    del model[k]
        hm.check()
    expected = {k: mask_of(model, k) for k in model}
    assert hm.to_dict() == expected
    assert len(hm) == len(expected)
    pool = sorted({k for _, keys, _ in ops for k in keys} | {41, BIG - 3})
    assert [hm.get(k) for k in pool] == [mask_of(model, k) for k in pool]
    for seq in [pool, *runs]:
        want = {}
        for slot in range(SLOTS):
            n = 0
            while n < len(seq) and slot in model.get(seq[n], set()):
                n += 1
            if n:
                want[slot] = n
        for compiled in (False, True):
            assert run_lengths(hm.runs(seq, compiled=compiled)) == want, compiled
            assert hm.match(seq, NAMES[:nslots], compiled=compiled) == {
                NAMES[s]: n for s, n in want.items()}, compiled


def run_lengths(runs: list[tuple[int, int]]) -> dict[int, int]:
    """slot -> run length, from ``HolderMap.runs``' (at, mask) entries."""
    out = {}
    for at, mask in runs:
        assert mask, "an entry without replicas"
        for slot in range(SLOTS):
            if mask >> slot & 1:
                assert slot not in out, "a slot ends twice"
                out[slot] = at
    return out


def test_compiled_query_loop_is_built_where_ci_runs() -> None:
    """CI runs every query test against the compiled loop: a build that silently fell back
    to the pure-Python loop would not test it."""
    import os

    from crdt.holders import COMPILED

    if os.environ.get("CI") == "true":
        assert COMPILED, "crdt/_match.c was not built (pip install -e . needs a C compiler)"


def test_holder_map_grows_and_shrinks_with_the_lone_keys() -> None:
    hm = HolderMap(bits(), min_size=3)
    keys = list(range(1, 2001))
    hm.add(keys, 5)
    hm.check()
    grown = hm._size
    assert grown >= 2000 / 0.75
    hm.add(keys[:1000], 6)  # half the keys now have two holders: they leave the table
    hm.check()
    hm.discard(keys, 5)
    hm.discard(keys[:990], 6)
    hm.check()
    assert hm._size < grown
    assert hm.to_dict() == {k: 1 << 6 for k in keys[990:1000]}


def test_holder_map_rejects_a_table_too_small_to_mark_empty_positions() -> None:
    with pytest.raises(ValueError, match="min_size"):
        HolderMap(bits(), min_size=1)


@settings(max_examples=150, deadline=None)
@given(
    writes=st.lists(
        st.tuples(st.booleans(), st.integers(0, 9), st.lists(st.integers(0, 30), max_size=10)),
        min_size=1,
        max_size=80,
    ),
    queries=st.lists(st.lists(st.integers(0, 30), max_size=20), min_size=1, max_size=8),
)
def test_match_agrees_with_a_naive_scan_through_table_and_dict(
    writes: list[tuple[bool, int, list[int]]], queries: list[list[int]]
) -> None:
    """Stores and removals over a tiny holder table: keys on one replica (table or dict),
    keys on several (dict), a run that passes from the dict to one replica's table keys."""
    idx = PrefixIndex()
    idx._holders = HolderMap(idx._bits, min_size=3)  # collisions and resizes at test sizes
    model: dict[str, set[int]] = {}
    for seq, (store, r, keys) in enumerate(writes):
        name = f"http://r{r}"
        if name not in model:
            idx.reset(name, 1)
            model[name] = set()
        if store:
            idx.store(name, (1, seq), keys)
            model[name].update(keys)
        else:
            idx.remove(name, (1, seq), keys)
            model[name].difference_update(keys)
    for q in queries:
        expected = {}
        for name, held in model.items():
            n = 0
            while n < len(q) and q[n] in held:
                n += 1
            if n:
                expected[name] = n
        assert idx.match(q) == expected
    idx.check_invariants()
