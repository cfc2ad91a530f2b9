"""The view builder: records + own dispatches + regions -> what policies see."""

from __future__ import annotations

import math

import pytest

from mesh.policies.base import estimate_load
from mesh.view import Dispatches, RegionRecord, ReplicaRecord, ViewBuilder


def builder(records: list[ReplicaRecord], regions: dict[str, RegionRecord],
            d: Dispatches | None = None, **kw: object) -> ViewBuilder:
    return ViewBuilder(region="us", dispatches=d or Dispatches(), records=lambda now: records,
                       regions=lambda now: regions, **kw)  # type: ignore[arg-type]


def test_own_dispatches_after_the_record_are_fresh_and_nothing_counts_twice() -> None:
    d = Dispatches()
    old = d.start("http://a", "us", 100, now=9.0)  # before the record (measured at 9.5)
    d.start("http://a", "us", 100, now=9.8)  # after it: not in the record yet
    rec = ReplicaRecord("http://a", "us", True, waiting=1, running=1, kv_usage=0.2, age=0.5,
                        others_inflight=2)
    view = builder([rec], {}, d).build(now=10.0)
    (r,) = view.replicas
    assert r.inflight == 4 and r.fresh == 1
    load = estimate_load(r, half_life=math.inf)
    # record (1 waiting + 1 running) + 1 fresh = 3 explained; 4 in flight -> 1 more waiting
    assert (load.waiting, load.running) == (3.0, 1.0)
    d.done(old)
    assert d.inflight("http://a") == 1 and d.counts() == {"http://a": 1}


def test_forwarded_dispatches_are_counted_here_but_not_published() -> None:
    d = Dispatches()
    d.start("http://e", "eu", 10, now=1.0, publish=False)
    d.start("http://a", "us", 10, now=1.0)
    assert d.counts() == {"http://e": 1, "http://a": 1}
    assert d.counts(published_only=True) == {"http://a": 1}


def test_regions_get_measured_static_or_default_rtt_plus_emulated() -> None:
    records = [ReplicaRecord(f"http://{r}", r, True, 0, 0, 0, 0.1) for r in ("us", "eu", "asia",
                                                                            "sa")]
    regions = {
        "eu": RegionRecord("eu", 0.002, ("http://router-eu",), queue=3),
        "asia": RegionRecord("asia", None, ("http://router-asia",)),
    }
    b = builder(records, regions, static_rtt={"asia": 0.15}, emulated_rtt={"eu": 0.08},
                default_rtt=0.1)
    view = b.build(now=0.0)
    assert view.regions["us"].rtt == 0.0
    assert math.isclose(view.regions["eu"].rtt, 0.082) and view.regions["eu"].queue == 3
    assert view.regions["asia"].rtt == 0.15
    # A region with replicas but no known router cannot be reached (no one-hop target).
    assert not view.regions["sa"].reachable
    assert {r.region for r in view.healthy()} == {"us", "eu", "asia"}


def test_a_learned_round_trip_replaces_the_measured_but_never_goes_below_it() -> None:
    records = [ReplicaRecord(f"http://{r}", r, True, 0, 0, 0, 0.1) for r in ("us", "eu", "asia",
                                                                            "sa")]
    regions = {
        "eu": RegionRecord("eu", 0.1, ("http://router-eu",)),
        "asia": RegionRecord("asia", 0.15, ("http://router-asia",)),
        "sa": RegionRecord("sa", None, ("http://router-sa",)),
    }
    # eu: the model overpriced the engine side, the learned figure drifted to 0.01;
    # asia: forwards cost more than the probes' round trip (HTTP, a slow path); sa: only a
    # configured round trip, which is a guess and no floor.
    learned = {"eu": 0.01, "asia": 0.2, "sa": 0.05}
    b = builder(records, regions, learned_rtt=learned, emulated_rtt={"eu": 0.02},
                static_rtt={"sa": 0.3})
    view = b.build(now=0.0)
    assert math.isclose(view.regions["eu"].rtt, 0.12)  # measured + emulated: the floor
    assert view.regions["asia"].rtt == 0.2
    assert view.regions["sa"].rtt == 0.05
    assert view.rtt("us") == 0.0


