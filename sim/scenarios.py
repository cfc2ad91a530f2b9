"""The evaluation scenarios: the papers' setups, as fleets, workloads and policy variants.

Every scenario names its source (SkyLB/SkyWalker, GORGO, the diurnal case) and what it keeps
and changes; ``docs/evaluation.md`` has the mapping in prose and the latest results. A
*variant* is one way to route the same workload on the same engines: a policy, where its
routers sit (one global balancer in the US, or one per region), and how they learn about
replicas (the fleet's plane). Every variant of a scenario sees the same requests: workloads
are seeded per client, so only timing differs between variants.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from sim import regret
from sim.engine_model import EngineConfig
from sim.fleet import Fleet, FleetResult, FleetSpec, RouterLayout, length_stats
from sim.metrics import Summary, summarize
from sim.profiles import (
    H100_LLAMA_3_1_8B,
    L4_LLAMA_3_1_8B,
    V100_16GB_LLAMA_2_7B,
    V100_LLAMA_2_7B,
    Profile,
    decode_params,
)
from sim.report import RunResult, ScenarioReport
from sim.topology import Topology, mesh_topology
from sim.traces import SessionTraceSpec, records_to_lines, synthesize_sessions, trace_workload
from sim.workloads import (
    ARENA,
    MIXED_TREE_US,
    WILDCHAT,
    DiurnalShape,
    Workload,
    chat_workload,
    diurnal_workload,
    tree_workload,
)
from sim.workloads.tasks import task_mix_workload

REGIONS = ("us", "eu", "asia")

SKYLB_TOPOLOGY = Topology.build(
    REGIONS,
    {("us", "eu"): (95, 105), ("us", "asia"): (140, 160), ("eu", "asia"): (220, 240)},
    intra_ms=(1, 2),
)
"""us-east-2 / eu-central-1 / ap-northeast-1 as public inter-region RTT tables give them;
the paper only says cross-region latency adds up to 200 ms."""

GORGO_TOPOLOGY = Topology.build(
    REGIONS,
    {("us", "eu"): (90, 130), ("us", "asia"): (260, 466), ("eu", "asia"): (230, 400)},
    intra_ms=(26, 40),
)
"""GORGO's measured RTTs from its Ashburn proxy: US-East 26-40 ms (taken for every in-region
hop), Frankfurt 90-130 ms, Seoul 260-466 ms. Frankfurt-Seoul is not reported: assumed."""

SKEW_TOPOLOGY = Topology.build(
    REGIONS,
    {("us", "eu"): (78, 82), ("us", "asia"): (148, 152), ("eu", "asia"): (198, 202)},
    intra_ms=(1, 2),
)
"""Round trips of 80 / 150 / 200 ms between us, eu and asia (the region-skew sweep)."""
SKEW_CLIENTS = {"us": 32, "eu": 6, "asia": 3}
"""Chat users per region, skewed towards us."""
SKEW_THINK_S = 2.0
"""Mean pause between a reply and the user's next turn (profile seconds)."""

GLOBAL_US = RouterLayout(global_region="us")
PER_REGION = RouterLayout(per_region=1)


@dataclass(frozen=True, slots=True)
class Variant:
    label: str
    policy: str
    plane: str
    prefix: str
    layout: RouterLayout
    params: Mapping[str, object] = field(default_factory=dict)
    replicas: Mapping[str, int] | None = None
    """Overrides the scenario's replicas (e.g. 9 shared vs 12 region-local)."""
    region_local: bool = False
    """Routers know and use only their own region's engines (reserved per-region capacity)."""
    note: str = ""
    oracle_lengths: bool = False
    """Requests carry their true output length as the prediction."""
    kv_hold: bool = False
    """The kvmesh policy is told the engines' KV capacity (``kv_tokens``), so it holds
    requests at the router when no replica has predicted KV headroom."""
    mesh_options: Mapping[str, object] = field(default_factory=dict)
    """Mesh-plane options over the scenario's (``sim.mesh_plane.MeshPlane``)."""

    def describe(self) -> str:
        where = self.layout.label
        local = ", region-local" if self.region_local else ""
        return f"{self.policy} ({where}, {self.plane} plane, prefix {self.prefix}{local})"


