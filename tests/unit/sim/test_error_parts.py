"""Taking the local prediction error apart by the predicted TTFT's parts."""

from __future__ import annotations

import pytest

from sim import error_parts


def outcome(at: float, observed: float, *, waiting: float = 0.0, uncached: int = 50,
            kind: str = "local") -> dict[str, object]:
    # predicted 0.100 = queue 0.02 (formula 0.05, repriced -0.03) + prefill 0.01
    # + interference 0.005 + kv shown 0.005 (0.02 at scale 0.25) + overhead 0.06
    parts = {"rtt": 0.0, "queue": 0.05, "prefill": 0.01, "decode": 0.025, "kv": 0.02,
             "kv_scale": 0.25, "overhead": 0.06, "calib": 0.06 - 0.015 - 0.03,
             "waiting": waiting}
    return {"at": at, "kind": kind, "pair": "us->us", "replica": "e0", "uncached": uncached,
            "observed_s": observed, "predicted_s": 0.1, "parts": parts}


def test_the_parts_add_up_to_the_prediction_and_the_groups_split() -> None:
    trace = {"us": [outcome(0.0, 0.1), outcome(61.0, 0.125), outcome(62.0, 0.2, waiting=2.0),
                    outcome(63.0, 0.08, uncached=400), outcome(64.0, 0.3, kind="forwarded")],
             "eu": []}
    rows = error_parts.local_rows(trace, after=60.0)
    assert len(rows) == 3  # the first is in the warm-up, the forward is not local
    r = rows[0]
    assert sum(r[p] for p in error_parts.PARTS) == pytest.approx(r["predicted"])
    assert (r["queue"], r["kv"], r["interference"]) == pytest.approx((0.02, 0.005, 0.005))
    assert r["error"] == pytest.approx(0.2)
    s = error_parts.summary(rows)
    assert s["all"]["n"] == 3 and s["queued"]["n"] == 1 and s["found no queue"]["n"] == 2
    assert s["uncached >= 256"]["n"] == 1
    assert s["queued"]["bias"] == pytest.approx(0.5)
    assert s["found no queue"]["abs_error"] == pytest.approx((0.2 + 0.25) / 2)
    lines = error_parts.table([("3 emulated", s)])
    assert len(lines) == 2 + 4 and lines[2].startswith("| 3 emulated | all | 3 |")
