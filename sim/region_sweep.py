"""``kvmesh bench region-sweep``: does forwarding pay, from a light to an overloaded home region?

The ``region-skew`` scenario (``sim/scenarios.py``): us / eu / asia, two simulated L4 engines
each, round trips of 80 / 150 / 200 ms (not scaled), multi-turn chat users skewed 32 / 6 / 3
towards us, times a load factor. At every load point, on real processes (``sim/localmesh.py``,
one run at a time, fresh routers and cold engine caches per variant) and in the simulator on
the same scaled fleet:

- ``kvmesh``: one router per region, peers of each other (forwarding allowed);
- ``kvmesh-no-peers``: the same routers, each alone with its region's engines;
- ``precise_prefix-local``: a single-region cache-and-load-aware policy per region (the
  simulator also runs ``least_load-local``; the best single-region policy of each region is
  reported).

No router is told its engines' prefill rate (default configuration): the cost model learns it
(``mesh/calibration.py``). Latency and throughput are measured over ``[warmup, horizon)``; the
mesh variant runs on to ``mesh_horizon`` so its prediction error is measured on requests sent
after ``error_after`` seconds (the one-minute warm-up). Ratios come from one run, side by side.

One window's p90 ratio at an overloaded home moves by 15% on the routers' near-tie draws
alone, so ``--seeds`` runs every variant on several seeds and judges the figures over their
requests pooled (``sim/sweep_pool.py``), each seed's own beside them; ``--emulated-from``
pools the emulated rows of earlier runs (one locked command a seed) with a fresh simulator
side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp

from sim import error_parts
from sim.emulation import (
    EmulatedVariant,
    EmulationPlan,
    ObservedFleet,
    Scaled,
    _local_spec,
    emulate_variant,
    scaled_profile,
)
from sim.localmesh import LocalMesh
from sim.metrics import RequestRecord, RunCounters, Summary, percentile, summarize
from sim.scenarios import PER_REGION, region_skew_workload, skew_clients
from sim.sweep_pool import PickSpread, PooledRatio, pick_one_per_seed, pooled_ratio, relative
from sim.workloads import Workload

SCENARIO = "region-skew"
MESH = "kvmesh"
NO_PEERS = "kvmesh-no-peers"
CALIBRATED = {"calibrated": True}
"""``--calibrated``: the kvmesh variants ranking by the learned figures (opt-in, docs/router.md)."""
EMULATED = (
    EmulatedVariant(MESH, "kvmesh", set_prefill_rate=False),
    EmulatedVariant(NO_PEERS, "kvmesh", peers=False, set_prefill_rate=False),
    EmulatedVariant("precise_prefix-local", "precise_prefix", peers=False,
                    set_prefill_rate=False),
)
SIMULATED_ONLY = (
    EmulatedVariant("least_load-local", "least_load", peers=False, set_prefill_rate=False),
)
SINGLE_REGION = ("kvmesh-no-peers", "precise_prefix-local", "least_load-local")
AGREE = 0.10
LIGHT, OVERLOADED = 1.0, 3.0
"""Load factors at or below which the home region is light (the mesh must not cost more
than 5%), and at or above which it is overloaded (the mesh must pay): a run of other loads
only is not judged on that check."""
"""The simulator and the emulation agree on the mesh / no-peers ratio within this."""


@dataclass(frozen=True, slots=True)
class SweepPlan:
    speedup: float = 2.5
    loads: tuple[float, ...] = (1.0, 2.0, 3.0)
    """Multiples of the 32 / 6 / 3 users."""
    warmup_s: float = 15.0
    horizon_s: float = 60.0
    mesh_horizon_s: float = 75.0
    error_after_s: float = 60.0
    drain_s: float = 10.0
    seeds: tuple[int, ...] = (1,)
    """Seeds of the measured runs, emulated and simulated, every variant (each seed's
    variants on fresh routers and cold engines). With several, every figure is over their
    requests pooled, each seed's own beside it: at an overloaded home one window's p90 ratio
    moves by 15% on the routers' near-tie draws alone (``sim/sweep_pool.py``)."""
    sim_seeds: tuple[int, ...] = ()
    """Seeds of the simulator's resolution runs (mesh and no-peers only, ``sim_horizon_s``
    long): one short p90 rests on a few dozen tail requests and cannot resolve 5%."""
    sim_horizon_s: float = 300.0
    variants: tuple[str, ...] = ()
    """Labels of the variants to run (empty: all). Mesh and no-peers alone are what the
    ratio needs: a longer window then fits one locked command."""
    calibrated: bool = False
    """False: the kvmesh variants run the policy's default parameters (what a router
    configured with nothing does). True (``--calibrated``): with ``calibrated: true``, the
    learned figures and the forwarding band ranking the replicas."""
    sim_ties: int = 0
    """Near-tie streams of the simulator's twin runs (``FleetSpec.tie_stream`` 0..n-1): the
    emulation's seed and window, only the routers' random draws changed. Every emulated run
    replays that one seed, and timing makes its decisions part from the simulator's after
    the first different draw: the twins show how far one window moves on that alone.
    Run for every seed of ``seeds``; the simulator's pooled figure is over all of them."""

    def emulation_plan(self, load: float, horizon: float) -> EmulationPlan:
        return EmulationPlan(
            scenario=SCENARIO, speedup=self.speedup, horizon_s=horizon,
            warmup_s=self.warmup_s, drain_s=self.drain_s, load=load,
            load_unit="x 32/6/3 users", scenario_load="1", workload=_workload,
            variants=(*self.emulated(), *SIMULATED_ONLY),
            defaults=tuple(v.label for v in EMULATED),
            rtt_scale=1.0,
        )

    def emulated(self) -> tuple[EmulatedVariant, ...]:
        """:data:`EMULATED` with the kvmesh variants' parameters this plan measures."""
        if not self.calibrated:
            return EMULATED
        return tuple(replace(v, params={**v.params, **CALIBRATED})
                     if v.label in (MESH, NO_PEERS) else v for v in EMULATED)

    def runs(self, variants: Sequence[EmulatedVariant]) -> list[EmulatedVariant]:
        return [v for v in variants if not self.variants or v.label in self.variants]

    def horizon_of(self, label: str) -> float:
        return self.mesh_horizon_s if label == MESH else self.horizon_s


def _workload(seed: int, horizon: float, speedup: float, load: float,
              regions: Sequence[str]) -> Workload:
    return region_skew_workload(seed, horizon, load, speedup)


def _scaled(plan: SweepPlan, load: float, horizon: float, seed: int) -> Scaled:
    ep = plan.emulation_plan(load, horizon)
    sc, topo, replicas = ep.fleet()
    return Scaled(ep, sc, topo, replicas, scaled_profile(sc.profile, plan.speedup), seed)


# -- one measured run ----------------------------------------------------------------------------