WorkloadFactory = Callable[[int, float], Workload]


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    title: str
    source: str
    """The paper setup this maps to, and what differs."""
    topology: Topology
    replicas: Mapping[str, int]
    profile: Profile
    workload: WorkloadFactory
    variants: tuple[Variant, ...]
    horizon_s: float = 300.0
    warmup_s: float = 60.0
    drain_s: float = 120.0
    extra_variants: tuple[Variant, ...] = ()
    """Analysis variants run with ``--extra`` (they separate information from algorithm)."""
    named_variants: tuple[Variant, ...] = ()
    """Diagnostic variants run only when ``--variants`` names them."""
    target: str = "kvmesh"
    mesh_options: Mapping[str, object] = field(default_factory=dict)
    probe_interval_s: float = 0.1
    """How often routers scrape their engines (the router's ``health_interval``)."""
    engine_config: EngineConfig | None = None
    """Engine knobs other than the profile's defaults (None: the defaults)."""
    objective: str = "ttft"
    """What the comparison notes judge: ``ttft`` (p90 TTFT vs the oracle) or ``e2e`` (mean
    end-to-end latency vs every variant)."""


BASELINES_GLOBAL = (
    Variant("round_robin", "round_robin", "probe", "none", GLOBAL_US),
    Variant("least_load", "least_load", "probe", "none", GLOBAL_US),
    Variant("consistent_hash", "consistent_hash", "probe", "none", GLOBAL_US),
    Variant("cache_aware_approx", "cache_aware_approx", "probe", "none", GLOBAL_US),
)
SKYLB = Variant("skylb", "skylb", "probe", "approx", PER_REGION)
KVMESH = Variant("kvmesh", "kvmesh", "mesh", "events", PER_REGION)
ORACLE = Variant("oracle", "kvmesh", "oracle", "events", PER_REGION)
ANALYSIS = (
    Variant(
        "skylb+events",
        "skylb",
        "mesh",
        "events",
        PER_REGION,
        note="SkyLB's algorithm on kvmesh's replicated state",
    ),
    Variant(
        "gorgo-mesh",
        "gorgo",
        "mesh",
        "events",
        PER_REGION,
        note="GORGO's cost on kvmesh's replicated state, one router per region",
    ),
    Variant("least_load-mesh", "least_load", "mesh", "events", PER_REGION),
)
LIVE_LOAD = (
    Variant(
        "kvmesh+live-own",
        "kvmesh",
        "mesh",
        "events",
        PER_REGION,
        mesh_options={"live_load": "own"},
        note="kvmesh with each router's own engines' live load instead of its last scrape",
    ),
    Variant(
        "kvmesh+live-load",
        "kvmesh",
        "mesh",
        "events",
        PER_REGION,
        mesh_options={"live_load": "all"},
        note="kvmesh with every engine's live load and in-flight count (prefixes and "
             "regions still from the replicated state)",
    ),
    Variant(
        "kvmesh-reported-kv",
        "kvmesh",
        "mesh",
        "events",
        PER_REGION,
        params={"kv_release": False},
        note="kvmesh pricing the KV barrier on the reported usage, without the sequences "
             "ended since the record (mesh/policies/kv_release.py)",
    ),
    Variant(
        "oracle-reported-kv",
        "kvmesh",
        "oracle",
        "events",
        PER_REGION,
        params={"kv_release": False},
        note="the oracle pricing the KV barrier on the reported usage",
    ),
    Variant(
        "kvmesh-calibrated",
        "kvmesh",
        "mesh",
        "events",
        PER_REGION,
        params={"calibrated": True},
        note="kvmesh with its learned corrections and forwarding band (calibrated: true, "
             "the policy kvmesh bench region-sweep measures)",
    ),
)
SKYLB_VARIANTS = (*BASELINES_GLOBAL, SKYLB, KVMESH, ORACLE)

UNBALANCED = {"us": 3, "asia": 3, "eu": 2}
BALANCED = {"us": 4, "eu": 4, "asia": 4}
_SKYLB_SOURCE = (
    "SkyWalker (EuroSys'26) §5: L4 + Llama-3.1-8B replicas in US/EU/Asia, clients in all "
    "three regions, baselines as one global balancer in the US, SkyWalker with one balancer "
    "per region. Here: simulated engines (docs/simulator.md), per-region RTTs from public "
    "tables, synthetic datasets shaped after the real ones."
)


def _arena(per_region: int) -> WorkloadFactory:
    def make(seed: int, horizon: float) -> Workload:
        return chat_workload(
            ARENA, dict.fromkeys(REGIONS, per_region), seed=seed, horizon_s=horizon
        )

    return make


def _wildchat(seed: int, horizon: float) -> Workload:
    return chat_workload(WILDCHAT, {"us": 40, "eu": 30, "asia": 30}, seed=seed, horizon_s=horizon)


def _tot(seed: int, horizon: float) -> Workload:
    return tree_workload({"us": 40, "eu": 20, "asia": 20}, seed=seed, horizon_s=horizon)


def _mixed_tree(seed: int, horizon: float) -> Workload:
    return tree_workload(
        {"us": 2, "eu": 20, "asia": 20},
        seed=seed,
        horizon_s=horizon,
        profiles={"us": MIXED_TREE_US},
    )


