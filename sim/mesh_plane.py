"""The kvmesh plane: every router's real replicated state, fed and gossiped in virtual time.

Per router, the production pieces: a :class:`mesh.state.MeshState` (``PrefixIndex``,
``LoadVector``, the ``meta`` map) is the router's backend; each engine the router manages
feeds a :class:`kvevents.ingest.EngineIngest` with the exact msgpack batches vLLM would
publish (``kvevents.publisher.encode_batch``), which writes the engine's slice of the index;
engine scrapes go to ``MeshState.publish_engine`` and the dispatch ledger to
``publish_inflight`` (every 20 ms when it changed, as ``Router`` does); a
:class:`mesh.gossip.MeshCore` per router gossips the three states over a
:class:`mesh.simnet.SimNet` whose one-way delays come from the scenario's topology. The
view a policy sees is built from ``MeshState`` exactly as the router builds it, so remote
load is as old as gossip made it and remote prefixes are as complete as gossip delivered.

Region-local runs and single routers have no peers: no gossip core is started.

For analysis only, the ``live_load`` option replaces load records by the engines' live
state at decision time: ``own`` for each router's own engines (a scrape of age 0), ``all``
for every engine, with every request bound for it as its in-flight count (the oracle plane's
load, with the replicated prefix index and regions kept). It separates what the age of
scrapes and gossip costs from what the rest of the replicated state does.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

from crdt.versions import VersionClock
from kvevents.decode import RawMessage
from kvevents.events import KVEvent
from kvevents.ingest import EngineIngest
from kvevents.publisher import encode_batch
from mesh.config import EngineConfig as RouterEngine
from mesh.config import RouterConfig
from mesh.engines import EngineLoad, EngineState
from mesh.gossip import GossipConfig, MeshCore
from mesh.membership import SwimConfig
from mesh.policies.base import PrefixLookup
from mesh.simnet import SimNet
from mesh.state import MeshState, view_records
from mesh.view import RegionRecord, ReplicaRecord
from sim.des import Timer

if TYPE_CHECKING:  # the fleet builds this plane; annotations only
    from sim.fleet import Fleet, FleetSpec, Flight, SimEngine, SimRouter

WALL_BASE = 1_700_000_000.0
"""Engines stamp batches with wall time; the simulated wall clock starts here."""
GENERATION = 10**13
"""Version generation of the simulated routers' records: above any wall-clock one."""
PUBLISH_INTERVAL = 0.02
TIDY_INTERVAL = 1.0
LIVE_LOAD = ("", "own", "all")


