"""Engines, routers and the network between them, in virtual time.

The pieces that decide are the production ones: every engine is a
:class:`sim.engine_model.EngineModel`; every router runs a real policy object over a
:class:`mesh.policies.View` built by the router's own :class:`mesh.view.ViewBuilder` from its
own :class:`mesh.view.Dispatches` ledger; block keys come from :mod:`kvevents.keys`. What the
fleet adds is only what the asyncio shells do in production: moving messages (with a delay
drawn from :class:`sim.topology.Topology`), scraping engines on a timer, queueing requests a
policy told to wait, and forwarding one hop.

How a router learns about replicas is the *plane*:

``probe``
    What SkyLB and single global balancers have: the router scrapes the engines it manages
    every ``probe_interval`` (100 ms), and regional routers exchange heartbeats carrying their
    queue length and their engines' last load (SkyLB's LB-to-LB probes). Prefix knowledge is
    either none or, with ``prefix="approx"``, a tree of what this router itself sent where
    (SkyLB's local trie plus its snapshot trie of what it pushed to each remote region).
``oracle``
    An instant, perfect global view: every router reads every engine's live load and a
    prefix index that every engine's KV events update the moment they happen. The upper
    bound a decentralized design can approach.
``mesh``
    kvmesh: each router ingests its own region's KV events and scrapes its own engines into
    its replicated state, and the routers gossip it (see :mod:`sim.mesh_plane`).

A request's life: the client sends it to a router of its region (or the nearest region that
has one); the router decides; the request goes straight to the engine if the router manages
it, else one hop to a router of the target region, which either uses the replica the first
router picked or picks one itself, and never forwards again. The first token and the last
token travel back along the same path.
"""

from __future__ import annotations

import math
import random
import statistics
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

from kvevents.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from kvevents.keys import EngineKeyMap, request_keys
from mesh.dispatch import Ask, Dispatcher, Placement, Target, Waiter
from mesh.lengths import LengthPredictor, bucket_of
from mesh.outcomes import Outcomes, Pending, policy_rate
from mesh.policies import Decision, Policy, Request, make_policy
from mesh.policies.base import LengthGuess, NoPrefixes, PrefixLookup
from mesh.policies.cache_aware import ApproxTree
from mesh.simnet import SimNet
from mesh.tiers import TierConfig, TierQueue, TierRules
from mesh.view import Dispatches, RegionRecord, ReplicaRecord, Ticket, ViewBuilder
from sim.des import EventLoop, Timer
from sim.engine_model import EngineConfig, EngineModel, RequestOutput, StepResult
from sim.mesh_plane import MeshPlane
from sim.metrics import RequestRecord, RunCounters
from sim.profiles import Profile
from sim.textgen import OutputPlan, TextGenerator
from sim.topology import Topology
from sim.workloads.base import Client, SimRequest, Workload

PLANES = ("probe", "oracle", "mesh")
CLIENTS_START_S = 0.5
"""Clients start once routers have scraped their engines (a router is not ready before)."""
PREFIX_SOURCES = ("none", "approx", "events")


@dataclass(frozen=True, slots=True)
class RouterLayout:
    """``global_region`` set: one router there manages every engine (a single global LB).
    Otherwise ``per_region`` routers in every region, each managing its region's engines."""

    global_region: str | None = None
    per_region: int = 1

    @property
    def label(self) -> str:
        return f"global@{self.global_region}" if self.global_region else f"{self.per_region}/region"


@dataclass(frozen=True, slots=True)
class FleetSpec:
    topology: Topology
    replicas: Mapping[str, int]
    """Engines per region."""
    profile: Profile
    policy: str
    policy_params: Mapping[str, object] = field(default_factory=dict)
    layout: RouterLayout = RouterLayout()
    plane: str = "mesh"
    prefix: str = "events"
    """Where the view's prefix knowledge comes from (``approx`` only on the probe plane)."""
    block_size: int = 16
    probe_interval_s: float = 0.1
    heartbeat_interval_s: float = 0.1
    engine_config: EngineConfig | None = None
    seed: int = 0
    label: str = ""
    mesh_options: Mapping[str, object] = field(default_factory=dict)
    """Passed to the mesh plane (gossip interval, fanout...)."""
    region_local: bool = False
    """Routers know and use only their own region's engines (per-region reserved capacity)."""
    oracle_lengths: bool = False
    """Requests carry their true output length as the prediction (an upper bound on what a
    length predictor can give the policy)."""
    tiers: TierConfig | None = None
    """Service tiers: requests get their tier's SLO deadline; the routers' dispatchers keep
    per-tier queues when ``enabled`` (else one FCFS queue, deadlines only measured)."""
    configured_rate: bool = True
    """Routers are told each engine's true prefill rate; False: left to the policy's default
    and to calibration (as a deployment that sets no ``prefill_rate``)."""
    tie_stream: int = 0
    """Which random stream the routers draw their random choices from (the kvmesh policy's
    near-tie draws; 0: the one every published figure used). Only the routers' streams
    change, never the workload's or the network's, so runs that differ in it show how much a
    figure owes to tie-breaking alone."""

    def __post_init__(self) -> None:
        if self.plane not in PLANES:
            raise ValueError(f"plane must be one of {PLANES}, got {self.plane!r}")
        if self.prefix not in PREFIX_SOURCES:
            raise ValueError(f"prefix must be one of {PREFIX_SOURCES}, got {self.prefix!r}")
        if self.prefix == "approx" and self.plane != "probe":
            raise ValueError("prefix='approx' is the probe plane's request-derived tree")
        for region in self.replicas:
            if region not in self.topology.regions:
                raise ValueError(f"replicas in unknown region {region!r}")
        g = self.layout.global_region
        if g is not None and g not in self.topology.regions:
            raise ValueError(f"global router in unknown region {g!r}")
        if g is not None and self.region_local:
            raise ValueError("region_local needs routers in every region, not a global one")