def skew_clients(load: float) -> dict[str, int]:
    """Users per region at ``load`` times the 32 / 6 / 3 base (at least one per region)."""
    return {r: max(1, round(n * load)) for r, n in SKEW_CLIENTS.items()}


def region_skew_workload(seed: int, horizon: float, load: float = 1.0,
                         speedup: float = 1.0) -> Workload:
    """Multi-turn chat, users skewed 32 / 6 / 3 to us (times ``load``), thinking between
    turns; time constants divided by ``speedup`` (engines that much faster)."""
    profile = replace(ARENA, think_time_s=SKEW_THINK_S / speedup,
                      start_spread_s=ARENA.start_spread_s / speedup)
    return chat_workload(profile, skew_clients(load), seed=seed, horizon_s=horizon)


def _skewed_arena(seed: int, horizon: float) -> Workload:
    return chat_workload(ARENA, {"us": 120, "eu": 40, "asia": 40}, seed=seed, horizon_s=horizon)


DIURNAL_SHAPE = DiurnalShape(day_s=600.0, peak_hour=14.0, peak_to_trough=8.0)


def _diurnal(seed: int, horizon: float) -> Workload:
    profile = replace(ARENA, think_time_s=3.0)
    return diurnal_workload(
        profile,
        dict.fromkeys(REGIONS, 2.5),
        seed=seed,
        horizon_s=horizon,
        shape=DIURNAL_SHAPE,
        users_per_region=400,
    )


GORGO_SESSIONS = SessionTraceSpec(
    users=90,
    requests_per_user=40,
    system_blocks=4,
    shared_system_blocks=2,
    new_tokens_mean=1200,
    max_input=24_000,
    output_mean=96,
    max_output=128,
    rate_per_s=6.0,
    reset_p=0.08,
)


def _gorgo_trace(seed: int, horizon: float) -> Workload:
    lines = records_to_lines(synthesize_sessions(GORGO_SESSIONS, seed))
    return trace_workload(
        lines,
        list(REGIONS),
        seed=seed,
        horizon_s=horizon,
        name="sessions",
        user_block=GORGO_SESSIONS.shared_system_blocks,
    )


def _scale_workload(regions: Sequence[str], clients_per_region: int) -> WorkloadFactory:
    def make(seed: int, horizon: float) -> Workload:
        return chat_workload(
            ARENA, dict.fromkeys(regions, clients_per_region), seed=seed, horizon_s=horizon
        )

    return make


SCALE_TOPOLOGY = mesh_topology(10)

ONE_REGION = Topology.build(("us",), {}, intra_ms=(1, 2))
IR_RATE_PER_S = 20.0


IR_OVERLOAD_PER_S = 50.0


def _five_tasks(seed: int, horizon: float) -> Workload:
    return task_mix_workload("us", IR_RATE_PER_S, seed=seed, horizon_s=horizon)


def _five_tasks_overload(seed: int, horizon: float) -> Workload:
    return task_mix_workload("us", IR_OVERLOAD_PER_S, seed=seed, horizon_s=horizon)


IR_VARIANTS = (
    Variant("round_robin", "round_robin", "probe", "none", GLOBAL_US),
    Variant("least_load", "least_load", "probe", "none", GLOBAL_US, params={"by": "tokens"},
            note="join-shortest-queue on outstanding tokens (queued prompts + predicted output)"),
    Variant("kvmesh-ttft", "kvmesh", "mesh", "events", GLOBAL_US,
            params={"objective": "ttft", "kv_knee": 1.0},
            note="the kvmesh policy as it was: expected TTFT, no decode-bound queue"),
    Variant("kvmesh", "kvmesh", "mesh", "events", GLOBAL_US, params={"objective": "e2e"},
            kv_hold=True,
            note="expected end-to-end latency with predicted lengths, mixing penalty; "
                 "held at the router when no replica has predicted KV headroom"),
    Variant("oracle", "kvmesh", "mesh", "events", GLOBAL_US, params={"objective": "e2e"},
            oracle_lengths=True, kv_hold=True,
            note="kvmesh's e2e cost and KV hold knowing every true output length"),
)
IR_ENGINE = EngineConfig(enable_prefix_caching=False, enable_chunked_prefill=False)
"""vLLM as the paper ran it (2024): no prefix caching (a preempted request recomputes its
prompt and every token it had generated) and no chunked prefill."""


