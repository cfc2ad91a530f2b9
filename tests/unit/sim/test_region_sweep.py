"""The region sweep's simulator side, small: rows, ratios, errors and the report."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sim.region_sweep import MESH, NO_PEERS, SweepPlan, acceptance, main, run_sweep, tables, write


def test_a_small_simulated_sweep_reports_every_variant(tmp_path: Path) -> None:
    plan = SweepPlan(speedup=2.5, loads=(0.25,), warmup_s=5.0, horizon_s=15.0,
                     mesh_horizon_s=20.0, error_after_s=10.0, drain_s=5.0)
    sw = asyncio.run(run_sweep(plan, "test", emulate_too=False, log=lambda s: None))
    labels = {r.variant for r in sw.rows}
    assert labels == {MESH, NO_PEERS, "precise_prefix-local", "least_load-local"}
    assert all(r.side == "simulated" for r in sw.rows)
    mesh = sw.get(0.25, MESH, "simulated")
    assert mesh is not None and mesh.summary.sent > 0
    assert mesh.errors["local"]["n"] > 0  # requests after the warm-up carried a prediction
    assert set(mesh.routers) == {"us-lb0", "eu-lb0", "asia-lb0"}
    assert sw.ratio(0.25, "simulated") is not None
    text = tables(sw)
    assert "| 0.25 (8/2/1) | kvmesh |" in text
    assert any(line.startswith("light load 0.25") for line in acceptance(sw))
    md = write(sw, tmp_path / "out")
    assert md.exists() and (tmp_path / "out" / "results.json").exists()


def test_bad_arguments_are_refused(capsys: object) -> None:
    assert main(["--loads", "0"]) == 2
    assert main(["--warmup", "50", "--horizon", "40"]) == 2