class _SimNode:
    """What ``MeshState`` asks of its gossip node (``mesh.node.MeshNode``), from a MeshCore."""

    def __init__(self, core: MeshCore) -> None:
        self.core = core
        self.generation = core.generation

    def alive(self) -> set[str]:
        return {m.node_id for m in self.core.membership.alive()}

    def region_rtt_ms(self) -> dict[str, float]:
        return {r: v * 1000.0 for r, v in self.core.membership.region_rtt().items()}

    def routers_by_region(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {self.core.region: [self.core.addr]}
        for m in self.core.membership.alive():
            out.setdefault(m.region, []).append(m.addr)
        return {r: sorted(v) for r, v in out.items()}

    def origin_advanced_at(self, state: str) -> dict[str, float]:
        return self.core.origin_advanced_at(state)


class _RouterMesh:
    """One router's replicated side and its engines' ingestion."""

    __slots__ = ("core", "ingests", "last_published", "local", "state")

    def __init__(self, state: MeshState) -> None:
        self.state = state
        self.core: MeshCore | None = None
        self.ingests: dict[str, EngineIngest] = {}
        self.local: dict[str, EngineState] = {}
        self.last_published: tuple[int, int] = (-1, -1)


class MeshPlane:
    name = "mesh"

    def __init__(self, spec: FleetSpec) -> None:
        opts = dict(spec.mesh_options)
        self.gossip = _gossip_config(opts.pop("gossip", "wan"))
        self.swim = _swim_config(opts.pop("swim", "wan"))
        self.live_load = str(opts.pop("live_load", ""))
        if self.live_load not in LIVE_LOAD:
            raise ValueError(f"mesh option live_load must be one of {LIVE_LOAD}, "
                             f"got {self.live_load!r}")
        if opts:
            raise ValueError(f"unknown mesh option {sorted(opts)[0]!r} "
                             "(known: gossip, swim, live_load)")
        self._routers: dict[str, _RouterMesh] = {}
        self._ingesters: dict[str, list[tuple[SimRouter, EngineIngest]]] = {}
        self._seq: dict[str, int] = {}
        self._pump_timer: Timer | None = None

    # -- setup -------------------------------------------------------------------------------
    def start(self, fleet: Fleet) -> None:
        self.fleet = fleet
        spec = fleet.spec
        loop = fleet.loop
        self._rng = random.Random(f"{spec.seed}/gossip-latency")
        self.net = SimNet(seed=spec.seed, latency=self._latency, now=loop.now)
        peers = [] if spec.region_local else fleet.routers
        addrs = [SimNet.addr_of(r.id) for r in peers]
        clock = self._clock
        for router in fleet.routers:
            rm = _RouterMesh(MeshState(self._config(router), clock=clock))
            rm.state.learned = router.outcomes.published
            rm.state.versions = VersionClock(GENERATION)
            rm.state._write_meta(loop.now)
            if len(peers) > 1:
                core = self.net.spawn(
                    router.id,
                    router.region,
                    {"prefix": rm.state.index, "load": rm.state.loads, "meta": rm.state.meta},
                    seeds=addrs,
                    swim=self.swim,
                    gossip=self.gossip,
                )
                rm.core = core
                rm.state.node = _SimNode(core)
            for e in router.managed.values():
                ingest = EngineIngest(e.replica, rm.state.index)
                rm.ingests[e.replica] = ingest
                self._ingesters.setdefault(e.replica, []).append((router, ingest))
            self._routers[router.id] = rm
            router.views.prefix = rm.state.prefix
            router.views.static_rtt = {
                r: fleet.topology.mean_rtt_s(router.region, r) for r in fleet.topology.regions
            }
            offset = fleet.rng.uniform(0, spec.probe_interval_s)
            loop.every(spec.probe_interval_s, partial(self._probe, router), first=offset)
            loop.every(PUBLISH_INTERVAL, partial(self._publish, router), first=offset)
            loop.every(TIDY_INTERVAL, partial(self._tidy, router), first=1.0 + offset)
        self._arm()

    def _config(self, router: SimRouter) -> RouterConfig:
        rate = self.fleet.configured_rate
        return RouterConfig(
            region=router.region,
            node_id=router.id,
            advertise=SimNet.addr_of(router.id),
            engines=tuple(RouterEngine(url=r, prefill_rate=rate) for r in router.managed),
            policy=self.fleet.spec.policy,
            block_size=self.fleet.spec.block_size,
        )

    def _clock(self) -> float:
        return self.fleet.loop.now

    def _latency(self, src_region: str, dst_region: str) -> float:
        return self.fleet.topology.one_way_s(src_region, dst_region, self._rng)

    # -- the gossip network on the fleet's clock -----------------------------------------------
    def _arm(self) -> None:
        t = self.net.next_event_time()
        if math.isinf(t):
            return
        timer = self._pump_timer
        if timer is not None and not timer.cancelled:
            if timer.when <= t:
                return
            timer.cancel()
        self._pump_timer = self.fleet.loop.at(max(t, self.fleet.loop.now), self._pump)

    def _pump(self) -> None:
        self._pump_timer = None
        before = self.net.total("tx_bytes"), self.net.total("tx_frames")
        self.net.run_until(self.fleet.loop.now)
        counters = self.fleet.counters
        counters.gossip_bytes += self.net.total("tx_bytes") - before[0]
        counters.gossip_messages += self.net.total("tx_frames") - before[1]
        self._arm()

    # -- engines -> routers ----------------------------------------------------------------------
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
        states = []
        for e in engines:
            waiting, running, kv = e.load()
            states.append(
                EngineState(e.replica, True, EngineLoad(waiting, running, kv), now, 0, "ok")
            )
        back = fleet.topology.one_way_s(engines[0].region, router.region, fleet.rng)
        fleet.loop.after(back, self._scraped, router, states)
        fleet.counters.load_reports += len(states)

    def _scraped(self, router: SimRouter, states: list[EngineState]) -> None:
        rm = self._routers[router.id]
        now = self.fleet.loop.now
        for st in states:
            rm.local[st.url] = st
            rm.state.publish_engine(st, router.region, now)
            if st.load is not None:
                router.outcomes.scraped(st.url, st.load.kv_usage, st.measured_at)
        router.kick()  # a load change: re-evaluate a waiting head

    def _publish(self, router: SimRouter) -> None:
        rm = self._routers[router.id]
        mark = (router.dispatches.version, len(router.queue))
        if mark != rm.last_published:
            rm.last_published = mark
            rm.state.publish_inflight(
                router.dispatches.counts(published_only=True), len(router.queue),
                self.fleet.loop.now,
            )

    def _tidy(self, router: SimRouter) -> None:
        self._routers[router.id].state._tidy(self.fleet.loop.now)

    def on_kv_events(self, engine: SimEngine, events: Sequence[KVEvent], now: float) -> None:
        targets = self._ingesters.get(engine.replica)
        if not targets:
            return
        seq = self._seq.get(engine.replica, 0)
        self._seq[engine.replica] = seq + 1
        msg = RawMessage(
            b"kv@" + engine.replica.encode(), seq, encode_batch(events, WALL_BASE + now)
        )
        fleet = self.fleet
        fleet.counters.kv_events += len(events)
        for router, ingest in targets:
            delay = fleet.topology.one_way_s(engine.region, router.region, fleet.rng)
            fleet.loop.after(delay, self._deliver, ingest, msg)

    def _deliver(self, ingest: EngineIngest, msg: RawMessage) -> None:
        ingest.on_message(msg, self.fleet.loop.now)

    # -- what a router's view is built from --------------------------------------------------------
    def records(self, router: SimRouter, now: float) -> Iterable[ReplicaRecord]:
        """The router's own (``mesh.state.view_records``, as ``mesh.router.Router`` does)."""
        records = self._replicated(router, now)
        if not self.live_load:
            return records
        return self._live(router, records, self.live_load == "all")

    def live_records(self, router: SimRouter, now: float) -> list[ReplicaRecord]:
        """Every engine's live load and in-flight count in the router's records (what
        ``live_load: all`` gives the view; ``sim.regret`` prices decisions on it)."""
        return self._live(router, self._replicated(router, now), True)

    def _replicated(self, router: SimRouter, now: float) -> Iterable[ReplicaRecord]:
        rm = self._routers[router.id]
        rate = self.fleet.configured_rate
        own = ((r, e.region, rm.local.get(r), rate) for r, e in router.managed.items())
        return view_records(own, router.managed, rm.state, now, router.outcomes.published,
                            router.outcomes.kv.get)

    def _live(self, router: SimRouter, records: Iterable[ReplicaRecord], everywhere: bool
              ) -> list[ReplicaRecord]:
        """The ``live_load`` analysis option (module docstring)."""
        fleet = self.fleet
        out = []
        for rec in records:
            if rec.healthy and (everywhere or rec.replica in router.managed):
                waiting, running, kv = fleet.engines[rec.replica].load()
                rec = rec._replace(waiting=waiting, running=running, kv_usage=kv, age=0.0)
                if everywhere:
                    mine = router.dispatches.inflight(rec.replica)
                    rec = rec._replace(
                        others_inflight=max(0, fleet.bound.get(rec.replica, 0) - mine),
                        inflight_age=math.inf)
            out.append(rec)
        return out

    def regions(self, router: SimRouter, now: float) -> Mapping[str, RegionRecord]:
        """``MeshState.regions``, plus the regions of engines this router reaches directly.

        A central proxy (one router managing engines in several regions) is not a production
        deployment mode: there, a router's engines are in its own region. The simulator
        models GORGO-proxy-style routers by giving each remote region of a managed engine
        its mean RTT and marking it reachable "direct", as the probe plane does.
        """
        out = dict(self._routers[router.id].state.regions(now))
        topology = self.fleet.topology
        for e in router.managed.values():
            if e.region != router.region and e.region not in out:
                out[e.region] = RegionRecord(
                    e.region, topology.mean_rtt_s(router.region, e.region), ("direct",), 0
                )
        return out

    def prefix(self, router: SimRouter) -> PrefixLookup:
        return self._routers[router.id].state.prefix

    def on_routed(self, router: SimRouter, flight: Flight, target: str, region: str) -> None:
        return None

    # -- inspection (tests, reports) ---------------------------------------------------------------
    def state_of(self, router_id: str) -> MeshState:
        return self._routers[router_id].state

    def core_of(self, router_id: str) -> MeshCore | None:
        return self._routers[router_id].core


def _gossip_config(value: Any) -> GossipConfig:
    """A profile name, a ``GossipConfig``, or a mapping of overrides of the WAN profile."""
    if isinstance(value, GossipConfig):
        return value
    if isinstance(value, Mapping):
        return replace(GossipConfig.wan(), **dict(value))
    return GossipConfig.profile(str(value))


def _swim_config(value: Any) -> SwimConfig:
    """A profile name, a ``SwimConfig``, or a mapping of overrides of the WAN profile."""
    if isinstance(value, SwimConfig):
        return value
    if isinstance(value, Mapping):
        return replace(SwimConfig.wan(), **dict(value))
    return SwimConfig.profile(str(value))
