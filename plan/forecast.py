"""Next-day demand forecasts per (region, model), and their error on held-back days.

``holt-winters`` is statsmodels' exponential smoothing with an additive daily season, no
trend, and initial states from the heuristic decomposition of the first days (fitting them
as free parameters costs ten times the time for no better error on daily cycles). It
averages the daily shape over every day seen, so one noisy day moves it less than it moves
the ``last-day`` baseline (tomorrow = today). ``seasonal-arima`` is statsmodels' STL
decomposition with an ARIMA(1,0,0) on the remainder. Forecasts are clipped at 0.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np

from plan.spec import PlanInputError

METHODS = ("holt-winters", "seasonal-arima", "last-day")


def _holt_winters(history: np.ndarray, period: int) -> np.ndarray:
    from statsmodels.tsa.holtwinters import ExponentialSmoothing

    model = ExponentialSmoothing(
        history, trend=None, seasonal="add", seasonal_periods=period,
        initialization_method="heuristic",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = model.fit(optimized=True)
    return np.asarray(fit.forecast(period), dtype=float)


def _seasonal_arima(history: np.ndarray, period: int) -> np.ndarray:
    from statsmodels.tsa.arima.model import ARIMA
    from statsmodels.tsa.forecasting.stl import STLForecast

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = STLForecast(
            history, ARIMA, model_kwargs={"order": (1, 0, 0)}, period=period, robust=True
        ).fit()
        return np.asarray(fit.forecast(period), dtype=float)


def _last_day(history: np.ndarray, period: int) -> np.ndarray:
    return np.array(history[-period:], dtype=float)


_FORECASTERS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "holt-winters": _holt_winters,
    "seasonal-arima": _seasonal_arima,
    "last-day": _last_day,
}


def min_days(method: str) -> int:
    return 1 if method == "last-day" else 2


def forecast_next_day(history: np.ndarray, period: int, method: str = "holt-winters") -> np.ndarray:
    """The next ``period`` steps after ``history`` (whole days of ``period`` steps)."""
    if method not in _FORECASTERS:
        raise PlanInputError(f"unknown forecast method {method!r} (known: {', '.join(METHODS)})")
    days = len(history) / period
    if days < min_days(method):
        raise PlanInputError(
            f"{method} needs at least {min_days(method)} whole days of history, got {days:.2f}"
        )
    if not np.any(history > 0):
        return np.zeros(period)
    out = _FORECASTERS[method](np.asarray(history, dtype=float), period)
    if not np.all(np.isfinite(out)):
        raise PlanInputError(f"{method} produced a non-finite forecast")
    clipped: np.ndarray = np.clip(out, 0.0, None)
    return clipped


def mape(actual: np.ndarray, predicted: np.ndarray) -> float:
    """Mean absolute percentage error over the steps with non-zero actual demand."""
    mask = actual > 0
    if not np.any(mask):
        return math.nan
    return float(np.mean(np.abs(predicted[mask] - actual[mask]) / actual[mask]) * 100.0)


def backtest(
    history: np.ndarray, period: int, held_back: int, methods: tuple[str, ...] = METHODS
) -> dict[str, list[float]]:
    """MAPE of each method on each of the last ``held_back`` days, each forecast from the
    days before it only."""
    days = len(history) // period
    out: dict[str, list[float]] = {m: [] for m in methods}
    for d in range(days - held_back, days):
        train = history[: d * period]
        actual = history[d * period : (d + 1) * period]
        for m in methods:
            if d < min_days(m):
                out[m].append(math.nan)
                continue
            out[m].append(mape(actual, forecast_next_day(train, period, m)))
    return out