def _scenarios() -> dict[str, Scenario]:
    out: list[Scenario] = [
        Scenario(
            "skylb-arena-332",
            "SkyLB: ChatBot-Arena-like, unbalanced replicas (3 US, 3 Asia, 2 EU)",
            _SKYLB_SOURCE + " Workload: 80 ongoing conversations per region, user id as hash key.",
            SKYLB_TOPOLOGY,
            UNBALANCED,
            L4_LLAMA_3_1_8B,
            _arena(80),
            SKYLB_VARIANTS,
            extra_variants=ANALYSIS,
            named_variants=LIVE_LOAD,
        ),
        Scenario(
            "skylb-arena-444",
            "SkyLB: ChatBot-Arena-like, balanced replicas (4 per region)",
            _SKYLB_SOURCE + " Workload: 80 ongoing conversations per region.",
            SKYLB_TOPOLOGY,
            BALANCED,
            L4_LLAMA_3_1_8B,
            _arena(80),
            SKYLB_VARIANTS,
            extra_variants=ANALYSIS,
            named_variants=LIVE_LOAD,
        ),
        Scenario(
            "skylb-wildchat-332",
            "SkyLB: WildChat-like, unbalanced replicas (3 US, 3 Asia, 2 EU)",
            _SKYLB_SOURCE + " Workload: 40 US, 30 EU, 30 Asia clients, hashed IP as hash key.",
            SKYLB_TOPOLOGY,
            UNBALANCED,
            L4_LLAMA_3_1_8B,
            _wildchat,
            SKYLB_VARIANTS,
            extra_variants=ANALYSIS,
            named_variants=LIVE_LOAD,
        ),
        Scenario(
            "skylb-wildchat-444",
            "SkyLB: WildChat-like, balanced replicas (4 per region)",
            _SKYLB_SOURCE + " Workload: 40 US, 30 EU, 30 Asia clients.",
            SKYLB_TOPOLOGY,
            BALANCED,
            L4_LLAMA_3_1_8B,
            _wildchat,
            SKYLB_VARIANTS,
            extra_variants=ANALYSIS,
            named_variants=LIVE_LOAD,
        ),
        Scenario(
            "skylb-tot",
            "SkyLB: Tree-of-Thoughts, depth 4, 2 branches, 12 replicas",
            _SKYLB_SOURCE + " Workload: 15-request trees, 40 US clients, 20 EU, 20 Asia.",
            SKYLB_TOPOLOGY,
            BALANCED,
            L4_LLAMA_3_1_8B,
            _tot,
            SKYLB_VARIANTS,
            extra_variants=ANALYSIS,
            named_variants=LIVE_LOAD,
        ),
        Scenario(
            "skylb-mixed-tree",
            "SkyLB: Mixed Tree (4-branch US trees, 2-branch elsewhere)",
            _SKYLB_SOURCE + " Workload: 2 US clients with 85-request 4-branch trees, 20 EU and "
            "20 Asia clients with 2-branch trees.",
            SKYLB_TOPOLOGY,
            BALANCED,
            L4_LLAMA_3_1_8B,
            _mixed_tree,
            SKYLB_VARIANTS,
            extra_variants=ANALYSIS,
            named_variants=LIVE_LOAD,
        ),
        Scenario(
            "gorgo",
            "GORGO: 3 regions at 26-40 / 90-130 / 260-466 ms, long shared contexts",
            "GORGO (arXiv 2602.11688): one replica per region (Ashburn, Frankfurt, Seoul), a "
            "central proxy in Ashburn, long-context sessions with heavy intra-user reuse, "
            "outputs capped at 128. Here: H100 + Llama-3.1-8B engines stand in for L40S + "
            "Qwen3.5-35B-A3B, and a synthetic Mooncake-format session trace (mean context "
            "~10k tokens, capped at 24k) stands in for ART-Chat.",
            GORGO_TOPOLOGY,
            {"us": 1, "eu": 1, "asia": 1},
            H100_LLAMA_3_1_8B,
            _gorgo_trace,
            (
                Variant(
                    "least_load",
                    "least_load",
                    "probe",
                    "none",
                    GLOBAL_US,
                    note="central proxy in the US",
                ),
                Variant(
                    "precise_prefix",
                    "precise_prefix",
                    "mesh",
                    "events",
                    GLOBAL_US,
                    note="central proxy in the US with every engine's KV events",
                ),
                Variant(
                    "gorgo",
                    "gorgo",
                    "mesh",
                    "events",
                    GLOBAL_US,
                    note="GORGO-proxy: central, in the US",
                ),
                Variant(
                    "gorgo-distributed",
                    "gorgo",
                    "mesh",
                    "events",
                    PER_REGION,
                    note="GORGO's cost, one router per region",
                ),
                KVMESH,
                ORACLE,
            ),
            horizon_s=300.0,
            warmup_s=60.0,
            drain_s=60.0,
        ),
        Scenario(
            "region-skew",
            "Region skew: chat users 32 / 6 / 3 to us, 2 L4 engines per region, 80/150/200 ms",
            "Forwarding that must pay for itself: the home region (us) carries most users; "
            "the mesh may send requests one round trip away, region-local routers may not. "
            "kvmesh with and without peers, and single-region policies per region. The sweep "
            "over load is `kvmesh bench region-sweep` (processes and simulator side by side, "
            "no router told its engines' prefill rate: learned online).",
            SKEW_TOPOLOGY,
            {"us": 2, "eu": 2, "asia": 2},
            L4_LLAMA_3_1_8B,
            region_skew_workload,
            (
                Variant("kvmesh", "kvmesh", "mesh", "events", PER_REGION),
                Variant("kvmesh-no-peers", "kvmesh", "mesh", "events", PER_REGION,
                        region_local=True),
                Variant("precise_prefix-local", "precise_prefix", "mesh", "events", PER_REGION,
                        region_local=True),
                Variant("least_load-local", "least_load", "mesh", "events", PER_REGION,
                        region_local=True),
            ),
            horizon_s=120.0,
            warmup_s=60.0,
            drain_s=60.0,
        ),
        Scenario(
            "diurnal-skew",
            "Diurnal skew: US 120 / EU 40 / Asia 40 clients, replicas even",
            "SkyWalker §5 diurnal test: the US at its peak while the other regions are quiet, "
            "12 replicas split evenly; region-local serving (each region only its own replicas) "
            "against sharing every replica, and 9 shared replicas against 12 region-local ones "
            "(the paper's 25% saving).",
            SKYLB_TOPOLOGY,
            BALANCED,
            L4_LLAMA_3_1_8B,
            _skewed_arena,
            (
                Variant(
                    "region-local-12", "kvmesh", "mesh", "events", PER_REGION, region_local=True
                ),
                Variant("skylb-12", "skylb", "probe", "approx", PER_REGION),
                Variant("kvmesh-12", "kvmesh", "mesh", "events", PER_REGION),
                Variant(
                    "region-local-9",
                    "kvmesh",
                    "mesh",
                    "events",
                    PER_REGION,
                    replicas={"us": 3, "eu": 3, "asia": 3},
                    region_local=True,
                ),
                Variant(
                    "skylb-9",
                    "skylb",
                    "probe",
                    "approx",
                    PER_REGION,
                    replicas={"us": 3, "eu": 3, "asia": 3},
                ),
                Variant(
                    "kvmesh-9",
                    "kvmesh",
                    "mesh",
                    "events",
                    PER_REGION,
                    replicas={"us": 3, "eu": 3, "asia": 3},
                ),
            ),
        ),
        Scenario(
            "diurnal-cycle",
            "Diurnal cycle: every region peaks at 14:00 local time",
            "The reservation argument of SkyWalker §2 over a full (compressed, 600 s) day: "
            "conversation arrivals per region follow a raised cosine peaking at 14:00 local "
            "time (8x peak/trough per region), so regions peak at different times. Region-local "
            "capacity against the same replicas shared globally.",
            SKYLB_TOPOLOGY,
            BALANCED,
            L4_LLAMA_3_1_8B,
            _diurnal,
            (
                Variant(
                    "region-local-12", "kvmesh", "mesh", "events", PER_REGION, region_local=True
                ),
                Variant("kvmesh-12", "kvmesh", "mesh", "events", PER_REGION),
                Variant(
                    "region-local-9",
                    "kvmesh",
                    "mesh",
                    "events",
                    PER_REGION,
                    replicas={"us": 3, "eu": 3, "asia": 3},
                    region_local=True,
                ),
                Variant(
                    "kvmesh-9",
                    "kvmesh",
                    "mesh",
                    "events",
                    PER_REGION,
                    replicas={"us": 3, "eu": 3, "asia": 3},
                ),
            ),
            horizon_s=660.0,
            warmup_s=60.0,
            drain_s=120.0,
        ),
        Scenario(
            "intelligent-router",
            "Intelligent Router: five-task mix, 4 replicas, 20 req/s",
            "Intelligent Router (arXiv 2408.13510) §4.1/§6: 4 instances, a mix of five tasks "
            "(translation, QnA, sentiment, in-context QnA, entity recognition; prompt/decode "
            "token means from its table, 35% heavy decodes), Poisson arrivals at 20 req/s, "
            "one router, mean end-to-end latency; vLLM FCFS, preemption by recomputation. "
            "Here: simulated V100 16GB + Llama-2-7B engines (about 4,800 tokens of KV each; "
            "the paper does not give the card's memory) calibrated to the paper's prefill "
            "gradient and lone decode speed, without prefix caching or chunked prefill, "
            "lognormal lengths with the table's means stand in for the datasets, and the "
            "kvmesh cost model with KV-headroom holding at the router (no reinforcement "
            "learning) stands in for the paper's workload-guided DQN.",
            ONE_REGION,
            {"us": 4},
            V100_16GB_LLAMA_2_7B,
            _five_tasks,
            IR_VARIANTS,
            horizon_s=130.0,
            warmup_s=30.0,
            drain_s=240.0,
            engine_config=IR_ENGINE,
            objective="e2e",
        ),
        Scenario(
            "intelligent-router-overload",
            "Intelligent Router: five-task mix, 4 replicas, 50 req/s (past capacity)",
            "The intelligent-router scenario at 50 req/s, past the four simulated V100s' "
            "capacity (about 35 req/s of this mix): a backlog grows for the whole arrival "
            "window, as the paper's round-robin latencies (168 s mean end to end for requests "
            "of a few seconds' work) say its testbed's did at 20 req/s.",
            ONE_REGION,
            {"us": 4},
            V100_LLAMA_2_7B,
            _five_tasks_overload,
            IR_VARIANTS,
            horizon_s=130.0,
            warmup_s=30.0,
            drain_s=400.0,
            objective="e2e",
        ),
        Scenario(
            "scale",
            "Scale: 10 regions x 100 replicas x 20 routers",
            "How far the simulator itself scales: the kvmesh mesh (2 routers per region, real "
            "gossip and CRDTs) over 1,000 simulated L4 engines with ChatBot-Arena-like load "
            "(1 client per replica). Engines are scraped and gossip rounds run once a second "
            "(instead of 10 and 5 times) to keep the production gossip code's CPU in bounds; "
            "see docs/evaluation.md for what dominates.",
            SCALE_TOPOLOGY,
            dict.fromkeys(SCALE_TOPOLOGY.regions, 100),
            L4_LLAMA_3_1_8B,
            _scale_workload(SCALE_TOPOLOGY.regions, 100),
            (Variant("kvmesh", "kvmesh", "mesh", "events", RouterLayout(per_region=2)),),
            horizon_s=20.0,
            warmup_s=5.0,
            drain_s=5.0,
            mesh_options={"gossip": {"gossip_interval": 1.0}},
            probe_interval_s=1.0,
        ),
    ]
    return {s.name: s for s in out}