@dataclass(slots=True)
class Row:
    load: float
    variant: str
    side: str
    """``emulated`` or ``simulated``."""
    summary: Summary
    region_p90: dict[str, float]
    errors: dict[str, dict[str, float | int | None]]
    """Per route kind: median |observed - predicted| / observed of requests sent after the
    warm-up, at the client, and how many."""
    routers: dict[str, Any] = field(default_factory=dict)
    """The routers' own error windows and learned figures (``/mesh/status`` ttft_model)."""
    trace: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Per router: its newest outcomes, predicted parts beside the observed TTFT
    (``/dashboard/api/outcomes``), for taking the error apart."""
    machine: dict[str, Any] = field(default_factory=dict)
    """Emulated runs: what the processes cost and how late the load generator was (mean
    cores by kind of process, lag p50 / p99, the engines' own mean TTFT in real seconds):
    what the simulator does not model."""
    seed: int = 1
    window: dict[str, tuple[float, ...]] = field(default_factory=dict)
    """Per client region, the TTFTs of the requests sent in ``[warmup, horizon)`` (what
    pooling over seeds needs)."""
    rel_errors: dict[str, tuple[float, ...]] = field(default_factory=dict)
    """Per route kind, the relative errors ``errors`` takes the median of."""


def _rel_errors(records: Sequence[RequestRecord], after: float) -> dict[str, tuple[float, ...]]:
    return {kind: tuple(abs(r.ttft - r.predicted_ttft) / r.ttft for r in records
                        if r.sent >= after and r.predicted_ttft is not None
                        and r.first_token is not None and r.ttft > 0
                        and (r.forwards > 0) == (kind == "forwarded"))
            for kind in ("local", "forwarded")}


def _medians(rel: Mapping[str, Sequence[float]]) -> dict[str, dict[str, Any]]:
    return {kind: {"median_abs_rel_error": round(statistics.median(xs), 4) if xs else None,
                   "n": len(xs)} for kind, xs in rel.items()}


def _row(plan: SweepPlan, load: float, label: str, side: str, seed: int,
         records: Sequence[RequestRecord], counters: RunCounters) -> Row:
    s = summarize(label, records, counters, warmup=plan.warmup_s, horizon=plan.horizon_s)
    measured = [r for r in records if plan.warmup_s <= r.sent < plan.horizon_s]
    regions = sorted({r.region for r in measured})
    window = {g: tuple(r.ttft for r in measured if r.region == g) for g in regions}
    p90 = {g: round(percentile(window[g], 90), 4) for g in regions}
    rel = _rel_errors(records, plan.error_after_s) if label == MESH else {}
    return Row(load, label, side, s, p90, _medians(rel), seed=seed, window=window,
               rel_errors=rel)


def simulate(plan: SweepPlan, load: float, v: EmulatedVariant, seed: int) -> Row:
    scaled = _scaled(plan, load, plan.horizon_of(v.label), seed)
    spec = scaled.spec(v.label, v.policy, v.params, PER_REGION, "mesh", "events")
    spec = replace(spec, region_local=not v.peers, configured_rate=v.set_prefill_rate)
    fleet = ObservedFleet(spec)
    result = fleet.run(scaled.workload(), drain_s=plan.drain_s)
    row = _row(plan, load, v.label, "simulated", seed, result.records, result.counters)
    if v.label == MESH:
        row.routers = {r.id: r.outcomes.status() for r in fleet.routers}
        row.trace = {r.id: r.outcomes.recent() for r in fleet.routers}
    return row


async def emulate(mesh: LocalMesh, session: aiohttp.ClientSession, plan: SweepPlan,
                  load: float, v: EmulatedVariant, seed: int, log: Any) -> Row:
    scaled = _scaled(plan, load, plan.horizon_of(v.label), seed)
    status: dict[str, Any] = {}
    trace: dict[str, list[dict[str, Any]]] = {}
    blind: dict[str, list[str]] = {}

    async def read_status() -> None:
        for region, url in mesh.router_urls.items():
            try:
                async with session.get(f"{url}/mesh/status") as resp:
                    doc = await resp.json(content_type=None)
                async with session.get(f"{url}/dashboard/api/outcomes") as resp:
                    outcomes = await resp.json(content_type=None)
            except (aiohttp.ClientError, ValueError):
                continue
            if not isinstance(doc, dict):
                continue
            blind[region] = _index_flags(doc)
            if v.label != MESH:
                continue
            if "ttft_model" in doc:
                status[region] = doc["ttft_model"]
            if isinstance(outcomes, dict) and isinstance(outcomes.get("outcomes"), list):
                trace[region] = outcomes["outcomes"]

    run = await emulate_variant(mesh, session, scaled, v, log, read_status)
    records = [o.record for o in run.observations]
    counters = RunCounters()
    row = _row(plan, load, v.label, "emulated", seed, records, counters)
    row.routers = status
    row.trace = trace
    lags = [o.lag for o in run.observations]
    row.machine = {"cpu_cores": run.cpu_cores,
                   "lag_p50_s": round(percentile(lags, 50), 4) if lags else None,
                   "lag_p99_s": round(run.lag_p99, 4) if lags else None,
                   "engine_ttft_mean_s": round(run.engine_ttft_mean, 4)
                   if math.isfinite(run.engine_ttft_mean) else None,
                   "engine_pace": run.engine_pace,
                   "failed": run.failed, "wall_s": round(run.wall_s, 1),
                   "index_flags": {g: f for g, f in sorted(blind.items()) if f}}
    return row


def _index_flags(doc: dict[str, Any]) -> list[str]:
    """Engines whose prefix matches a router did not trust at the end of a run (``flag``
    from ``mesh.selfcheck``) or whose event stream it holds only in part."""
    precision = doc.get("precision")
    if not isinstance(precision, dict):
        return []
    out = []
    engines = precision.get("engines")
    for replica, e in sorted(engines.items() if isinstance(engines, dict) else []):
        if isinstance(e, dict) and e.get("flag"):
            out.append(f"{replica} {e['flag']}")
    decoders = precision.get("decoders")
    for replica, d in sorted(decoders.items() if isinstance(decoders, dict) else []):
        if isinstance(d, dict) and d.get("partial") and not any(
                x.startswith(f"{replica} ") for x in out):
            out.append(f"{replica} partial stream")
    return out


# -- the sweep ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pair:
    """One resolution run: the mesh and no-peers on one seed, long window, simulator."""

    load: float
    seed: int
    mesh: tuple[float, ...]
    """TTFTs of the requests sent in the measured window."""
    no_peers: tuple[float, ...]
    forwarded: float
    """Share of the mesh's measured requests that were forwarded."""

    def ratio(self) -> float:
        return percentile(list(self.mesh), 90) / percentile(list(self.no_peers), 90)


def simulate_pair(plan: SweepPlan, load: float, seed: int) -> Pair:
    """Mesh and no-peers on ``seed`` over ``[warmup, sim_horizon)`` (the resolution runs)."""
    p = replace(plan, horizon_s=plan.sim_horizon_s, mesh_horizon_s=plan.sim_horizon_s)
    out: dict[str, list[RequestRecord]] = {}
    for v in p.emulated()[:2]:
        scaled = _scaled(p, load, p.sim_horizon_s, seed)
        spec = scaled.spec(v.label, v.policy, v.params, PER_REGION, "mesh", "events")
        spec = replace(spec, region_local=not v.peers, configured_rate=v.set_prefill_rate)
        result = ObservedFleet(spec).run(scaled.workload(), drain_s=p.drain_s)
        out[v.label] = [r for r in result.records if p.warmup_s <= r.sent < p.sim_horizon_s]
    mesh = out[MESH]
    return Pair(load, seed, tuple(r.ttft for r in mesh), tuple(r.ttft for r in out[NO_PEERS]),
                sum(1 for r in mesh if r.forwards) / len(mesh) if mesh else 0.0)


@dataclass(frozen=True, slots=True)
class Twin:
    """The mesh / no-peers p90 ratio of an emulated seed and window, simulated with the
    routers' near-tie stream ``stream``."""

    load: float
    stream: int
    ratio: float
    forwarded: float
    seed: int = 1
    mesh: tuple[float, ...] = ()
    """TTFTs of the requests sent in the window (what pooling needs)."""
    no_peers: tuple[float, ...] = ()


def simulate_twin(plan: SweepPlan, load: float, stream: int, seed: int) -> Twin:
    """Mesh and no-peers on an emulated seed over ``[warmup, horizon)``, tie stream
    ``stream`` (0: the simulated rows of the tables)."""
    p90: dict[str, float] = {}
    ttfts: dict[str, tuple[float, ...]] = {}
    forwarded = 0.0
    for v in plan.emulated()[:2]:
        scaled = _scaled(plan, load, plan.horizon_s, seed)
        spec = scaled.spec(v.label, v.policy, v.params, PER_REGION, "mesh", "events")
        spec = replace(spec, region_local=not v.peers, configured_rate=v.set_prefill_rate,
                       tie_stream=stream)
        result = ObservedFleet(spec).run(scaled.workload(), drain_s=plan.drain_s)
        window = [r for r in result.records if plan.warmup_s <= r.sent < plan.horizon_s]
        ttfts[v.label] = tuple(r.ttft for r in window)
        p90[v.label] = percentile(ttfts[v.label], 90)
        if v.label == MESH and window:
            forwarded = sum(1 for r in window if r.forwards) / len(window)
    return Twin(load, stream, p90[MESH] / p90[NO_PEERS], forwarded, seed, ttfts[MESH],
                ttfts[NO_PEERS])


@dataclass(frozen=True, slots=True)
class Pool:
    """One variant on one side at one load, over the requests of every seed run pooled
    (with one seed: that run's own figures)."""

    seeds: tuple[int, ...]
    sent: int
    ttft_p90: float
    ttft_p99: float
    ttft_mean: float
    throughput_rps: float
    """Mean over the seeds (every seed has the same window)."""
    forwarded: float
    region_p90: dict[str, float]
    errors: dict[str, dict[str, Any]]
    """As ``Row.errors``, the median over every seed's requests."""


def pool(rows: Sequence[Row]) -> Pool:
    ttfts = [x for r in rows for w in r.window.values() for x in w]
    finite = [x for x in ttfts if math.isfinite(x)]
    regions = sorted({g for r in rows for g in r.window})
    sent = sum(r.summary.sent for r in rows)
    kinds = sorted({k for r in rows for k in r.rel_errors})
    return Pool(
        seeds=tuple(r.seed for r in rows), sent=sent,
        ttft_p90=percentile(ttfts, 90), ttft_p99=percentile(ttfts, 99),
        ttft_mean=statistics.fmean(finite) if finite else math.nan,
        throughput_rps=statistics.fmean(r.summary.throughput_rps for r in rows),
        forwarded=sum(r.summary.router_forwards for r in rows) / sent if sent else math.nan,
        region_p90={g: round(percentile([x for r in rows for x in r.window.get(g, ())], 90), 4)
                    for g in regions},
        errors=_medians({k: [x for r in rows for x in r.rel_errors.get(k, ())] for k in kinds}))


@dataclass(slots=True)
class Sweep:
    plan: SweepPlan
    command: str
    rows: list[Row]
    wall_s: float
    load_average: tuple[float, float, float]
    pairs: list[Pair] = field(default_factory=list)
    twins: list[Twin] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)
    """Earlier runs whose emulated rows this one pools (``--emulated-from``)."""

    def twin_spread(self, load: float, seed: int | None = None) -> dict[str, Any] | None:
        """The twins of ``seed`` (default: the first) at ``load``: ratios, mean, sd, range
        (None: no twins run)."""
        seed = self.plan.seeds[0] if seed is None else seed
        ts = [t for t in self.twins if t.load == load and t.seed == seed]
        if not ts:
            return None
        ratios = [t.ratio for t in ts]
        return {"seed": seed, "streams": [t.stream for t in ts],
                "ratios": [round(r, 4) for r in ratios],
                "mean": statistics.fmean(ratios),
                "sd": statistics.stdev(ratios) if len(ratios) > 1 else 0.0,
                "range": (min(ratios), max(ratios)),
                "forwarded": statistics.fmean(t.forwarded for t in ts)}

    def resolution(self, load: float) -> dict[str, Any] | None:
        """The resolution runs at ``load``: per-seed p90 ratios, their mean and spread, and
        the ratio of the p90s of every seed's requests pooled."""
        ps = [p for p in self.pairs if p.load == load]
        if not ps:
            return None
        ratios = [p.ratio() for p in ps]
        pooled = pooled_ratio([p.mesh for p in ps], [p.no_peers for p in ps])
        return {
            "seeds": [p.seed for p in ps], "ratios": [round(r, 4) for r in ratios],
            "mean": statistics.fmean(ratios),
            "sd": statistics.stdev(ratios) if len(ratios) > 1 else 0.0,
            "pooled_p90": (pooled.mesh_p90, pooled.alone_p90),
            "pooled": pooled.ratio,
            "requests": pooled.requests,
            "forwarded": statistics.fmean(p.forwarded for p in ps),
        }

    def get(self, load: float, variant: str, side: str, seed: int | None = None) -> Row | None:
        """The run of ``seed`` (default: the first)."""
        seed = self.plan.seeds[0] if seed is None else seed
        for r in self.rows:
            if r.load == load and r.variant == variant and r.side == side and r.seed == seed:
                return r
        return None

    def pooled(self, load: float, variant: str, side: str) -> Pool | None:
        """Every seed's run of ``variant`` pooled (None: not run)."""
        rows = [r for r in self.rows if r.load == load and r.variant == variant
                and r.side == side]
        return pool(rows) if rows else None

    def ratio(self, load: float, side: str, metric: str = "ttft_p90") -> float | None:
        """Mesh over no-peers, every seed pooled."""
        a, b = self.pooled(load, MESH, side), self.pooled(load, NO_PEERS, side)
        if a is None or b is None:
            return None
        x, y = getattr(a, metric), getattr(b, metric)
        return x / y if y and math.isfinite(x) and math.isfinite(y) else None

    def seed_ratio(self, load: float, side: str, seed: int) -> float | None:
        a, b = self.get(load, MESH, side, seed), self.get(load, NO_PEERS, side, seed)
        if a is None or b is None:
            return None
        r = pool([a]).ttft_p90 / pool([b]).ttft_p90
        return r if math.isfinite(r) else None

    def simulated_pooled(self, load: float) -> tuple[PooledRatio, int] | None:
        """The simulator's mesh / no-peers p90 ratio over every seed and, when twins ran,
        every twin of every seed, pooled; and how many runs of each variant that is."""
        ts = [t for t in self.twins if t.load == load]
        if ts:
            return pooled_ratio([t.mesh for t in ts], [t.no_peers for t in ts]), len(ts)
        rows = {v: [r for r in self.rows if r.load == load and r.variant == v
                    and r.side == "simulated"] for v in (MESH, NO_PEERS)}
        if not rows[MESH] or not rows[NO_PEERS]:
            return None
        windows = {v: [tuple(x for w in r.window.values() for x in w) for r in rs]
                   for v, rs in rows.items()}
        return pooled_ratio(windows[MESH], windows[NO_PEERS]), len(rows[MESH])

    def pick_spread(self, load: float) -> PickSpread | None:
        """How far one pooled run moves on decisions alone: the pooled ratio over the ways
        of taking one twin per seed, against the simulator's pooled figure (needs twins)."""
        ref = self.simulated_pooled(load)
        by_seed: dict[int, list[tuple[tuple[float, ...], tuple[float, ...]]]] = {}
        for t in self.twins:
            if t.load == load:
                by_seed.setdefault(t.seed, []).append((t.mesh, t.no_peers))
        if ref is None or not by_seed:
            return None
        return pick_one_per_seed(by_seed, ref[0].ratio, AGREE)

    def best_single_region(self, load: float, side: str) -> dict[str, tuple[str, float]]:
        best: dict[str, tuple[str, float]] = {}
        for label in SINGLE_REGION:
            p = self.pooled(load, label, side)
            if p is None:
                continue
            for region, v in p.region_p90.items():
                if region not in best or v < best[region][1]:
                    best[region] = (label, v)
        return best