class ScriptedText(TextGenerator):
    """Output tokens chosen by the workload: the engine generates exactly the reply the
    client's next turn will quote, so follow-up turns can hit the cached reply blocks."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.next_tokens: tuple[int, ...] | None = None

    def plan(
        self,
        prompt_token_ids: Sequence[int],
        max_tokens: int | None,
        natural_range: tuple[int, int] = (16, 256),
    ) -> OutputPlan:
        scripted, self.next_tokens = self.next_tokens, None
        if scripted is None:
            return super().plan(prompt_token_ids, max_tokens, natural_range)
        return OutputPlan(scripted, stops_naturally=False)


class Flight:
    """One request's journey through the fleet."""

    __slots__ = (
        "client",
        "engine",
        "entry",
        "entry_pending",
        "entry_ticket",
        "forwarded",
        "pinned",
        "policy_request",
        "rec",
        "req",
        "target",
        "via",
        "via_pending",
        "via_ticket",
    )

    def __init__(self, req: SimRequest, client: Client, rec: RequestRecord) -> None:
        self.req = req
        self.client = client
        self.rec = rec
        self.policy_request: Request | None = None
        self.entry: SimRouter | None = None
        self.via: SimRouter | None = None
        self.engine: SimEngine | None = None
        self.entry_ticket: Ticket | None = None
        self.via_ticket: Ticket | None = None
        self.entry_pending: Pending | None = None
        self.via_pending: Pending | None = None
        """Predictions awaiting the first token, at the entry and the serving router."""
        self.forwarded = False
        self.pinned: str | None = None
        self.target: str | None = None
        """The replica this request is bound for, once any router has named it."""


class SimEngine:
    """One replica: the engine model stepped by the event loop."""

    def __init__(self, fleet: Fleet, replica: str, region: str, seed: int) -> None:
        self.fleet = fleet
        self.replica = replica
        self.region = region
        self.text = ScriptedText(seed)
        spec = fleet.spec
        self.model = EngineModel(spec.profile, spec.engine_config, seed=seed, textgen=self.text)
        self.flights: dict[str, Flight] = {}
        self.stepping = False
        self.batches = 0
        self.block_size = self.model.config.block_size

    def submit(self, flight: Flight) -> None:
        now = self.fleet.loop.now
        req = flight.req
        self.text.next_tokens = req.output
        try:
            self.model.add_request(str(req.rid), req.prompt, req.output_len, now)
        except ValueError:
            self.text.next_tokens = None
            self.fleet.reject(flight, self.region)
            return
        self.flights[str(req.rid)] = flight
        flight.engine = self
        if not self.stepping:
            self.stepping = True
            self.fleet.loop.at(now, self._step)

    def _step(self) -> None:
        loop = self.fleet.loop
        result = self.model.step(loop.now)
        if result.events:
            self.batches += 1
            self.fleet.publish_kv(self, result.events)
        if result.duration <= 0 and not result.outputs:
            self.stepping = False
            return
        loop.at(result.end, self._step_done, result)

    def _step_done(self, result: StepResult) -> None:
        for out in result.outputs:
            flight = self.flights.get(out.req_id)
            if flight is None:
                continue
            if out.first_token:
                self.fleet.first_token(flight, out)
            if out.finished:
                del self.flights[out.req_id]
                self.fleet.finished(flight, out)
        if self.model.has_work():
            self._step()
        else:
            self.stepping = False

    def load(self) -> tuple[int, int, float]:
        """(waiting, running, KV usage): what a /metrics scrape reads."""
        s = self.model.scheduler
        return len(s.waiting), len(s.running), self.model.kv.usage


