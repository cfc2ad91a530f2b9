"""The prediction error of local decisions, taken apart by the predicted TTFT's parts.

A router's outcome trace (``mesh.outcomes.Outcomes.recent``: every placement's predicted
parts beside the TTFT it observed from the decision) says *where* the cost model is wrong.
The predicted TTFT of a local decision is the sum of

- ``queue``: the waiting requests as priced (the formula's queue, or the learned delay per
  waiting request once the correction replaced it);
- ``prefill``: the uncached tokens past the learned knee at the replica's rate;
- ``interference``: the running batch's share of the prefill (``decode`` less the barrier);
- ``kv``: the part of the KV-barrier term the engine shows (``kv * kv_scale``);
- ``overhead``: the learned first-token overhead (the step floor, HTTP), and the round trip.

Grouping the outcomes (found no queue / queued / long prefills) and setting each group's
median observed TTFT beside the median of each part shows which part misses. Pure: rows
in, rows out.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

IDLE_WAITING = 0.5
"""Estimated waiting requests below which a decision found no queue (as the calibration)."""
LONG_PREFILL = 256
"""Uncached tokens from which a prefill is well past any step-time floor."""
PARTS = ("queue", "prefill", "interference", "kv", "overhead")


def local_rows(trace: Mapping[str, Sequence[Mapping[str, Any]]],
               after: float) -> list[dict[str, Any]]:
    """Local outcomes decided ``after`` seconds or more past each router's first decision,
    with the predicted TTFT split into :data:`PARTS` and the signed relative error."""
    out: list[dict[str, Any]] = []
    for rows in trace.values():
        if not rows:
            continue
        t0 = min(float(r["at"]) for r in rows)
        for r in rows:
            if r.get("kind") != "local" or float(r["at"]) - t0 < after:
                continue
            observed = float(r["observed_s"])
            if observed <= 0:
                continue
            p = r["parts"]
            ks = float(p.get("kv_scale", 1.0))
            kv = float(p.get("kv", 0.0))
            overhead = float(p.get("overhead", 0.0))
            # calib = overhead + (kv_scale - 1) * kv + the queue's repricing
            requeue = float(p.get("calib", 0.0)) - overhead + (1.0 - ks) * kv
            out.append({
                "observed": observed, "predicted": float(r["predicted_s"]),
                "waiting": float(p.get("waiting", 0.0)), "uncached": int(r["uncached"]),
                "queue": float(p.get("queue", 0.0)) + requeue,
                "prefill": float(p.get("prefill", 0.0)),
                "interference": float(p.get("decode", 0.0)) - kv,
                "kv": ks * kv,
                "overhead": overhead + float(p.get("rtt", 0.0)),
                "error": (observed - float(r["predicted_s"])) / observed,
            })
    return out


def _median(xs: Iterable[float]) -> float | None:
    v = list(xs)
    return statistics.median(v) if v else None


def groups(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    return {
        "all": list(rows),
        "found no queue": [r for r in rows if r["waiting"] < IDLE_WAITING],
        "queued": [r for r in rows if r["waiting"] >= IDLE_WAITING],
        f"uncached >= {LONG_PREFILL}": [r for r in rows if r["uncached"] >= LONG_PREFILL],
    }


def summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float | int | None]]:
    """Per group: n, median |error| and signed error (> 0: slower than predicted), the
    median observed and predicted TTFT and the median of each part, seconds."""
    out: dict[str, dict[str, float | int | None]] = {}
    for name, rs in groups(rows).items():
        row: dict[str, float | int | None] = {
            "n": len(rs),
            "abs_error": _median(abs(r["error"]) for r in rs),
            "bias": _median(r["error"] for r in rs),
            "observed": _median(r["observed"] for r in rs),
            "predicted": _median(r["predicted"] for r in rs),
        }
        for part in PARTS:
            row[part] = _median(r[part] for r in rs)
        out[name] = row
    return out


def table(title_rows: Sequence[tuple[str, Mapping[str, Mapping[str, float | int | None]]]]
          ) -> list[str]:
    """Markdown rows: one per (title, group)."""
    def f(x: float | int | None, pct: bool = False) -> str:
        if x is None:
            return "-"
        return f"{x:+.1%}" if pct else f"{x:.3f}"

    out = ["| run | group | n | median abs error | median signed | observed | predicted | "
           + " | ".join(PARTS) + " |", "|---|---|---:|---:|---:|---:|---:|"
           + "---:|" * len(PARTS)]
    for title, summ in title_rows:
        for name, g in summ.items():
            if not g["n"]:
                continue
            ae = g["abs_error"]
            out.append(f"| {title} | {name} | {g['n']} | "
                       f"{'-' if ae is None else f'{ae:.1%}'} | {f(g['bias'], True)} | "
                       f"{f(g['observed'])} | {f(g['predicted'])} | "
                       + " | ".join(f(g[p]) for p in PARTS) + " |")
    return out