@dataclass(frozen=True, slots=True)
class Source:
    """An earlier run (its ``results.json``) whose emulated rows a report pools."""

    path: str
    command: str
    wall_s: float
    load_average: tuple[float, ...]
    seeds: tuple[int, ...]


SAME_WINDOWS = ("speedup", "warmup_s", "horizon_s", "mesh_horizon_s", "error_after_s",
                "drain_s")
"""What an earlier run must share with this one for its rows to be pooled with it."""


def _number(v: Any) -> Any:
    return math.nan if v is None else math.inf if v == "inf" else v


def _row_of(doc: dict[str, Any], trace: dict[str, list[dict[str, Any]]]) -> Row:
    summary = {k: _number(v) for k, v in doc["summary"].items()}
    summary["per_region_ttft_p90"] = {g: _number(v) for g, v in
                                      (summary.get("per_region_ttft_p90") or {}).items()}
    return Row(float(doc["load"]), doc["variant"], doc["side"], Summary(**summary),
               doc["region_p90"], doc["errors"], routers=doc.get("routers") or {}, trace=trace,
               machine=doc.get("machine") or {}, seed=int(doc["seed"]),
               # A TTFT saved as null is a request that never saw its first token.
               window={g: tuple(math.inf if x is None else x for x in w)
                       for g, w in doc["ttft"].items()},
               rel_errors={k: tuple(xs) for k, xs in doc.get("rel_errors", {}).items()})


