"""The region sweep's simulator side, small: rows, ratios, errors and the report."""

from __future__ import annotations

import asyncio
import json
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


def test_several_seeds_are_pooled_and_each_shown(tmp_path: Path) -> None:
    from sim.metrics import percentile
    plan = SweepPlan(speedup=2.5, loads=(0.25,), warmup_s=5.0, horizon_s=15.0,
                     mesh_horizon_s=20.0, error_after_s=10.0, drain_s=5.0,
                     variants=(MESH, NO_PEERS), seeds=(1, 2), sim_ties=2)
    sw = asyncio.run(run_sweep(plan, "test", emulate_too=False, log=lambda s: None))
    assert sorted((r.seed, r.variant) for r in sw.rows) == [
        (1, MESH), (1, NO_PEERS), (2, MESH), (2, NO_PEERS)]
    assert sorted((t.seed, t.stream) for t in sw.twins) == [(1, 0), (1, 1), (2, 0), (2, 1)]

    def window(variant: str) -> list[float]:
        return [x for r in sw.rows if r.variant == variant for w in r.window.values()
                for x in w]

    # The pooled p90 is over every seed's requests, not a mean of per-seed p90s.
    pm = sw.pooled(0.25, MESH, "simulated")
    assert pm is not None and pm.seeds == (1, 2)
    assert pm.sent == sum(r.summary.sent for r in sw.rows if r.variant == MESH)
    assert pm.ttft_p90 == percentile(window(MESH), 90)
    assert sw.ratio(0.25, "simulated") == pytest.approx(
        percentile(window(MESH), 90) / percentile(window(NO_PEERS), 90))
    # Each seed's own ratio is its own run's, and stream 0 of its twins is that run.
    for seed in (1, 2):
        own = sw.seed_ratio(0.25, "simulated", seed)
        (t0,) = [t for t in sw.twins if t.seed == seed and t.stream == 0]
        assert own == pytest.approx(t0.ratio)
    # The simulator's pooled figure is over every seed's every twin.
    sim = sw.simulated_pooled(0.25)
    assert sim is not None and sim[1] == 4
    assert sim[0].requests[0] == sum(len(t.mesh) for t in sw.twins)
    spread = sw.pick_spread(0.25)
    assert spread is not None and spread.picks == 4  # 2 twins of seed 1 x 2 of seed 2
    text = tables(sw)
    assert "Every seed's requests pooled (seeds 1,2" in text
    assert "Each seed on its own" in text and "| 0.25 | 2 |" in text
    assert "Agreement on the mesh / no-peers TTFT p90 ratio" in text
    assert any(x.startswith("light load 0.25, seeds 1,2 pooled") for x in acceptance(sw))
    # Beside emulated runs, the verdict is pooled against pooled, every seed shown.
    sw.rows += [replace(r, side="emulated") for r in list(sw.rows)]
    emu = sw.ratio(0.25, "emulated")
    assert emu == pytest.approx(sw.ratio(0.25, "simulated"))
    (line,) = [x for x in acceptance(sw) if "mesh/no-peers ratio emu" in x]
    assert f"emu {emu:.3f} vs sim {sim[0].ratio:.3f} over 4 runs (2 twins a seed)" in line
    assert "per seed emu / sim 1: " in line and "; 2: " not in line and ", 2: " in line
    assert "one pooled run moves by sd" in line
    write(sw, tmp_path / "out")
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["plan"]["seeds"] == [1, 2]
    assert doc["pooled"]["0.25"]["emulated"] == pytest.approx(emu)
    assert set(doc["pooled"]["0.25"]["per_seed"]) == {"1", "2"}
    assert {r["seed"] for r in doc["rows"]} == {1, 2}


def test_one_seed_pooled_is_that_runs_own_figures() -> None:
    plan = SweepPlan(speedup=2.5, loads=(0.25,), warmup_s=5.0, horizon_s=15.0,
                     mesh_horizon_s=20.0, error_after_s=10.0, drain_s=5.0,
                     variants=(MESH, NO_PEERS))
    sw = asyncio.run(run_sweep(plan, "test", emulate_too=False, log=lambda s: None))
    for label in (MESH, NO_PEERS):
        row, pooled = sw.get(0.25, label, "simulated"), sw.pooled(0.25, label, "simulated")
        assert row is not None and pooled is not None
        assert pooled.ttft_p90 == row.summary.ttft_p90
        assert pooled.ttft_p99 == row.summary.ttft_p99
        assert pooled.throughput_rps == row.summary.throughput_rps
        assert pooled.region_p90 == row.region_p90 and pooled.errors == row.errors
    assert "Each seed on its own" not in tables(sw)


