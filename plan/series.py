"""Demand history: tokens/s per (region, model) on a regular time grid.

Readers hand in samples at any times; ``DemandHistory.from_samples`` bins them onto a grid of
``step_s`` seconds aligned to the day (a missing bin is 0 demand: no request arrived). The
planner works on whole days: ``days()`` drops a partial first or last day.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from plan.spec import PlanInputError

SeriesKey = tuple[str, str]
"""(region, model)."""


@dataclass(frozen=True, slots=True)
class Sample:
    """``tokens`` (prompt + output) observed in ``[t, t + duration)``, ``t`` in seconds."""

    t: float
    region: str
    model: str
    tokens: float
    duration: float


@dataclass(frozen=True, slots=True)
class DemandHistory:
    start: float
    """Time of the first bin, a multiple of ``day_s`` (seconds; any epoch)."""
    step_s: float
    day_s: float
    series: Mapping[SeriesKey, np.ndarray]
    """tokens/s per bin; every array has the same length."""

    @property
    def steps_per_day(self) -> int:
        return round(self.day_s / self.step_s)

    @property
    def length(self) -> int:
        return len(next(iter(self.series.values()))) if self.series else 0

    @property
    def full_days(self) -> int:
        return self.length // self.steps_per_day

    @classmethod
    def from_samples(
        cls, samples: Iterable[Sample], *, step_s: float = 60.0, day_s: float = 86400.0
    ) -> DemandHistory:
        if step_s <= 0 or day_s <= 0:
            raise PlanInputError("step and day length must be positive")
        per_day = day_s / step_s
        if abs(per_day - round(per_day)) > 1e-6:
            raise PlanInputError(f"the day ({day_s:g} s) must be a whole number of steps")
        acc: dict[SeriesKey, dict[int, float]] = {}
        t0 = math.inf
        t1 = -math.inf
        n = 0
        for s in samples:
            if not (math.isfinite(s.t) and math.isfinite(s.tokens)) or s.tokens < 0:
                raise PlanInputError(
                    f"bad demand sample at t={s.t} for {s.region}/{s.model}: {s.tokens}"
                )
            n += 1
            b = math.floor(s.t / step_s)
            acc.setdefault((s.region, s.model), {})
            acc[(s.region, s.model)][b] = acc[(s.region, s.model)].get(b, 0.0) + s.tokens
            t0 = min(t0, s.t)
            t1 = max(t1, s.t + max(s.duration, 0.0))
        if n == 0:
            raise PlanInputError("the demand history is empty")
        first = math.floor(t0 / day_s) * round(per_day)
        last = max(math.ceil(t1 / step_s), first + 1)
        length = last - first
        series: dict[SeriesKey, np.ndarray] = {}
        for key, bins in acc.items():
            arr = np.zeros(length)
            for b, tok in bins.items():
                if first <= b < last:
                    arr[b - first] += tok / step_s
            series[key] = arr
        return cls(first * step_s, step_s, day_s, series)

    def whole_days(self) -> DemandHistory:
        """Only complete days (from ``start``, which is day-aligned)."""
        n = self.full_days * self.steps_per_day
        if n == 0:
            raise PlanInputError(
                f"the history holds less than one whole day ({self.length} steps of "
                f"{self.step_s:g} s, a day is {self.day_s:g} s)"
            )
        return DemandHistory(
            self.start, self.step_s, self.day_s, {k: v[:n] for k, v in self.series.items()}
        )

    def resample(self, step_s: float) -> DemandHistory:
        """Mean tokens/s over coarser bins (``step_s`` a multiple of the current step)."""
        f = step_s / self.step_s
        if f < 1 or abs(f - round(f)) > 1e-6:
            raise PlanInputError(
                f"resample step {step_s:g} s must be a multiple of the history's {self.step_s:g} s"
            )
        k = round(f)
        out = {}
        for key, v in self.series.items():
            n = len(v) // k * k
            out[key] = v[:n].reshape(-1, k).mean(axis=1)
        return DemandHistory(self.start, step_s, self.day_s, out)


def slot_peaks(day: np.ndarray, slots: int) -> list[float]:
    """The largest value in each of ``slots`` equal parts of one day's series."""
    if len(day) % slots:
        raise PlanInputError(f"a day of {len(day)} steps does not split into {slots} slots")
    return [float(x) for x in day.reshape(slots, -1).max(axis=1)]
