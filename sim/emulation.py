"""``kvmesh bench emulate SCENARIO``: a scenario on real processes, next to the simulator.

The discrete-event simulator (``sim/fleet.py``) predicts a scenario's figures; the emulation
measures them on the processes a deployment runs. For one scenario of ``sim/scenarios.py``,
scaled down to a few minutes on a small machine (``EmulationPlan``):

1. start one ``kvmesh sim-engine`` per replica with the scenario's profile at ``--speedup S``,
   one ``kvmesh router`` per region, and ``kvmesh netdelay`` gateways for the delayed hops
   (``sim/localmesh.py``), every round trip being the scenario's divided by S;
2. per variant: fresh routers with the variant's policy, empty engine caches, and the
   scenario's workload (same generator and seed, its time constants divided by S) driven by
   an asyncio load generator from the scenario's regions (``sim/loadgen.py``), every request's
   TTFT, end-to-end latency, tokens and routing headers recorded at the client;
3. run the simulator on the *same* scaled scenario: the profile with every step S times
   shorter, the same scaled round trips, workload, seed, windows and router layout;
4. write both, side by side with their relative differences, under
   ``results/emulate-<scenario>/``.

Everything is compared in real seconds: only the engines and the network are scaled, the
routers' own timers (100 ms probes, gossip rounds, 10 ms SkyLB rechecks) run as they do in
production, in both the processes and the simulator.

What a process can and cannot stand for: real routers always hold kvmesh's replicated state
(KV-event prefix index, gossiped load), so every variant is simulated on the ``mesh`` plane
with ``events`` prefixes; a single global balancer is emulated as every client sending to that
region's router, which decides over the whole mesh and forwards one hop, pinned, to the
replica's own router (simulated the same way, ``ObservedFleet``). The scenario's own
variant (probe plane, approximate prefix tree, one router managing every engine) is simulated
too, on the same scaled fleet, as a reference column.
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
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp

from sim.emulation_report import (
    EmulationReport,
    VariantComparison,
    side_by_side,
    where_time_goes,
    write_emulation_report,
)
from sim.engine_model import RequestOutput
from sim.fleet import Fleet, FleetSpec, Flight, RouterLayout, SimRouter
from sim.loadgen import UNFINISHED, Entry, LoadGenerator, Observation
from sim.localmesh import MIN_DELAY_MS, LocalFleetSpec, LocalMesh
from sim.metrics import RequestRecord, RunCounters, percentile, summarize
from sim.procs import free_ports
from sim.profiles import Profile
from sim.report import RunResult
from sim.scenarios import GORGO_SESSIONS, PER_REGION, SCENARIOS, Scenario, Variant
from sim.topology import Link, Topology
from sim.traces import records_to_lines, synthesize_sessions, trace_workload
from sim.workloads import ARENA, Workload, chat_workload
from sim.workloads.base import Client

# -- what to run -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EmulatedVariant:
    """One way to route, as processes can run it."""

    label: str
    policy: str
    entry: str | None = None
    """Region whose router every client sends to (a global balancer there); None: each
    client uses its own region's router."""
    params: Mapping[str, object] = field(default_factory=dict)
    reference: str | None = None
    """Label of the scenario variant this stands for (simulated as defined, for reference)."""
    note: str = ""
    peers: bool = True
    """False: every router alone with its region's engines (no mesh)."""
    set_prefill_rate: bool = True
    """False: routers are not told the engines' prefill rate (default config: learned)."""

    @property
    def layout(self) -> str:
        return f"global@{self.entry} (entry)" if self.entry else "1/region"


WorkloadBuilder = Callable[[int, float, float, float, Sequence[str]], Workload]
"""``(seed, horizon_s, speedup, load, regions) -> Workload``, times in real seconds."""