class SimRouter:
    """One router: the product's decision core (:class:`mesh.dispatch.Dispatcher`) driven by
    the fleet's event loop, plus what the asyncio router does around it (timers, messages)."""

    def __init__(self, fleet: Fleet, router_id: str, region: str, managed: list[SimEngine]) -> None:
        self.fleet = fleet
        self.id = router_id
        self.region = region
        self.managed = {e.replica: e for e in managed}
        self.policy: Policy = make_policy(fleet.spec.policy, fleet.spec.policy_params)
        stream = fleet.spec.tie_stream
        self.rng = random.Random(f"{fleet.spec.seed}/router/{router_id}"
                                 + (f"/stream{stream}" if stream else ""))
        self.dispatches = Dispatches()
        rate = fleet.configured_rate
        self.outcomes = Outcomes(region, policy_rate(self.policy), lambda replica: rate)
        self.views: ViewBuilder = ViewBuilder(
            region=region,
            dispatches=self.dispatches,
            records=lambda now: fleet.live_records(self, now),
            regions=lambda now: fleet.plane.regions(self, now),
            prefix=NoPrefixes(),
            learned_rtt=self.outcomes.rtt,
            margins=self.outcomes.margins,
            prior_margin=self.outcomes.prior_margin,
        )
        self.core = Dispatcher(
            region=region,
            policy=self.policy,
            views=self.views,
            local=self.managed.__contains__,
            rng=self.rng,
            tiers=(TierRules(fleet.spec.tiers) if fleet.spec.tiers is not None
                   and fleet.spec.tiers.enabled else None),
        )
        self._waiting: dict[Waiter, Flight] = {}
        self._timer: Timer | None = None
        self._kicked = False

    @property
    def queue(self) -> TierQueue:
        return self.core.queue

    @property
    def mean_prompt_tokens(self) -> float:
        return self.core.mean_prompt_tokens

    # -- requests ----------------------------------------------------------------------------
    def receive(self, flight: Flight, forwarded: bool) -> None:
        """A request arrives (from a client, or forwarded by a peer router)."""
        now = self.fleet.loop.now
        preq = flight.policy_request
        assert preq is not None
        if not forwarded:
            preq = flight.policy_request = self.core.annotate(preq)
        got = self.core.submit(Ask(preq, forwarded, flight.pinned if forwarded else None), now)
        if isinstance(got, Placement):
            self._go(flight, got, forwarded)
            return
        self._waiting[got] = flight
        if got.first is None:
            self.pump()  # an arrival behind others: re-evaluate the head
        else:
            self._arm()

    def kick(self) -> None:
        """A completion or a load change: re-evaluate a waiting head (once, now)."""
        if self.core.queue and not self._kicked:
            self._kicked = True
            self.fleet.loop.at(self.fleet.loop.now, self.pump)

    def pump(self) -> None:
        self._kicked = False
        now = self.fleet.loop.now
        for waiter, placement in self.core.pump(now):
            flight = self._waiting.pop(waiter)
            flight.rec.queued_at_router += now - waiter.since
            self._go(flight, placement, waiter.ask.forwarded)
        self._arm()

    def _arm(self) -> None:
        at = self.core.retry_at
        timer = self._timer
        if timer is not None and not timer.cancelled:
            if at is not None and timer.when == at:
                return
            timer.cancel()
        self._timer = None if at is None else self.fleet.loop.at(at, self._retry)

    def _retry(self) -> None:
        self._timer = None
        self.pump()

    def _go(self, flight: Flight, p: Placement, forwarded: bool) -> None:
        if p.load_age is not None and (not forwarded or flight.rec.staleness is None):
            flight.rec.staleness = p.load_age
        self.fleet.route(self, flight, p, forwarded)


class Plane(Protocol):
    """How routers learn about replicas (see the module docstring)."""

    name: str

    def start(self, fleet: Fleet) -> None: ...

    def records(self, router: SimRouter, now: float) -> Iterable[ReplicaRecord]: ...

    def regions(self, router: SimRouter, now: float) -> Mapping[str, RegionRecord]: ...

    def prefix(self, router: SimRouter) -> PrefixLookup: ...

    def on_kv_events(self, engine: SimEngine, events: Sequence[KVEvent], now: float) -> None: ...

    def on_routed(self, router: SimRouter, flight: Flight, target: str, region: str) -> None: ...


