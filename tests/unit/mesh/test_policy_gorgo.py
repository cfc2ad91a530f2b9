"""GORGO's cost: RTT + running and queued work + prefill of the uncached prompt."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from mesh.policies import RegionView, ReplicaView, Request, View, make_policy


class Index:
    def __init__(self, held: Mapping[str, int]) -> None:
        self.held = held

    def match(self, keys: Sequence[int]) -> Mapping[str, int]:
        return {r: min(n, len(keys)) for r, n in self.held.items()}


REQ = Request("r", token_ids=list(range(1000)), keys=list(range(62)), block_size=16)
REGIONS = {"us": RegionView("us"), "eu": RegionView("eu", rtt=0.1)}


def test_cost_is_the_documented_sum() -> None:
    v = View(
        region="us",
        replicas=(ReplicaView("http://a", "us", waiting=2, running=3),),
        regions=REGIONS,
        mean_prompt_tokens=100,
    )
    d = make_policy("gorgo", {"ms_per_token": 0.5}).decide(REQ, v, 0.0, random.Random(0))
    # 0 rtt + 0.0005*1*3*100 + 0.0005*2*100 + 0.0005*1000
    assert abs(d.candidates[0].cost - (0.15 + 0.1 + 0.5)) < 1e-9


def test_remote_cache_beats_local_cold_replica_only_when_worth_the_rtt() -> None:
    reps = (ReplicaView("http://a", "us"), ReplicaView("http://b", "eu"))
    hot_remote = View("us", reps, REGIONS, prefix=Index({"http://b": 62}))
    # Local cold prefill 1000 tok at 0.5 ms = 0.5 s; remote 0.1 s + 9 tok -> remote wins.
    policy = make_policy("gorgo", {"ms_per_token": 0.5})
    assert policy.decide(REQ, hot_remote, 0.0, random.Random(0)).replica == "http://b"
    short = Request("r", token_ids=list(range(100)), keys=list(range(6)), block_size=16)
    # 100 tokens cold at home = 0.05 s < 0.1 s of RTT: stay home.
    assert policy.decide(short, hot_remote, 0.0, random.Random(0)).replica == "http://a"