@dataclass(frozen=True, slots=True)
class EmulationPlan:
    """A scenario scaled to run on loopback in minutes. Times are real seconds."""

    scenario: str
    speedup: float
    horizon_s: float
    warmup_s: float
    drain_s: float
    load: float
    load_unit: str
    """What ``load`` counts, e.g. "clients per region"."""
    scenario_load: str
    """The scenario's own load in the same unit, for the scaling statement."""
    workload: WorkloadBuilder
    variants: tuple[EmulatedVariant, ...]
    defaults: tuple[str, ...]
    rtt_scale: float | None = None
    """Multiplies every round trip; None: ``1 / speedup`` (the scenario's RTT-to-compute
    ratio kept)."""
    replicas: Mapping[str, int] | None = None
    """None: the scenario's. Its regions (keys) restrict the topology."""
    min_delay_ms: float = MIN_DELAY_MS
    """Hops whose scaled mean round trip is below this are not delayed (a direct loopback hop
    is nearer such a link than a gateway: :data:`sim.localmesh.MIN_DELAY_MS`)."""

    @property
    def network_scale(self) -> float:
        return self.rtt_scale if self.rtt_scale is not None else 1.0 / self.speedup

    def fleet(self) -> tuple[Scenario, Topology, dict[str, int]]:
        sc = SCENARIOS[self.scenario]
        replicas = dict(self.replicas if self.replicas is not None else sc.replicas)
        unknown = [r for r in replicas if r not in sc.topology.regions]
        if unknown:
            raise ValueError(
                f"{self.scenario} has no region {unknown[0]!r} (regions: "
                f"{', '.join(sc.topology.regions)})"
            )
        regions = tuple(r for r in sc.topology.regions if r in replicas)
        return sc, scaled_topology(sc.topology, self.network_scale, regions), replicas

    def scaling(self) -> str:
        sc = SCENARIOS[self.scenario]
        replicas = self.replicas if self.replicas is not None else sc.replicas
        fleet = ", ".join(f"{r} {n}" for r, n in replicas.items())
        return (
            f"engines ({fleet}) {self.speedup:g}x faster than the {sc.profile.name} profile "
            f"(--speedup {self.speedup:g}), and the workload's time constants with them; "
            f"every round trip x{self.network_scale:g}; {self.load:g} {self.load_unit} "
            f"(scenario: {self.scenario_load}); {self.horizon_s:g} s of load "
            f"({self.horizon_s * self.speedup:g} profile s; scenario: {sc.horizon_s:g}), the "
            f"first {self.warmup_s:g} s not measured, up to {self.drain_s:g} s of drain; hops "
            f"under {self.min_delay_ms:g} ms round trip not delayed. Routers' timers are not "
            "scaled."
        )


def scaled_profile(profile: Profile, speedup: float) -> Profile:
    """The profile with every step ``speedup`` times shorter (what ``--speedup`` does)."""
    gpu = replace(
        profile.gpu,
        peak_flops=profile.gpu.peak_flops * speedup,
        mem_bandwidth=profile.gpu.mem_bandwidth * speedup,
    )
    return replace(
        profile,
        name=f"{profile.name}/x{speedup:g}",
        gpu=gpu,
        step_overhead_s=profile.step_overhead_s / speedup,
    )


def scaled_topology(topo: Topology, scale: float, regions: Sequence[str]) -> Topology:
    def s(link: Link) -> tuple[float, float]:
        return (link.lo_ms * scale, link.hi_ms * scale)

    pairs = {(a, b): s(topo.rtt(a, b)) for i, a in enumerate(regions) for b in regions[i + 1 :]}
    return Topology.build(regions, pairs, intra_ms=s(topo.intra))


def _arena(
    seed: int, horizon: float, speedup: float, load: float, regions: Sequence[str]
) -> Workload:
    p = ARENA
    return chat_workload(
        p,
        dict.fromkeys(regions, int(load)),
        seed=seed,
        horizon_s=horizon,
        start_spread_s=p.start_spread_s / speedup,
        think_time_s=p.think_time_s / speedup,
        conversation_gap_s=p.conversation_gap_s / speedup,
    )


def _gorgo(
    seed: int, horizon: float, speedup: float, load: float, regions: Sequence[str]
) -> Workload:
    spec = replace(GORGO_SESSIONS, rate_per_s=load)
    lines = records_to_lines(synthesize_sessions(spec, seed))
    return trace_workload(
        lines, list(regions), seed=seed, horizon_s=horizon, speedup=speedup, name="sessions"
    )


