"""KV usage less the sequences that ended since the load record (``mesh.policies.kv_release``)."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import pytest

from mesh.policies import RegionView, ReplicaView, Request, View, make_policy
from mesh.policies.kv_release import kv_in_use
from mesh.policies.ttft import TtftParams, _costs, expected_ttft

REGIONS = {"eu": RegionView("eu")}
P_L4 = {"prefill_rate": 1700.0, "decode_step": 0.07, "batch_weight": 0.004}


class Index:
    def __init__(self, held: Mapping[str, int]) -> None:
        self.held = held

    def match(self, keys: Sequence[int]) -> Mapping[str, int]:
        return {r: min(n, len(keys)) for r, n in self.held.items()}


def rep(name: str, **kw: object) -> ReplicaView:
    return ReplicaView(replica=f"http://{name}", region="eu", **kw)  # type: ignore[arg-type]


def test_a_sequence_ended_since_the_record_takes_its_share_of_the_blocks_out() -> None:
    # The record shows 17 running at 94% KV; 16 are still in flight: one has ended.
    r = rep("a", running=17, kv_usage=0.94, inflight=16, load_age=0.1)
    assert kv_in_use(r) == pytest.approx(0.94 * 16 / 17)
    # Two queued, 10 running, 9 in flight of which 1 sent after the record: 4 have ended.
    r = rep("a", waiting=2, running=10, kv_usage=0.9, inflight=9, fresh=1)
    assert kv_in_use(r) == pytest.approx(0.9 * 6 / 10)
    # More gone than were running: nothing of the record's is left.
    assert kv_in_use(rep("a", running=3, kv_usage=0.5, inflight=1, fresh=1)) == 0.0


@pytest.mark.parametrize("kw", [
    {"running": 17, "kv_usage": 0.94, "inflight": 17},   # nothing ended
    {"running": 17, "kv_usage": 0.94, "inflight": 20, "fresh": 3},  # new ones sent since
    {"running": 17, "kv_usage": 0.94, "inflight": 0},    # nothing counted: outside traffic
    {"running": 0, "kv_usage": 0.3, "inflight": 2},      # no running sequence to share it
])
def test_the_reported_usage_stands_when_nothing_is_known_to_have_ended(
        kw: dict[str, float]) -> None:
    r = rep("a", **kw)
    assert kv_in_use(r) == r.kv_usage


def _near_full_views() -> tuple[Request, View]:
    # ``hold`` has the prompt cached but reported 96.7% KV a quarter second ago (10 running);
    # one of those has finished since (9 in flight). ``cold`` has room and no prefix.
    req = Request("q", token_ids=list(range(4063)), keys=list(range(253)), block_size=16)
    hold = rep("hold", running=10, kv_usage=0.967, inflight=9, load_age=0.23)
    cold = rep("cold", running=10, kv_usage=0.5, inflight=10, load_age=0.17)
    view = View("eu", (cold, hold), REGIONS, prefix=Index({"http://hold": 245}),
                mean_prompt_tokens=300, mean_output_tokens=360)
    return req, view


def test_the_prefix_holder_is_not_priced_out_by_a_barrier_a_completion_has_lowered() -> None:
    req, view = _near_full_views()
    d = make_policy("kvmesh", P_L4).decide(req, view, 0.0, random.Random(0))
    assert d.replica == "http://hold"
    p = TtftParams(**P_L4)  # type: ignore[arg-type]
    hold = dict(expected_ttft(req, view.replicas[1], view, 245, p).parts)
    assert hold["decode"] < 1.0  # the barrier at 0.967 alone would be 1.46 s


def test_off_or_calibrated_the_reported_usage_prices_the_barrier() -> None:
    req, view = _near_full_views()
    off = make_policy("kvmesh", {**P_L4, "kv_release": False})
    assert off.decide(req, view, 0.0, random.Random(0)).replica == "http://cold"
    for params in (TtftParams(**P_L4, kv_release=False),  # type: ignore[arg-type]
                   TtftParams(**P_L4, calibrated=True)):  # type: ignore[arg-type]
        hold = expected_ttft(req, view.replicas[1], view, 245, params)
        assert dict(hold.parts)["decode"] == pytest.approx(0.05 * 0.967 / 0.033, rel=0.05)
    p = TtftParams(**P_L4)  # type: ignore[arg-type]
    matches = view.prefix.match(req.keys)
    assert _costs(req, view.replicas, view, matches, p) == [
        expected_ttft(req, r, view, matches.get(r.replica, 0), p).cost for r in view.replicas]