def test_local_only_and_without_for_forwarded_requests_and_retries() -> None:
    records = [ReplicaRecord("http://a", "us", True, 0, 0, 0, 0.1),
               ReplicaRecord("http://b", "us", True, 0, 0, 0, 0.1),
               ReplicaRecord("http://e", "eu", True, 0, 0, 0, 0.1)]
    view = builder(records, {"eu": RegionRecord("eu", 0.05, ("http://r-eu",))}).build(0.0)
    assert [r.replica for r in view.local_only().healthy()] == ["http://a", "http://b"]
    assert [r.replica for r in view.without(["http://a"], ["eu"]).healthy()] == ["http://b"]


def test_region_pushes_newer_than_its_freshest_record_are_counted() -> None:
    from mesh.view import region_key

    d = Dispatches()
    d.start(region_key("eu"), "eu", 10, now=5.0, publish=False)  # older than eu's record
    d.start(region_key("eu"), "eu", 10, now=9.9, publish=False)  # newer: not in it yet
    records = [ReplicaRecord("http://e1", "eu", True, 0, 0, 0, age=0.5),
               ReplicaRecord("http://e2", "eu", True, 0, 0, 0, age=3.0)]
    view = builder(records, {"eu": RegionRecord("eu", 0.05, ("http://r-eu",))}, d).build(10.0)
    assert view.regions["eu"].pushed == 1


def test_an_own_forward_counts_until_the_owners_published_count_holds_it() -> None:
    d = Dispatches()
    d.start("http://e", "eu", 10, now=1.0, publish=False)  # forwarded to eu's router at 1.0
    regions = {"eu": RegionRecord("eu", 0.1, ("http://eu-router",))}

    def inflight(inflight_age: float) -> int:
        rec = ReplicaRecord("http://e", "eu", True, 0, 0, 0.0, 0.2, others_inflight=1,
                            owner="http://eu-router", inflight_age=inflight_age)
        (r,) = builder([rec], regions, d).build(now=5.0).replicas
        return r.inflight

    # The owner's counts were published at 4.0, after the forward arrived (1.0 + 0.05):
    # its "1" is this request; counting it here too would count it twice.
    assert inflight(1.0) == 1
    # Published at 1.02, before the forward could arrive: not in there yet, count it here.
    assert inflight(3.98) == 2
    # No published counts known from the owner: count it here.
    assert inflight(math.inf) == 2


def test_a_region_without_a_measured_band_gets_the_prior_one() -> None:
    records = [ReplicaRecord(f"http://{r}", r, True, 0, 0, 0, 0.1) for r in ("us", "eu", "asia")]
    regions = {r: RegionRecord(r, 0.1, (f"http://router-{r}",)) for r in ("eu", "asia")}
    view = builder(records, regions, margins={"eu": 0.02}).build(now=0.0)
    assert view.regions["eu"].margin == 0.02 and view.regions["asia"].margin is None
    view = builder(records, regions, margins={"eu": 0.02},
                   prior_margin=lambda: 0.05).build(now=0.0)
    assert view.regions["eu"].margin == 0.02 and view.regions["asia"].margin == 0.05