_SKYLB_VARIANTS = (
    EmulatedVariant("round_robin", "round_robin", entry="us", reference="round_robin"),
    EmulatedVariant("least_load", "least_load", entry="us", reference="least_load"),
    EmulatedVariant("consistent_hash", "consistent_hash", entry="us", reference="consistent_hash"),
    EmulatedVariant(
        "cache_aware_approx", "cache_aware_approx", entry="us", reference="cache_aware_approx"
    ),
    EmulatedVariant(
        "skylb",
        "skylb",
        reference="skylb",
        note="the router's skylb reads the KV-event prefix index, not SkyLB's own trie",
    ),
    EmulatedVariant("kvmesh", "kvmesh", reference="kvmesh"),
)
_SKYLB_DEFAULTS = ("round_robin", "least_load", "skylb", "kvmesh")


def _skylb_plan(name: str) -> EmulationPlan:
    return EmulationPlan(
        scenario=name,
        speedup=2.0,
        horizon_s=40.0,
        warmup_s=10.0,
        drain_s=20.0,
        load=12,
        load_unit="clients per region",
        scenario_load="80",
        workload=_arena,
        variants=_SKYLB_VARIANTS,
        defaults=_SKYLB_DEFAULTS,
    )


PLANS: dict[str, EmulationPlan] = {
    "skylb-arena-332": _skylb_plan("skylb-arena-332"),
    "skylb-arena-444": _skylb_plan("skylb-arena-444"),
    "gorgo": EmulationPlan(
        scenario="gorgo",
        speedup=1.0,
        horizon_s=50.0,
        warmup_s=10.0,
        drain_s=20.0,
        load=GORGO_SESSIONS.rate_per_s,
        load_unit="arrivals per profile second",
        scenario_load=f"{GORGO_SESSIONS.rate_per_s:g}",
        workload=_gorgo,
        variants=(
            EmulatedVariant("least_load", "least_load", entry="us", reference="least_load"),
            EmulatedVariant(
                "precise_prefix", "precise_prefix", entry="us", reference="precise_prefix"
            ),
            EmulatedVariant("gorgo", "gorgo", entry="us", reference="gorgo"),
            EmulatedVariant("gorgo-distributed", "gorgo", reference="gorgo-distributed"),
            EmulatedVariant("kvmesh", "kvmesh", reference="kvmesh"),
        ),
        defaults=("least_load", "gorgo", "gorgo-distributed", "kvmesh"),
    ),
}


# -- the simulator on the same scaled fleet ------------------------------------------------------


class ObservedFleet(Fleet):
    """The simulator's fleet, noting each request's TTFT inside its engine.

    With ``entry`` set, every client sends to that region's router: a global balancer made
    of a mesh router that decides over every replica and forwards one hop to the replica's
    own router, as the emulated one does.
    """

    def __init__(self, spec: FleetSpec, entry: str | None = None) -> None:
        super().__init__(spec)
        if entry is not None and entry not in self.routers_in:
            raise ValueError(f"no router in entry region {entry!r}")
        self.entry = entry
        self.engine_ttfts: list[float] = []

    def entry_router(self, client: Client) -> SimRouter:
        if self.entry is None:
            return super().entry_router(client)
        routers = self.routers_in[self.entry]
        return routers[zlib.crc32(client.cid.encode()) % len(routers)]

    def first_token(self, flight: Flight, out: RequestOutput) -> None:
        if out.ttft is not None:
            self.engine_ttfts.append(out.ttft)
        super().first_token(flight, out)


@dataclass(frozen=True, slots=True)
class Scaled:
    """The scaled scenario both sides run."""

    plan: EmulationPlan
    scenario: Scenario
    topology: Topology
    replicas: dict[str, int]
    profile: Profile
    seed: int

    def workload(self) -> Workload:
        p = self.plan
        return p.workload(self.seed, p.horizon_s, p.speedup, p.load, self.topology.regions)

    def spec(
        self,
        label: str,
        policy: str,
        params: Mapping[str, object],
        layout: RouterLayout,
        plane: str,
        prefix: str,
    ) -> FleetSpec:
        return FleetSpec(
            topology=self.topology,
            replicas=self.replicas,
            profile=self.profile,
            policy=policy,
            policy_params=params,
            layout=layout,
            plane=plane,
            prefix=prefix,
            seed=self.seed,
            label=label,
            mesh_options=self.scenario.mesh_options,
        )


@dataclass(slots=True)
class SimulatedRun:
    run: RunResult
    records: list[RequestRecord]
    engine_ttft_mean: float
    """Mean TTFT inside the engines (arrival at the engine to first token), every request."""


