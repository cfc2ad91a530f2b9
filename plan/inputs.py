"""Reading demand history and the planning spec from files (the I/O shell of the planner).

Three demand formats, each turned into ``Sample``s:

``csv``
    ``timestamp,region,model,tokens_per_s`` (or ``tokens_in_per_s`` + ``tokens_out_per_s``),
    one row per region, model and step; ``timestamp`` in seconds or ISO 8601 (UTC).
``trace``
    the simulator's Mooncake-style JSONL (``timestamp`` ms, ``input_length``,
    ``output_length``); each session is placed in a region the way ``sim.traces`` does.
``prom``
    a file of Prometheus text-format scrapes of the routers' ``kvmesh_demand_tokens_total``
    counters, each sample carrying its timestamp (ms); rates are the counter differences.

A bad row is a ``PlanInputError`` naming the file and line.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path

import yaml

from plan.series import Sample
from plan.spec import PlanInputError, PlanSpec, spec_from_dict

FORMATS = ("csv", "trace", "prom")


def _timestamp(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise PlanInputError(
            f"{where}: timestamp {text!r} is neither seconds nor ISO 8601"
        ) from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def _float(text: str | None, what: str, where: str) -> float:
    try:
        v = float(text if text is not None else "")
    except ValueError as exc:
        raise PlanInputError(f"{where}: {what} {text!r} is not a number") from exc
    if not math.isfinite(v) or v < 0:
        raise PlanInputError(f"{where}: {what} must be a finite number >= 0, got {v}")
    return v


def read_csv(path: str | Path, step_s: float = 60.0) -> Iterator[Sample]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = set(reader.fieldnames or ())
        need = {"timestamp", "region", "model"}
        if not need <= cols:
            raise PlanInputError(f"{path}: needs columns {sorted(need)}, has {sorted(cols)}")
        split = "tokens_per_s" not in cols
        if split and not {"tokens_in_per_s", "tokens_out_per_s"} <= cols:
            raise PlanInputError(
                f"{path}: needs 'tokens_per_s' or 'tokens_in_per_s' and 'tokens_out_per_s'"
            )
        for i, row in enumerate(reader, start=2):
            where = f"{path}:{i}"
            if split:
                rate = _float(row["tokens_in_per_s"], "tokens_in_per_s", where) + _float(
                    row["tokens_out_per_s"], "tokens_out_per_s", where
                )
            else:
                rate = _float(row["tokens_per_s"], "tokens_per_s", where)
            if not row["region"] or not row["model"]:
                raise PlanInputError(f"{where}: empty region or model")
            t = _timestamp(row["timestamp"], where)
            yield Sample(t, row["region"], row["model"], rate * step_s, step_s)


def read_trace(
    path: str | Path, regions: Sequence[str], model: str, weights: Sequence[float] | None = None
) -> Iterator[Sample]:
    from sim.traces import TraceFormatError, read_mooncake, region_by_first_block

    region_of = region_by_first_block(list(regions), weights)
    try:
        for rec in read_mooncake(str(path)):
            yield Sample(
                rec.timestamp_ms / 1000.0,
                region_of(rec),
                model,
                float(rec.input_length + rec.output_length),
                0.0,
            )
    except TraceFormatError as exc:
        raise PlanInputError(str(exc)) from exc


_PROM_LINE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)"
    r"(?:\s+(?P<ts>-?\d+))?\s*$"
)
_PROM_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
DEMAND_COUNTER = "kvmesh_demand_tokens_total"


def read_prom(path: str | Path, metric: str = DEMAND_COUNTER) -> Iterator[Sample]:
    points: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{path}:{i}"
            m = _PROM_LINE.match(line)
            if m is None:
                raise PlanInputError(f"{where}: not a Prometheus text-format sample")
            if m["name"] != metric:
                continue
            labels = dict(_PROM_LABEL.findall(m["labels"] or ""))
            if m["ts"] is None:
                raise PlanInputError(
                    f"{where}: {metric} sample without a timestamp (record the scrapes with "
                    "their timestamps, e.g. from Prometheus' query API; docs/planning.md)"
                )
            for lab in ("region", "model"):
                if not labels.get(lab):
                    raise PlanInputError(f"{where}: {metric} sample without a {lab!r} label")
            key = (labels["region"], labels["model"], labels.get("direction", ""))
            value = _float(m["value"], "counter value", where)
            points.setdefault(key, []).append((int(m["ts"]) / 1000.0, value))
    if not points:
        raise PlanInputError(f"{path}: no {metric} samples")
    for (region, model, _), pts in sorted(points.items()):
        pts.sort()
        for (t0, v0), (t1, v1) in pairwise(pts):
            if t1 <= t0:
                continue
            delta = v1 - v0 if v1 >= v0 else v1  # a counter reset starts again from 0
            yield Sample(t0, region, model, delta, t1 - t0)


def read_samples(
    path: str | Path,
    fmt: str | None = None,
    *,
    step_s: float = 60.0,
    regions: Sequence[str] = (),
    model: str = "",
) -> list[Sample]:
    fmt = fmt or guess_format(path)
    if fmt == "csv":
        return list(read_csv(path, step_s))
    if fmt == "trace":
        if not regions or not model:
            raise PlanInputError("a trace needs the regions to spread it over and its model")
        return list(read_trace(path, regions, model))
    if fmt == "prom":
        return list(read_prom(path))
    raise PlanInputError(f"unknown demand format {fmt!r} (known: {', '.join(FORMATS)})")


def guess_format(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".json"):
        return "trace"
    if suffix in (".prom", ".txt", ".metrics"):
        return "prom"
    raise PlanInputError(f"cannot tell the format of {path}; pass --format ({', '.join(FORMATS)})")


def read_spec(path: str | Path) -> PlanSpec:
    text = Path(path).read_text(encoding="utf-8")
    try:
        doc = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise PlanInputError(f"{path}: not valid YAML/JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise PlanInputError(f"{path}: the spec must be a mapping")
    return spec_from_dict(doc)
