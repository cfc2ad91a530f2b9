"""The region sweep's simulator side, small: rows, ratios, errors and the report."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from sim.region_sweep import (
    MESH,
    NO_PEERS,
    SweepPlan,
    _seeds,
    acceptance,
    main,
    run_sweep,
    tables,
    write,
)


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
    assert set(mesh.trace) == {"us-lb0", "eu-lb0", "asia-lb0"}
    assert sum(len(t) for t in mesh.trace.values()) >= mesh.errors["local"]["n"]
    assert "error taken apart" in text and "| 0.25 simulated | all |" in text
    md = write(sw, tmp_path / "out")
    assert md.exists() and (tmp_path / "out" / "results.json").exists()
    assert (tmp_path / "out" / "outcomes-simulated-load0.25.json").exists()


def test_bad_arguments_are_refused(capsys: object) -> None:
    assert main(["--loads", "0"]) == 2
    assert main(["--warmup", "50", "--horizon", "40"]) == 2
    assert main(["--variants", "kvmesh,round-robin"]) == 2


def test_the_variants_asked_for_are_the_ones_run(tmp_path: Path) -> None:
    plan = SweepPlan(speedup=2.5, loads=(0.25,), warmup_s=5.0, horizon_s=15.0,
                     mesh_horizon_s=20.0, error_after_s=10.0, drain_s=5.0,
                     variants=(MESH, NO_PEERS))
    sw = asyncio.run(run_sweep(plan, "test", emulate_too=False, log=lambda s: None))
    assert {r.variant for r in sw.rows} == {MESH, NO_PEERS}
    assert sw.ratio(0.25, "simulated") is not None
    assert "| 0.25 (8/2/1) | least_load-local | - / - |" in tables(sw)
    assert write(sw, tmp_path / "out").exists()


def test_resolution_runs_report_each_seed_and_the_pooled_ratio(tmp_path: Path) -> None:
    plan = SweepPlan(speedup=2.5, loads=(0.25,), warmup_s=5.0, horizon_s=15.0,
                     mesh_horizon_s=20.0, error_after_s=10.0, drain_s=5.0,
                     sim_seeds=(1, 2), sim_horizon_s=25.0)
    sw = asyncio.run(run_sweep(plan, "test", emulate_too=False, log=lambda s: None))
    assert [(p.load, p.seed) for p in sw.pairs] == [(0.25, 1), (0.25, 2)]
    assert all(p.mesh and p.no_peers for p in sw.pairs)
    res = sw.resolution(0.25)
    assert res is not None and res["seeds"] == [1, 2] and len(res["ratios"]) == 2
    assert res["requests"] == (sum(len(p.mesh) for p in sw.pairs),
                               sum(len(p.no_peers) for p in sw.pairs))
    assert "Resolution runs" in tables(sw)
    assert any("simulator over 2 seeds" in line for line in acceptance(sw))
    write(sw, tmp_path / "out")
    assert '"resolution"' in (tmp_path / "out" / "results.json").read_text()


def test_seed_lists_and_ranges() -> None:
    assert _seeds("1-3,5,2") == (1, 2, 3, 5)
    assert _seeds("") == ()
    for bad in ("x", "3-1"):
        with pytest.raises(ValueError, match="--sim-seeds"):
            _seeds(bad)
    assert main(["--sim-seeds", "2-1"]) == 2


def test_engines_a_router_did_not_trust_are_reported() -> None:
    from sim.region_sweep import _index_flags
    doc = {"precision": {"engines": {"http://a": {"flag": "partial"}, "http://b": {"flag": None}},
                         "decoders": {"http://a": {"partial": True}, "http://c": {"partial": True},
                                      "http://b": {"partial": False}}}}
    assert _index_flags(doc) == ["http://a partial", "http://c partial stream"]
    assert _index_flags({}) == [] and _index_flags({"precision": {"engines": 3}}) == []


def test_twin_runs_replay_the_emulated_seed_with_other_tie_streams(tmp_path: Path) -> None:
    plan = SweepPlan(speedup=2.5, loads=(0.25,), warmup_s=5.0, horizon_s=15.0,
                     mesh_horizon_s=20.0, error_after_s=10.0, drain_s=5.0, sim_ties=2)
    sw = asyncio.run(run_sweep(plan, "test", emulate_too=False, log=lambda s: None))
    assert [(t.load, t.stream) for t in sw.twins] == [(0.25, 0), (0.25, 1)]
    # Stream 0 is the simulated rows' own run: the same window, the same ratio.
    assert sw.twins[0].ratio == pytest.approx(sw.ratio(0.25, "simulated"))
    tw = sw.twin_spread(0.25)
    assert tw is not None and tw["streams"] == [0, 1]
    assert tw["range"][0] <= tw["mean"] <= tw["range"][1]
    assert "Twin runs" in tables(sw)
    write(sw, tmp_path / "out")
    assert '"twins"' in (tmp_path / "out" / "results.json").read_text()
    assert main(["--sim-ties", "-1"]) == 2
    # Beside an emulated run, the acceptance judges it against the twins' mean and range.
    sw.rows += [replace(r, side="emulated") for r in sw.rows if r.variant in (MESH, NO_PEERS)]
    (line,) = [x for x in acceptance(sw) if "simulated twins" in x]
    assert line.startswith("load 0.25: emu ") and "inside their range" in line