def test_a_replica_without_a_rate_is_priced_at_the_median_of_those_with_one() -> None:
    def rec(name: str, rate: float | None, knee: float = 0.0,
            models: tuple[str, ...] = ()) -> ReplicaRecord:
        return ReplicaRecord(f"http://{name}", "us", True, 0, 0, 0, 0.1, prefill_rate=rate,
                             models=models, prefill_knee=knee)

    # Learned 2,000 and 3,000 tokens/s (knees 50, 150): the quiet replica, priced at the
    # configured default, would look several times faster than its learned peers.
    records = [rec("a", 2000.0, 50.0), rec("b", 3000.0, 150.0), rec("c", None),
               rec("d", 9000.0, 10.0, models=("other",))]
    view = builder(records, {}).build(now=0.0, model="m")
    by = {r.replica: r for r in view.replicas}
    assert set(by) == {"http://a", "http://b", "http://c"}  # d does not serve m
    assert (by["http://c"].prefill_rate, by["http://c"].prefill_knee) == (2500.0, 100.0)
    assert (by["http://a"].prefill_rate, by["http://a"].prefill_knee) == (2000.0, 50.0)
    # With d in the view (no model asked), the median of three: 3,000 tokens/s, knee 50.
    view = builder(records, {}).build(now=0.0)
    c = next(r for r in view.replicas if r.replica == "http://c")
    assert (c.prefill_rate, c.prefill_knee) == (3000.0, 50.0)
    # Nobody has a rate: nothing is invented (the policy's configured default applies).
    view = builder([rec("x", None), rec("y", None)], {}).build(now=0.0)
    assert all(r.prefill_rate is None for r in view.replicas)


def _brute(d: Dispatches, replica: str, since: float, before: float) -> tuple[int, int]:
    tickets = list(d._open.get(replica, {}).values())
    return (sum(1 for t in tickets if t.at > since),
            sum(1 for t in tickets if not t.publish and t.at <= before))


def test_fresh_and_covered_stop_early_only_while_tickets_come_in_time_order() -> None:
    """``fresh``/``covered`` read a suffix/prefix of a replica's tickets while every start
    came no earlier than the one before; the same counts as reading them all, and once a
    start goes back in time, they read them all."""
    import random

    rng = random.Random(7)
    for ordered in (True, False):
        d = Dispatches()
        now, live = 0.0, []
        for step in range(400):
            if live and rng.random() < 0.45:
                d.done(live.pop(rng.randrange(len(live))))
            else:
                now += rng.choice([0.0, 0.001, 0.01])  # ties included
                at = now if ordered or step < 200 else now - rng.random()
                live.append(d.start(rng.choice("ab"), "us", 1, at,
                                    publish=rng.random() < 0.5))
            for replica in "ab":
                for bound in (now - 0.05, now - 0.005, now, now + 1, -1.0):
                    assert (d.fresh(replica, bound), d.covered(replica, bound)) == \
                        _brute(d, replica, bound, bound)
        assert d._ordered is ordered


def test_a_replica_without_a_learned_overhead_is_priced_at_the_median_of_those_with_one() -> None:
    def rec(name: str, region: str, overhead: float | None) -> ReplicaRecord:
        return ReplicaRecord(f"http://{name}", region, True, 0, 0, 0, 0.1, overhead=overhead)

    # Home learned its engines' overheads (70 and 80 ms); a quiet region's owner has not yet.
    # At 0 the remote replica would look 75 ms faster than it is: most of a light-load TTFT.
    records = [rec("a", "us", 0.07), rec("b", "us", 0.08), rec("c", "eu", None),
               rec("d", "eu", 0.0)]
    by = {r.replica: r.overhead for r in builder(records, {}).build(now=0.0).replicas}
    assert by == {"http://a": 0.07, "http://b": 0.08, "http://c": 0.07, "http://d": 0.0}
    # A learned 0 is a figure, not an unknown: the median of three known is 0.07 above.
    records = [rec("a", "us", 0.07), rec("b", "us", 0.08), rec("c", "eu", None)]
    by = {r.replica: r.overhead for r in builder(records, {}).build(now=0.0).replicas}
    assert by["http://c"] == pytest.approx(0.075)
    # Nobody has learned one: nothing is invented.
    view = builder([rec("x", "us", None), rec("y", "eu", None)], {}).build(now=0.0)
    assert [r.overhead for r in view.replicas] == [0.0, 0.0]
