"""``sageserve-tiers``: interactive and batch work on siloed pools, one FCFS pool, or tiers.

SageServe (arXiv 2502.14617) serves latency-sensitive (IW) and deadline-bound batch (NIW)
traffic from one fleet and reports that a unified pool needs fewer instance-hours than
separate ones. Here: 3 regions of one continent (US east / central / west: 25-75 ms apart, UTC
-5 / -6 / -8, so their days nearly coincide), L4 + Llama-3.1-8B engines, ChatBot-Arena-like
conversations whose arrivals follow each region's day (compressed to ``day_s``, 8x peak to
trough) as the interactive tier, plus a steady open-loop batch stream per region with a
completion deadline. Fleets are fixed in size for the whole run, so replica-hours are
replicas x measured window (virtual hours of the compressed day).

Variants, each at several fleet sizes, tried smallest first until one meets the target (the
sweep assumes that a larger fleet of the same kind meets it too; it is not run):

``siloed``
    Two pools run apart: interactive conversations alone on ``k`` replicas per region, and
    batch alone on ``m`` replicas (spread over the regions). Both kvmesh, FCFS. The siloed
    fleet for a target is the smallest interactive pool meeting it plus the smallest batch
    pool meeting it, so its figure is a lower bound on what any siloed deployment needs.
``shared-fcfs``
    One pool of ``k`` per region takes everything, every request alike (kvmesh, FCFS).
``kvmesh-tiers``
    The same pool with service tiers: interactive first, batch held for spare capacity
    anywhere in the mesh, promoted near its deadline, shed (429, retried) when the
    interactive SLO is at risk.

Attainment: interactive requests sent in the measured window whose TTFT is within the
interactive target; batch requests sent in the window that completed by their deadline.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from mesh.tiers import BATCH, INTERACTIVE, TierConfig
from sim.fleet import Fleet, FleetResult, FleetSpec
from sim.metrics import RequestRecord, summarize
from sim.profiles import L4_LLAMA_3_1_8B
from sim.report import RunResult, ScenarioReport
from sim.scenarios import PER_REGION
from sim.topology import Topology
from sim.workloads import ARENA, DiurnalShape, Workload
from sim.workloads.base import Client, LogNormal
from sim.workloads.batch import BatchSource, Tiered
from sim.workloads.chat import UserPrefixes
from sim.workloads.diurnal import DiurnalChatSource

NAME = "sageserve-tiers"
TITLE = "SageServe tiers: diurnal interactive + steady batch, siloed vs shared vs tiers"
TARGET = 0.99
REGIONS = ("us-east", "us-central", "us-west")
UTC_OFFSETS = {"us-east": -5.0, "us-central": -6.0, "us-west": -8.0}
TOPOLOGY = Topology.build(
    REGIONS,
    {("us-east", "us-central"): (25, 35), ("us-east", "us-west"): (60, 75),
     ("us-central", "us-west"): (40, 50)},
    intra_ms=(1, 2),
)
"""Public inter-region RTTs of US cloud regions (Virginia, Iowa, Oregon), roughly."""


BATCH_PROMPT = LogNormal(median=400, sigma=0.5, lo=32, hi=2000)
BATCH_OUTPUT = LogNormal(median=300, sigma=0.4, lo=8, hi=512)
TIERS = TierConfig(
    interactive_ttft=1.0,
    batch_deadline=600.0,
    promote_before=60.0,
    batch_kv_below=0.5,
    batch_running_below=10,
)
"""Interactive: TTFT within 1 s (SageServe's IW-F). Batch: done within one (compressed) day,
as SageServe's NIW within 24 h; fed to replicas under half KV use, as SageServe's
``feed_async`` does below 0.5 memory utilisation, and only to replicas running fewer than 10
sequences (chosen on seed 1 among 2, 6, 10, 16 and unbounded: docs/evaluation.md)."""


@dataclass(frozen=True, slots=True)
class TierSetup:
    day_s: float = 600.0
    interactive_peak_per_region: float = 1.5
    """Conversation starts per second at a region's local peak."""
    think_time_s: float = 3.0
    batch_rate_per_region: float = 1.0
    """Batch requests per second per region, steady."""
    batch_prompt: LogNormal = BATCH_PROMPT
    batch_output: LogNormal = BATCH_OUTPUT
    tiers: TierConfig = TIERS
    horizon_s: float = 660.0
    """Requests sent in [warmup_s, horizon_s) are measured: one whole day."""
    warmup_s: float = 60.0
    drain_s: float = 60.0
    """After the load ends. Both streams keep coming until every measured batch request's
    deadline has passed, so deferred batch work never finds an empty fleet at the end."""
    shared_sizes: tuple[int, ...] = (7, 8, 9, 10)
    """Replicas in all (spread over the regions) tried for the shared pools."""
    silo_interactive_sizes: tuple[int, ...] = (7, 8, 9, 10)
    silo_batch_sizes: tuple[int, ...] = (1, 2, 3)


SETUP = TierSetup()


def _workload(setup: TierSetup, seed: int, horizon: float, *, interactive: bool = True,
              batch: bool = True) -> Workload:
    clients: list[Client] = []
    if interactive:
        profile = replace(ARENA, think_time_s=setup.think_time_s)
        prefixes = UserPrefixes(profile, seed)
        shape = DiurnalShape(day_s=setup.day_s)
        clients += [Tiered(DiurnalChatSource(r, i, profile, prefixes, shape, UTC_OFFSETS[r],
                                             setup.interactive_peak_per_region, 400, seed),
                           INTERACTIVE)
                    for i, r in enumerate(REGIONS)]
    if batch:
        clients += [BatchSource(r, 100 + i, setup.batch_rate_per_region, setup.batch_prompt,
                                setup.batch_output, setup.tiers.batch_deadline, seed)
                    for i, r in enumerate(REGIONS)]
    return Workload("sageserve-tiers", clients, horizon)


def _spread(n: int) -> dict[str, int]:
    """``n`` replicas over the regions, the first regions getting one more."""
    return {r: n // len(REGIONS) + (1 if i < n % len(REGIONS) else 0)
            for i, r in enumerate(REGIONS)}


@dataclass(slots=True)
class PoolRun:
    """One fleet of one size, run once."""

    label: str
    replicas: dict[str, int]
    result: FleetResult
    wall_s: float
    interactive_attainment: float
    batch_attainment: float
    interactive: int
    batch: int
    shed: int


@dataclass(slots=True)
class Window:
    horizon: float
    """End of the measured window (requests sent before it count)."""
    warmup: float
    drain: float
    load_until: float = 0.0
    """When the clients stop sending (at least ``horizon``)."""


def attainment(records: Sequence[RequestRecord], tier: str, w: Window) -> tuple[float, int]:
    """Share of ``tier``'s requests sent in the window that met their SLO, and how many."""
    mine = [r for r in records if r.tier == tier and w.warmup <= r.sent < w.horizon]
    if not mine:
        return math.nan, 0
    if tier == BATCH:
        met = sum(1 for r in mine if r.done is not None and r.done <= r.deadline)
    else:
        met = sum(1 for r in mine if r.first_token is not None and r.first_token <= r.deadline)
    return met / len(mine), len(mine)


def _run_pool(setup: TierSetup, label: str, replicas: dict[str, int], seed: int, w: Window,
              *, tiers_on: bool, interactive: bool = True, batch: bool = True,
              progress: Callable[[str, float, float], None] | None = None) -> PoolRun:
    spec = FleetSpec(topology=TOPOLOGY, replicas={k: v for k, v in replicas.items() if v},
                     profile=L4_LLAMA_3_1_8B, policy="kvmesh", layout=PER_REGION,
                     plane="mesh", prefix="events", seed=seed, label=label,
                     tiers=replace(setup.tiers, enabled=tiers_on))
    started = time.perf_counter()
    fleet = Fleet(spec)
    end = max(w.load_until, w.horizon) + w.drain
    cb = None if progress is None else (lambda now: progress(label, now, end))
    until = max(w.load_until, w.horizon)
    result = fleet.run(_workload(setup, seed, until, interactive=interactive, batch=batch),
                       drain_s=w.drain, progress=cb)
    ia, ni = attainment(result.records, INTERACTIVE, w)
    ba, nb = attainment(result.records, BATCH, w)
    return PoolRun(label, dict(replicas), result, time.perf_counter() - started, ia, ba, ni, nb,
                   result.counters.shed)


def replica_hours(replicas: dict[str, int], w: Window) -> float:
    return sum(replicas.values()) * (w.horizon - w.warmup) / 3600.0


@dataclass(slots=True)
class Options:
    seed: int = 1
    quick: bool = False
    horizon_s: float | None = None
    shared_sizes: tuple[int, ...] = ()
    silo_interactive_sizes: tuple[int, ...] = ()
    silo_batch_sizes: tuple[int, ...] = ()
    only: tuple[str, ...] = field(default_factory=tuple)


def window(setup: TierSetup, opts: Options) -> Window:
    horizon = opts.horizon_s or setup.horizon_s
    warmup, drain = setup.warmup_s, setup.drain_s
    if opts.quick:
        horizon, warmup = horizon / 5, warmup / 5
    # load goes on until every batch request sent in the window has met its deadline or not
    return Window(horizon, warmup, drain, horizon + setup.tiers.batch_deadline)


def _run_result(p: PoolRun, w: Window, variant: str, meets: bool, extra: dict[str, object]
                ) -> RunResult:
    summary = summarize(p.label, p.result.records, p.result.counters, warmup=w.warmup,
                        horizon=w.horizon)
    ttfts = [r.ttft for r in p.result.records
             if w.warmup <= r.sent < w.horizon and r.tier == INTERACTIVE]
    return RunResult(
        variant=p.label, summary=summary, ttfts=ttfts, wall_s=p.wall_s,
        events=p.result.events,
        config={
            "variant": variant, "policy": "kvmesh", "plane": "mesh",
            "replicas": p.replicas, "replica_hours": round(replica_hours(p.replicas, w), 4),
            "interactive_ttft_attainment": _r(p.interactive_attainment),
            "batch_deadline_attainment": _r(p.batch_attainment),
            "interactive_requests": p.interactive, "batch_requests": p.batch,
            "shed": p.shed, "meets_target": meets, "waits": p.result.counters.waits,
            "rejected": p.result.counters.rejected, **extra,
        },
    )


def _r(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 5)


def _ok(x: float) -> bool:
    return not math.isnan(x) and x >= TARGET


def run(opts: Options, command: str, setup: TierSetup = SETUP,
        progress: Callable[[str, float, float], None] | None = None) -> ScenarioReport:
    w = window(setup, opts)
    shared = opts.shared_sizes or setup.shared_sizes
    silo_i = opts.silo_interactive_sizes or setup.silo_interactive_sizes
    silo_b = opts.silo_batch_sizes or setup.silo_batch_sizes
    want = set(opts.only or ("siloed", "shared-fcfs", "kvmesh-tiers"))
    runs: list[RunResult] = []
    best: dict[str, tuple[float, str] | None] = {}
    if "siloed" in want:
        best_i: PoolRun | None = None
        for k in silo_i:
            p = _run_pool(setup, f"silo-interactive-{k}", _spread(k),
                          opts.seed, w, tiers_on=False, batch=False, progress=progress)
            ok = _ok(p.interactive_attainment)
            runs.append(_run_result(p, w, "siloed (interactive pool)", ok, {}))
            if ok:
                best_i = p
                break
        best_b: PoolRun | None = None
        for m in silo_b:
            p = _run_pool(setup, f"silo-batch-{m}", _spread(m), opts.seed, w, tiers_on=False,
                          interactive=False, progress=progress)
            ok = _ok(p.batch_attainment)
            runs.append(_run_result(p, w, "siloed (batch pool)", ok, {}))
            if ok:
                best_b = p
                break
        best["siloed"] = None if best_i is None or best_b is None else (
            replica_hours(best_i.replicas, w) + replica_hours(best_b.replicas, w),
            f"{best_i.label} + {best_b.label}")
    for variant, on in (("shared-fcfs", False), ("kvmesh-tiers", True)):
        if variant not in want:
            continue
        best[variant] = None
        for k in shared:
            p = _run_pool(setup, f"{variant}-{k}", _spread(k), opts.seed, w,
                          tiers_on=on, progress=progress)
            ok = _ok(p.interactive_attainment) and _ok(p.batch_attainment)
            runs.append(_run_result(p, w, variant, ok, {}))
            if ok:
                best[variant] = (replica_hours(p.replicas, w), p.label)
                break
    notes = [f"- target: interactive TTFT <= {setup.tiers.interactive_ttft:g} s and batch "
             f"completed within {setup.tiers.batch_deadline:g} s, each for >= "
             f"{100 * TARGET:g}% of the requests sent in the window."]
    for variant, got in best.items():
        if got is None:
            notes.append(f"- {variant}: no size tried meets the target.")
        else:
            notes.append(f"- {variant}: smallest fleet meeting the target {got[1]}, "
                         f"{got[0]:.3f} replica-hours.")
    silo, tiers = best.get("siloed"), best.get("kvmesh-tiers")
    if silo is not None and tiers is not None:
        notes.append(f"- kvmesh-tiers vs siloed: {100 * (tiers[0] / silo[0] - 1):+.1f}% "
                     "replica-hours for the same target.")
    params: dict[str, object] = {
        "seed": opts.seed, "horizon_s": w.horizon, "warmup_s": w.warmup, "drain_s": w.drain,
        "load_until_s": w.load_until,
        "profile": L4_LLAMA_3_1_8B.name, "regions": list(REGIONS),
        "day_s": setup.day_s, "interactive_peak_per_region": setup.interactive_peak_per_region,
        "batch_rate_per_region": setup.batch_rate_per_region,
        "tiers": {"interactive_ttft": setup.tiers.interactive_ttft,
                  "batch_deadline": setup.tiers.batch_deadline,
                  "promote_before": setup.tiers.promote_margin,
                  "batch_kv_below": setup.tiers.batch_kv_below,
                  "batch_running_below": setup.tiers.batch_running_below},
        "target": TARGET, "shared_sizes": list(shared),
        "silo_interactive_sizes": list(silo_i), "silo_batch_sizes": list(silo_b),
        "best": {k: (None if v is None else {"replica_hours": round(v[0], 4), "fleet": v[1]})
                 for k, v in best.items()},
    }
    return ScenarioReport(NAME, TITLE, command, __doc__ or "", runs, params, notes)


def table(runs: Sequence[RunResult]) -> str:
    """The tier figures of every run, one row each (markdown)."""
    head = ("| run | replicas | replica-hours | interactive TTFT SLO | batch deadline | "
            "shed | interactive TTFT p99 (s) | meets |\n|---|---:|---:|---:|---:|---:|---:|---|\n")
    rows = []
    for r in runs:
        c = r.config
        reps = c.get("replicas")
        n = sum(reps.values()) if isinstance(reps, dict) else 0

        def pct(x: object) -> str:
            return "-" if not isinstance(x, float) else f"{100 * x:.2f}%"

        rows.append(f"| {r.variant} | {n} | {c.get('replica_hours')} | "
                    f"{pct(c.get('interactive_ttft_attainment'))} | "
                    f"{pct(c.get('batch_deadline_attainment'))} | {c.get('shed')} | "
                    f"{_p99(r.ttfts)} | {'yes' if c.get('meets_target') else 'no'} |")
    return head + "\n".join(rows) + "\n"


def _p99(xs: Sequence[float]) -> str:
    from sim.metrics import percentile

    v = percentile(list(xs), 99)
    return "-" if math.isnan(v) else "inf" if math.isinf(v) else f"{v:.3f}"