class KeyIndex:
    """Block key -> replicas holding it, fed by ``EngineKeyMap`` changes: the oracle's truth.

    ``match`` answers like the prefix index: consecutive leading keys each replica holds.
    """

    def __init__(self) -> None:
        self._holders: dict[int, set[str]] = {}
        self._maps: dict[str, EngineKeyMap] = {}

    def apply(self, replica: str, events: Sequence[KVEvent]) -> None:
        km = self._maps.get(replica)
        if km is None:
            km = self._maps[replica] = EngineKeyMap()
        holders = self._holders
        for ev in events:
            if isinstance(ev, BlockStored):
                for k in km.stored(ev):
                    holders.setdefault(k, set()).add(replica)
            elif isinstance(ev, BlockRemoved):
                for k in km.removed(ev):
                    hs = holders.get(k)
                    if hs is not None:
                        hs.discard(replica)
                        if not hs:
                            del holders[k]
            elif isinstance(ev, AllBlocksCleared):
                for k in km.held_keys():
                    hs = holders.get(k)
                    if hs is not None:
                        hs.discard(replica)
                        if not hs:
                            del holders[k]
                km.clear()

    def match(self, keys: Sequence[int]) -> Mapping[str, int]:
        out: dict[str, int] = {}
        if not keys:
            return out
        alive = set(self._holders.get(keys[0], ()))
        depth = 0
        while alive:
            depth += 1
            if depth == len(keys):
                for r in alive:
                    out[r] = depth
                break
            nxt = self._holders.get(keys[depth])
            if nxt is None:
                for r in alive:
                    out[r] = depth
                break
            for r in alive - nxt:
                out[r] = depth
            alive &= nxt
        return out


class SnapshotPrefix:
    """SkyLB's tries as a prefix lookup: what this router sent to each local replica, and
    what it pushed to each remote region (every replica of that region inherits the match)."""

    def __init__(self, fleet: Fleet, max_entries: int = 1 << 20) -> None:
        self.tree = ApproxTree(max_entries)
        self._fleet = fleet

    def match(self, keys: Sequence[int]) -> Mapping[str, int]:
        raw = self.tree.match(keys)
        out: dict[str, int] = {}
        for tenant, depth in raw.items():
            if tenant.startswith("@"):
                for e in self._fleet.by_region.get(tenant[1:], ()):
                    out[e.replica] = max(out.get(e.replica, 0), depth)
            else:
                out[tenant] = max(out.get(tenant, 0), depth)
        return out


@dataclass(slots=True)
class _Probe:
    waiting: int
    running: int
    kv: float
    measured_at: float


@dataclass(slots=True)
class _Heartbeat:
    queue: int
    records: dict[str, _Probe]


