"""SGLang-style approximate tree: stickiness from its own history, balance thresholds."""

from __future__ import annotations

import random

from mesh.policies import ReplicaView, Request, View, make_policy
from mesh.policies.cache_aware import ApproxTree, CacheAwareApprox


def rep(name: str, **kw: object) -> ReplicaView:
    return ReplicaView(replica=f"http://{name}", region="us", **kw)  # type: ignore[arg-type]


def req(keys: list[int], block: int = 16) -> Request:
    return Request("r", token_ids=list(range(len(keys) * block + 3)), keys=keys, block_size=block)


def test_follow_up_turn_returns_to_the_replica_that_served_the_prefix() -> None:
    policy = make_policy("cache_aware_approx")
    v = View(region="us", replicas=(rep("a"), rep("b"), rep("c")))
    rng = random.Random(3)
    first = policy.decide(req([1, 2, 3]), v, 0.0, rng)
    for turn in range(4, 9):
        d = policy.decide(req(list(range(1, turn + 1))), v, 0.0, rng)
        assert d.replica == first.replica
        assert "prefix" in d.reason and d.matched_blocks == turn - 1


def test_low_overlap_goes_to_the_least_loaded() -> None:
    policy = CacheAwareApprox({"cache_threshold": 0.5})
    policy.tree.insert([1], "http://a")
    v = View(region="us", replicas=(rep("a", waiting=3), rep("b")))
    d = policy.decide(req([1, 7, 8, 9]), v, 0.0, random.Random(0))  # 1 of 4 blocks matched
    assert d.replica == "http://b" and "miss" in d.reason


def test_imbalanced_pool_ignores_the_cache() -> None:
    policy = CacheAwareApprox({"balance_abs_threshold": 4, "balance_rel_threshold": 1.5})
    policy.tree.insert([1, 2, 3, 4], "http://a")
    balanced = View(region="us", replicas=(rep("a", running=3), rep("b", running=1)))
    assert policy.decide(req([1, 2, 3, 4]), balanced, 0.0, random.Random(0)).replica == "http://a"
    skewed = View(region="us", replicas=(rep("a", running=10), rep("b", running=1)))
    d = policy.decide(req([1, 2, 3, 4]), skewed, 0.0, random.Random(0))
    assert d.replica == "http://b" and "imbalanced" in d.reason


def test_tree_is_bounded_and_evicts_least_recent_paths_whole() -> None:
    tree = ApproxTree(max_size=6)
    tree.insert([1, 2, 3], "a")
    tree.insert([10, 11, 12], "b")
    assert tree.match([1, 2, 3]) == {"a": 3}
    tree.insert([20, 21], "c")  # evicts the oldest entries: a's path, root first
    assert len(tree) == 6
    assert tree.match([1, 2, 3]) == {}
    assert tree.match([10, 11, 12, 13]) == {"b": 3}
    assert tree.match([20, 21]) == {"c": 2}
