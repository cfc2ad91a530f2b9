"""llm-d style precise prefix scoring over the KV-event index."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from mesh.policies import ReplicaView, Request, View, make_policy


class Index:
    def __init__(self, held: Mapping[str, Sequence[int]]) -> None:
        self.held = held

    def match(self, keys: Sequence[int]) -> Mapping[str, int]:
        out = {}
        for replica, blocks in self.held.items():
            n = 0
            while n < len(keys) and keys[n] in blocks:
                n += 1
            if n:
                out[replica] = n
        return out


def rep(name: str, region: str = "us", **kw: object) -> ReplicaView:
    return ReplicaView(replica=f"http://{name}", region=region, **kw)  # type: ignore[arg-type]


REQ = Request("r", token_ids=list(range(64)), keys=[1, 2, 3, 4], block_size=16)


def test_longest_consecutive_prefix_wins_when_loads_are_equal() -> None:
    idx = Index({"http://a": [1, 2], "http://b": [1, 2, 3, 4], "http://c": [2, 3, 4]})
    v = View(region="us", replicas=(rep("a"), rep("b"), rep("c")), prefix=idx)
    d = make_policy("precise_prefix").decide(REQ, v, 0.0, random.Random(0))
    assert d.replica == "http://b"
    assert d.matched_blocks == 4 and d.total_blocks == 4
    assert "prefix=4/4" in d.reason


def test_queue_and_kv_pressure_outweigh_a_small_prefix() -> None:
    idx = Index({"http://a": [1]})
    v = View(
        region="us",
        replicas=(rep("a", waiting=8, kv_usage=0.9), rep("b", waiting=0, kv_usage=0.1)),
        prefix=idx,
    )
    d = make_policy("precise_prefix").decide(REQ, v, 0.0, random.Random(0))
    assert d.replica == "http://b"
    scores = {c.replica: -c.cost for c in d.candidates}
    # a: 2*0.25 + 0.1 + 0 = 0.6; b: 0 + 0.9 + 1 = 1.9
    assert abs(scores["http://a"] - 0.6) < 1e-9 and abs(scores["http://b"] - 1.9) < 1e-9