class ProbePlane:
    """Scrapes + LB heartbeats, no KV events (SkyLB and single global balancers)."""

    name = "probe"

    def __init__(self, approx_prefix: bool) -> None:
        self.approx = approx_prefix
        self._own: dict[str, dict[str, _Probe]] = {}
        self._heard: dict[str, dict[str, _Heartbeat]] = {}
        self._prefix: dict[str, PrefixLookup] = {}

    def start(self, fleet: Fleet) -> None:
        self.fleet = fleet
        spec = fleet.spec
        for router in fleet.routers:
            self._own[router.id] = {}
            self._heard[router.id] = {}
            self._prefix[router.id] = SnapshotPrefix(fleet) if self.approx else NoPrefixes()
            router.views.prefix = self._prefix[router.id]
            offset = fleet.rng.uniform(0, spec.probe_interval_s)
            fleet.loop.every(spec.probe_interval_s, partial(self._probe, router), first=offset)
            if len(fleet.routers) > 1 and not spec.region_local:
                fleet.loop.every(
                    spec.heartbeat_interval_s, partial(self._heartbeat, router), first=offset
                )

    def _probe(self, router: SimRouter) -> None:
        fleet = self.fleet
        by_region: dict[str, list[SimEngine]] = {}
        for e in router.managed.values():
            by_region.setdefault(e.region, []).append(e)
        for region, engines in by_region.items():
            out = fleet.topology.one_way_s(router.region, region, fleet.rng)
            fleet.loop.after(out, self._read, router, engines)

    def _read(self, router: SimRouter, engines: list[SimEngine]) -> None:
        fleet = self.fleet
        now = fleet.loop.now
        got = {e.replica: _Probe(*e.load(), now) for e in engines}
        back = fleet.topology.one_way_s(engines[0].region, router.region, fleet.rng)
        fleet.loop.after(back, self._arrived, router, got)
        fleet.counters.load_reports += len(got)

    def _arrived(self, router: SimRouter, got: dict[str, _Probe]) -> None:
        self._own[router.id].update(got)
        router.kick()  # a load change: re-evaluate a waiting head

    def _heartbeat(self, router: SimRouter) -> None:
        fleet = self.fleet
        own = dict(self._own[router.id])
        for peer in fleet.routers:
            if peer is router:
                continue
            beat = _Heartbeat(len(router.queue), own)
            fleet.counters.gossip_bytes += 32 + 40 * len(own)
            fleet.counters.gossip_messages += 1
            delay = fleet.topology.one_way_s(router.region, peer.region, fleet.rng)
            fleet.loop.after(delay, self._heard_from, peer, router.id, beat)

    def _heard_from(self, peer: SimRouter, sender: str, beat: _Heartbeat) -> None:
        self._heard[peer.id][sender] = beat

    def records(self, router: SimRouter, now: float) -> Iterable[ReplicaRecord]:
        own = self._own[router.id]
        rate = self.fleet.configured_rate
        for replica, e in router.managed.items():
            p = own.get(replica)
            if p is None:
                yield ReplicaRecord(replica, e.region, True, 0, 0, 0.0, math.inf, 0, rate)
            else:
                yield ReplicaRecord(
                    replica,
                    e.region,
                    True,
                    p.waiting,
                    p.running,
                    p.kv,
                    now - p.measured_at,
                    0,
                    rate,
                )
        for beat in self._heard[router.id].values():
            for replica, p in beat.records.items():
                if replica in router.managed:
                    continue
                region = self.fleet.engines[replica].region
                yield ReplicaRecord(
                    replica,
                    region,
                    True,
                    p.waiting,
                    p.running,
                    p.kv,
                    now - p.measured_at,
                    0,
                    rate,
                )

    def regions(self, router: SimRouter, now: float) -> Mapping[str, RegionRecord]:
        fleet = self.fleet
        out: dict[str, RegionRecord] = {}
        if fleet.spec.region_local:
            return out
        queues: dict[str, int] = {}
        for sender, beat in self._heard[router.id].items():
            region = fleet.router_by_id[sender].region
            queues[region] = queues.get(region, 0) + beat.queue
        for region in fleet.by_region:
            if region == router.region:
                continue
            routers = fleet.routers_in.get(region)
            names = tuple(r.id for r in routers) if routers else ("direct",)
            out[region] = RegionRecord(
                region,
                fleet.topology.mean_rtt_s(router.region, region),
                names,
                queues.get(region, 0),
            )
        return out

    def prefix(self, router: SimRouter) -> PrefixLookup:
        return self._prefix[router.id]

    def on_kv_events(self, engine: SimEngine, events: Sequence[KVEvent], now: float) -> None:
        return None

    def on_routed(self, router: SimRouter, flight: Flight, target: str, region: str) -> None:
        lookup = self._prefix.get(router.id)
        if isinstance(lookup, SnapshotPrefix) and flight.policy_request is not None:
            lookup.tree.insert(flight.policy_request.keys, target)


class OraclePlane:
    """Every router sees every engine's live load and cache contents, instantly."""

    name = "oracle"

    def __init__(self) -> None:
        self.index = KeyIndex()

    def start(self, fleet: Fleet) -> None:
        self.fleet = fleet
        for router in fleet.routers:
            router.views.prefix = self.index

    def records(self, router: SimRouter, now: float) -> Iterable[ReplicaRecord]:
        rate = self.fleet.configured_rate
        local = self.fleet.spec.region_local
        bound = self.fleet.bound
        for e in self.fleet.engine_list:
            if local and e.region != router.region:
                continue
            waiting, running, kv = e.load()
            # Every request bound for the replica, counted once; the view adds our own.
            others = max(0, bound.get(e.replica, 0) - router.dispatches.inflight(e.replica))
            yield ReplicaRecord(e.replica, e.region, True, waiting, running, kv, 0.0, others, rate)

    def regions(self, router: SimRouter, now: float) -> Mapping[str, RegionRecord]:
        fleet = self.fleet
        out: dict[str, RegionRecord] = {}
        if fleet.spec.region_local:
            return out
        for region in fleet.by_region:
            if region == router.region:
                continue
            routers = fleet.routers_in.get(region)
            names = tuple(r.id for r in routers) if routers else ("direct",)
            queue = sum(len(r.queue) for r in routers) if routers else 0
            out[region] = RegionRecord(
                region, fleet.topology.mean_rtt_s(router.region, region), names, queue
            )
        return out

    def prefix(self, router: SimRouter) -> PrefixLookup:
        return self.index

    def on_kv_events(self, engine: SimEngine, events: Sequence[KVEvent], now: float) -> None:
        self.index.apply(engine.replica, events)
        self.fleet.counters.kv_events += len(events)

    def on_routed(self, router: SimRouter, flight: Flight, target: str, region: str) -> None:
        return None


@dataclass(slots=True)
class FleetResult:
    records: list[RequestRecord]
    counters: RunCounters
    wall_s: float
    events: int
    virtual_s: float


