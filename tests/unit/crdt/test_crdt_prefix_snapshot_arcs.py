"""PrefixIndex snapshots cut by key: arcs under a tiny budget install exactly the whole snapshot.

A peer that lacks a slice, holds an older epoch or is partial gets a RESET. When it does not
fit the byte budget it travels as arcs of the key space; the receiver stages them and only
installs (its digest only moves) once they cover the key space.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crdt import wire
from crdt.base import DecodeError
from crdt.prefix_index import KEY_SPACE, IndexDelta, PrefixIndex

R = "http://engine-0:8000"


def build_origin(rnd: random.Random, n_keys: int, epoch: int = 3) -> tuple[PrefixIndex, int]:
    """A complete slice of about ``n_keys`` keys written over many seqs, with churn."""
    src = PrefixIndex(min_tombstones=rnd.choice([16, 1 << 16]))
    src.reset(R, epoch)
    held: list[int] = []
    seq = 0
    while len(held) < n_keys:
        # hashes mostly, plus small ints and edge values (arcs must wrap round 2**64)
        ks = [
            rnd.choice([rnd.getrandbits(64), rnd.randrange(64), KEY_SPACE - 1 - rnd.randrange(4)])
            for _ in range(rnd.randint(1, 40))
        ]
        src.store(R, (epoch, seq), ks)
        held.extend(ks)
        seq += 1
        if rnd.random() < 0.3 and held:
            gone = rnd.sample(held, k=min(len(held), rnd.randint(1, 10)))
            src.remove(R, (epoch, seq), gone)
            held = [k for k in held if k not in set(gone)]
            seq += 1
    return src, seq - 1


def receiver(kind: str, epoch: int, top: int) -> PrefixIndex:
    """An index that needs a snapshot of R: empty, an older epoch, or partial (history lost)."""
    idx = PrefixIndex()
    if kind == "older":
        idx.reset(R, epoch - 1)
        idx.store(R, (epoch - 1, 7), [1, 2, 3])
    elif kind == "partial":
        idx.store(R, (epoch, top - 3), [5, 6, 1 << 40])  # no reset: history before is unknown
        assert idx.slice_info(R) is not None and idx.slice_info(R).partial  # type: ignore[union-attr]
    return idx


def copy_of(idx: PrefixIndex) -> PrefixIndex:
    out = PrefixIndex()
    out.merge(idx.full_delta(), 0.0)
    return out


def roundtrip(idx: PrefixIndex, delta: IndexDelta) -> IndexDelta:
    return idx.delta_from_wire(wire.decode(wire.encode(delta.to_wire())))


def arcs(src: PrefixIndex, recv: PrefixIndex, budget: int) -> list[IndexDelta]:
    """Every delta ``src`` sends to a peer at ``recv``'s digest until one lap is staged."""
    probe = copy_of(recv) if recv.replicas() else PrefixIndex()
    start = probe.digest()
    out: list[IndexDelta] = []
    for _ in range(20_000):
        d = src.delta_since(start, 0.0, budget)
        assert not d.is_empty()
        out.append(d)
        probe.merge(d, 0.0)
        if probe.digest() != start:
            return out
    raise AssertionError("arcs never covered the key space")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    n_keys=st.integers(1500, 4000),
    budget=st.sampled_from([300, 700, 2048]),
    kind=st.sampled_from(["empty", "older", "partial"]),
)
def test_arcs_shuffled_duplicated_and_lost_then_resent_install_the_whole_snapshot(
    seed: int, n_keys: int, budget: int, kind: str
) -> None:
    rnd = random.Random(seed)
    src, top = build_origin(rnd, n_keys)
    recv = receiver(kind, 3, top)
    target = copy_of(recv)
    target.merge(roundtrip(target, src.delta_since(recv.digest(), 0.0)), 0.0)  # whole snapshot
    assert target.content()[R] == src.content()[R]

    pieces = arcs(src, recv, budget)
    assert len(pieces) > 1, "the snapshot should not have fitted the budget"
    for d in pieces:
        assert len(d.pieces) == 1 and d.pieces[0].reset
        assert len(wire.encode(d.to_wire())) <= budget
    # deliver shuffled, some twice, some lost first and re-sent at the end
    lost = rnd.sample(pieces, k=len(pieces) // 4)
    train = [d for d in pieces if all(d is not x for x in lost)]
    train += rnd.sample(train, k=min(5, len(train)))
    rnd.shuffle(train)
    train += lost
    before = recv.digest()
    installed = False
    for d in train:
        recv.merge(roundtrip(recv, d), 0.0)
        if recv.digest() != before:
            # the version moves once, straight to the whole snapshot's state
            assert recv.content() == target.content()
            installed = True
        else:
            assert not installed or recv.content() == target.content()
    assert installed
    assert recv.content() == target.content()
    assert recv.digest() == target.digest()
    assert not recv.slice_info(R).catching_up  # type: ignore[union-attr]
    assert not recv.merge(roundtrip(recv, rnd.choice(pieces)), 0.0)  # late duplicate: no-op
    recv.check_invariants()
    assert recv.delta_since(src.digest(), 0.0).is_empty()
    assert src.delta_since(recv.digest(), 0.0).is_empty()


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n_keys=st.integers(1000, 2500))
def test_arcs_of_snapshots_at_several_versions_join_in_any_order(seed: int, n_keys: int) -> None:
    """The origin moves on between arcs: receivers fed the same arcs in any order agree, and
    continuations then bring them to the origin's state."""
    rnd = random.Random(seed)
    src, top = build_origin(rnd, n_keys)
    empty: dict[str, tuple[int, int]] = {}
    pieces: list[IndexDelta] = []
    seq = top + 1
    probe = PrefixIndex()
    for _ in range(5000):
        d = src.delta_since(empty, 0.0, 600)
        pieces.append(d)
        probe.merge(d, 0.0)
        if probe.replicas():
            break
        src.store(R, (3, seq), [rnd.getrandbits(64)])
        if rnd.random() < 0.5:
            src.remove(R, (3, seq), [rnd.choice(sorted(src.keys(R)))])
        seq += 1
    assert probe.replicas(), "arcs never covered the key space"
    a, b = PrefixIndex(), PrefixIndex()
    order_a = pieces + rnd.sample(pieces, k=min(3, len(pieces)))
    order_b = list(pieces)
    rnd.shuffle(order_a)
    rnd.shuffle(order_b)
    for d in order_a:
        a.merge(roundtrip(a, d), 0.0)
    for d in order_b:
        b.merge(roundtrip(b, d), 0.0)
    assert a.content() == b.content() == probe.content()
    assert a.digest() == b.digest()
    # installed at the oldest arc's version: a subset of the origin's keys of that time
    epoch, installed = a.version(R)  # type: ignore[misc]
    assert (epoch, installed) <= src.version(R)  # type: ignore[operator]
    for _ in range(200):
        d = src.delta_since(a.digest(), 0.0, 600)
        if d.is_empty():
            break
        a.merge(roundtrip(a, d), 0.0)
    assert a.content()[R] == src.content()[R]
    a.check_invariants()