def test_measured_seeds_are_parsed_and_bad_ones_refused(capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    from sim.region_sweep import _measured_seeds
    assert _measured_seeds(None, None) == (1,)
    assert _measured_seeds(4, None) == (4,)
    assert _measured_seeds(None, "1-3") == (1, 2, 3)
    assert _measured_seeds(None, "2,1,2") == (2, 1)
    for seed, seeds, why in ((1, "1-2", "not both"), (None, "", "at least one seed"),
                             (None, "3-1", "--seeds: empty range"),
                             (None, "a-b", "--seeds: expected numbers")):
        with pytest.raises(ValueError, match=why):
            _measured_seeds(seed, seeds)
    assert main(["--seeds", "1-x"]) == 2
    assert "--seeds: expected numbers or ranges, got '1-x'" in capsys.readouterr().err
    assert main(["--seed", "2", "--seeds", "1-3"]) == 2
    assert "give --seed or --seeds, not both" in capsys.readouterr().err


def test_emulated_rows_of_earlier_runs_are_pooled_with_a_fresh_simulator_side(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Two one-seed "emulations" (the simulator's own rows relabelled), written as a run would.
    window = ["--speedup", "2.5", "--loads", "0.25", "--warmup", "5", "--horizon", "15",
              "--mesh-horizon", "20", "--error-after", "10", "--variants", f"{MESH},{NO_PEERS}"]
    dirs = []
    for seed in (1, 2):
        plan = SweepPlan(speedup=2.5, loads=(0.25,), warmup_s=5.0, horizon_s=15.0,
                         mesh_horizon_s=20.0, error_after_s=10.0, variants=(MESH, NO_PEERS),
                         seeds=(seed,))
        sw = asyncio.run(run_sweep(plan, f"run {seed}", emulate_too=False, log=lambda s: None))
        sw.rows = [replace(r, side="emulated") for r in sw.rows]
        write(sw, tmp_path / f"seed{seed}")
        dirs.append(str(tmp_path / f"seed{seed}"))
    out = tmp_path / "pooled"
    assert main([*window, "--emulated-from", ",".join(dirs), "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["plan"]["seeds"] == [1, 2]
    assert [s["command"] for s in doc["sources"]] == ["run 1", "run 2"]
    assert sorted((r["side"], r["seed"]) for r in doc["rows"] if r["variant"] == MESH) == [
        ("emulated", 1), ("emulated", 2), ("simulated", 1), ("simulated", 2)]
    # The simulator is deterministic: its own rows, pooled again, agree to the last digit.
    pooled = doc["pooled"]["0.25"]
    assert pooled["emulated"] == pytest.approx(pooled["simulated"])
    assert pooled["difference"] == pytest.approx(0.0, abs=1e-9)
    md = (out / "results.md").read_text()
    assert "- seed 1: `run 1`" in md and "within 10%: yes" in md
    # Traces came along with their rows: the mesh's, once per seed (the no-peers rows
    # have none, though the file is per load and seed).
    assert (out / "outcomes-emulated-load0.25-seed1.json").exists()
    emulated_parts = [x for x in md.splitlines() if x.startswith("| 0.25 emulated seed 1 | all")]
    assert len(emulated_parts) == 1
    # Refused, with the reason: another window, the same run twice, seeds given too.
    bad = [([*window[:6], "--horizon", "16", *window[8:], "--emulated-from", dirs[0]],
            "horizon_s was 15.0, here 16.0"),
           ([*window, "--emulated-from", f"{dirs[0]},{dirs[0]}"], "is in both"),
           ([*window, "--emulated-from", dirs[0], "--seeds", "1-2"], "give no --seed"),
           ([*window, "--emulated-from", str(tmp_path / "none")], "cannot read it"),
           ([*window[:2], "--loads", "0.5", *window[4:], "--emulated-from", dirs[0]],
            "no emulated run of"),
           ([*window, "--calibrated", "--emulated-from", dirs[0]],
            "ran with calibrated False, here True")]
    for argv, why in bad:
        assert main([*argv, "--out", str(tmp_path / "x")]) == 2
        assert why in capsys.readouterr().err


def test_each_load_is_judged_on_the_checks_that_apply_to_it() -> None:
    from sim.region_sweep import Sweep
    plan = SweepPlan(speedup=2.5, loads=(0.25,), warmup_s=5.0, horizon_s=15.0,
                     mesh_horizon_s=20.0, error_after_s=10.0, drain_s=5.0,
                     variants=(MESH, NO_PEERS))
    sw = asyncio.run(run_sweep(plan, "test", emulate_too=False, log=lambda s: None))
    light = acceptance(sw)
    assert any(x.startswith("light load 0.25") for x in light)
    assert not any(x.startswith("overloaded") for x in light)
    # The same rows as an overloaded point: judged on paying, not on costing nothing.
    heavy = acceptance(Sweep(replace(plan, loads=(3.0,)), "test",
                             [replace(r, load=3.0) for r in sw.rows], 0.0, (0.0, 0.0, 0.0)))
    assert any(x.startswith("overloaded load 3") for x in heavy)
    assert not any(x.startswith("light") for x in heavy)


def test_the_sweep_runs_the_default_kvmesh_policy_unless_told_calibrated(
        tmp_path: Path) -> None:
    """By default both kvmesh variants run the policy's default parameters (what a router
    configured with none does); ``--calibrated`` sets ``calibrated: true``, recorded in the
    plan."""
    default = SweepPlan(variants=(MESH, NO_PEERS))
    assert {v.label: dict(v.params) for v in default.runs(default.emulated())} == {
        MESH: {}, NO_PEERS: {}}
    assert all(not v.params for v in default.emulation_plan(1.0, 60.0).variants
               if v.label in (MESH, NO_PEERS))
    calibrated = replace(default, calibrated=True)
    assert {v.label: dict(v.params) for v in calibrated.runs(calibrated.emulated())} == {
        MESH: {"calibrated": True}, NO_PEERS: {"calibrated": True}}
    out = tmp_path / "out"
    assert main(["--sim-only", "--calibrated", "--speedup", "2.5", "--loads", "0.25",
                 "--warmup", "5", "--horizon", "15", "--mesh-horizon", "20",
                 "--error-after", "10", "--variants", f"{MESH},{NO_PEERS}",
                 "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["plan"]["calibrated"] is True
    assert "--calibrated" in doc["command"]