class Fleet:
    """Build once per run: engines, routers, plane and clients share one event loop."""

    def __init__(self, spec: FleetSpec, plane: Plane | None = None) -> None:
        self.spec = spec
        self.topology = spec.topology
        self.loop = EventLoop()
        self.rng = random.Random(f"{spec.seed}/network")
        self.counters = RunCounters()
        self.prefill_rate = 1024 / spec.profile.prefill_time(1024)
        self.configured_rate: float | None = self.prefill_rate if spec.configured_rate else None
        """The prefill rate routers are configured with (None: not set)."""
        self.engines: dict[str, SimEngine] = {}
        self.by_region: dict[str, list[SimEngine]] = {}
        for region in sorted(spec.replicas):
            for i in range(spec.replicas[region]):
                replica = f"{region}-e{i}"
                e = SimEngine(self, replica, region, seed=zlib.crc32(replica.encode()) ^ spec.seed)
                self.engines[replica] = e
                self.by_region.setdefault(region, []).append(e)
        self.engine_list = list(self.engines.values())
        self.routers: list[SimRouter] = []
        g = spec.layout.global_region
        if g is not None:
            self.routers.append(SimRouter(self, f"{g}-lb0", g, self.engine_list))
        else:
            for region in spec.topology.regions:
                for i in range(spec.layout.per_region):
                    managed = self.by_region.get(region, [])
                    self.routers.append(SimRouter(self, f"{region}-lb{i}", region, managed))
        self.router_by_id = {r.id: r for r in self.routers}
        self.router_at = {**self.router_by_id,
                          **{SimNet.addr_of(r.id): r for r in self.routers}}
        """Routers by the addresses views name them with (plane-dependent)."""
        self.routers_in: dict[str, list[SimRouter]] = {}
        for r in self.routers:
            self.routers_in.setdefault(r.region, []).append(r)
        self.plane: Plane = plane or make_plane(spec)
        self.records: list[RequestRecord] = []
        self.outstanding = 0
        self.bound: dict[str, int] = {}
        """Requests bound for each replica and not yet answered, each counted once."""
        self._horizon = math.inf
        self._keys_cache: dict[int, list[int]] = {}
        self.offline: set[str] = set()
        """Replicas taking no new requests (not started, starting, or draining): set by an
        autoscaler (``sim.scaling``); routers drop them from their view as a failed health
        check would."""

    def live_records(self, router: SimRouter, now: float) -> Iterable[ReplicaRecord]:
        records = self.plane.records(router, now)
        if not self.offline:
            return records
        return [r for r in records if r.replica not in self.offline]

    # -- clients -----------------------------------------------------------------------------
    def entry_router(self, client: Client) -> SimRouter:
        routers = self.routers_in.get(client.region)
        if not routers:
            region = self.topology.nearest(client.region, self.routers_in)
            routers = self.routers_in[region]
        return routers[zlib.crc32(client.cid.encode()) % len(routers)]

    def _schedule(self, client: Client, reqs: Iterable[SimRequest]) -> None:
        for req in reqs:
            if req.sent_at < self._horizon:
                self.loop.at(req.sent_at, self._send, client, req)

    def _send(self, client: Client, req: SimRequest) -> None:
        now = self.loop.now
        rec = RequestRecord(
            rid=req.rid,
            client=req.client,
            region=req.region,
            user=req.user,
            kind=req.kind,
            sent=now,
            prompt_tokens=req.prompt_len,
            output_tokens=req.output_len,
        )
        self.records.append(rec)
        self.outstanding += 1
        flight = Flight(req, client, rec)
        tiers = self.spec.tiers
        tier = req.tier or (tiers.default if tiers is not None else "standard")
        deadline = math.inf
        if math.isfinite(req.deadline_s):
            deadline = now + req.deadline_s
        elif tiers is not None:
            deadline = tiers.deadline(tier, now)
        rec.tier, rec.deadline = tier, deadline
        flight.policy_request = Request(
            request_id=str(req.rid),
            token_ids=req.prompt,
            keys=request_keys(req.prompt, self.spec.block_size),
            block_size=self.spec.block_size,
            session=req.user,
            max_tokens=req.max_tokens,
            arrival=now,
            app=req.app,
            predicted=LengthGuess(float(req.output_len), bucket_of(req.output_len))
            if self.spec.oracle_lengths else None,
            tier=tier,
            deadline=deadline,
        )
        router = self.entry_router(client)
        flight.entry = router
        rec.router = router.id
        rec.router_region = router.region
        self._schedule(client, client.on_sent(req, now))
        delay = self.topology.one_way_s(client.region, router.region, self.rng)
        self.loop.after(delay, router.receive, flight, False)

    # -- routing -----------------------------------------------------------------------------
    def route(self, router: SimRouter, flight: Flight, p: Placement, forwarded: bool) -> None:
        """Carry out ``router``'s placement: to an engine, one hop to a router, or back."""
        d, target = p.decision, p.target
        if target is None and p.outcome == "shed":
            self._shed(router, flight, d.retry_after)
            return
        if target is None:
            self.reject(flight, router.region)
            return
        if target.local:
            self.dispatch(router, flight, target, forwarded, d)
            return
        peer = self.router_at.get(target.url)
        if peer is None or forwarded:
            self.reject(flight, router.region)
            return
        if d.replica is not None:
            self._bind(flight, d.replica)
        now = self.loop.now
        flight.entry_ticket = router.core.start(target, flight.req.prompt_len, now,
                                                _work(flight))
        assert flight.policy_request is not None
        flight.entry_pending = router.outcomes.begin(d, flight.policy_request, False, now)
        if flight.entry_pending is not None:
            flight.rec.predicted_ttft = flight.entry_pending.prediction.cost
        self.plane.on_routed(router, flight, d.replica or f"@{target.region}", target.region)
        flight.via = peer
        flight.forwarded = True
        flight.pinned = d.replica
        flight.rec.forwards += 1
        delay = self.topology.one_way_s(router.region, target.region, self.rng)
        self.loop.after(delay, peer.receive, flight, True)

    def dispatch(
        self, router: SimRouter, flight: Flight, target: Target, forwarded: bool,
        d: Decision | None = None,
    ) -> None:
        engine = self.engines[target.replica]
        ticket = router.core.start(
            Target(engine.replica, engine.replica, engine.region, True),
            flight.req.prompt_len, self.loop.now, _work(flight),
        )
        pending = None
        if d is not None and flight.policy_request is not None:
            pending = router.outcomes.begin(d, flight.policy_request, True, self.loop.now)
        if forwarded:
            flight.via_ticket = ticket
            flight.via_pending = pending
        else:
            flight.entry_ticket = ticket
            flight.entry_pending = pending
            if pending is not None:
                flight.rec.predicted_ttft = pending.prediction.cost
        self.plane.on_routed(router, flight, engine.replica, engine.region)
        if flight.target is not None and flight.target != engine.replica:
            # The serving router picked another of its engines than the one named: the
            # request is bound for the one it goes to.
            self._unbind(flight)
        self._bind(flight, engine.replica)
        flight.rec.replica = engine.replica
        flight.rec.replica_region = engine.region
        flight.rec.decided = self.loop.now
        delay = self.topology.one_way_s(router.region, engine.region, self.rng)
        self.loop.after(delay, engine.submit, flight)

    # -- responses ---------------------------------------------------------------------------
    def _back_path(
        self, flight: Flight, engine_region: str
    ) -> list[tuple[SimRouter | None, float]]:
        """Hops back to the client: (router reached or None for the client, delay)."""
        hops: list[tuple[SimRouter | None, float]] = []
        here = engine_region
        for router in (flight.via, flight.entry):
            if router is None:
                continue
            hops.append((router, self.topology.one_way_s(here, router.region, self.rng)))
            here = router.region
        hops.append((None, self.topology.one_way_s(here, flight.req.region, self.rng)))
        return hops

    def first_token(self, flight: Flight, out: RequestOutput) -> None:
        assert flight.engine is not None
        flight.rec.cached_tokens = out.num_cached_tokens
        path = self._back_path(flight, flight.engine.region)
        t = self.loop.now
        for router, delay in path:
            t += delay
            if router is None:
                continue
            pending = flight.via_pending if router is flight.via else flight.entry_pending
            if pending is not None:
                # The first token reaches this router at t: the outcome it learns from.
                self.loop.at(t, router.outcomes.first_byte, pending, t)
        flight.rec.first_token = t
        entry, preq = flight.entry, flight.policy_request
        if entry is not None and preq is not None:
            # The entry router sees the first token when it passes through it.
            at = self.loop.now + sum(d for _, d in path[:-1])
            self.loop.at(at, entry.core.observe_first_token, preq, at)

    def finished(self, flight: Flight, out: RequestOutput) -> None:
        assert flight.engine is not None
        t = self.loop.now
        learner = flight.via if flight.via is not None else flight.entry
        for router, delay in self._back_path(flight, flight.engine.region):
            t += delay
            if router is not None:
                self.loop.at(t, self._release, flight, router, router is learner)
        self.loop.at(t, self._complete, flight, True)

    def _shed(self, router: SimRouter, flight: Flight, retry_after: float) -> None:
        """A 429 with ``Retry-After``: back to the client, which sends it again then (as an
        HTTP client honours the header: whole seconds, at least one)."""
        self.counters.shed += 1
        flight.rec.sheds += 1
        back = self.topology.one_way_s(router.region, flight.req.region, self.rng)
        out = self.topology.one_way_s(flight.req.region, router.region, self.rng)
        self.loop.after(back + max(1.0, math.ceil(retry_after)) + out, router.receive,
                        flight, False)

    def reject(self, flight: Flight, where: str) -> None:
        """Nothing could serve it: an error travels back to the client."""
        self.counters.rejected += 1
        t = self.loop.now
        for router in (flight.via, flight.entry):
            if router is not None:
                self._release(flight, router)
        t += self.topology.one_way_s(where, flight.req.region, self.rng)
        self.loop.at(t, self._complete, flight, False)

    def _release(self, flight: Flight, router: SimRouter, learn: bool = False) -> None:
        if learn and flight.policy_request is not None:
            # The router that dispatched to the engine sees the answer's usage.
            router.core.completed(flight.policy_request, flight.req.output_len)
        if router is flight.via and flight.via_ticket is not None:
            router.core.done(flight.via_ticket)
            flight.via_ticket = None
        if router is flight.entry and flight.entry_ticket is not None:
            router.core.done(flight.entry_ticket)
            flight.entry_ticket = None
        router.kick()

    def _bind(self, flight: Flight, replica: str) -> None:
        if flight.target is None:
            flight.target = replica
            self.bound[replica] = self.bound.get(replica, 0) + 1

    def _unbind(self, flight: Flight) -> None:
        if flight.target is not None:
            self.bound[flight.target] -= 1
            flight.target = None

    def _complete(self, flight: Flight, ok: bool) -> None:
        now = self.loop.now
        self._unbind(flight)
        self.outstanding -= 1
        if ok:
            flight.rec.done = now
        else:
            flight.rec.first_token = None
        self._schedule(flight.client, flight.client.on_complete(flight.req, now))

    # -- engines -----------------------------------------------------------------------------
    def publish_kv(self, engine: SimEngine, events: Sequence[KVEvent]) -> None:
        self.plane.on_kv_events(engine, events, self.loop.now)

    def _sample_load(self) -> None:
        loads = [w + r for w, r, _ in (e.load() for e in self.engine_list)]
        mean = statistics.fmean(loads) if loads else 0.0
        if mean > 0:
            self.counters.load_cv_samples.append(statistics.pstdev(loads) / mean)

    # -- running -----------------------------------------------------------------------------
    def run(
        self,
        workload: Workload,
        *,
        drain_s: float = 60.0,
        progress: Callable[[float], None] | None = None,
    ) -> FleetResult:
        """Run ``workload`` until its horizon, then let requests in flight finish (at most
        ``drain_s`` more virtual seconds)."""
        started = time.perf_counter()
        self._horizon = workload.horizon_s
        self.plane.start(self)
        self.loop.every(1.0, self._sample_load, first=1.0)
        for client in workload.clients:
            self._schedule(client, client.start(CLIENTS_START_S))
        self.loop.run(until=workload.horizon_s, on_progress=progress)
        end = workload.horizon_s + drain_s

        def check_drained() -> None:
            if self.outstanding <= 0:
                self.loop.stop()

        self.loop.every(0.5, check_drained)
        check_drained()
        if self.outstanding > 0:
            self.loop.run(until=end, on_progress=progress)
        self.counters.decisions = sum(r.core.decisions for r in self.routers)
        self.counters.waits = sum(r.core.waits for r in self.routers)
        return FleetResult(
            records=self.records,
            counters=self.counters,
            wall_s=time.perf_counter() - started,
            events=self.loop.events_run,
            virtual_s=self.loop.now,
        )


