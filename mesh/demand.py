"""Live capacity hints: the demand a router observes and the capacity plan's current target.

``DemandMeter`` counts the tokens of requests that *arise* in this router's region (client
requests, not ones forwarded in by peers), per model: prompt tokens exactly (the router
tokenizes them) and the output tokens requested (``max_tokens``; an engine may stop
earlier, so this is an upper bound). ``rates`` is tokens/s over the last ``window`` seconds:
the figure a forecaster or ``kvmesh plan --format prom`` reads. Model names come from
clients, so only ``max_models`` distinct names get their own label; the rest count as
``other``.

``PlanTargets`` reads the ``targets`` of a ``kvmesh plan`` JSON (region -> model -> replicas
per slot of a UTC day) and answers the target for a wall-clock time. Both are sans-I/O: the
router passes ``now`` in.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from mesh.metrics import gauge

OTHER = "other"


class PlanFileError(ValueError):
    """A plan file the router cannot use; the message names the file and the cause."""


class DemandMeter:
    def __init__(self, window: float = 60.0, max_models: int = 32) -> None:
        self.window = window
        self.max_models = max_models
        self.totals: dict[tuple[str, str], float] = {}
        """(model, direction) -> tokens since start."""
        self._recent: deque[tuple[float, str, int, int]] = deque()

    def _label(self, model: str) -> str:
        totals = self.totals
        if (model, "in") in totals or (model, "out") in totals:
            return model or OTHER  # a model seen before (every request but the first)
        known = {m for m, _ in totals}
        if model in known or len(known) < self.max_models:
            return model or OTHER
        return OTHER

    def observe(self, model: str, prompt_tokens: int, output_tokens: int, now: float) -> None:
        label = self._label(model)
        for direction, n in (("in", prompt_tokens), ("out", output_tokens)):
            key = (label, direction)
            self.totals[key] = self.totals.get(key, 0.0) + max(0, n)
        self._recent.append((now, label, max(0, prompt_tokens), max(0, output_tokens)))
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] <= now - self.window:
            self._recent.popleft()

    def rates(self, now: float) -> dict[tuple[str, str], float]:
        """(model, direction) -> tokens/s over the last window (every model seen: 0 if idle)."""
        self._trim(now)
        out = dict.fromkeys(self.totals, 0.0)
        for _, label, tin, tout in self._recent:
            out[(label, "in")] += tin / self.window
            out[(label, "out")] += tout / self.window
        return out


@dataclass(frozen=True, slots=True)
class PlanTargets:
    day_s: float
    slot_s: float
    targets: Mapping[str, Mapping[str, tuple[int, ...]]]

    @classmethod
    def from_dict(cls, doc: Mapping[str, object], where: str = "plan") -> PlanTargets:
        try:
            day_s = float(doc["day_s"])  # type: ignore[arg-type]
            slot_s = float(doc["slot_s"])  # type: ignore[arg-type]
            raw = doc["targets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanFileError(f"{where}: needs numeric 'day_s', 'slot_s' and 'targets'") from exc
        if not (day_s > 0 and slot_s > 0 and math.isfinite(day_s)):
            raise PlanFileError(f"{where}: day_s and slot_s must be positive")
        slots = round(day_s / slot_s)
        if not isinstance(raw, Mapping):
            raise PlanFileError(f"{where}: 'targets' must map region -> model -> list")
        targets: dict[str, dict[str, tuple[int, ...]]] = {}
        for region, by_model in raw.items():
            if not isinstance(by_model, Mapping):
                raise PlanFileError(f"{where}: targets.{region} must map model -> list")
            for model, values in by_model.items():
                if (
                    not isinstance(values, list)
                    or len(values) != slots
                    or not all(isinstance(v, int) and v >= 0 for v in values)
                ):
                    raise PlanFileError(
                        f"{where}: targets.{region}.{model} must be {slots} integers >= 0"
                    )
                targets.setdefault(str(region), {})[str(model)] = tuple(values)
        return cls(day_s, slot_s, targets)

    @classmethod
    def from_file(cls, path: str) -> PlanTargets:
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise PlanFileError(f"{path}: cannot read the plan: {exc}") from exc
        if not isinstance(doc, dict):
            raise PlanFileError(f"{path}: a plan is a JSON object")
        return cls.from_dict(doc, path)

    def target(self, region: str, model: str, wall: float) -> int | None:
        values = self.targets.get(region, {}).get(model)
        if not values:
            return None
        return values[int((wall % self.day_s) // self.slot_s) % len(values)]


def hint_metrics(
    region: str,
    meter: DemandMeter,
    plan: PlanTargets | None,
    healthy: Mapping[str, int],
    now: float,
    wall: float,
) -> Iterable[object]:
    """The metric families an autoscaler reads (``healthy``: model -> healthy replicas here)."""
    totals = [([region, m, d], v) for (m, d), v in sorted(meter.totals.items())]
    rates = [([region, m, d], v) for (m, d), v in sorted(meter.rates(now).items())]
    from prometheus_client.core import CounterMetricFamily

    c = CounterMetricFamily(
        "kvmesh_demand_tokens",
        "Tokens of requests arising in this region (in: prompt, out: requested max_tokens)",
        labels=["region", "model", "direction"],
    )
    for labels, v in totals:
        c.add_metric(labels, v)
    yield c
    yield gauge(
        "kvmesh_demand_tokens_per_second",
        f"Tokens/s of requests arising in this region over the last {meter.window:g} s",
        ["region", "model", "direction"],
        rates,
    )
    yield gauge(
        "kvmesh_healthy_replicas",
        "Healthy replicas in this region, by model served ('any': not reported)",
        ["region", "model"],
        [([region, m], float(n)) for m, n in sorted(healthy.items())],
    )
    if plan is not None:
        rows = []
        for model in sorted(plan.targets.get(region, {})):
            t = plan.target(region, model, wall)
            if t is not None:
                rows.append(([region, model], float(t)))
        yield gauge(
            "kvmesh_plan_target_replicas",
            "Replicas the capacity plan wants in this region now (kvmesh plan)",
            ["region", "model"],
            rows,
        )