def load_emulated(paths: Sequence[Path], plan: SweepPlan) -> tuple[list[Row], list[Source]]:
    """The emulated rows of earlier runs (a ``results.json`` or the directory holding it) at
    ``plan``'s loads and variants, checked to share its windows. Each (load, seed, variant)
    once; every seed with the same variants at a load (a pooled ratio over seeds that ran
    only one of its two variants would mix populations)."""
    rows: list[Row] = []
    sources: list[Source] = []
    seen: dict[tuple[float, int, str], Path] = {}
    wanted = {v.label for v in plan.runs(plan.emulated())}
    for path in paths:
        f = path / "results.json" if path.is_dir() else path
        try:
            doc = json.loads(f.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"--emulated-from {f}: cannot read it ({exc})") from None
        theirs = doc.get("plan") if isinstance(doc, dict) else None
        if not isinstance(theirs, dict) or doc.get("scenario") != SCENARIO:
            raise ValueError(f"--emulated-from {f}: not a region-sweep results.json")
        if theirs.get("calibrated", True) != plan.calibrated:
            raise ValueError(f"--emulated-from {f}: its kvmesh variants ran with calibrated "
                             f"{theirs.get('calibrated', True)}, here {plan.calibrated}")
        for k in SAME_WINDOWS:
            if theirs.get(k) != getattr(plan, k):
                raise ValueError(f"--emulated-from {f}: {k} was {theirs.get(k)}, here "
                                 f"{getattr(plan, k)} (the simulator must replay the same "
                                 f"windows)")
        several = len(theirs.get("seeds") or ()) > 1
        taken: list[Row] = []
        for r in doc.get("rows") or []:
            if r.get("side") != "emulated" or r.get("variant") not in wanted \
                    or r.get("load") not in plan.loads:
                continue
            if "ttft" not in r or "seed" not in r:
                raise ValueError(f"--emulated-from {f}: its rows lack their requests' TTFTs "
                                 f"(written before runs could be pooled)")
            key = (float(r["load"]), int(r["seed"]), str(r["variant"]))
            if key in seen:
                raise ValueError(f"--emulated-from: load {key[0]:g} seed {key[1]} {key[2]} "
                                 f"is in both {seen[key]} and {f}")
            seen[key] = f
            # The outcome traces are the mesh's (the file is per load and seed, not variant).
            trace_file = f.parent / _outcomes_name("emulated", key[0], key[1], several)
            trace = (json.loads(trace_file.read_text())
                     if key[2] == MESH and trace_file.exists() else {})
            taken.append(_row_of(r, trace))
        if not taken:
            raise ValueError(f"--emulated-from {f}: no emulated run of "
                             f"{', '.join(sorted(wanted))} at load "
                             f"{', '.join(f'{x:g}' for x in plan.loads)}")
        rows += taken
        sources.append(Source(str(f), str(doc.get("command", "")), float(doc.get("wall_s", 0)),
                              tuple(doc.get("load_average") or ()),
                              tuple(sorted({r.seed for r in taken}))))
    for load in plan.loads:
        by_variant = {v: sorted(s for (ld, s, x) in seen if ld == load and x == v)
                      for v in wanted}
        if not any(by_variant.values()):
            raise ValueError(f"--emulated-from: no emulated run at load {load:g}")
        if len({tuple(x) for x in by_variant.values()}) > 1:
            raise ValueError(f"--emulated-from: at load {load:g} the variants ran on different "
                             f"seeds ({'; '.join(f'{v}: {x}' for v, x in by_variant.items())})")
    return rows, sources


def _outcomes_name(side: str, load: float, seed: int, several: bool) -> str:
    return f"outcomes-{side}-load{load:g}" + (f"-seed{seed}" if several else "") + ".json"


