"""Forecasts on a seeded synthetic daily series, the held-back-day error, and the grid."""

from __future__ import annotations

import math

import numpy as np
import pytest

from plan.forecast import backtest, forecast_next_day, mape
from plan.series import DemandHistory, Sample, slot_peaks
from plan.spec import PlanInputError

PERIOD = 96


def daily(days: int, noise: float, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(days * PERIOD)
    shape = 1000.0 + 800.0 * np.cos(2 * math.pi * (t % PERIOD - 56) / PERIOD)
    return shape * rng.lognormal(0.0, noise, len(t))


def test_holt_winters_beats_yesterday_on_a_noisy_daily_cycle() -> None:
    series = daily(6, noise=0.25)
    errors = backtest(series, PERIOD, held_back=2, methods=("holt-winters", "last-day"))
    hw, last = np.mean(errors["holt-winters"]), np.mean(errors["last-day"])
    assert hw < last
    assert len(errors["holt-winters"]) == 2


def test_forecast_shape_and_clipping() -> None:
    series = daily(3, noise=0.05)
    f = forecast_next_day(series, PERIOD)
    assert f.shape == (PERIOD,)
    assert np.all(f >= 0)
    # The daily peak is forecast within 15% of the true shape's peak (1800).
    assert abs(f.max() - 1800.0) / 1800.0 < 0.15
    assert np.array_equal(forecast_next_day(series, PERIOD, "last-day"), series[-PERIOD:])


def test_too_little_history_is_refused() -> None:
    with pytest.raises(PlanInputError, match="at least 2 whole days"):
        forecast_next_day(daily(1, 0.1), PERIOD, "holt-winters")
    with pytest.raises(PlanInputError, match="unknown forecast method"):
        forecast_next_day(daily(3, 0.1), PERIOD, "magic")


def test_mape_skips_zero_actuals() -> None:
    assert mape(np.array([0.0, 100.0]), np.array([5.0, 110.0])) == pytest.approx(10.0)
    assert math.isnan(mape(np.zeros(3), np.ones(3)))


def test_history_bins_samples_onto_a_day_aligned_grid() -> None:
    samples = [
        Sample(10.0, "us", "m", 120.0, 0.0),
        Sample(30.0, "us", "m", 60.0, 0.0),
        Sample(70.0, "us", "m", 600.0, 60.0),
        Sample(100.0, "eu", "m", 60.0, 0.0),
    ]
    h = DemandHistory.from_samples(samples, step_s=60.0, day_s=240.0)
    assert h.start == 0.0
    assert list(h.series[("us", "m")]) == [3.0, 10.0, 0.0]
    assert list(h.series[("eu", "m")]) == [0.0, 1.0, 0.0]
    with pytest.raises(PlanInputError, match="less than one whole day"):
        h.whole_days()
    assert slot_peaks(np.array([1.0, 5.0, 2.0, 0.0]), 2) == [5.0, 2.0]
    with pytest.raises(PlanInputError, match="whole number of steps"):
        DemandHistory.from_samples(samples, step_s=70.0, day_s=240.0)
