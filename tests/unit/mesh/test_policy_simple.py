"""Load-only baselines on hand-built views."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from mesh.policies import PolicyError, ReplicaView, Request, View, make_policy

REQ = Request("r1", token_ids=list(range(40)), keys=[1, 2], block_size=16)


def view(*reps: ReplicaView, region: str = "us") -> View:
    return View(region=region, replicas=reps)


def rep(name: str, region: str = "us", **kw: object) -> ReplicaView:
    return ReplicaView(replica=f"http://{name}", region=region, **kw)  # type: ignore[arg-type]


def test_round_robin_cycles_over_healthy_replicas_only() -> None:
    policy = make_policy("round_robin")
    v = view(rep("a"), rep("b", healthy=False), rep("c"), rep("d", region="eu"))
    picks = [policy.decide(REQ, v, 0.0, random.Random(0)).replica for _ in range(6)]
    assert picks == ["http://a", "http://c", "http://d"] * 2


def test_round_robin_local_scope_stays_home() -> None:
    policy = make_policy("round_robin", {"scope": "local"})
    v = view(rep("a"), rep("d", region="eu"))
    assert {policy.decide(REQ, v, 0.0, random.Random(0)).replica for _ in range(4)} == {
        "http://a"
    }


def test_random_never_picks_unhealthy_and_covers_the_rest() -> None:
    policy = make_policy("random")
    v = view(rep("a"), rep("b", healthy=False), rep("c"))
    rng = random.Random(1)
    picks = Counter(policy.decide(REQ, v, 0.0, rng).replica for _ in range(200))
    assert set(picks) == {"http://a", "http://c"}


def test_least_load_counts_inflight_and_own_fresh_dispatches() -> None:
    policy = make_policy("least_load")
    v = view(
        rep("a", waiting=0, running=1),
        rep("b", waiting=0, running=0, fresh=2),  # two own dispatches not in its record yet
        rep("c", waiting=0, running=0, inflight=3),  # other routers have three in flight
    )
    d = policy.decide(REQ, v, 0.0, random.Random(0))
    assert d.replica == "http://a"
    assert "outstanding=1.0" in d.reason


def test_power_of_two_takes_the_lighter_of_its_pair() -> None:
    policy = make_policy("power_of_two")
    v = view(rep("a", waiting=5), rep("b", waiting=0))
    # With two replicas the pair is always both, so the lighter always wins.
    assert {policy.decide(REQ, v, 0.0, random.Random(s)).replica for s in range(10)} == {
        "http://b"
    }


def test_no_healthy_replica_is_a_decision_without_target() -> None:
    d = make_policy("least_load").decide(REQ, view(rep("a", healthy=False)), 0.0, random.Random())
    assert d.replica is None and d.region is None and d.outcome == "none"


def test_unknown_policy_and_bad_parameters_name_the_key() -> None:
    with pytest.raises(PolicyError, match="unknown policy 'fastest'"):
        make_policy("fastest")
    with pytest.raises(PolicyError, match=r"policy\.tau"):
        make_policy("round_robin", {"tau": 3})
    with pytest.raises(PolicyError, match=r"policy\.tau: expected a non-negative integer"):
        make_policy("skylb", {"tau": "ten"})
    with pytest.raises(PolicyError, match="scope"):
        make_policy("least_load", {"scope": "planet"})
