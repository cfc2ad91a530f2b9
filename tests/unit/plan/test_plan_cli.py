"""``kvmesh plan`` end to end on a small trace, and its refusal of bad input."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from cli import main

DAY = 1200.0
SPEC = """
gpus:
  L4: {throughput: {llama: 40}}
  H100: {throughput: {llama: 200}}
regions:
  us: {prices: {L4: {reserved: 1.0, on_demand: 2.6}, H100: {reserved: 6.0, on_demand: 15.0}}}
  eu: {prices: {L4: {reserved: 1.1, on_demand: 2.8}}}
  asia: {prices: {L4: {reserved: 1.2, on_demand: 3.0, spot: 1.0}}}
rtt_ms: {us-eu: 100, us-asia: 150, eu-asia: 230}
max_rtt_ms: 200
startup_s: 155
spot_max_share: 0.3
"""


def write_trace(path: Path, days: int = 4, seed: int = 3) -> int:
    """Mooncake-format requests whose rate follows a daily cosine (peak 1/s)."""
    rng = random.Random(seed)
    lines = []
    t = 0.0
    while t < days * DAY:
        t += rng.expovariate(1.0)
        rate = 0.15 + 0.85 * (1 + math.cos(2 * math.pi * (t % DAY) / DAY)) / 2
        if rng.random() > rate:
            continue
        user = rng.randrange(200)
        lines.append(
            json.dumps(
                {
                    "timestamp": round(t * 1000),
                    "input_length": rng.randint(200, 1200),
                    "output_length": rng.randint(20, 200),
                    "hash_ids": [user],
                }
            )
        )
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


def test_plan_end_to_end_on_a_small_trace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "trace.jsonl"
    assert write_trace(trace) > 1000
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    out = tmp_path / "out"
    rc = main([
        "plan", str(trace), "--spec", str(spec), "--regions", "us,eu,asia", "--model", "llama",
        "--day", str(DAY), "--out", str(out),
    ])
    assert rc == 0
    plan = json.loads((out / "plan.json").read_text())
    assert set(plan["targets"]) == {"us", "eu", "asia"}
    assert all(len(v["llama"]) == 24 for v in plan["targets"].values())
    res = plan["reservation"]
    # Sharing across regions never needs more than region-local.
    assert res["global"]["total_instance_hours"] <= res["region_local"]["total_instance_hours"]
    # Every slot of the hourly plan serves the forecast: capacity >= slot peak per model.
    tps = {"L4": 40.0, "H100": 200.0}
    for t in range(24):
        cap = 0.0
        stage = plan["stage2"]
        for table in ("reserved", "on_demand", "spot"):
            for by_model in stage[table].values():
                for g, n in by_model.get("llama", {}).items():
                    cap += tps[g] * (n if table == "reserved" else n[t])
        need = sum(v[t] for v in plan["forecast"]["slot_peak"].values())
        assert cap >= need - 1e-6
    mape = plan["forecast"]["mape_mean"]
    assert set(mape) == {"holt-winters", "last-day"}
    assert (out / "report.md").exists()
    assert (out / "demand_capacity.png").stat().st_size > 1000
    assert (out / "cost.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "global reservation" in printed


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("on_demand: 2.8", "on_demand: -2.8"), "negative or invalid price"),
        (("  eu: {prices: {L4: {reserved: 1.1, on_demand: 2.8}}}", "  eu: {}"),
         "region 'eu' has no GPU type"),
        (("max_rtt_ms: 200", "max_rtt_ms: 200\nmax_utilization: 0"), "max_utilization"),
    ],
)
def test_plan_refuses_bad_specs_naming_the_cause(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: tuple[str, str], message: str
) -> None:
    trace = tmp_path / "trace.jsonl"
    write_trace(trace, days=1)
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.replace(*edit))
    rc = main([
        "plan", str(trace), "--spec", str(spec), "--regions", "us,eu,asia", "--model", "llama",
        "--day", str(DAY), "--out", str(tmp_path / "o"), "--no-plots",
    ])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_plan_refuses_demand_no_capacity_can_meet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "trace.jsonl"
    write_trace(trace, days=2)
    spec = tmp_path / "spec.yaml"
    capped = SPEC.replace(
        "  us: {prices: {L4: {reserved: 1.0, on_demand: 2.6}, H100: {reserved: 6.0, on_demand: "
        "15.0}}}",
        "  us: {prices: {L4: {reserved: 1.0, on_demand: 2.6}}, max_instances: {L4: 1}}",
    ).replace("eu: {prices", "eu: {max_instances: {L4: 1}, prices").replace(
        "asia: {prices", "asia: {max_instances: {L4: 1}, prices"
    )
    spec.write_text(capped)
    rc = main([
        "plan", str(trace), "--spec", str(spec), "--regions", "us,eu,asia", "--model", "llama",
        "--day", str(DAY), "--out", str(tmp_path / "o"), "--no-plots", "--method", "last-day",
    ])
    assert rc == 2
    err = capsys.readouterr().err
    assert "demand no capacity can meet" in err and "model 'llama'" in err
