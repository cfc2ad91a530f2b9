"""Tree-of-Thoughts trees and diurnal per-region arrivals."""

from __future__ import annotations

from collections import Counter

import pytest

from sim.workloads import MIXED_TREE_US, TOT, DiurnalShape, diurnal_workload, tree_workload
from sim.workloads.base import SimRequest
from sim.workloads.chat import ARENA
from sim.workloads.diurnal import aggregate_peak_to_trough, utc_offsets


def _one_tree(branches_profile: object = None) -> list[SimRequest]:
    w = tree_workload({"us": 1}, seed=3, horizon_s=100)
    client = w.clients[0]
    pending = client.start(0.0)
    out: list[SimRequest] = []
    while pending:
        req = pending.pop(0)
        out.append(req)
        follow = client.on_complete(req, req.sent_at + 1.0)
        if any(f.session != req.session for f in follow):
            break  # the next tree started
        pending += follow
    return out


def test_a_tree_has_15_requests_over_4_levels() -> None:
    tree = _one_tree()
    assert TOT.requests_per_tree == 15 and MIXED_TREE_US.requests_per_tree == 85
    assert len(tree) == 15
    assert Counter(r.turn for r in tree) == {0: 1, 1: 2, 2: 4, 3: 8}
    assert len({r.session for r in tree}) == 1


def test_children_extend_the_parent_and_siblings_share_the_prompt() -> None:
    tree = _one_tree()
    by_level: dict[int, list[SimRequest]] = {}
    for r in tree:
        by_level.setdefault(r.turn, []).append(r)
    root = by_level[0][0]
    for child in by_level[1]:
        head = root.prompt + root.output
        assert child.prompt[: len(head)] == head
    a, b = by_level[1]
    assert a.prompt == b.prompt and a.output != b.output
    assert max(r.output_len for r in tree) <= 256


def test_next_tree_starts_after_the_last_leaf() -> None:
    w = tree_workload({"us": 1}, seed=3, horizon_s=100)
    client = w.clients[0]
    pending = client.start(0.0)
    sessions: list[str] = []
    while pending and len(sessions) < 40:
        req = pending.pop(0)
        sessions.append(req.session)
        pending += client.on_complete(req, req.sent_at + 1.0)
    assert sessions[:15] == [sessions[0]] * 15
    assert sessions[15] != sessions[0]


def test_mixed_tree_uses_four_branches_in_one_region() -> None:
    w = tree_workload({"us": 2, "eu": 20}, seed=1, horizon_s=10, profiles={"us": MIXED_TREE_US})
    assert sum(1 for c in w.clients if c.region == "us") == 2
    us = next(c for c in w.clients if c.region == "us")
    root = us.start(0.0)[0]
    assert len(us.on_complete(root, 1.0)) == 4


def test_each_region_peaks_in_its_own_daytime() -> None:
    shape = DiurnalShape(day_s=240.0, peak_to_trough=10.0)
    w = diurnal_workload(
        ARENA, {"us": 4.0, "eu": 4.0, "asia": 4.0}, seed=2, horizon_s=480, shape=shape
    )
    arrivals: dict[str, list[float]] = {}
    for src in w.clients:
        pending = src.start(0.0)
        while pending:
            req = pending.pop(0)
            if req.sent_at > 480:
                break
            arrivals.setdefault(src.region, []).append(req.sent_at)
            pending += src.on_sent(req, req.sent_at)
    offsets = utc_offsets(["us", "eu", "asia"])
    for region, times in arrivals.items():
        bins = Counter(int((t % 240.0) / 240.0 * 24) for t in times)  # UTC hour of the day
        busiest = max(range(24), key=lambda h: bins.get(h, 0) + bins.get((h + 1) % 24, 0))
        local = (busiest + 1 + offsets[region]) % 24
        assert abs(local - 14.0) <= 3.5, (region, busiest, local)
        assert max(bins.values()) > 4 * max(1, min(bins.get(h, 0) for h in range(24)))


def test_aggregate_load_is_flatter_than_any_region() -> None:
    per_region, total = aggregate_peak_to_trough(
        DiurnalShape(peak_to_trough=8.0), {"us": 1.0, "eu": 1.0, "asia": 1.0}
    )
    assert all(v == pytest.approx(8.0, rel=0.01) for v in per_region.values())
    assert total < 2.0