SCENARIOS: dict[str, Scenario] = _scenarios()


@dataclass(frozen=True, slots=True)
class RunOptions:
    seed: int = 1
    horizon_s: float | None = None
    warmup_s: float | None = None
    drain_s: float | None = None
    only: tuple[str, ...] = ()
    extra: bool = False
    quick: bool = False
    """A short run (a fifth of the horizon) for smoke tests; figures are noisier."""
    tie_stream: int = 0
    """The routers' near-tie random stream (``FleetSpec.tie_stream``; 0: the default)."""
    probe_interval_s: float | None = None
    """How often routers scrape their engines (and probe-plane routers send heartbeats),
    over the scenario's setting (None: the scenario's)."""
    regret: bool = False
    """Price every kvmesh decision again on the engines' live state (``sim.regret``): each
    mesh-plane kvmesh run's decision regret goes into its config and the report's notes."""


def policy_params(sc: Scenario, v: Variant) -> dict[str, object]:
    """The variant's policy parameters; the kvmesh policy also gets the decode figures of
    the scenario's engine profile (as an operator configures them), unless the variant
    sets its own."""
    if v.policy == "kvmesh":
        kv: dict[str, object] = {}
        if v.kv_hold:
            cfg = (sc.engine_config or EngineConfig()).for_profile(sc.profile)
            kv["kv_tokens"] = cfg.num_gpu_blocks * cfg.block_size
            kv["kv_block"] = cfg.block_size
        return {**decode_params(sc.profile), **kv, **v.params}
    return dict(v.params)


