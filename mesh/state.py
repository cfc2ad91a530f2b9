"""The replicated side of a router: what other regions know, and how this router tells them.

``MeshBackend`` is what the router asks of it; ``MeshState`` is the implementation over the
CRDTs (prefix index, load vector, router meta map), fed by this router's engines' KV event
streams and scrapes, and gossiped by a :class:`mesh.node.MeshNode` when peers are set.
``LocalOnly`` is the no-mesh stand-in unit tests use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from prometheus_client.core import CounterMetricFamily

from crdt.load_vector import LoadVector
from crdt.lww_map import LWWMap
from crdt.prefix_index import PrefixIndex
from crdt.versions import VersionClock
from kvevents.sources import EventSource, open_event_source
from mesh.calibration import Calibrated
from mesh.config import RouterConfig
from mesh.engines import EngineState
from mesh.kv_outlook import KvHistory
from mesh.metrics import gauge
from mesh.node import MeshConfig, MeshNode
from mesh.policies.base import NoPrefixes, PrefixLookup
from mesh.sized_lookup import dp_sources, engine_of, learned_block_sizes
from mesh.status import ReplicaLoad, ReplicaStatus, build_status, replica_rows
from mesh.tls import client_context
from mesh.transport import STATUS_PATH
from mesh.view import RegionRecord, ReplicaRecord

log = logging.getLogger("kvmesh.mesh")

OwnEngine = tuple[str, str, EngineState | None, float | None]
"""(replica, region, its last probe or None, prefill rate) of an engine this router probes."""


def _not_learned(replica: str) -> Calibrated:
    return Calibrated()


def _no_outlook(replica: str) -> KvHistory | None:
    return None


def view_records(own: Iterable[OwnEngine], own_set: Container[str], backend: MeshBackend,
                 now: float, learned: Callable[[str], Calibrated] = _not_learned,
                 outlook: Callable[[str], KvHistory | None] = _no_outlook,
                 ) -> Iterator[ReplicaRecord]:
    """What a router's view is built from: its own engines as it probes them (no load known
    yet: not healthy) with what this router learned of them and their KV outlook, then every
    other replica as the replicated state has it (its owner's learned figures included)."""
    for url, region, st, rate in own:
        others = backend.others_inflight(url)
        cal = learned(url)
        kv = outlook(url)
        peak, trend = (kv.peak, kv.trend) if kv is not None else (None, None)
        knee = 0.0
        if rate is None:  # a configured rate is taken as given; the learned one fills in
            rate, knee = cal.prefill_rate, cal.prefill_knee or 0.0
        if st is None or st.load is None:
            yield ReplicaRecord(url, region, False, 0, 0, 0, float("inf"), others, rate,
                                queue_delay=cal.queue_delay, overhead=cal.overhead,
                                kv_scale=cal.kv_scale, prefill_knee=knee)
            continue
        load = st.load
        yield ReplicaRecord(url, region, st.healthy, load.waiting, load.running,
                            load.kv_usage, max(0.0, now - st.measured_at), others, rate,
                            st.models, queue_delay=cal.queue_delay,
                            overhead=cal.overhead, kv_scale=cal.kv_scale,
                            prefill_knee=knee, kv_peak=peak, kv_trend=trend)
    for rec in backend.remote_records(now):
        if rec.replica not in own_set:
            yield rec


class MeshBackend(Protocol):
    """The replicated side of the router: what other regions know, and how we tell them."""

    prefix: PrefixLookup

    def remote_records(self, now: float) -> Iterable[ReplicaRecord]:
        """Records of replicas this router does not probe itself."""
        ...

    def others_inflight(self, replica: str) -> int: ...

    def regions(self, now: float) -> Mapping[str, RegionRecord]: ...

    def publish_engine(self, state: EngineState, region: str, now: float) -> None: ...

    def publish_inflight(self, counts: Mapping[str, int], queue: int, now: float) -> None: ...

    def routes(self) -> list[web.RouteDef]: ...

    async def start(self, session: aiohttp.ClientSession) -> None: ...

    async def start_gossip(self) -> None:
        """Join the mesh; called once the router's HTTP server listens."""
        ...

    async def stop(self) -> None: ...

    def status(self) -> dict[str, Any]: ...

    def metric_providers(self) -> list[Callable[[], Iterable[Any]]]: ...


@dataclass(slots=True)
class LocalOnly:
    """No mesh: this router knows only its own engines (single-region use, tests)."""

    prefix: PrefixLookup = field(default_factory=NoPrefixes)

    def remote_records(self, now: float) -> Iterable[ReplicaRecord]:
        return ()

    def others_inflight(self, replica: str) -> int:
        return 0

    def regions(self, now: float) -> Mapping[str, RegionRecord]:
        return {}

    def publish_engine(self, state: EngineState, region: str, now: float) -> None:
        return None

    def publish_inflight(self, counts: Mapping[str, int], queue: int, now: float) -> None:
        return None

    def routes(self) -> list[web.RouteDef]:
        return []

    async def start(self, session: aiohttp.ClientSession) -> None:
        return None

    async def start_gossip(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def status(self) -> dict[str, Any]:
        return {"mesh": "disabled"}

    def metric_providers(self) -> list[Callable[[], Iterable[Any]]]:
        return []



class MeshState:
    """The replicated side of one router, and the only writer of its own facts.

    - ``prefix`` (``PrefixIndex``): slices of this router's engines, written from their KV
      events; other slices arrive by gossip.
    - ``load`` (``LoadVector``): this router's load records of its engines (every scrape) and
      its in-flight counts (as they change); other routers' arrive by gossip, with ages.
    - ``meta`` (``LWWMap``): one entry per router, written by that router: its region, its
      engines' profiles (prefill rate) and its FCFS queue length.

    An engine that has been down for ``slice_expiry`` seconds has its slice dropped (its
    cache is gone or unreachable), with a tombstone so a stale copy cannot come back. Remote
    load records older than ``stale_after`` count as down: nobody vouches for them.
    """

    def __init__(self, config: RouterConfig, clock: Callable[[], float] = time.monotonic,
                 slice_expiry: float = 30.0, stale_after: float = 10.0) -> None:
        self.config = config
        self.clock = clock
        self.slice_expiry = slice_expiry
        self.stale_after = stale_after
        self.me = config.node_id
        self.index = PrefixIndex()
        self.prefix: PrefixLookup = self.index
        self.loads = LoadVector(node_id=self.me)
        self.meta = LWWMap()
        self.subscribers: list[EventSource] = []
        self.node: Any = None
        """The gossip peer (a :class:`MeshNode`; the simulator puts its own in)."""
        self._down_since: dict[str, float] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._queue = 0
        self._models: dict[str, tuple[str, ...]] = {}
        self._calib_cache: dict[str, tuple[object, Calibrated]] = {}
        self._own_of: object = None
        self._own_urls: frozenset[str] = frozenset()
        self.learned: Callable[[str], Calibrated] = _not_learned
        """This router's learned figures of its own engines (``mesh.outcomes``), published
        in its meta record: the one writer of them."""
        for i, eng in enumerate(config.engines):
            if eng.kv_events is None:
                continue
            for name, events, replay in dp_sources(eng):  # one stream per data-parallel rank
                self.subscribers.append(self._subscriber(i, name, events, replay))
        if config.peers:
            self.node = self._node()
        generation = self.node.generation if self.node is not None else int(time.time() * 1000)
        self.versions = VersionClock(generation)
        self._write_meta(clock())

    def _subscriber(self, i: int, url: str, source: str, replay: str | None) -> EventSource:
        """The engine's event source: ZMQ PUB (``tcp://``, ``ipc://``) or a Redis stream."""
        try:
            return open_event_source(url, source, self.index, replay=replay)
        except ValueError as exc:
            raise ValueError(f"engines[{i}].kv_events: {exc}") from None

    def _node(self) -> MeshNode:
        if self.config.mesh_key is None:
            raise ValueError("mesh_key: required when peers are configured (it signs gossip)")
        mesh_config = MeshConfig.from_options(
            node_id=self.config.node_id, region=self.config.region,
            advertise=self.config.advertise, keys=list(self.config.mesh_keys),
            seeds=self.config.peers, options=self.config.gossip,
            ssl_context=client_context(self.config),
        )
        return MeshNode(mesh_config, {"prefix": self.index, "load": self.loads,
                                      "meta": self.meta}, replicas=self._status_rows)

    def _write_meta(self, now: float) -> None:
        sizes = learned_block_sizes(self.subscribers)
        engines = {e.url: {"prefill_rate": e.prefill_rate,
                           "models": list(self._models.get(e.url, ())),
                           "block_size": sizes.get(e.url),
                           "calib": self.learned(e.url).as_dict()}
                   for e in self.config.engines}
        self.meta.set(self.me, {"region": self.config.region, "addr": self.config.advertise,
                                "engines": engines, "queue": self._queue},
                      self.versions.next(), now)

    def _router_meta(self, router: str) -> dict[str, Any]:
        value = self.meta.get(router)
        return value if isinstance(value, dict) else {}

    # -- MeshBackend -------------------------------------------------------------------------
    def _own(self) -> frozenset[str]:
        """This router's engines (remembered per engine list: this runs on every view)."""
        engines = self.config.engines
        if self._own_of is not engines:
            self._own_urls = frozenset(e.url for e in engines)
            self._own_of = engines
        return self._own_urls

    def remote_records(self, now: float) -> Iterable[ReplicaRecord]:
        own = self._own()
        alive = self._alive_routers()
        for replica, load in self.loads.loads(now, skip=own).items():
            meta = self._router_meta(load.reporter)
            region = meta.get("region")
            if not isinstance(region, str):
                continue
            engines = meta.get("engines")
            info = engines.get(replica) if isinstance(engines, dict) else None
            info = info if isinstance(info, dict) else {}
            rate = info.get("prefill_rate")
            cal = self._calibrated(replica, info.get("calib"))
            knee = 0.0
            if not isinstance(rate, int | float):  # configured wins; learned fills in
                rate, knee = cal.prefill_rate, cal.prefill_knee or 0.0
            models = info.get("models")
            live = alive is None or load.reporter in alive
            healthy = load.healthy and load.age <= self.stale_after and live
            addr = meta.get("addr")
            owner = addr if live and isinstance(addr, str) and addr else None
            yield ReplicaRecord(
                replica, region, healthy, float(load.waiting), float(load.running),
                load.kv_usage, load.age, self.loads.inflight(replica, exclude_router=self.me),
                float(rate) if isinstance(rate, int | float) else None,
                tuple(m for m in models if isinstance(m, str)) if isinstance(models, list)
                else (),
                owner, self.loads.inflight_age(load.reporter, now),
                cal.queue_delay, cal.overhead, cal.kv_scale, knee,
            )

    def _calibrated(self, replica: str, raw: object) -> Calibrated:
        """A remote replica's learned figures, parsed once per meta update (this runs per
        replica on every view)."""
        hit = self._calib_cache.get(replica)
        if hit is not None and hit[0] is raw:
            return hit[1]
        cal = Calibrated.from_dict(raw)
        self._calib_cache[replica] = (raw, cal)
        return cal

    def _alive_routers(self) -> set[str] | None:
        if self.node is None:
            return None
        return {*self.node.alive(), self.me}

    def others_inflight(self, replica: str) -> int:
        return self.loads.inflight(replica, exclude_router=self.me)

    def regions(self, now: float) -> Mapping[str, RegionRecord]:
        if self.node is None:
            return {}
        rtts = self.node.region_rtt_ms()
        alive = self._alive_routers() or set()
        queues: dict[str, int] = {}
        for router in alive:
            meta = self._router_meta(router)
            region, queue = meta.get("region"), meta.get("queue", 0)
            if isinstance(region, str) and isinstance(queue, int):
                queues[region] = queues.get(region, 0) + queue
        out: dict[str, RegionRecord] = {}
        for region, urls in self.node.routers_by_region().items():
            if region == self.config.region:
                continue
            rtt = rtts.get(region)
            out[region] = RegionRecord(region, None if rtt is None else rtt / 1000.0,
                                       tuple(urls), queues.get(region, 0))
        return out

    def publish_engine(self, state: EngineState, region: str, now: float) -> None:
        if state.models and self._models.get(state.url) != state.models:
            self._models[state.url] = state.models
            self._write_meta(now)
        if state.healthy:
            self._down_since.pop(state.url, None)
        else:
            self._down_since.setdefault(state.url, now)
        load = state.load
        self.loads.report(
            state.url, self.me, self.versions.next(),
            waiting=round(load.waiting) if load else 0,
            running=round(load.running) if load else 0,
            kv_usage=load.kv_usage if load else 0.0,
            tokens_queued=0, healthy=state.healthy, now=now,
            age=max(0.0, now - state.measured_at) if load else 0.0,
        )

    def publish_inflight(self, counts: Mapping[str, int], queue: int, now: float) -> None:
        self.loads.set_inflight(self.me, self.versions.next(), counts, now)
        if queue != self._queue:
            self._queue = queue
            self._write_meta(now)

    def routes(self) -> list[web.RouteDef]:
        if self.node is None:
            return []
        # The router serves its own /mesh/status, which embeds the node's document.
        return [r for r in self.node.routes() if getattr(r, "path", "") != STATUS_PATH]

    async def start(self, session: aiohttp.ClientSession) -> None:
        for sub in self.subscribers:
            await sub.start()
        self._tasks.append(asyncio.create_task(self._housekeeping(), name="mesh housekeeping"))

    async def start_gossip(self) -> None:
        if self.node is not None:
            await self.node.start()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self.node is not None:
            await self.node.aclose()
        for sub in self.subscribers:
            await sub.aclose()

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                self._tidy(self.clock())
            except Exception:  # housekeeping must never stop
                log.exception("mesh housekeeping failed")

    def _tidy(self, now: float) -> None:
        for url, since in list(self._down_since.items()):
            if now - since < self.slice_expiry:
                continue
            for name in [r for r in self.index.replicas() if engine_of(r) == url]:  # DP ranks
                if self.index.version(name) is not None:
                    log.info("engine %s down for %.0fs: dropping slice %s", url, now - since,
                             name)
                    self.index.drop(name, now=now)
        self.index.gc(now, 60.0)
        self.loads.expire(now)
        self.meta.gc(now, 300.0)
        # Refresh our own meta entry now and then so it never looks abandoned.
        self._write_meta(now)

    def _status_rows(self, now: float) -> list[ReplicaStatus]:
        loads = {}
        for replica, load in self.loads.loads(now).items():
            region = self._router_meta(load.reporter).get("region")
            loads[replica] = ReplicaLoad(str(region), load.reporter, load.waiting, load.running,
                                         load.kv_usage, load.age)
        return replica_rows(self.index.slices(), loads)

    def status(self) -> dict[str, Any]:
        """The mesh document; a lone router (no peers) has the same shape, with no peers."""
        if self.node is not None:
            doc: dict[str, Any] = self.node.status()
            return doc
        now = self.clock()
        return build_status(
            node_id=self.me, region=self.config.region, address=self.config.advertise,
            generation=self.versions.generation, incarnation=0, peers=(),
            replicas=self._status_rows(now), now=now, region_rtt_ms={},
        )

    def metric_providers(self) -> list[Callable[[], Iterable[Any]]]:
        return [self._ingest_metrics, self._gossip_metrics]

    def _ingest_metrics(self) -> Iterable[Any]:
        events = CounterMetricFamily("kvmesh_events_ingested", "KV events ingested, by replica",
                                     labels=["replica"])
        batches = CounterMetricFamily("kvmesh_event_batches", "KV event batches, by replica",
                                      labels=["replica"])
        gaps = CounterMetricFamily("kvmesh_event_gaps", "Sequence gaps seen, by replica",
                                   labels=["replica"])
        lag_rows: list[tuple[list[str], float]] = []
        for sub in self.subscribers:
            st = sub.stats()
            events.add_metric([st.replica], st.events)
            batches.add_metric([st.replica], st.batches)
            gaps.add_metric([st.replica], st.gaps)
            if st.lag_s is not None:
                lag_rows.append(([st.replica], st.lag_s))
        yield events
        yield batches
        yield gaps
        yield gauge("kvmesh_event_lag_seconds",
                    "Router receive time minus the engine's batch timestamp (last batch)",
                    ["replica"], lag_rows)
        yield gauge("kvmesh_index_blocks", "Blocks held per replica in the merged prefix index",
                    ["replica"], [([r], float(self.index.blocks(r)))
                                  for r in self.index.replicas()])

    def _gossip_metrics(self) -> Iterable[Any]:
        now = self.clock()
        own = {e.url for e in self.config.engines}
        yield gauge("kvmesh_gossip_convergence_lag_seconds",
                    "Age of each remote replica's load record here: scrape to arrival",
                    ["replica"], [([r], load.age) for r, load in self.loads.loads(now).items()
                                  if r not in own])
        if self.node is None:
            return
        counters = self.node.metrics()
        b = CounterMetricFamily("kvmesh_gossip_bytes", "Gossip bytes sent and received",
                                labels=["direction"])
        b.add_metric(["tx"], counters.get("tx.bytes", 0))
        b.add_metric(["rx"], counters.get("rx.bytes", 0))
        yield b
        c = CounterMetricFamily("kvmesh_gossip_events", "Mesh protocol counters by name",
                                labels=["name"])
        for name, value in sorted(counters.items()):
            c.add_metric([name], value)
        yield c
        advanced = self.node.origin_advanced_at("prefix")
        yield gauge("kvmesh_gossip_origin_silence_seconds",
                    "Seconds since each replica's prefix slice last advanced here",
                    ["replica"], [([k], now - v) for k, v in advanced.items()])