async def run_sweep(plan: SweepPlan, command: str, emulate_too: bool = True,
                    workdir: Path | None = None, log: Any = print,
                    emulated: Sequence[Row] = (), sources: Sequence[Source] = ()) -> Sweep:
    """Emulate (unless ``emulated`` rows of earlier runs are given, or ``emulate_too`` is
    off), then simulate the same seeds and windows."""
    started = time.perf_counter()
    rows: list[Row] = list(emulated)
    emulate_too = emulate_too and not emulated
    several = len(plan.seeds) > 1

    def tag(load: float, seed: int) -> str:
        return f"load {load:g} ({skew_clients(load)})" + (f", seed {seed}" if several else "")

    if emulate_too:
        first = _scaled(plan, plan.loads[0], plan.horizon_s, plan.seeds[0])
        temp = workdir is None
        wd = workdir or Path(tempfile.mkdtemp(prefix="kvmesh-region-sweep-"))
        wd.mkdir(parents=True, exist_ok=True)
        mesh = LocalMesh(_local_spec(first), wd)
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120)
        ok = False
        try:
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                try:
                    log(f"region-sweep: 6 engines (x{plan.speedup:g}), 3 routers; logs in {wd}")
                    await mesh.start_engines(session)
                    for load in plan.loads:
                        for seed in plan.seeds:
                            for v in plan.runs(plan.emulated()):
                                log(f"- {tag(load, seed)}: {v.label}, emulating")
                                rows.append(await emulate(mesh, session, plan, load, v, seed,
                                                          log))
                finally:
                    await mesh.stop()
            ok = True
        finally:
            if temp and ok:
                shutil.rmtree(wd, ignore_errors=True)
            elif temp:
                log(f"logs kept in {wd}")
    for load in plan.loads:
        for seed in plan.seeds:
            for v in plan.runs((*plan.emulated(), *SIMULATED_ONLY)):
                log(f"- {tag(load, seed)}: {v.label}, simulating")
                rows.append(simulate(plan, load, v, seed))
    pairs = []
    for load in plan.loads:
        for seed in plan.sim_seeds:
            log(f"- load {load:g}: seed {seed}, mesh and no-peers over {plan.sim_horizon_s:g} s, "
                f"simulating")
            pairs.append(simulate_pair(plan, load, seed))
    twins = []
    for load in plan.loads:
        for seed in plan.seeds:
            for stream in range(plan.sim_ties):
                log(f"- load {load:g}: seed {seed}, tie stream {stream}, mesh and no-peers, "
                    f"simulating")
                twins.append(simulate_twin(plan, load, stream, seed))
    return Sweep(plan, command, rows, time.perf_counter() - started, os.getloadavg(), pairs,
                 twins, list(sources))


# -- the report -----------------------------------------------------------------------------------


def _f(x: float | None, digits: int = 3) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.1%}"


def _seeds_text(seeds: Sequence[int]) -> str:
    return ",".join(map(str, seeds))


