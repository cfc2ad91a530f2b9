"""The simulator's service tiers: batch workload, tier labels, sheds retried, the scenario's
figures (short runs: structure and bookkeeping, not results)."""

from __future__ import annotations

import dataclasses
import math

from mesh.tiers import BATCH, INTERACTIVE, TierConfig
from sim import tier_scenario as ts
from sim.metrics import RequestRecord
from sim.workloads.base import LogNormal
from sim.workloads.batch import BatchSource, Tiered


def test_batch_source_is_steady_seeded_and_deadline_bound() -> None:
    def make() -> BatchSource:
        return BatchSource("us", 3, 2.0, LogNormal(100, 0.3, 8, 400), LogNormal(50, 0.3, 4, 100),
                           120.0, seed=7)

    a, b = make(), make()
    reqs = a.start(0.0)
    for _ in range(200):
        reqs += a.on_sent(reqs[-1], reqs[-1].sent_at)
    again = b.start(0.0)
    for _ in range(200):
        again += b.on_sent(again[-1], again[-1].sent_at)
    assert reqs == again
    assert all(r.tier == BATCH and r.deadline_s == 120.0 for r in reqs)
    times = [r.sent_at for r in reqs]
    assert times == sorted(times)
    rate = len(reqs) / times[-1]
    assert 1.6 < rate < 2.4
    assert len({r.prompt for r in reqs}) == len(reqs)


def test_tiered_relabels_every_request() -> None:
    inner = BatchSource("eu", 1, 1.0, LogNormal(10, 0.1), LogNormal(5, 0.1), 60.0, seed=1)
    t = Tiered(inner, INTERACTIVE)
    first = t.start(0.0)
    assert [r.tier for r in first] == [INTERACTIVE]
    assert [r.tier for r in t.on_sent(first[0], 1.0)] == [INTERACTIVE]


def test_attainment_counts_the_window_and_the_right_clock() -> None:
    w = ts.Window(100.0, 10.0, 50.0)

    def rec(tier: str, sent: float, first: float | None, done: float | None,
            deadline: float) -> RequestRecord:
        return RequestRecord(0, "c", "us", "u", "k", sent, 10, 10, first_token=first, done=done,
                             tier=tier, deadline=deadline)

    records = [rec(INTERACTIVE, 20, 20.5, 30, 21), rec(INTERACTIVE, 20, 21.5, 30, 21),
               rec(INTERACTIVE, 5, 99, 99, 6),  # before the window: not counted
               rec(BATCH, 20, 21, 60, 80), rec(BATCH, 20, 21, 90, 80),
               rec(BATCH, 30, None, None, 90)]
    assert ts.attainment(records, INTERACTIVE, w) == (0.5, 2)
    att, n = ts.attainment(records, BATCH, w)
    assert n == 3 and math.isclose(att, 1 / 3)
    assert math.isnan(ts.attainment([], BATCH, w)[0])


def test_short_sweep_reports_every_run_and_the_best_fleets() -> None:
    setup = dataclasses.replace(
        ts.SETUP, interactive_peak_per_region=0.3, batch_rate_per_region=0.3,
        tiers=TierConfig(interactive_ttft=1.0, batch_deadline=30.0, promote_before=10.0),
        horizon_s=40.0, warmup_s=10.0, drain_s=40.0)
    opts = ts.Options(shared_sizes=(3,), silo_interactive_sizes=(3,), silo_batch_sizes=(3,))
    report = ts.run(opts, "test", setup)
    labels = [r.variant for r in report.runs]
    assert labels == ["silo-interactive-3", "silo-batch-3", "shared-fcfs-3", "kvmesh-tiers-3"]
    for r in report.runs:
        c = r.config
        assert c["replica_hours"] == round(3 * 30.0 / 3600, 4)
        assert isinstance(c["meets_target"], bool)
    silo_i, silo_b, fcfs, tiers = (r.config for r in report.runs)
    assert silo_i["batch_requests"] == 0 and silo_i["interactive_requests"] > 0
    assert silo_b["interactive_requests"] == 0 and silo_b["batch_requests"] > 0
    assert fcfs["batch_requests"] == tiers["batch_requests"] > 0
    assert fcfs["waits"] == 0  # FCFS: nothing held
    best = report.params["best"]
    assert isinstance(best, dict) and set(best) == {"siloed", "shared-fcfs", "kvmesh-tiers"}
    assert any("replica-hours" in n or "no size" in n for n in report.notes)
    assert ts.table(report.runs).count("\n") == 2 + len(report.runs)