def fleet_spec(sc: Scenario, v: Variant, seed: int, tie_stream: int = 0) -> FleetSpec:
    return FleetSpec(
        topology=sc.topology,
        replicas=v.replicas or sc.replicas,
        profile=sc.profile,
        policy=v.policy,
        policy_params=policy_params(sc, v),
        layout=v.layout,
        plane=v.plane,
        prefix=v.prefix,
        seed=seed,
        label=v.label,
        region_local=v.region_local,
        oracle_lengths=v.oracle_lengths,
        mesh_options={**sc.mesh_options, **v.mesh_options},
        probe_interval_s=sc.probe_interval_s,
        heartbeat_interval_s=sc.probe_interval_s,
        engine_config=sc.engine_config,
        tie_stream=tie_stream,
    )


def windows(sc: Scenario, opts: RunOptions) -> tuple[float, float, float]:
    horizon = opts.horizon_s or sc.horizon_s
    warmup = opts.warmup_s if opts.warmup_s is not None else sc.warmup_s
    drain = opts.drain_s if opts.drain_s is not None else sc.drain_s
    if opts.quick:
        horizon, warmup, drain = horizon / 5, warmup / 5, drain / 2
    if warmup >= horizon:
        raise ValueError(f"warmup {warmup} s must be shorter than the horizon {horizon} s")
    return horizon, warmup, drain


