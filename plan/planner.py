"""Demand history -> forecast -> the two integer programs -> a plan (a JSON-able dict).

Stage one sizes the long-term reservation: reservations only, every slot's demand served,
once with cross-region serving inside the RTT bound (the global peak, SkyWalker's argument)
and once region-local (each region's own peak): the saving between them is the planning
result. A third, cost-optimal solve lets on-demand and spot capacity take the peaks, which
sets the reservation the hourly plan builds on (its on-demand part is fluid: only the
reservation has to be whole here). Stage two fixes that reservation and, slot by slot as
SageServe does every hour, adds whole on-demand/spot instances for the forecast day, paying
the start-up for every instance beyond those the previous slot left running. The
design demand of stage one is, per slot, the largest of the forecast and of the last
``design_days`` days seen; stage two uses the forecast alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from plan.forecast import METHODS, backtest, forecast_next_day, min_days
from plan.milp import Allocation, solve, solve_hourly
from plan.series import DemandHistory, SeriesKey, slot_peaks
from plan.spec import PlanInputError, PlanSpec, spec_to_dict

PLAN_VERSION = 1
MIN_TRAINING_DAYS = 3
"""A held-back day is forecast from at least this many days before it: with two, a seasonal
model cannot tell a day's noise from its shape (on the diurnal history Holt-Winters then
loses to yesterday: docs/planning.md)."""


@dataclass(frozen=True, slots=True)
class PlanOptions:
    slots: int = 24
    forecast_steps_per_day: int = 96
    method: str = "holt-winters"
    held_back_days: int = 1
    design_days: int = 7
    margin: float = 0.0
    """Extra share of demand planned for (on top of the forecast)."""
    time_limit_s: float = 60.0
    mip_rel_gap: float = 1e-2


def allocation_dict(a: Allocation) -> dict[str, object]:
    def nest(table: Mapping[tuple[str, str, str], object]) -> dict[str, object]:
        out: dict[str, dict[str, dict[str, object]]] = {}
        for (r, m, g), v in sorted(table.items()):
            out.setdefault(r, {}).setdefault(m, {})[g] = v
        return {r: v for r, v in out.items()}

    return {
        "reserved": nest({k: v for k, v in a.reserved.items() if v}),
        "on_demand": nest({k: v for k, v in a.on_demand.items() if any(v)}),
        "spot": nest({k: v for k, v in a.spot.items() if any(v)}),
        "replicas": {f"{r}/{m}": v for (r, m), v in a.targets().items()},
        "flows": {f"{x}->{y}/{m}": [round(f, 3) for f in v] for (x, y, m), v in a.flows.items()},
        "cost": {k: round(v, 4) for k, v in a.cost.items()},
        "total_cost": round(a.total_cost, 4),
        "instance_hours": {k: round(v, 4) for k, v in a.instance_hours.items()},
        "total_instance_hours": round(a.total_instance_hours, 4),
        "solve_s": round(a.solve_s, 4),
        "status": a.status,
        "mip_gap": a.mip_gap,
        "size": {"columns": a.columns, "integer": a.integer_columns, "rows": a.rows},
    }


def _pct_less(a: float, b: float) -> float:
    return (1.0 - a / b) * 100.0 if b > 0 else math.nan


def make_plan(
    spec: PlanSpec, history: DemandHistory, opts: PlanOptions = PlanOptions()
) -> dict[str, object]:
    spec.validate()
    if opts.method not in METHODS:
        raise PlanInputError(f"unknown forecast method {opts.method!r}")
    if opts.forecast_steps_per_day % opts.slots:
        raise PlanInputError("forecast steps per day must be a multiple of the slots per day")
    hist = history.whole_days()
    step = hist.day_s / opts.forecast_steps_per_day
    if step < hist.step_s:
        step = hist.step_s
    hist = hist.resample(step)
    period = hist.steps_per_day
    if period % opts.slots:
        raise PlanInputError(
            f"{period} forecast steps per day do not split into {opts.slots} slots"
        )
    days = hist.full_days
    models = spec.models()
    for region, model in hist.series:
        if region not in spec.regions:
            raise PlanInputError(f"demand history names region {region!r}, not in the spec")
        if model not in models:
            raise PlanInputError(f"demand history names model {model!r}: no GPU type serves it")
    if days < min_days(opts.method):
        raise PlanInputError(
            f"{opts.method} needs {min_days(opts.method)} whole days of history, got {days}"
        )
    held = min(opts.held_back_days, max(0, days - MIN_TRAINING_DAYS))
    forecasts: dict[SeriesKey, np.ndarray] = {}
    errors: dict[str, dict[str, list[float]]] = {}
    for key, arr in sorted(hist.series.items()):
        forecasts[key] = forecast_next_day(arr, period, opts.method)
        if held:
            methods = tuple(dict.fromkeys((opts.method, "last-day")))
            errors[f"{key[0]}/{key[1]}"] = backtest(arr, period, held, methods)
    scale = 1.0 + opts.margin
    hourly = {k: [x * scale for x in slot_peaks(f, opts.slots)] for k, f in forecasts.items()}
    design: dict[SeriesKey, list[float]] = {}
    for k, arr in hist.series.items():
        rows = [hourly[k]]
        for d in range(max(0, days - opts.design_days), days):
            day = arr[d * period : (d + 1) * period]
            rows.append([x * scale for x in slot_peaks(day, opts.slots)])
        design[k] = [max(col) for col in zip(*rows, strict=True)]
    slot_hours = 24.0 / opts.slots
    kw = {"slot_hours": slot_hours, "time_limit_s": opts.time_limit_s,
          "mip_rel_gap": opts.mip_rel_gap}
    glob = solve(spec, design, reserve_only=True, cross_region=True, **kw)  # type: ignore[arg-type]
    local = solve(spec, design, reserve_only=True, cross_region=False, **kw)  # type: ignore[arg-type]
    mixed = solve(spec, design, cross_region=True, fluid_hourly=True, **kw)  # type: ignore[arg-type]
    hourly_plan = solve_hourly(spec, hourly, mixed.reserved, **kw)  # type: ignore[arg-type]
    mean_err = {
        m: float(np.nanmean([v for e in errors.values() for v in e.get(m, [])]))
        for m in {m for e in errors.values() for m in e}
    }
    targets: dict[str, dict[str, list[int]]] = {}
    for (r, m), v in hourly_plan.targets().items():
        targets.setdefault(r, {})[m] = v
    return {
        "version": PLAN_VERSION,
        "day_s": hist.day_s,
        "slots": opts.slots,
        "slot_s": hist.day_s / opts.slots,
        "targets": targets,
        "reserved_targets": {
            r: {m: v[0] for (rr, m), v in glob.targets().items() if rr == r}
            for r in sorted(spec.regions)
        },
        "history": {
            "days": days,
            "step_s": hist.step_s,
            "series": [f"{r}/{m}" for r, m in sorted(hist.series)],
        },
        "forecast": {
            "method": opts.method,
            "step_s": step,
            "held_back_days": held,
            "mape": errors,
            "mape_mean": mean_err,
            "next_day": {f"{r}/{m}": [round(x, 3) for x in f] for (r, m), f in forecasts.items()},
            "slot_peak": {f"{r}/{m}": [round(x, 3) for x in v] for (r, m), v in hourly.items()},
            "design_peak": {f"{r}/{m}": [round(x, 3) for x in v] for (r, m), v in design.items()},
        },
        "reservation": {
            "global": allocation_dict(glob),
            "region_local": allocation_dict(local),
            "instance_hours_saving_pct": round(
                _pct_less(glob.total_instance_hours, local.total_instance_hours), 2
            ),
            "cost_saving_pct": round(_pct_less(glob.total_cost, local.total_cost), 2),
        },
        "stage1": allocation_dict(mixed),
        "stage2": allocation_dict(hourly_plan),
        "solve_s": round(glob.solve_s + local.solve_s + mixed.solve_s + hourly_plan.solve_s, 4),
        "options": {
            "slots": opts.slots,
            "forecast_steps_per_day": opts.forecast_steps_per_day,
            "design_days": opts.design_days,
            "margin": opts.margin,
            "mip_rel_gap": opts.mip_rel_gap,
        },
        "spec": spec_to_dict(spec),
    }
