"""Live capacity hints: the demand meter's window and label cap, the plan file reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mesh.config import ConfigError, build
from mesh.demand import DemandMeter, PlanFileError, PlanTargets


def test_rates_cover_the_window_only() -> None:
    m = DemandMeter(window=10.0)
    m.observe("a", 100, 20, now=0.0)
    m.observe("a", 50, 10, now=5.0)
    assert m.rates(5.0) == {("a", "in"): 15.0, ("a", "out"): 3.0}
    assert m.rates(12.0) == {("a", "in"): 5.0, ("a", "out"): 1.0}
    assert m.rates(30.0) == {("a", "in"): 0.0, ("a", "out"): 0.0}
    assert m.totals == {("a", "in"): 150.0, ("a", "out"): 30.0}


def test_client_chosen_model_names_are_capped() -> None:
    m = DemandMeter(max_models=2)
    for name in ("a", "b", "c", "d", "a"):
        m.observe(name, 1, 0, now=0.0)
    assert {k for k, _ in m.totals} == {"a", "b", "other"}
    assert m.totals[("other", "in")] == 2.0


def test_plan_targets_follow_the_utc_slot() -> None:
    doc = {"day_s": 600, "slot_s": 25, "targets": {"us": {"m": list(range(24))}}}
    p = PlanTargets.from_dict(doc)
    assert p.target("us", "m", 0.0) == 0
    assert p.target("us", "m", 26.0) == 1
    assert p.target("us", "m", 600.0 * 7 + 599.0) == 23
    assert p.target("eu", "m", 0.0) is None


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"slot_s": 1, "targets": {}}, "needs numeric"),
        ({"day_s": 4, "slot_s": 2, "targets": {"us": {"m": [1]}}}, "must be 2 integers"),
        ({"day_s": 4, "slot_s": 2, "targets": {"us": {"m": [1, -1]}}}, "must be 2 integers"),
        ({"day_s": 4, "slot_s": 2, "targets": ["x"]}, "must map region"),
    ],
)
def test_bad_plans_are_refused(doc: dict[str, object], message: str) -> None:
    with pytest.raises(PlanFileError, match=message):
        PlanTargets.from_dict(doc)


def test_router_config_checks_the_plan_file(tmp_path: Path) -> None:
    good = tmp_path / "plan.json"
    good.write_text(json.dumps({"day_s": 86400, "slot_s": 3600, "targets": {}}))
    assert build({"region": "us", "plan_file": str(good)}).plan_file == str(good)
    with pytest.raises(ConfigError, match=r"plan_file: .*missing.json: cannot read"):
        build({"region": "us", "plan_file": str(tmp_path / "missing.json")})