def selected_variants(sc: Scenario, opts: RunOptions) -> list[Variant]:
    variants = list(sc.variants) + (list(sc.extra_variants) if opts.extra else [])
    if opts.only:
        known = {v.label: v for v in (*sc.variants, *sc.extra_variants, *sc.named_variants)}
        unknown = [x for x in opts.only if x not in known]
        if unknown:
            raise ValueError(
                f"unknown variant {unknown[0]!r} for {sc.name} (known: {', '.join(known)})"
            )
        variants = [known[x] for x in opts.only]
    return variants


Progress = Callable[[str, float, float], None]
"""``progress(variant, virtual_now, virtual_end)``."""


def run_variant(
    sc: Scenario, v: Variant, opts: RunOptions, progress: Progress | None = None
) -> tuple[RunResult, FleetResult]:
    horizon, warmup, drain = windows(sc, opts)
    if opts.probe_interval_s is not None:
        sc = replace(sc, probe_interval_s=opts.probe_interval_s)
    spec = fleet_spec(sc, v, opts.seed, opts.tie_stream)
    started = time.perf_counter()
    fleet = Fleet(spec)
    scored = regret.attach(fleet, warmup) if opts.regret else None
    workload = sc.workload(opts.seed, horizon)
    end = horizon + drain
    cb = None if progress is None else (lambda now: progress(v.label, now, end))
    result = fleet.run(workload, drain_s=drain, progress=cb)
    summary = summarize(v.label, result.records, result.counters, warmup=warmup, horizon=horizon)
    ttfts = [r.ttft for r in result.records if warmup <= r.sent < horizon]
    run = RunResult(
        variant=v.label,
        summary=summary,
        ttfts=ttfts,
        wall_s=time.perf_counter() - started,
        events=result.events,
        config={
            "policy": v.policy,
            "policy_params": dict(spec.policy_params),
            "layout": v.layout.label,
            "plane": v.plane,
            "prefix": v.prefix,
            "region_local": v.region_local,
            "oracle_lengths": v.oracle_lengths,
            "replicas": dict(v.replicas or sc.replicas),
            "note": v.note,
            "virtual_s": round(result.virtual_s, 3),
            "decisions": result.counters.decisions,
            "waits": result.counters.waits,
            "rejected": result.counters.rejected,
            "kv_events": result.counters.kv_events,
            "gossip_messages": result.counters.gossip_messages,
            "length_prediction": length_stats(fleet),
        },
    )
    if scored is not None:
        run.config["regret"] = scored.summary()
    return run, result


def _pct(a: float, b: float) -> float:
    return (a / b - 1.0) * 100.0 if b and math.isfinite(a) and math.isfinite(b) else math.nan


def compare_e2e(runs: Sequence[RunResult], target: str = "kvmesh") -> list[str]:
    """The target's mean end-to-end latency against every other variant."""
    by = {r.variant: r.summary for r in runs}
    t = by.get(target)
    if t is None:
        return []
    lines = []
    for other, s in by.items():
        if other == target:
            continue
        d = _pct(t.e2e_mean, s.e2e_mean)
        ahead = "ahead of" if t.e2e_mean < s.e2e_mean else "behind"
        lines.append(
            f"- {target} vs {other}: mean E2E {t.e2e_mean:.2f} s vs {s.e2e_mean:.2f} s, "
            f"{d:+.1f}% ({ahead}); p90 E2E {_pct(t.e2e_p90, s.e2e_p90):+.1f}%, p90 TTFT "
            f"{_pct(t.ttft_p90, s.ttft_p90):+.1f}%."
        )
    return lines


def compare(runs: Sequence[RunResult], target: str = "kvmesh") -> list[str]:
    """Plain statements about the target against the oracle and the other variants."""
    by = {r.variant: r.summary for r in runs}
    t = by.get(target)
    if t is None:
        return []
    lines = []
    oracle = by.get("oracle")
    if oracle is not None:
        d = _pct(t.ttft_p90, oracle.ttft_p90)
        verdict = "within" if d <= 5.0 else "NOT within"
        lines.append(
            f"- {target} p90 TTFT {t.ttft_p90:.3f} s vs oracle {oracle.ttft_p90:.3f} s: "
            f"{d:+.1f}% ({verdict} the 5% target); throughput "
            f"{_pct(t.throughput_rps, oracle.throughput_rps):+.1f}%."
        )
    for other, s in by.items():
        if other in (target, "oracle"):
            continue
        d = _pct(t.ttft_p90, s.ttft_p90)
        ahead = "ahead of" if t.ttft_p90 < s.ttft_p90 else "behind"
        lines.append(
            f"- {target} vs {other}: p90 TTFT {d:+.1f}% ({ahead}), throughput "
            f"{_pct(t.throughput_rps, s.throughput_rps):+.1f}%, prefix hit "
            f"{100 * t.hit_rate:.1f}% vs {100 * s.hit_rate:.1f}%."
        )
    return lines


