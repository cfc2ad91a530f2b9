"""LoadVector: version-ordered load records and in-flight counts, ages in the local clock."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdt import wire
from crdt.base import DecodeError
from crdt.load_vector import LoadDelta, LoadVector
from crdt.versions import VersionClock


def rt(lv: LoadVector, d: LoadDelta) -> LoadDelta:
    return lv.delta_from_wire(wire.decode(wire.encode(d.to_wire())))


def report(
    lv: LoadVector,
    replica: str,
    reporter: str,
    version: tuple[int, int],
    now: float,
    waiting: int = 0,
    healthy: bool = True,
) -> bool:
    return lv.report(
        replica,
        reporter,
        version,
        waiting=waiting,
        running=1,
        kv_usage=0.5,
        tokens_queued=waiting * 100,
        healthy=healthy,
        now=now,
    )


def test_records_are_ordered_by_the_reporters_version_not_by_arrival() -> None:
    lv = LoadVector()
    assert report(lv, "http://e1", "router-a", (1, 5), now=0.0, waiting=3)
    assert not report(lv, "http://e1", "router-a", (1, 4), now=1.0, waiting=9)  # late, older
    load = lv.load("http://e1", now=2.0)
    assert load is not None and load.waiting == 3 and load.age == pytest.approx(2.0)
    assert report(lv, "http://e1", "router-a", (2, 0), now=3.0, waiting=7)  # reporter restarted
    load = lv.load("http://e1", now=3.0)
    assert load is not None and load.waiting == 7 and load.version == (2, 0)


def test_readers_take_the_freshest_of_several_reporters() -> None:
    lv = LoadVector()
    report(lv, "http://e1", "router-a", (1, 1), now=0.0, waiting=1)
    report(lv, "http://e1", "router-b", (9, 1), now=4.0, waiting=2)
    load = lv.load("http://e1", now=5.0)
    assert load is not None and load.reporter == "router-b" and load.age == pytest.approx(1.0)
    assert [r.reporter for r in lv.reports("http://e1", now=5.0)] == ["router-a", "router-b"]
    assert lv.loads(now=5.0)["http://e1"].waiting == 2
    assert lv.replicas() == ["http://e1"]


def test_age_travels_with_the_record_across_hops_in_each_local_clock() -> None:
    # three nodes whose clocks are wildly offset from each other
    a, b, c = LoadVector(), LoadVector(), LoadVector()
    report(a, "http://e1", "a", (1, 1), now=1000.0)
    b.merge(rt(b, a.delta_since(b.digest(), now=1002.0)), now=50.0)  # 2 s old on arrival
    c.merge(rt(c, b.delta_since(c.digest(), now=53.0)), now=-7.0)  # 3 s more at b
    load = c.load("http://e1", now=-6.0)
    assert load is not None and load.age == pytest.approx(6.0)


def test_equal_version_keeps_the_fresher_age_estimate() -> None:
    a, b = LoadVector(), LoadVector()
    report(a, "http://e1", "a", (1, 1), now=0.0)
    slow = a.delta_since({}, now=10.0)  # took a long way round: 10 s old
    fast = a.delta_since({}, now=1.0)
    b.merge(slow, now=100.0)
    assert not b.merge(fast, now=100.0)  # nothing new, but the age estimate improves
    load = b.load("http://e1", now=100.0)
    assert load is not None and load.age == pytest.approx(1.0)


def test_records_older_than_max_age_fade_out_everywhere() -> None:
    a, b = LoadVector(max_age=30.0), LoadVector(max_age=30.0, node_id="b")
    report(a, "http://e1", "a", (1, 1), now=0.0)
    report(b, "http://e2", "b", (1, 1), now=0.0)
    assert a.delta_since({}, now=31.0).is_empty()  # too old to ship
    b.merge(a.delta_since({}, now=29.0), now=0.0)  # arrives 29 s old
    assert b.expire(now=0.5) == 0
    assert b.expire(now=2.0) == 1  # a's record is now 31 s old
    assert b.expire(now=100.0) == 0  # b's own record is never expired locally
    assert b.replicas() == ["http://e2"]
    too_old = LoadDelta((replace(a.reports("http://e1", now=0.0)[0], age=31.0),))
    assert not b.merge(too_old, now=0.0)  # refused on arrival: it cannot resurrect
    assert b.replicas() == ["http://e2"]


def test_inflight_counts_are_owned_per_router_and_summed_by_readers() -> None:
    a = LoadVector(node_id="ra")
    b = LoadVector(node_id="rb")
    ca, cb = VersionClock(1), VersionClock(7)
    a.adjust_inflight("ra", "http://e1", +1, ca.next(), now=0.0)
    a.adjust_inflight("ra", "http://e1", +1, ca.next(), now=0.0)
    b.adjust_inflight("rb", "http://e1", +3, cb.next(), now=0.0)
    b.adjust_inflight("rb", "http://e2", +1, cb.next(), now=0.0)
    b.merge(rt(b, a.delta_since(b.digest(), now=0.1)), now=0.0)
    a.merge(rt(a, b.delta_since(a.digest(), now=0.1)), now=0.0)
    for lv in (a, b):
        assert lv.inflight("http://e1") == 5
        assert lv.inflight("http://e1", exclude_router="ra") == 3
        assert lv.inflight_by_router("http://e1") == {"ra": 2, "rb": 3}
    assert a.adjust_inflight("ra", "http://e1", -5, ca.next(), now=1.0) == 0  # never below 0
    b.merge(a.delta_since(b.digest(), now=1.0), now=1.0)
    assert b.inflight("http://e1") == 3 and b.inflight_by_router("http://e1") == {"rb": 3}


def test_bad_reports_are_rejected() -> None:
    lv = LoadVector()
    with pytest.raises(ValueError):
        lv.report(
            "http://e1",
            "a",
            (1, 1),
            waiting=-1,
            running=0,
            kv_usage=0.1,
            tokens_queued=0,
            healthy=True,
            now=0.0,
        )
    with pytest.raises(ValueError):
        lv.report(
            "http://e1",
            "a",
            (1, 1),
            waiting=0,
            running=0,
            kv_usage=1.5,
            tokens_queued=0,
            healthy=True,
            now=0.0,
        )
    with pytest.raises(ValueError):
        lv.report(
            "bad\x1fname",
            "a",
            (1, 1),
            waiting=0,
            running=0,
            kv_usage=0.1,
            tokens_queued=0,
            healthy=True,
            now=0.0,
        )
    with pytest.raises(ValueError):
        lv.set_inflight("a", (1, 1), {"http://e1": -2}, now=0.0)
    assert lv.replicas() == [] and lv.inflight("http://e1") == 0


@pytest.mark.parametrize(
    "obj",
    [
        ["load", 1, [["r", "a", 1, 1, 0, 0, 1.5, 0, True, 0.0]], []],
        ["load", 1, [["r", "a", 1, 1, 0, 0, 0.5, 0, 1, 0.0]], []],
        ["load", 1, [["r", "a", 1, 1, 0, 0, float("nan"), 0, True, 0.0]], []],
        ["load", 1, [["r", "a", 1, 1, -3, 0, 0.5, 0, True, 0.0]], []],
        ["load", 1, [], [["r", 1, 1, {"x": -1}, 0.0]]],
        ["load", 1, [], [["r", 1, 1, [1], 0.0]]],
        ["load", 1, [], [["r", 1, 1, {}, -1.0]]],
        ["load", 1, []],
        ["lww", 1, [], []],
    ],
)
def test_delta_from_wire_rejects_malformed_shapes(obj: object) -> None:
    with pytest.raises(DecodeError):
        LoadVector().delta_from_wire(obj)


# ---- laws and convergence ----------------------------------------------------------------

write_st = st.one_of(
    st.tuples(
        st.just("load"),
        st.sampled_from(["e1", "e2", "e3"]),
        st.sampled_from(["ra", "rb"]),
        st.integers(0, 9),
    ),
    st.tuples(
        st.just("inflight"),
        st.sampled_from(["e1", "e2", "e3"]),
        st.sampled_from(["ra", "rb", "rc"]),
        st.integers(-2, 3),
    ),
)


def run_writes(writes: list[tuple[str, str, str, int]]) -> list[LoadVector]:
    """Snapshots of one history in which every (replica, reporter) and router has one writer."""
    clocks: dict[str, VersionClock] = {}
    lv = LoadVector(max_age=1e9)
    snaps = []
    for kind, replica, who, n in writes:
        clock = clocks.setdefault(who, VersionClock(2))
        if kind == "load":
            lv.report(
                replica,
                who,
                clock.next(),
                waiting=n,
                running=n % 3,
                kv_usage=n / 10,
                tokens_queued=n * 10,
                healthy=n != 0,
                now=0.0,
            )
        else:
            lv.adjust_inflight(who, replica, n, clock.next(), now=0.0)
        snap = LoadVector(max_age=1e9)
        snap.merge(lv.full_delta(0.0), 0.0)
        snaps.append(snap)
    return snaps


def join(*vs: LoadVector) -> LoadVector:
    out = LoadVector(max_age=1e9)
    for v in vs:
        out.merge(rt(out, v.full_delta(0.0)), 0.0)
    return out


@settings(max_examples=80, deadline=None)
@given(st.lists(write_st, max_size=20), st.data())
def test_join_laws_and_delta_equals_full_state(
    writes: list[tuple[str, str, str, int]], data: st.DataObject
) -> None:
    history = [LoadVector(max_age=1e9), *run_writes(writes)]
    a, b, c = (data.draw(st.sampled_from(history)) for _ in range(3))
    assert join(a, b).content() == join(b, a).content()
    assert join(join(a, b), c).content() == join(a, join(b, c)).content()
    assert join(a, a).content() == a.content()
    via_delta = join(b)
    via_delta.merge(rt(via_delta, a.delta_since(b.digest(), 0.0)), 0.0)
    assert via_delta.content() == join(a, b).content()
    assert join(*history).content() == history[-1].content()


@settings(max_examples=60, deadline=None)
@given(st.lists(write_st, max_size=30), st.integers(0, 2**32 - 1), st.sampled_from([None, 60]))
def test_routers_converge_to_the_model(
    writes: list[tuple[str, str, str, int]], seed: int, budget: int | None
) -> None:
    rnd = random.Random(seed)
    names = ["ra", "rb", "rc"]
    nodes = {n: LoadVector(max_age=1e9, node_id=n) for n in names}
    clocks = {n: VersionClock(1) for n in names}
    model_load: dict[tuple[str, str], int] = {}
    model_inflight: dict[tuple[str, str], int] = {}
    inbox: list[tuple[str, LoadDelta]] = []
    for kind, replica, who, n in writes:
        node = nodes[who]
        if kind == "load":
            node.report(
                replica,
                who,
                clocks[who].next(),
                waiting=n,
                running=0,
                kv_usage=0.0,
                tokens_queued=0,
                healthy=True,
                now=0.0,
            )
            model_load[replica, who] = n
        else:
            node.adjust_inflight(who, replica, n, clocks[who].next(), now=0.0)
            model_inflight[replica, who] = max(0, model_inflight.get((replica, who), 0) + n)
        a, b = rnd.sample(names, 2)
        inbox.append((b, nodes[a].delta_since(nodes[b].digest(), 0.0, budget)))
        rnd.shuffle(inbox)
        if rnd.random() < 0.5:
            to, d = inbox.pop()
            if rnd.random() < 0.7:
                nodes[to].merge(d, 0.0)
    for _ in range(100):
        changed = False
        for a in names:
            for b in names:
                if a != b:
                    d = nodes[a].delta_since(nodes[b].digest(), 0.0, budget)
                    changed |= nodes[b].merge(rt(nodes[b], d), 0.0)
        if not changed:
            break
    for node in nodes.values():
        assert node.content() == nodes["ra"].content()
        for (replica, who), waiting in model_load.items():
            got = {r.reporter: r.waiting for r in node.reports(replica, 0.0)}
            assert got[who] == waiting
        for replica in ["e1", "e2", "e3"]:
            expected = sum(v for (r, _), v in model_inflight.items() if r == replica)
            assert node.inflight(replica) == expected
            for who in names:
                mine = model_inflight.get((replica, who), 0)
                assert node.inflight(replica, exclude_router=who) == expected - mine


def test_loads_can_leave_replicas_out_before_their_records_are_built() -> None:
    lv = LoadVector()
    report(lv, "http://a", "router-a", (1, 1), now=0.0, waiting=1)
    report(lv, "http://b", "router-a", (1, 2), now=0.0, waiting=2)
    report(lv, "http://b", "router-b", (5, 1), now=2.0, waiting=3)
    report(lv, "http://c", "router-b", (5, 2), now=1.0, waiting=4)
    everything = lv.loads(3.0)
    assert set(everything) == {"http://a", "http://b", "http://c"}
    assert lv.loads(3.0, skip={"http://b"}) == {k: v for k, v in everything.items()
                                                if k != "http://b"}
    assert lv.loads(3.0, skip=()) == everything