def length_stats(fleet: Fleet) -> dict[str, object]:
    """The routers' response-length predictors' accuracy, summed over routers."""
    merged = LengthPredictor()
    for r in fleet.routers:
        lp = r.core.lengths
        merged.observed += lp.observed
        merged.total_tokens += lp.total_tokens
        merged.dropped_keys += lp.dropped_keys
        for into, sc in zip(merged.scores, lp.scores, strict=True):
            into.n += sc.n
            into.hits += sc.hits
            into.baseline_hits += sc.baseline_hits
            into.abs_error += sc.abs_error
            into.baseline_abs_error += sc.baseline_abs_error
    out = merged.stats()
    out.pop("keys", None)
    return out


def _work(flight: Flight) -> float:
    """The request's predicted output tokens (its decode work in the ledger)."""
    preq = flight.policy_request
    guess = preq.predicted if preq is not None else None
    return guess.tokens if guess is not None else 0.0


def make_plane(spec: FleetSpec) -> Plane:
    if spec.plane == "probe":
        if spec.prefix == "events":
            raise ValueError("the probe plane has no KV events; use prefix='none' or 'approx'")
        return ProbePlane(approx_prefix=spec.prefix == "approx")
    if spec.plane == "oracle":
        return OraclePlane()
    return MeshPlane(spec)
