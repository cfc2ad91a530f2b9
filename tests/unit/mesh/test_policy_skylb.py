"""SkyLB selective pushing: local first, push to available regions, otherwise wait."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from mesh.policies import RegionView, ReplicaView, Request, View, make_policy


class Index:
    def __init__(self, held: Mapping[str, int]) -> None:
        self.held = held

    def match(self, keys: Sequence[int]) -> Mapping[str, int]:
        return dict(self.held)


def rep(name: str, region: str, **kw: object) -> ReplicaView:
    return ReplicaView(replica=f"http://{name}", region=region, **kw)  # type: ignore[arg-type]


REQ = Request("r", token_ids=list(range(70)), keys=[1, 2, 3, 4], block_size=16, arrival=0.0)
REGIONS = {
    "us": RegionView("us"),
    "eu": RegionView("eu", rtt=0.08),
    "asia": RegionView("asia", rtt=0.15),
}


def test_available_local_replica_first_even_if_remote_is_cached() -> None:
    v = View(
        "us",
        (rep("u1", "us", waiting=2), rep("u2", "us"), rep("e1", "eu")),
        REGIONS,
        prefix=Index({"http://e1": 4}),
    )
    d = make_policy("skylb").decide(REQ, v, 0.0, random.Random(0))
    assert d.replica == "http://u2" and d.region == "us"


def test_local_prefix_match_above_half_wins_among_available() -> None:
    v = View("us", (rep("u1", "us"), rep("u2", "us", running=5)), REGIONS,
             prefix=Index({"http://u2": 3}))
    d = make_policy("skylb").decide(REQ, v, 0.0, random.Random(0))
    assert d.replica == "http://u2" and "prefix" in d.reason


def test_saturated_region_pushes_to_the_available_region_with_the_prefix() -> None:
    v = View(
        "us",
        (rep("u1", "us", waiting=1), rep("u2", "us", fresh=1),
         rep("e1", "eu"), rep("a1", "asia")),
        REGIONS,
        prefix=Index({"http://a1": 3, "http://e1": 1}),
    )
    d = make_policy("skylb").decide(REQ, v, 0.0, random.Random(0))
    assert d.replica is None and d.region == "asia" and not d.wait
    assert "push to asia" in d.reason
    # Without a prefix anywhere, the nearer region wins.
    v2 = View("us", v.replicas, REGIONS)
    assert make_policy("skylb").decide(REQ, v2, 0.0, random.Random(0)).region == "eu"


def test_remote_queue_over_tau_or_longer_than_ours_blocks_pushing() -> None:
    reps = (rep("u1", "us", waiting=1), rep("e1", "eu"))
    long_queue = {**REGIONS, "eu": RegionView("eu", rtt=0.08, queue=11)}
    d = make_policy("skylb").decide(REQ, View("us", reps, long_queue, queue=20), 0.0,
                                    random.Random(0))
    assert d.wait and d.outcome == "wait" and d.retry_after == 0.01
    some_queue = {**REGIONS, "eu": RegionView("eu", rtt=0.08, queue=3)}
    d = make_policy("skylb").decide(REQ, View("us", reps, some_queue, queue=1), 0.0,
                                    random.Random(0))
    assert d.wait
    d = make_policy("skylb").decide(REQ, View("us", reps, some_queue, queue=5), 0.0,
                                    random.Random(0))
    assert d.region == "eu"


def test_waiting_is_bounded_by_max_wait() -> None:
    v = View("us", (rep("u1", "us", waiting=4), rep("u2", "us", waiting=1)), REGIONS)
    policy = make_policy("skylb", {"max_wait": 5})
    assert policy.decide(REQ, v, 4.9, random.Random(0)).wait
    d = policy.decide(REQ, v, 5.0, random.Random(0))
    assert d.replica == "http://u2" and "waited" in d.reason


def test_forwarded_request_sees_only_its_region_and_waits_there() -> None:
    full = View("eu", (rep("e1", "eu", waiting=1), rep("u1", "us")), REGIONS)
    d = make_policy("skylb").decide(REQ, full.local_only(), 0.0, random.Random(0))
    assert d.wait


def test_own_recent_pushes_fill_a_regions_available_replicas() -> None:
    reps = (rep("u1", "us", waiting=1), rep("e1", "eu"), rep("e2", "eu"))
    pushed_once = {**REGIONS, "eu": RegionView("eu", rtt=0.08, pushed=1)}
    d = make_policy("skylb").decide(REQ, View("us", reps, pushed_once), 0.0, random.Random(0))
    assert d.region == "eu"
    pushed_twice = {**REGIONS, "eu": RegionView("eu", rtt=0.08, pushed=2)}
    d = make_policy("skylb").decide(REQ, View("us", reps, pushed_twice), 0.0, random.Random(0))
    assert d.wait