def test_a_partial_peer_of_a_large_slice_is_upgraded_under_a_small_budget() -> None:
    """The reset that upgrades a partial peer used to be sent whole or not at all."""
    rnd = random.Random(11)
    src, top = build_origin(rnd, 6000)
    peer = receiver("partial", 3, top)
    budget = 4096
    for _ in range(1000):
        d = src.delta_since(peer.digest(), 0.0, budget)
        if d.is_empty():
            break
        assert len(wire.encode(d.to_wire())) <= budget
        peer.merge(roundtrip(peer, d), 0.0)
    info = peer.slice_info(R)
    assert info is not None and not info.partial and not info.catching_up
    assert peer.content()[R] == src.content()[R]


def test_arc_pieces_are_checked_on_decode() -> None:
    rnd = random.Random(3)
    src, _ = build_origin(rnd, 500)
    d = src.delta_since({}, 0.0, 400)
    p = d.pieces[0]
    assert not p.whole
    obj = d.to_wire()
    piece = list(obj[2][0])  # type: ignore[index]
    bad_len = [*piece[:11], 0]
    bad_start = [*piece[:10], KEY_SPACE, piece[11]]
    not_reset = [piece[0], piece[1], 0, piece[3], 2, *piece[5:]]
    outside = [*piece[:10], (p.arc_lo + p.arc_len) % KEY_SPACE, 1]
    eleven = piece[:11]
    for bad in (bad_len, bad_start, not_reset, eleven):
        with pytest.raises(DecodeError):
            src.delta_from_wire([obj[0], obj[1], [bad], []])
    if p.key_count():
        with pytest.raises(DecodeError, match="outside its arc"):
            src.delta_from_wire([obj[0], obj[1], [outside], []])
    # the well-formed piece round-trips
    assert src.delta_from_wire(obj) == d


@pytest.mark.parametrize("old_first", [True, False])
def test_arcs_of_a_snapshot_from_before_a_clear_are_void_once_a_later_one_is_staged(
    old_first: bool,
) -> None:
    """Arcs staged before the origin cleared must not install: the slice would sit below the
    clear, where no sender can continue it (it gets another reset), and the install would
    throw away the newer arcs staged so far. So the first install is the post-clear state."""
    rnd = random.Random(5)
    src = PrefixIndex()
    src.reset(R, 3)
    src.store(R, (3, 0), [rnd.getrandbits(64) for _ in range(200)])
    old = [src.delta_since({}, 0.0, 300) for _ in range(5)]  # the first arcs of a lap at seq 0
    assert all(not d.pieces[0].whole and d.pieces[0].hi == 0 for d in old)
    src.clear(R, (3, 1))
    src.store(R, (3, 2), [rnd.getrandbits(64) for _ in range(200)])
    recv = PrefixIndex()
    if old_first:
        for d in old:
            assert recv.merge(roundtrip(recv, d), 0.0)
    for n in range(1000):
        d = src.delta_since(recv.digest(), 0.0, 300)  # the lap goes on, now at seq 2
        assert not d.is_empty() and d.pieces[0].hi == 2
        recv.merge(roundtrip(recv, d), 0.0)
        if n == 0 and not old_first:
            for late in old:  # staged after an arc that has seen the clear: void
                assert not recv.merge(roundtrip(recv, late), 0.0)
        if recv.replicas():
            break
    assert recv.version(R) == (3, 2)
    assert recv.content() == src.content()
    assert src.delta_since(recv.digest(), 0.0, 300).is_empty()
    recv.check_invariants()