def tables(sw: Sweep) -> str:
    sides = ("emulated", "simulated")
    several = len(sw.plan.seeds) > 1
    out = [f"Every seed's requests pooled (seeds {_seeds_text(sw.plan.seeds)}; req/s: the "
           f"mean over the seeds; each seed's own ratio in the per-seed table below):", ""] \
        if several else []
    out += ["| load (users us/eu/asia) | variant | TTFT p90 (s) emu / sim | TTFT p99 (s) | "
            "req/s | forwarded |",
            "|---|---|---:|---:|---:|---:|"]
    for load in sw.plan.loads:
        users = "/".join(str(n) for n in skew_clients(load).values())
        for v in (*EMULATED, *SIMULATED_ONLY):
            e, s = sw.pooled(load, v.label, sides[0]), sw.pooled(load, v.label, sides[1])

            def both(attr: str, fmt: Any = _f, e: Pool | None = e, s: Pool | None = s) -> str:
                a = fmt(getattr(e, attr)) if e else "-"
                b = fmt(getattr(s, attr)) if s else "-"
                return f"{a} / {b}"

            out.append(f"| {load:g} ({users}) | {v.label} | {both('ttft_p90')} | "
                       f"{both('ttft_p99')} | {both('throughput_rps', lambda x: _f(x, 1))} | "
                       f"{both('forwarded', _pct)} |")
    out += ["", "| load | mesh / no-peers TTFT p90 emu | sim | emu vs sim | mean TTFT emu | "
            "sim | emu vs sim | req/s emu | sim | best single-region p90 per region "
            "(emu; sim) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for load in sw.plan.loads:
        re_, rs = sw.ratio(load, sides[0]), sw.ratio(load, sides[1])
        agree = (re_ / rs - 1.0) if re_ is not None and rs else None
        me, ms = (sw.ratio(load, side, "ttft_mean") for side in sides)
        agree_m = (me / ms - 1.0) if me is not None and ms else None
        te, ts = (sw.ratio(load, side, "throughput_rps") for side in sides)

        def best(side: str, load: float = load) -> str:
            return ", ".join(f"{g} {_f(p)} ({v})"
                             for g, (v, p) in sorted(sw.best_single_region(load, side).items()))

        out.append(f"| {load:g} | {_f(re_)} | {_f(rs)} | {_pct(agree)} | {_f(me)} | {_f(ms)} | "
                   f"{_pct(agree_m)} | {_f(te)} | {_f(ts)} | {best(sides[0])}; "
                   f"{best(sides[1])} |")
    out += ["", f"Prediction error of the mesh (|observed - predicted| / observed at the client, "
            f"requests sent after {sw.plan.error_after_s:g} s):", "",
            "| load | side | local: median (n) | forwarded: median (n) |", "|---|---|---:|---:|"]
    for load in sw.plan.loads:
        for side in sides:
            pm = sw.pooled(load, MESH, side)
            if pm is None:
                continue
            cells = [f"{_pct(pm.errors[k]['median_abs_rel_error'])} ({pm.errors[k]['n']})"
                     for k in ("local", "forwarded")]
            out.append(f"| {load:g} | {side} | {cells[0]} | {cells[1]} |")
    if several:
        out += ["", *per_seed_table(sw)]
    agreement = agreement_table(sw)
    if agreement:
        out += ["", *agreement]
    parts = [(f"{r.load:g} {r.side}" + (f" seed {r.seed}" if several else ""),
              error_parts.summary(error_parts.local_rows(r.trace, sw.plan.error_after_s)))
             for r in sw.rows if r.trace]
    if parts:
        out += ["", f"Local decisions' error taken apart (the routers' outcome traces: TTFT "
                f"observed from the decision, decided {sw.plan.error_after_s:g} s or more "
                f"into the run; medians, seconds; ``sim/error_parts.py``):", "",
                *error_parts.table(parts)]
    machine = [r for r in sw.rows if r.machine]
    if machine:
        out += ["", "Emulated runs, the machine (mean cores by kind of process, the load "
                "generator's lag against its schedule, the engines' own mean TTFT against "
                "the clients', the engines' steps that ended after their deadline and the "
                "real seconds they fell behind their profile for good):", "",
                "| load | variant | cores engines / routers / netdelay / load generator | "
                "lag p50 / p99 (s) | engine TTFT mean (s) | client TTFT mean (s) | "
                "engine steps late (mean ms) / behind (s) | "
                "engines not trusted by their router at the end |",
                "|---|---|---|---|---:|---:|---|---|"]
        for r in machine:
            m = r.machine
            load_ = f"{r.load:g}" + (f" (seed {r.seed})" if several else "")
            c = m.get("cpu_cores", {})
            cores = " / ".join(_f(c.get(k), 2) for k in ("engines", "routers", "netdelay",
                                                          "load generator"))
            flags = m.get("index_flags") or {}
            blind = "; ".join(f"{g}: {', '.join(f)}" for g, f in flags.items()) or "none"
            pace = m.get("engine_pace") or {}
            paced = (f"{100 * pace['late_share']:.0f}% ({pace['late_ms_mean']:.1f}) / "
                     f"{pace['absorbed_s']:.2f}" if pace.get("steps") else "-")
            out.append(f"| {load_} | {r.variant} | {cores} | {_f(m.get('lag_p50_s'))} / "
                       f"{_f(m.get('lag_p99_s'))} | {_f(m.get('engine_ttft_mean_s'))} | "
                       f"{_f(r.summary.ttft_mean)} | {paced} | {blind} |")
    if sw.pairs:
        p = sw.plan
        out += ["", f"Resolution runs (simulator, mesh and no-peers on each seed, TTFT over "
                f"[{p.warmup_s:g}, {p.sim_horizon_s:g}) s):", "",
                "| load | seeds | mesh / no-peers p90 per seed | mean (sd) | pooled p90 mesh / "
                "no-peers (requests) | ratio | forwarded |", "|---|---|---|---:|---|---:|---:|"]
        for load in sw.plan.loads:
            res = sw.resolution(load)
            if res is None:
                continue
            a, b = res["pooled_p90"]
            out.append(f"| {load:g} | {','.join(map(str, res['seeds']))} | "
                       f"{' '.join(f'{x:.3f}' for x in res['ratios'])} | {res['mean']:.3f} "
                       f"({res['sd']:.3f}) | {a:.4f} / {b:.4f} ({res['requests'][0]} / "
                       f"{res['requests'][1]}) | {res['pooled']:.3f} | {_pct(res['forwarded'])} |")
    if sw.twins:
        p = sw.plan
        out += ["", f"Twin runs (simulator, the emulated seeds and window, TTFT over "
                f"[{p.warmup_s:g}, {p.horizon_s:g}) s, the routers' near-tie stream "
                f"varied): how far one window moves on decisions alone:", "",
                "| load | seed | mesh / no-peers p90 per tie stream | mean (sd) | range | "
                "forwarded |", "|---|---|---|---:|---|---:|"]
        for load in sw.plan.loads:
            for seed in sw.plan.seeds:
                tw = sw.twin_spread(load, seed)
                if tw is None:
                    continue
                lo, hi = tw["range"]
                out.append(f"| {load:g} | {seed} | "
                           f"{' '.join(f'{x:.3f}' for x in tw['ratios'])} | "
                           f"{tw['mean']:.3f} ({tw['sd']:.3f}) | {lo:.3f}-{hi:.3f} | "
                           f"{_pct(tw['forwarded'])} |")
    return "\n".join(out)


def per_seed_table(sw: Sweep) -> list[str]:
    """Each seed's own runs: the ratio emulated and simulated (stream 0, and the mean of its
    twins when they ran), the p90s it is made of, the share forwarded."""
    out = ["Each seed on its own (mesh / no-peers TTFT p90; sim: tie stream 0, and the mean "
           "(sd) of its twins when they ran):", "",
           "| load | seed | emu | sim | twins' mean (sd) | emu vs sim | emu vs twins' mean | "
           "mesh p90 (s) emu / sim | no-peers p90 (s) emu / sim | forwarded emu / sim |",
           "|---|---|---:|---:|---:|---:|---:|---|---|---|"]
    for load in sw.plan.loads:
        for seed in sw.plan.seeds:
            re_, rs = (sw.seed_ratio(load, side, seed) for side in ("emulated", "simulated"))
            tw = sw.twin_spread(load, seed)

            def p90(variant: str, seed: int = seed, load: float = load) -> str:
                rows = [sw.get(load, variant, side, seed) for side in ("emulated", "simulated")]
                return " / ".join(_f(r.summary.ttft_p90) if r else "-" for r in rows)

            def fwd(side: str, seed: int = seed, load: float = load) -> str:
                r = sw.get(load, MESH, side, seed)
                return _pct(r.summary.router_forwards / r.summary.sent) \
                    if r and r.summary.sent else "-"

            twins = f"{tw['mean']:.3f} ({tw['sd']:.3f})" if tw else "-"
            out.append(
                f"| {load:g} | {seed} | {_f(re_)} | {_f(rs)} | {twins} | "
                f"{_pct(relative(re_, rs))} | "
                f"{_pct(relative(re_, tw['mean'] if tw else None))} | {p90(MESH)} | "
                f"{p90(NO_PEERS)} | {fwd('emulated')} / {fwd('simulated')} |")
    return out


def agreement_table(sw: Sweep) -> list[str]:
    """The criterion: the emulated ratio over every seed pooled against the simulator's over
    the same seeds (and their twins) pooled, with how far one pooled run moves on decisions
    alone (the simulator's picks of one twin per seed)."""
    lines = []
    for load in sw.plan.loads:
        sim = sw.simulated_pooled(load)
        if sim is None:
            continue
        emu = sw.ratio(load, "emulated")
        d = relative(emu, sim[0].ratio)
        spread = sw.pick_spread(load)
        noise = (f"{spread.rel_sd:.1%} ({spread.within:.0%} of {spread.picks})"
                 if spread else "-")
        verdict = "-" if d is None else "yes" if abs(d) <= AGREE else "NO"
        lines.append(f"| {load:g} | {_seeds_text(sw.plan.seeds)} | {_f(emu)} | "
                     f"{sim[0].ratio:.3f} ({sim[1]} run{'s' if sim[1] > 1 else ''}, "
                     f"{sim[0].requests[0]} / {sim[0].requests[1]} requests) | {_pct(d)} | "
                     f"{noise} | {verdict} |")
    if not lines:
        return []
    return [f"Agreement on the mesh / no-peers TTFT p90 ratio, every seed's requests pooled "
            f"(the simulator over the same seeds and windows, each seed's twins too when they "
            f"ran). Decision noise: the simulator's pooled ratio when one twin per seed is "
            f"taken, as one emulated run takes one trajectory per seed: relative sd over the "
            f"ways to pick, and the share of them within {AGREE:.0%} of the simulator's "
            f"pooled figure:", "",
            "| load | seeds | emu pooled | sim pooled | emu vs sim | decision noise: sd (picks "
            f"within {AGREE:.0%}) | within {AGREE:.0%} |", "|---|---|---:|---|---:|---|---|",
            *lines]


def acceptance(sw: Sweep) -> list[str]:
    """The acceptance checks, each with the figures it reads (emulated unless said; with
    several seeds, over every seed's requests pooled)."""
    side = "emulated" if any(r.side == "emulated" for r in sw.rows) else "simulated"
    loads = sw.plan.loads
    seeds = sw.plan.seeds
    over = f", seeds {_seeds_text(seeds)} pooled" if len(seeds) > 1 else ""
    out = []
    light, heavy = min(loads), max(loads)
    r = sw.ratio(light, side)
    # "Forwarding costs nothing when it is not needed": at most 5% above the routers
    # without peers (a mesh that is faster still meets it).
    if light <= LIGHT:
        out.append(f"light load {light:g}{over}: mesh p90 / no-peers p90 = {_f(r)} "
                   f"(at most 5% above: {'yes' if r is not None and r <= 1.05 else 'NO'})")
    res = sw.resolution(light)
    if res is not None and light <= LIGHT:
        ok = res["pooled"] <= 1.05
        out.append(f"light load {light:g}, simulator over {len(res['seeds'])} seeds x "
                   f"{sw.plan.sim_horizon_s - sw.plan.warmup_s:g} s: pooled p90 ratio "
                   f"{res['pooled']:.3f}, per seed {res['mean']:.3f} +- {res['sd']:.3f} "
                   f"(at most 5% above: {'yes' if ok else 'NO'})")
    r = sw.ratio(heavy, side)
    t = sw.ratio(heavy, side, "throughput_rps")
    ok = r is not None and r <= 0.70 and t is not None and t > 1.0
    if heavy >= OVERLOADED:
        out.append(f"overloaded load {heavy:g}{over}: mesh p90 / no-peers p90 = {_f(r)}, "
                   f"req/s ratio {_f(t)} (>= 30% lower and higher throughput: "
                   f"{'yes' if ok else 'NO'})")
    for load in loads:
        m = sw.pooled(load, MESH, side)
        if m is None:
            continue
        lo, fw = (m.errors[k]["median_abs_rel_error"] for k in ("local", "forwarded"))
        ok_l = lo is not None and lo <= 0.25
        ok_f = fw is None or fw <= 0.35
        out.append(f"load {load:g}{over}: median abs error local {_pct(lo)} (<= 25%: "
                   f"{'yes' if ok_l else 'NO'}), forwarded {_pct(fw)} (n="
                   f"{m.errors['forwarded']['n']}; <= 35%: {'yes' if ok_f else 'NO'})")
    if side != "emulated":
        return out
    for load in loads:
        re_ = sw.ratio(load, "emulated")
        sim = sw.simulated_pooled(load)
        rs = sim[0].ratio if sim else None
        d = relative(re_, rs)
        ok = d is not None and abs(d) <= AGREE
        what = "" if sim is None or sim[1] == len(seeds) else \
            f" over {sim[1]} runs ({sim[1] // len(seeds)} twins a seed)"
        line = (f"load {load:g}{over}: mesh/no-peers ratio emu {_f(re_)} vs sim {_f(rs)}{what} "
                f"({_pct(d)}; within {AGREE:.0%}: {'yes' if ok else 'NO'})")
        if len(seeds) > 1:
            per = [(sw.seed_ratio(load, "emulated", x), sw.seed_ratio(load, "simulated", x))
                   for x in seeds]
            line += "; per seed emu / sim " + ", ".join(
                f"{x}: {_f(e)} / {_f(s_)}" for x, (e, s_) in zip(seeds, per, strict=True))
        spread = sw.pick_spread(load)
        if spread is not None:
            line += (f"; one pooled run moves by sd {spread.rel_sd:.1%} on decisions alone "
                     f"({spread.within:.0%} of the simulator's own picks within "
                     f"{AGREE:.0%})")
        out.append(line)
        tw = sw.twin_spread(load)
        if len(seeds) == 1 and tw is not None and re_ is not None:
            d = re_ / tw["mean"] - 1.0
            lo, hi = tw["range"]
            out.append(f"load {load:g}: emu {_f(re_)} vs the mean of {len(tw['ratios'])} "
                       f"simulated twins {tw['mean']:.3f} ({_pct(d)}; within 10%: "
                       f"{'yes' if abs(d) <= 0.10 else 'NO'}; inside their range "
                       f"{lo:.3f}-{hi:.3f}: {'yes' if lo <= re_ <= hi else 'NO'})")
    return out


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def pooled_json(sw: Sweep, load: float) -> dict[str, Any] | None:
    """The comparison at ``load``: pooled ratios of both sides, each seed's own, the
    decision noise of one pooled run."""
    sim = sw.simulated_pooled(load)
    if sim is None:
        return None
    spread = sw.pick_spread(load)
    emu = sw.ratio(load, "emulated")
    return {
        "seeds": list(sw.plan.seeds),
        "emulated": emu,
        "simulated": _finite(sim[0].ratio),
        "simulated_runs": sim[1],
        "simulated_p90": (_finite(sim[0].mesh_p90), _finite(sim[0].alone_p90)),
        "simulated_requests": sim[0].requests,
        "difference": relative(emu, sim[0].ratio),
        "per_seed": {str(x): {"emulated": sw.seed_ratio(load, "emulated", x),
                              "simulated": sw.seed_ratio(load, "simulated", x)}
                     for x in sw.plan.seeds},
        "decision_noise": None if spread is None else {
            "picks": spread.picks, "mean": spread.mean, "sd": spread.sd,
            "rel_sd": spread.rel_sd, "within": spread.within},
    }


def to_json(sw: Sweep) -> dict[str, Any]:
    return {
        "scenario": SCENARIO,
        "command": sw.command,
        "plan": asdict(sw.plan),
        "wall_s": round(sw.wall_s, 1),
        "load_average": sw.load_average,
        "sources": [asdict(x) for x in sw.sources],
        "rows": [{"load": r.load, "variant": r.variant, "side": r.side, "seed": r.seed,
                  "summary": {k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                              for k, v in asdict(r.summary).items()},
                  "region_p90": r.region_p90, "errors": r.errors, "routers": r.routers,
                  "machine": r.machine,
                  "ttft": {g: [round(x, 6) if math.isfinite(x) else None for x in w]
                           for g, w in r.window.items()},
                  "rel_errors": {k: [round(x, 6) for x in xs]
                                 for k, xs in r.rel_errors.items()}}
                 for r in sw.rows],
        "pooled": {f"{load:g}": pooled_json(sw, load) for load in sw.plan.loads
                   if sw.simulated_pooled(load) is not None},
        "resolution": {f"{load:g}": sw.resolution(load) for load in sw.plan.loads
                       if sw.resolution(load) is not None},
        "twins": {f"{load:g} seed {seed}": sw.twin_spread(load, seed)
                  for load in sw.plan.loads for seed in sw.plan.seeds
                  if sw.twin_spread(load, seed) is not None},
        "acceptance": acceptance(sw),
    }


def write(sw: Sweep, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(to_json(sw), indent=1, default=str) + "\n")
    for r in sw.rows:
        if r.trace:
            name = _outcomes_name(r.side, r.load, r.seed, len(sw.plan.seeds) > 1)
            (out / name).write_text(json.dumps(r.trace, separators=(",", ":")) + "\n")
    md = out / "results.md"
    p = sw.plan
    sources = "".join(
        f"- seed {_seeds_text(x.seeds)}: `{x.command}` (wall {x.wall_s:.0f} s, load average "
        f"{' '.join(f'{a:.1f}' for a in x.load_average)} at its end)\n" for x in sw.sources)
    if sources:
        sources = f"Emulated rows from earlier runs, one locked command each:\n\n{sources}\n"
    md.write_text(
        f"# region-sweep\n\n`{sw.command}`\n\n{sources}"
        f"Engines at x{p.speedup:g}, round trips 80 / 150 / 200 ms unscaled; latency over "
        f"[{p.warmup_s:g}, {p.horizon_s:g}) s; wall {sw.wall_s:.0f} s, load average "
        f"{' '.join(f'{x:.1f}' for x in sw.load_average)}.\n\n{tables(sw)}\n\n"
        + "\n".join(f"- {line}" for line in acceptance(sw)) + "\n")
    return md


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvmesh bench region-sweep", description=__doc__.split(
        "\n", 1)[0])
    d = SweepPlan()
    p.add_argument("--loads", default=",".join(f"{x:g}" for x in d.loads),
                   help="load factors (x 32/6/3 users)")
    p.add_argument("--speedup", type=float, default=d.speedup)
    p.add_argument("--horizon", type=float, default=d.horizon_s)
    p.add_argument("--mesh-horizon", type=float, default=d.mesh_horizon_s)
    p.add_argument("--warmup", type=float, default=d.warmup_s)
    p.add_argument("--error-after", type=float, default=d.error_after_s)
    p.add_argument("--seed", type=int,
                   help=f"the one seed of the measured runs (default {d.seeds[0]})")
    p.add_argument("--seeds",
                   help="several seeds of the measured runs, e.g. 1-3 or 1,4: every variant, "
                        "emulated and simulated (and --sim-ties twins), on each; figures "
                        "and the agreement verdict over every seed's requests pooled, each "
                        "seed's own beside them")
    p.add_argument("--sim-seeds", default="",
                   help="seeds of the simulator's resolution runs (mesh and no-peers, "
                        "--sim-horizon long), e.g. 1-8 or 1,2,3")
    p.add_argument("--sim-horizon", type=float, default=d.sim_horizon_s)
    p.add_argument("--sim-ties", type=int, default=d.sim_ties,
                   help="twin runs: the emulation's seed and window simulated with this many "
                        "near-tie streams (how far one window moves on decisions alone)")
    p.add_argument("--variants", default="",
                   help="comma-separated variants to run (default: all of "
                        f"{', '.join(v.label for v in (*EMULATED, *SIMULATED_ONLY))})")
    p.add_argument("--sim-only", action="store_true", help="the simulator's side only")
    p.add_argument("--calibrated", action="store_true",
                   help="run the kvmesh variants with calibrated: true instead of the "
                        "policy's default parameters")
    p.add_argument("--emulated-from", default="",
                   help="comma-separated results.json files (or their directories) of "
                        "earlier runs with the same windows: their emulated rows are pooled "
                        "here (their seeds become this run's) and only the simulator runs; "
                        "so runs too long for one locked command can be taken a seed at a time")
    p.add_argument("--out", default="results/region-sweep")
    p.add_argument("--workdir", help="keep configs and process logs here")
    return p