def _run_fleet(
    scaled: Scaled, fleet: ObservedFleet, label: str, config: dict[str, object]
) -> SimulatedRun:
    p = scaled.plan
    started = time.perf_counter()
    result = fleet.run(scaled.workload(), drain_s=p.drain_s)
    summary = summarize(
        label, result.records, result.counters, warmup=p.warmup_s, horizon=p.horizon_s
    )
    ttfts = [r.ttft for r in result.records if p.warmup_s <= r.sent < p.horizon_s]
    engine = statistics.fmean(fleet.engine_ttfts) if fleet.engine_ttfts else math.nan
    config = {
        **config,
        "decisions": result.counters.decisions,
        "waits": result.counters.waits,
        "rejected": result.counters.rejected,
        "engine_ttft_mean_s": _round(engine),
    }
    run = RunResult(label, summary, ttfts, time.perf_counter() - started, result.events, config)
    return SimulatedRun(run, result.records, engine)


def _round(x: float, digits: int = 4) -> float | None:
    return round(x, digits) if math.isfinite(x) else None


def simulate_matched(scaled: Scaled, v: EmulatedVariant) -> SimulatedRun:
    """The simulator running what the processes run: mesh plane, KV-event prefixes, one router
    per region, clients entering where the emulation's clients enter."""
    spec = scaled.spec(v.label, v.policy, v.params, PER_REGION, "mesh", "events")
    spec = replace(spec, region_local=not v.peers, configured_rate=v.set_prefill_rate)
    fleet = ObservedFleet(spec, v.entry)
    return _run_fleet(
        scaled,
        fleet,
        v.label,
        {"policy": v.policy, "layout": v.layout, "plane": "mesh", "prefix": "events"},
    )


def scenario_variant(scaled: Scaled, v: EmulatedVariant) -> Variant | None:
    """The scenario's own variant ``v`` stands for, if it differs from what is emulated."""
    if v.reference is None:
        return None
    known = {x.label: x for x in (*scaled.scenario.variants, *scaled.scenario.extra_variants)}
    ref = known.get(v.reference)
    if ref is None:
        return None
    same = (
        ref.plane == "mesh"
        and ref.prefix == "events"
        and ref.layout == PER_REGION
        and v.entry is None
        and ref.policy == v.policy
        and not ref.region_local
    )
    return None if same else ref


def simulate_reference(scaled: Scaled, ref: Variant) -> SimulatedRun:
    spec = scaled.spec(ref.label, ref.policy, ref.params, ref.layout, ref.plane, ref.prefix)
    spec = replace(spec, region_local=ref.region_local)
    if ref.replicas is not None:
        spec = replace(spec, replicas=ref.replicas)
    label = f"{ref.label} [scenario]"
    return _run_fleet(
        scaled,
        ObservedFleet(spec),
        label,
        {
            "policy": ref.policy,
            "layout": ref.layout.label,
            "plane": ref.plane,
            "prefix": ref.prefix,
        },
    )


# -- the emulation ---------------------------------------------------------------------------------


@dataclass(slots=True)
class EmulatedRun:
    run: RunResult
    observations: list[Observation]
    wall_s: float
    cpu_cores: dict[str, float]
    """Mean cores used over the run, by kind of process (the load generator included)."""
    lag_p99: float
    """How late requests left against their schedule (the load generator's own delay)."""
    failed: int
    """Requests answered with an error (not counting those cut off by the drain limit)."""
    engine_ttft_mean: float
    """Mean TTFT inside the engines by their own clocks (model time), every request."""
    engine_pace: dict[str, float] = field(default_factory=dict)
    """How closely the engines kept their profile's pace over the run, summed over engines
    (:func:`pace_of`)."""