def run_scenario(
    name: str, opts: RunOptions, command: str, progress: Progress | None = None
) -> ScenarioReport:
    sc = SCENARIOS[name]
    horizon, warmup, drain = windows(sc, opts)
    if opts.probe_interval_s is not None and not opts.probe_interval_s > 0:
        raise ValueError(f"the probe interval must be positive, got {opts.probe_interval_s}")
    runs: list[RunResult] = []
    for v in selected_variants(sc, opts):
        run, _ = run_variant(sc, v, opts, progress)
        runs.append(run)
    params: dict[str, object] = {
        "seed": opts.seed,
        "tie_stream": opts.tie_stream,
        "probe_interval_s": opts.probe_interval_s or sc.probe_interval_s,
        "horizon_s": horizon,
        "warmup_s": warmup,
        "drain_s": drain,
        "replicas": dict(sc.replicas),
        "profile": sc.profile.name,
        "regions": list(sc.topology.regions),
        "rtt_ms": {
            f"{a}-{b}": [sc.topology.rtt(a, b).lo_ms, sc.topology.rtt(a, b).hi_ms]
            for i, a in enumerate(sc.topology.regions)
            for b in sc.topology.regions[i:]
        }
        if len(sc.topology.regions) <= 4
        else "ring (sim.topology.mesh_topology)",
        "variants": {v.label: v.describe() for v in selected_variants(sc, opts)},
    }
    notes = compare_e2e(runs, sc.target) if sc.objective == "e2e" else compare(runs, sc.target)
    return ScenarioReport(
        scenario=name,
        title=sc.title,
        command=command,
        description=sc.source,
        runs=runs,
        params=params,
        notes=[*notes, *length_notes(runs, sc.target), *regret_notes(runs)],
    )


def length_notes(runs: Sequence[RunResult], target: str = "kvmesh") -> list[str]:
    """The target's response-length prediction accuracy per true bucket, against always
    predicting the running mean (scored on every completion its routers learned from)."""
    run = next((r for r in runs if r.variant == target), None)
    st = run.config.get("length_prediction") if run is not None else None
    if not isinstance(st, dict) or not st.get("scored"):
        return []
    buckets = st.get("buckets")
    rows = buckets.items() if isinstance(buckets, dict) else ()
    parts = [
        f"{label}: {100 * b['accuracy']:.1f}% vs {100 * b['baseline_accuracy']:.1f}% "
        f"(n={b['n']}, MAE {b['mae_tokens']:.0f} vs {b['baseline_mae_tokens']:.0f} tokens)"
        for label, b in rows if b["n"]
    ]
    return [
        f"- {target} response-length buckets predicted right: "
        f"{100 * float(st['accuracy']):.1f}% vs {100 * float(st['baseline_accuracy']):.1f}% "
        f"for predict-the-mean, over {st['scored']} completions (mean absolute error "
        f"{st.get('mae_tokens', 0.0):.0f} vs {st.get('baseline_mae_tokens', 0.0):.0f} "
        "tokens); per true bucket "
        + "; ".join(parts) + "."
    ]


def regret_notes(runs: Sequence[RunResult]) -> list[str]:
    """Each scored run's decision regret against the live state (``--regret``)."""
    lines = []
    for r in runs:
        st = r.config.get("regret")
        if not isinstance(st, dict) or not st.get("decisions"):
            continue
        lines.append(
            f"- {r.variant} decisions priced on the engines' live state: mean regret "
            f"{st['mean_ms']:.2f} ms over {st['decisions']} decisions; "
            f"{100 * st['share_any']:.2f}% with any, {100 * st['share_over_50ms']:.2f}% over "
            f"50 ms, {100 * st['share_over_200ms']:.2f}% over 200 ms; forwards "
            f"{st['forwards']}, mean {st['forward_mean_ms']:.2f} ms."
        )
    return lines


def summary_of(report: ScenarioReport, variant: str) -> Summary | None:
    for r in report.runs:
        if r.variant == variant:
            return r.summary
    return None


def results_dir(name: str, out: str | None) -> Path:
    return Path(out) if out else Path("results") / name