def _seeds(text: str, option: str = "--sim-seeds") -> tuple[int, ...]:
    """``1-8`` or ``1,2,5`` (empty: none)."""
    out: list[int] = []
    for part in filter(None, (x.strip() for x in text.split(","))):
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"{option}: expected numbers or ranges, got {part!r}") from None
        if last < first:
            raise ValueError(f"{option}: empty range {part!r}")
        out.extend(range(first, last + 1))
    return tuple(dict.fromkeys(out))


def _measured_seeds(seed: int | None, seeds: str | None) -> tuple[int, ...]:
    """``--seed`` or ``--seeds`` (not both; neither: the plan's default)."""
    if seed is not None and seeds is not None:
        raise ValueError("give --seed or --seeds, not both")
    if seeds is not None:
        out = _seeds(seeds, "--seeds")
        if not out:
            raise ValueError("--seeds: expected at least one seed")
        return out
    return (seed,) if seed is not None else SweepPlan().seeds


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        loads = tuple(float(x) for x in args.loads.split(",") if x)
        if not loads or any(x <= 0 for x in loads):
            raise ValueError("--loads expects positive numbers")
        known = [v.label for v in (*EMULATED, *SIMULATED_ONLY)]
        variants = tuple(x.strip() for x in args.variants.split(",") if x.strip())
        unknown = [x for x in variants if x not in known]
        if unknown:
            raise ValueError(f"--variants: unknown {', '.join(unknown)} "
                             f"(known: {', '.join(known)})")
        plan = SweepPlan(args.speedup, loads, args.warmup, args.horizon, args.mesh_horizon,
                         args.error_after, seeds=_measured_seeds(args.seed, args.seeds),
                         sim_seeds=_seeds(args.sim_seeds),
                         sim_horizon_s=args.sim_horizon, sim_ties=args.sim_ties,
                         variants=variants, calibrated=args.calibrated)
        if plan.sim_ties < 0:
            raise ValueError("--sim-ties expects a count >= 0")
        if plan.sim_seeds and plan.sim_horizon_s <= plan.warmup_s:
            raise ValueError("--sim-horizon must exceed --warmup")
        if not plan.warmup_s < plan.horizon_s <= plan.mesh_horizon_s:
            raise ValueError("expected warmup < horizon <= mesh horizon")
        emulated: list[Row] = []
        sources: list[Source] = []
        if args.emulated_from:
            if args.seed is not None or args.seeds is not None:
                raise ValueError("--emulated-from takes its seeds from the files: give no "
                                 "--seed or --seeds")
            emulated, sources = load_emulated(
                [Path(x.strip()) for x in args.emulated_from.split(",") if x.strip()], plan)
            plan = replace(plan, seeds=tuple(sorted({r.seed for r in emulated})))
    except ValueError as exc:
        print(f"kvmesh bench region-sweep: {exc}", file=sys.stderr)
        return 2
    command = shlex.join(["kvmesh", "bench", "region-sweep", *argv])
    try:
        sw = asyncio.run(run_sweep(plan, command, not args.sim_only,
                                   Path(args.workdir) if args.workdir else None,
                                   lambda s: print(s, flush=True), emulated, sources))
    except RuntimeError as exc:
        print(f"kvmesh bench region-sweep: failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; every process was stopped", file=sys.stderr)
        return 130
    md = write(sw, Path(args.out))
    print(tables(sw))
    print()
    print("\n".join(acceptance(sw)))
    print(f"\nwrote {md}")
    return 0


__all__ = ["SweepPlan", "main", "run_sweep"]