def pace_of(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """The engines' pace over a run from two readings of ``LocalMesh.engine_pace``: steps,
    the share that ended late (caught up by the next), the real seconds not counted as
    engine time while busy (``absorbed_s``: a loop that could not keep up), and the mean
    lateness of a late step (ms)."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    steps, late = d.get("steps", 0.0), d.get("late_steps", 0.0)
    return {"steps": int(steps),
            "late_share": round(late / steps, 4) if steps else 0.0,
            "late_ms_mean": round(1000 * d.get("late_s", 0.0) / late, 2) if late else 0.0,
            "absorbed_s": round(d.get("absorbed_s", 0.0), 4),
            "busy_s": round(d.get("busy_s", 0.0), 2)}


def _local_spec(scaled: Scaled) -> LocalFleetSpec:
    topo = scaled.topology
    rtts = {(a, b): topo.mean_rtt_s(a, b) for a in topo.regions for b in topo.regions if a != b}
    return LocalFleetSpec(
        regions=topo.regions,
        replicas=scaled.replicas,
        profile=scaled.scenario.profile.name,
        speedup=scaled.plan.speedup,
        intra=topo.intra,
        inter_rtt_s=rtts,
        seed=scaled.seed,
        min_delay_ms=scaled.plan.min_delay_ms,
    )


async def _client_entries(
    mesh: LocalMesh, scaled: Scaled, v: EmulatedVariant, clients: Sequence[Client]
) -> dict[str, Entry]:
    """Per client region, where its clients connect: the entry router, through a gateway
    holding the client->router round trip when it is long enough to matter."""
    topo = scaled.topology
    out: dict[str, Entry] = {}
    by_link: dict[Link, list[tuple[str, int, int]]] = {}
    regions = sorted({c.region for c in clients})
    ports = free_ports(len(regions))
    for region, port in zip(regions, ports, strict=True):
        entry = v.entry or region
        router = mesh.router_urls[entry]
        link = topo.rtt(region, entry)
        out[region] = Entry(router, f"{entry}-lb0", entry)
        if link.mean_ms >= scaled.plan.min_delay_ms:
            target = int(router.rsplit(":", 1)[1])
            by_link.setdefault(link, []).append((region, port, target))
    for link, routes in by_link.items():
        name = f"clients-{link.lo_ms:g}-{link.hi_ms:g}ms-{v.label}"
        await mesh.open_gateway(name, link, [(p, t) for _, p, t in routes])
        for region, port, _ in routes:
            e = out[region]
            out[region] = Entry(f"http://127.0.0.1:{port}", e.router, e.region)
    return out


async def emulate_variant(
    mesh: LocalMesh,
    session: aiohttp.ClientSession,
    scaled: Scaled,
    v: EmulatedVariant,
    log: Callable[[str], None],
    before_stop: Callable[[], Awaitable[None]] | None = None,
) -> EmulatedRun:
    """Fresh routers with ``v``'s policy over cold engines, the workload, then stop them
    (``before_stop`` runs while they still answer: reading their status, say)."""
    plan = scaled.plan
    await mesh.reset_engines(session)
    await mesh.start_routers(session, v.policy, v.params, v.label, peers=v.peers,
                             set_prefill_rate=v.set_prefill_rate)
    gateways_before = list(mesh.gateways)
    try:
        workload = scaled.workload()
        entries = await _client_entries(mesh, scaled, v, workload.clients)
        gen = LoadGenerator(
            session,
            workload,
            lambda c: entries[c.region],
            model=mesh.spec.model,
            replica_names={e.url: e.name for e in mesh.engines},
        )
        last = [-10.0]

        def progress(now: float, sent: int, done: int) -> None:
            if now - last[0] >= 10.0:
                last[0] = now
                log(f"  {v.label}: {now:5.1f} / {plan.horizon_s:g} s, {sent} sent, {done} done")

        ttft_sum = "vllm:time_to_first_token_seconds_sum"
        ttft_count = "vllm:time_to_first_token_seconds_count"
        e_sum0 = await mesh.engine_metric(session, ttft_sum)
        e_n0 = await mesh.engine_metric(session, ttft_count)
        pace0 = await mesh.engine_pace(session)
        cpu0, own0, t0 = mesh.cpu_seconds(), time.process_time(), time.perf_counter()
        observations = await gen.run(plan.drain_s, progress)
        wall = time.perf_counter() - t0
        cpu1, own1 = mesh.cpu_seconds(), time.process_time()
        e_sum = await mesh.engine_metric(session, ttft_sum) - e_sum0
        e_n = await mesh.engine_metric(session, ttft_count) - e_n0
        pace = pace_of(pace0, await mesh.engine_pace(session))
        counters = RunCounters(
            gossip_bytes=int(
                await mesh.router_metric(session, "kvmesh_gossip_bytes_total", 'direction="tx"')
            )
        )
        waits = await mesh.router_metric(session, "kvmesh_router_decisions_total", 'outcome="wait"')
        decisions = await mesh.router_metric(session, "kvmesh_router_decisions_total")
        if before_stop is not None:
            await before_stop()
    finally:
        await mesh.stop_routers()
        for gw in [g for g in mesh.gateways if g not in gateways_before]:
            await mesh.close_gateway(gw)
    cores = {k: round((cpu1[k] - cpu0.get(k, 0.0)) / wall, 3) for k in cpu1}
    cores["load generator"] = round((own1 - own0) / wall, 3)
    # Engines keep profile seconds; real seconds are those divided by the speedup.
    engine_ttft = e_sum / e_n / plan.speedup if e_n else math.nan
    records = [o.record for o in observations]
    summary = summarize(v.label, records, counters, warmup=plan.warmup_s, horizon=plan.horizon_s)
    ttfts = [r.ttft for r in records if plan.warmup_s <= r.sent < plan.horizon_s]
    failed = sum(1 for o in observations if o.error and o.error != UNFINISHED)
    lags = [o.lag for o in observations]
    lag99 = percentile(lags, 99)
    config: dict[str, object] = {
        "policy": v.policy,
        "layout": v.layout,
        "note": v.note,
        "decisions": int(decisions),
        "waits": int(waits),
        "failed": failed,
        "engine_ttft_mean_s": _round(engine_ttft),
        "cpu_cores": cores,
        "lag_p99_s": _round(lag99),
        "engine_pace": pace,
    }
    run = RunResult(v.label, summary, ttfts, wall, len(observations), config)
    return EmulatedRun(run, observations, wall, cores, lag99, failed, engine_ttft, pace)


# -- running ---------------------------------------------------------------------------------------


async def run_emulation(
    plan: EmulationPlan,
    variants: Sequence[str],
    *,
    seed: int = 1,
    command: str = "",
    workdir: Path | None = None,
    log: Callable[[str], None] = print,
) -> EmulationReport:
    """Emulate then simulate each variant; every process started is stopped on return."""
    sc, topo, replicas = plan.fleet()
    known = {v.label: v for v in plan.variants}
    unknown = [x for x in variants if x not in known]
    if unknown:
        raise ValueError(
            f"unknown variant {unknown[0]!r} for {plan.scenario} (known: {', '.join(known)})"
        )
    if not plan.warmup_s < plan.horizon_s:
        raise ValueError(f"warmup {plan.warmup_s:g} s must be shorter than the horizon")
    scaled = Scaled(plan, sc, topo, replicas, scaled_profile(sc.profile, plan.speedup), seed)
    started = time.perf_counter()
    temp = workdir is None
    wd = workdir or Path(tempfile.mkdtemp(prefix="kvmesh-emulate-"))
    wd.mkdir(parents=True, exist_ok=True)
    mesh = LocalMesh(_local_spec(scaled), wd)
    emulated: dict[str, EmulatedRun] = {}
    failed = False
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            try:
                n = sum(replicas.values())
                log(
                    f"emulate {plan.scenario}: {n} engines ({sc.profile.name} x{plan.speedup:g}),"
                    f" {len(topo.regions)} routers; logs in {wd}"
                )
                await mesh.start_engines(session)
                for label in variants:
                    log(f"- {label}: emulating")
                    emulated[label] = await emulate_variant(
                        mesh, session, scaled, known[label], log
                    )
            finally:
                await mesh.stop()
    except BaseException:
        failed = True
        raise
    finally:
        if temp and not failed:
            shutil.rmtree(wd, ignore_errors=True)
        elif temp:
            log(f"logs kept in {wd}")
    rows = []
    for label in variants:
        v = known[label]
        log(f"- {label}: simulating")
        sim = simulate_matched(scaled, v)
        ref_variant = scenario_variant(scaled, v)
        ref = simulate_reference(scaled, ref_variant) if ref_variant is not None else None
        rows.append(VariantComparison(v, emulated[label], sim, ref, plan.warmup_s, plan.horizon_s))
    return EmulationReport(scaled, command, rows, time.perf_counter() - started, os.getloadavg())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvmesh bench emulate",
        description="Run a scenario on real processes on loopback and in the simulator, "
        "side by side.",
    )
    p.add_argument("scenario", nargs="?", help=f"one of: {', '.join(PLANS)}")
    p.add_argument("--list", action="store_true", help="list the scenarios and their variants")
    p.add_argument("--variants", default="", help="comma-separated variant labels")
    p.add_argument("--speedup", type=float, help="engine and network time compression")
    p.add_argument("--rtt-scale", type=float, help="multiply round trips (default 1/speedup)")
    p.add_argument(
        "--load",
        type=float,
        help="clients per region (chat) or arrivals per profile second (trace)",
    )
    p.add_argument("--replicas", help="engines per region, e.g. us=1,eu=1 (only those regions)")
    p.add_argument("--horizon", type=float, help="real seconds of load")
    p.add_argument("--warmup", type=float, help="real seconds not measured")
    p.add_argument("--drain", type=float, help="real seconds to let requests finish")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", help="output folder (default results/emulate-<scenario>)")
    p.add_argument("--workdir", help="keep configs and process logs here")
    p.add_argument("--no-plots", action="store_true")
    return p


def _replicas(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in text.split(","):
        region, _, n = item.partition("=")
        if not region.strip() or not n.strip().isdigit() or int(n) < 1:
            raise ValueError(f"--replicas expects REGION=N,... with N >= 1, got {item!r}")
        out[region.strip()] = int(n)
    return out


def plan_from_args(args: argparse.Namespace) -> tuple[EmulationPlan, list[str]]:
    plan = PLANS[args.scenario]
    changes: dict[str, Any] = {}
    for key, attr in (
        ("speedup", "speedup"),
        ("rtt_scale", "rtt_scale"),
        ("load", "load"),
        ("horizon", "horizon_s"),
        ("warmup", "warmup_s"),
        ("drain", "drain_s"),
    ):
        value = getattr(args, key)
        if value is not None:
            if value < 0 or (value == 0 and key in {"speedup", "horizon", "load"}):
                raise ValueError(f"--{key.replace('_', '-')} must be positive, got {value:g}")
            changes[attr] = value
    if args.replicas:
        changes["replicas"] = _replicas(args.replicas)
    plan = replace(plan, **changes)
    variants = [x for x in args.variants.split(",") if x] or list(plan.defaults)
    return plan, variants


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.list or not args.scenario:
        for name, plan in PLANS.items():
            labels = ", ".join(
                f"{v.label}{'*' if v.label in plan.defaults else ''}" for v in plan.variants
            )
            print(f"{name:18s} {labels}")
        print("(* run by default)")
        return 0 if args.list else 2
    if args.scenario not in PLANS:
        print(
            f"kvmesh bench emulate: no emulation plan for {args.scenario!r} "
            f"(known: {', '.join(PLANS)})",
            file=sys.stderr,
        )
        return 2
    try:
        plan, variants = plan_from_args(args)
        plan.fleet()
    except ValueError as exc:
        print(f"kvmesh bench emulate: {exc}", file=sys.stderr)
        return 2
    command = shlex.join(["kvmesh", "bench", "emulate", *argv])
    print(f"scaling: {plan.scaling()}", flush=True)
    try:
        report = asyncio.run(
            run_emulation(
                plan,
                variants,
                seed=args.seed,
                command=command,
                workdir=Path(args.workdir) if args.workdir else None,
                log=lambda s: print(s, flush=True),
            )
        )
    except ValueError as exc:
        print(f"kvmesh bench emulate: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"kvmesh bench emulate: failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; every process was stopped", file=sys.stderr)
        return 130
    out = Path(args.out) if args.out else Path("results") / f"emulate-{plan.scenario}"
    md = write_emulation_report(report, out, plots=not args.no_plots)
    print(side_by_side(report.rows))
    print(where_time_goes(report.rows))
    print(f"agreement: {json.dumps(asdict(report.agreement()))}")
    print(f"\nwrote {md} and {out / 'results.json'}")
    failed = sum(r.emulated.failed for r in report.rows)
    if failed:
        print(f"{failed} requests failed (see the requests-*.jsonl files)", file=sys.stderr)
    return 0 if failed == 0 else 1


__all__ = [
    "PLANS",
    "EmulatedRun",
    "EmulatedVariant",
    "EmulationPlan",
    "ObservedFleet",
    "Scaled",
    "SimulatedRun",
    "main",
    "run_emulation",
    "scaled_profile",
    "scaled_topology",
    "simulate_matched",
]
