"""Pooling several runs into one p90 ratio, and the spread of one twin picked per seed."""

from __future__ import annotations

import math

import pytest

from sim import sweep_pool
from sim.metrics import percentile
from sim.sweep_pool import pick_one_per_seed, pooled_ratio, relative


def test_the_pooled_ratio_is_over_every_request_not_a_mean_of_ratios() -> None:
    mesh = [[0.1] * 9 + [1.0], [0.2] * 10]
    alone = [[1.0] * 10, [2.0] * 10]
    r = pooled_ratio(mesh, alone)
    assert r.requests == (20, 20)
    assert r.mesh_p90 == percentile([x for run in mesh for x in run], 90)
    assert r.alone_p90 == percentile([x for run in alone for x in run], 90)
    assert r.ratio == pytest.approx(r.mesh_p90 / r.alone_p90)
    per_run = [percentile(m, 90) / percentile(a, 90) for m, a in zip(mesh, alone, strict=True)]
    assert r.ratio != pytest.approx(sum(per_run) / 2)
    assert math.isnan(pooled_ratio([[]], [[1.0]]).ratio)
    assert math.isnan(pooled_ratio([[1.0]], [[0.0]]).ratio)


def test_every_way_to_pick_one_twin_per_seed_is_pooled() -> None:
    # Seed 1's twins: mesh p90 0.1 or 0.3; seed 2's: always 0.2; alone always 1.0.
    twins = {1: [([0.1] * 10, [1.0] * 10), ([0.3] * 10, [1.0] * 10)],
             2: [([0.2] * 10, [1.0] * 10), ([0.2] * 10, [1.0] * 10),
                 ([0.2] * 10, [1.0] * 10)]}
    s = pick_one_per_seed(twins, reference=0.2)
    assert s is not None and s.picks == 6
    # Pooled: half the requests at 0.2 and half at 0.1 (or 0.3): p90 0.2 or 0.3.
    assert s.mean == pytest.approx((0.2 + 0.3) / 2)
    assert s.within == pytest.approx(0.5)  # the 0.2 picks, not the 0.3 ones
    assert s.rel_sd == pytest.approx(s.sd / s.mean)
    assert pick_one_per_seed({1: [([0.1], [1.0])]}, 0.1) is None  # one way: no spread
    assert pick_one_per_seed({}, 0.1) is None
    assert pick_one_per_seed({1: [([0.1], [1.0])], 2: []}, 0.1) is None


def test_past_the_limit_the_picks_are_a_seeded_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sweep_pool, "MAX_PICKS", 5)
    twins = {s: [([0.1 * (k + 1)] * 4, [1.0] * 4) for k in range(3)] for s in range(3)}
    a, b = pick_one_per_seed(twins, 0.2), pick_one_per_seed(twins, 0.2)
    assert a is not None and a.picks == 5 and a == b


def test_relative_difference() -> None:
    assert relative(1.1, 1.0) == pytest.approx(0.1)
    assert relative(None, 1.0) is None and relative(1.0, 0.0) is None
    assert relative(math.nan, 1.0) is None
