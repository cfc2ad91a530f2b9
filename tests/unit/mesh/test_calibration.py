"""Calibration: robust, rate-limited estimates of the cost model's inputs from outcomes."""

from __future__ import annotations

import random

import pytest

from mesh.calibration import (
    EVERY,
    MAX_STEP,
    MIN_SAMPLES,
    BoundedMedian,
    Calibrated,
    Calibrator,
    theil_sen_slope,
)
from mesh.ttft_error import Prediction


def local(uncached: int, *, rate: float = 8000.0, waiting: float = 0.0, kv: float = 0.0,
          replica: str = "e0") -> Prediction:
    """What the policy would have predicted at ``rate`` with no calibration."""
    prefill = uncached / rate
    parts = (("rtt", 0.0), ("queue", 0.0 if waiting < 0.5 else waiting * 0.03),
             ("prefill", prefill), ("decode", kv), ("calib", 0.0), ("waiting", waiting),
             ("kv", kv))
    return Prediction(replica, "us", "us", prefill + kv, parts)


def test_a_bounded_median_keeps_its_prior_until_enough_samples() -> None:
    est = BoundedMedian(prior=100.0, lo=0.0)
    for _ in range(MIN_SAMPLES - 1):
        assert not est.add(10.0)
    assert est.value is None and est.current == 100.0


def test_a_bounded_median_moves_at_most_a_bounded_step() -> None:
    est = BoundedMedian(prior=100.0, lo=0.0)
    for _ in range(MIN_SAMPLES):
        est.add(10.0)
    assert est.value == pytest.approx(100.0 * (1 - MAX_STEP))
    for _ in range(10 * EVERY):
        est.add(10.0)
    assert est.value == pytest.approx(10.0)


def test_one_outlier_in_a_window_moves_nothing() -> None:
    est = BoundedMedian(prior=None)
    for x in [1.0] * 20:
        est.add(x)
    assert est.value == 1.0
    for x in [1000.0, 1.0, 1.0, 1.0]:
        est.add(x)
    assert est.value == 1.0


def test_theil_sen_recovers_a_slope_through_outliers() -> None:
    rng = random.Random(1)
    points = [(float(x), 0.01 + x / 5000 + rng.uniform(-1e-3, 1e-3)) for x in range(50, 1000, 40)]
    points[3] = (points[3][0], 5.0)  # a request stuck behind something the model never saw
    points[7] = (points[7][0], 0.0)
    slope = theil_sen_slope(points, 64)
    assert slope is not None and 1 / slope == pytest.approx(5000, rel=0.05)
    assert theil_sen_slope([(10.0, 1.0), (20.0, 2.0)], 64) is None


def test_the_prefill_rate_and_overhead_are_learned_from_idle_requests() -> None:
    cal = Calibrator(default_rate=8000.0)
    rng = random.Random(2)
    for _ in range(200):
        u = rng.randint(32, 1500)
        cal.observe_local(local(u), u, 0.012 + u / 3000)  # the engine: 3000 tokens/s + 12 ms
    got = cal.published("e0")
    assert got.prefill_rate == pytest.approx(3000, rel=0.05)
    assert got.overhead == pytest.approx(0.012, abs=0.003)
    assert cal.version > 0


def test_the_queue_delay_per_waiting_request_is_learned_from_waits() -> None:
    cal = Calibrator(default_rate=5000.0)
    rng = random.Random(3)
    for i in range(300):
        u = rng.randint(32, 800)
        if i % 2:
            cal.observe_local(local(u, rate=5000), u, u / 5000)
        else:
            w = rng.choice([1.0, 2.0, 4.0])
            cal.observe_local(local(u, rate=5000, waiting=w), u, u / 5000 + w * 0.08)
    got = cal.published("e0")
    assert got.queue_delay == pytest.approx(0.08, rel=0.15)


def test_a_barrier_the_engine_does_not_show_is_scaled_away() -> None:
    cal = Calibrator(default_rate=5000.0)
    rng = random.Random(4)
    for _ in range(200):
        u = rng.randint(32, 800)
        kv = rng.uniform(0.0, 0.5)  # the model's KV-barrier seconds; the engine shows none
        cal.observe_local(local(u, rate=5000, kv=kv), u, 0.005 + u / 5000)
    got = cal.published("e0")
    assert got.kv_scale is not None and got.kv_scale < 0.1


def test_configured_rates_are_the_prior() -> None:
    cal = Calibrator(default_rate=8000.0)
    cal.observe_local(local(100), 100, 0.05, configured_rate=1234.0)
    assert cal.replicas["e0"].prefill_rate.current == 1234.0
    assert cal.published("e0").prefill_rate is None  # not learned yet


def test_the_forward_round_trip_is_learned_from_forwards() -> None:
    cal = Calibrator()
    for _ in range(40):
        p = Prediction("r", "us", "eu", 0.1 + 0.02, (("rtt", 0.1), ("prefill", 0.02)))
        cal.observe_forward(p, 0.17)  # the round trip is 150 ms, not 100
    assert cal.learned_rtt()["eu"] == pytest.approx(0.15, abs=0.005)


def test_bad_observations_are_ignored() -> None:
    cal = Calibrator()
    cal.observe_local(local(100), 100, float("nan"))
    cal.observe_local(local(100), 100, -1.0)
    cal.observe_forward(Prediction("r", "us", "eu", 0.1, ()), float("inf"))
    assert cal.replicas == {} and cal.rtt == {}


@pytest.mark.parametrize("value", [None, [], {"prefill_rate": "fast"}, {"prefill_rate": -5},
                                   {"overhead": 1e9}, {"kv_scale": True}])
def test_malformed_replicated_figures_are_not_learned(value: object) -> None:
    got = Calibrated.from_dict(value)
    assert got == Calibrated() or all(
        v is None for v in (got.prefill_rate, got.overhead, got.kv_scale))


def test_replicated_figures_round_trip() -> None:
    c = Calibrated(4321.0, 0.02, 0.01, 0.5)
    assert Calibrated.from_dict(c.as_dict()) == c
