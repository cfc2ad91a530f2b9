"""The asyncio shell that runs a router's mesh peer: timers, HTTP in and out, seed DNS.

All protocol decisions live in :class:`mesh.gossip.MeshCore`; this shell feeds it frames
and the clock and moves the frames it returns. One event loop, no threads: the core is
called from the request handler and the timer loop in turn, never concurrently.

Integration (the router owns the aiohttp app and the replicated states)::

    node = MeshNode(MeshConfig.from_options(node_id=..., region=..., advertise=...,
                                            keys=[...], seeds=[...], options=cfg.gossip),
                    {"prefix": prefix_index, "load": load_vector})
    app.add_routes(node.routes())          # POST /mesh/gossip, GET /mesh/status
    await node.start()                     # after the app listens
    ...  node.peers(), node.region_rtt_ms(), node.alive(), node.metrics() ...
    await node.aclose()                    # announces LEFT, then stops

Generation: a strictly larger number on every start, so peers replace everything about the
previous run. By default it is the wall clock in milliseconds at start (monotone across
restarts unless the clock steps back by more than the downtime); with ``generation_file``
it is also at least one more than the last value written there.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import random
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol
from urllib.parse import urlsplit

from aiohttp import web

from crdt.base import Replicated
from mesh.auth import parse_key
from mesh.gossip import GossipConfig, MeshCore, Outgoing
from mesh.membership import MemberEvent, PeerView, SwimConfig
from mesh.messages import NodeInfo, Status
from mesh.status import ReplicaStatus, build_status
from mesh.transport import (
    GOSSIP_PATH,
    STATUS_PATH,
    Answer,
    GossipClient,
    TransportError,
    gossip_handler,
    packet_limit,
)

log = logging.getLogger("kvmesh.mesh")

MAX_IDLE = 1.0
"""Longest the timer loop sleeps without looking at the core."""


class Clock(Protocol):
    """Monotonic seconds for every timer, wall seconds only for generations and replay stamps."""

    def monotonic(self) -> float: ...

    def time(self) -> float: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()


Resolver = Callable[[str, int], Awaitable[list[str]]]
"""``(host, port) -> addresses``: how seed names become peers (a headless service -> pods)."""


def next_generation(wall: float, path: str | None = None) -> int:
    """A generation larger than any earlier run's (see the module docstring)."""
    gen = int(wall * 1000)
    if path is None:
        return gen
    with contextlib.suppress(FileNotFoundError, ValueError), open(path, encoding="ascii") as f:
        gen = max(gen, int(f.read().strip()) + 1)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="ascii") as f:
        f.write(str(gen))
    os.replace(tmp, path)
    return gen


_SCALARS = {f.name: f for f in fields(SwimConfig)} | {f.name: f for f in fields(GossipConfig)}


@dataclass(frozen=True, slots=True)
class MeshConfig:
    node_id: str
    region: str
    advertise: str
    """Base URL peers reach this router at (``http://10.0.0.5:8000``)."""
    keys: tuple[bytes, ...]
    """Mesh keys; the first signs, all verify (rotation)."""
    seeds: tuple[str, ...] = ()
    """Base URLs to join through; a host name may resolve to several routers."""
    generation: int | None = None
    generation_file: str | None = None
    swim: SwimConfig = field(default_factory=SwimConfig.lan)
    gossip: GossipConfig = field(default_factory=GossipConfig.lan)
    seed_refresh: float = 30.0
    """Seconds between DNS resolutions of the seeds."""
    request_timeout: float | None = None
    """Per-POST timeout; default ``max(push_timeout, probe_interval)``."""
    ssl_context: ssl.SSLContext | None = None
    """Client TLS settings for https peers (the server side is the router's listener)."""
    max_inflight_posts: int = 512

    @classmethod
    def from_options(
        cls,
        *,
        node_id: str,
        region: str,
        advertise: str,
        keys: Sequence[bytes | str],
        seeds: Iterable[str] = (),
        options: Mapping[str, object] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> MeshConfig:
        """Build from a flat mapping (the router config's ``gossip:`` section).

        ``profile`` (lan, wan, local) picks the base timings; any field of
        :class:`~mesh.membership.SwimConfig` or :class:`~mesh.gossip.GossipConfig` overrides
        one; also ``generation``, ``generation_file``, ``seed_refresh``, ``request_timeout``.
        Errors are ``ValueError`` naming ``gossip.<key>``.
        """
        opts = dict(options or {})
        profile = opts.pop("profile", "lan")
        if not isinstance(profile, str):
            raise ValueError(f"gossip.profile: expected lan, wan or local, got {profile!r}")
        try:
            swim, gossip = SwimConfig.profile(profile), GossipConfig.profile(profile)
        except ValueError as exc:
            raise ValueError(f"gossip.profile: {exc}") from None
        swim_kw: dict[str, Any] = {}
        gossip_kw: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in opts.items():
            if key in ("generation", "generation_file", "seed_refresh", "request_timeout"):
                extra[key] = _option(key, value, str if key == "generation_file" else float)
                if key == "generation":
                    extra[key] = int(extra[key])
                continue
            f = _SCALARS.get(key)
            if f is None:
                raise ValueError(f"gossip.{key}: unknown option")
            typ = int if f.type in ("int", int) else float
            target = swim_kw if key in {x.name for x in fields(SwimConfig)} else gossip_kw
            target[key] = _option(key, value, typ)
        if not advertise:
            raise ValueError("gossip.advertise: the mesh needs a URL peers can reach")
        return cls(
            node_id=node_id,
            region=region,
            advertise=advertise.rstrip("/"),
            keys=tuple(parse_key(k) if isinstance(k, str) else bytes(k) for k in keys),
            seeds=tuple(s.rstrip("/") for s in seeds),
            swim=replace(swim, **swim_kw),
            gossip=replace(gossip, **gossip_kw),
            ssl_context=ssl_context,
            **extra,
        )


def _option(key: str, value: object, typ: type) -> Any:
    if typ is str:
        if not isinstance(value, str):
            raise ValueError(f"gossip.{key}: expected a string, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"gossip.{key}: expected a number, got {value!r}")
    if typ is int and value != int(value):
        raise ValueError(f"gossip.{key}: expected an integer, got {value!r}")
    if value < 0:
        raise ValueError(f"gossip.{key}: must not be negative, got {value!r}")
    return typ(value)


async def _getaddrinfo(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class MeshNode:
    """Runs membership and gossip for one router on the router's own aiohttp server."""

    def __init__(
        self,
        config: MeshConfig,
        states: Mapping[str, Replicated[Any]],
        clock: Clock | None = None,
        rng: random.Random | None = None,
        *,
        replicas: Callable[[float], Iterable[ReplicaStatus]] | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        self.config = config
        self.clock: Clock = clock or SystemClock()
        self.rng = rng or random.Random()
        self.replicas = replicas
        """Replica rows for /mesh/status at ``now``; None shows no replicas."""
        generation = config.generation
        if generation is None:
            generation = next_generation(self.clock.time(), config.generation_file)
        self.core = MeshCore(
            NodeInfo(config.node_id, config.region, config.advertise),
            generation,
            states,
            keys=config.keys,
            rng=self.rng,
            now=self.clock.monotonic(),
            wall=self.clock.time,
            swim=config.swim,
            gossip=config.gossip,
            seeds=[],
        )
        self.core.on_event = self._log_event
        self.counters = self.core.counters
        timeout = config.request_timeout or max(
            config.gossip.push_timeout, config.swim.probe_interval
        )
        self.client = GossipClient(
            timeout=timeout,
            max_message_bytes=config.gossip.max_message_bytes,
            ssl_context=config.ssl_context,
        )
        self._resolve: Resolver = resolver or _getaddrinfo
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._posts: set[asyncio.Task[None]] = set()
        self._started = False
        self._closed = False

    # ---- wiring ------------------------------------------------------------------------

    @property
    def node_id(self) -> str:
        return self.core.node_id

    @property
    def generation(self) -> int:
        return self.core.generation

    def routes(self) -> list[web.RouteDef]:
        handler = gossip_handler(
            self._handle, self.config.gossip.max_message_bytes, self._bad_packet
        )
        return [web.post(GOSSIP_PATH, handler), web.get(STATUS_PATH, self._status_route)]

    def attach(self, app: web.Application) -> None:
        """Add the routes and tie start/stop to the app's startup and cleanup."""
        app.add_routes(self.routes())

        async def on_startup(_app: web.Application) -> None:
            await self.start()

        async def on_cleanup(_app: web.Application) -> None:
            await self.aclose()

        app.on_startup.append(on_startup)
        app.on_cleanup.append(on_cleanup)

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        await self.client.start()
        await self._refresh_seeds()
        self._tasks = [
            asyncio.create_task(self._timer_loop(), name="mesh-timers"),
            asyncio.create_task(self._seed_loop(), name="mesh-seeds"),
        ]
        log.info(
            "mesh node %s (%s) generation %d at %s",
            self.node_id,
            self.config.region,
            self.generation,
            self.config.advertise,
        )

    async def aclose(self, leave_timeout: float = 1.0) -> None:
        """Announce that we leave (best effort, bounded), then stop every task."""
        if self._closed:
            return
        self._closed = True
        if self._started:
            notices = self.core.leave(self.clock.monotonic())
            sends = [self.client.post(o.addr, [o.data]) for o in notices]
            if sends:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        asyncio.gather(*sends, return_exceptions=True), leave_timeout
                    )
        for task in [*self._tasks, *self._posts]:
            task.cancel()
        for task in [*self._tasks, *self._posts]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.client.close()

    stop = aclose

    # ---- views -------------------------------------------------------------------------

    def peers(self) -> list[PeerView]:
        return self.core.peers()

    def with_status(self, status: Status) -> set[str]:
        return {m.node_id for m in self.core.membership.with_status(status)}

    def alive(self) -> set[str]:
        return self.with_status(Status.ALIVE)

    def suspect(self) -> set[str]:
        return self.with_status(Status.SUSPECT)

    def dead(self) -> set[str]:
        return self.with_status(Status.DEAD)

    def left(self) -> set[str]:
        return self.with_status(Status.LEFT)

    def rtt_ms(self, peer_id: str) -> float | None:
        rtt = self.core.membership.rtt(peer_id)
        return None if rtt is None else rtt * 1000.0

    def region_rtt_ms(self) -> dict[str, float]:
        return {r: v * 1000.0 for r, v in self.core.membership.region_rtt().items()}

    def routers_by_region(self) -> dict[str, list[str]]:
        """Region -> advertise URLs of ALIVE routers (this one included)."""
        out: dict[str, list[str]] = {self.config.region: [self.config.advertise]}
        for m in self.core.membership.alive():
            out.setdefault(m.region, []).append(m.addr)
        return {r: sorted(v) for r, v in out.items()}

    def origin_advanced_at(self, state: str) -> dict[str, float]:
        return self.core.origin_advanced_at(state)

    def metrics(self) -> dict[str, int]:
        return dict(self.counters)

    def status(self) -> dict[str, Any]:
        now = self.clock.monotonic()
        rows = list(self.replicas(now)) if self.replicas is not None else []
        return build_status(
            node_id=self.node_id,
            region=self.config.region,
            address=self.config.advertise,
            generation=self.generation,
            incarnation=self.core.membership.incarnation,
            peers=self.peers(),
            replicas=rows,
            now=now,
            region_rtt_ms=self.region_rtt_ms(),
            counters=self.metrics(),
        )

    # ---- inbound -----------------------------------------------------------------------

    def _bad_packet(self, reason: str) -> None:
        self.counters[f"rx.rejected.{reason}"] += 1

    async def _handle(self, frames: list[bytes]) -> Answer:
        now = self.clock.monotonic()
        replies: list[Outgoing] = []
        others: list[Outgoing] = []
        rejected: list[str] = []
        for frame in frames:
            outs = self._receive(frame, now)
            if self.core.last_rejection is not None:
                reason, detail = self.core.last_rejection
                rejected.append(reason)
                log.debug("mesh frame rejected: %s %s", reason, detail)
            for o in outs:
                (replies if o.reply else others).append(o)
        room = packet_limit(self.config.gossip.max_message_bytes) - 64
        answer: list[bytes] = []
        for o in replies:
            if len(o.data) + 8 <= room:
                answer.append(o.data)
                room -= len(o.data) + 8
            else:
                others.append(o)
        self._dispatch(others)
        self._wake.set()
        return Answer(answer, rejected)

    def _receive(self, frame: bytes, now: float) -> list[Outgoing]:
        try:
            return self.core.receive(frame, now)
        except Exception:  # a bug in a state's merge must not take the mesh down
            self.counters["rx.errors"] += 1
            log.exception("mesh: error while handling a frame")
            return []

    # ---- outbound ----------------------------------------------------------------------

    def _dispatch(self, outs: Sequence[Outgoing]) -> None:
        if self._closed or not outs:
            return
        by_addr: dict[str, list[bytes]] = {}
        for o in outs:
            by_addr.setdefault(o.addr, []).append(o.data)
        limit = packet_limit(self.config.gossip.max_message_bytes) - 64
        for addr, frames in by_addr.items():
            packet: list[bytes] = []
            size = 0
            for f in frames:
                if packet and size + len(f) + 8 > limit:
                    self._spawn_post(addr, packet)
                    packet, size = [], 0
                packet.append(f)
                size += len(f) + 8
            if packet:
                self._spawn_post(addr, packet)

    def _spawn_post(self, addr: str, frames: list[bytes]) -> None:
        if len(self._posts) >= self.config.max_inflight_posts:
            self.counters["tx.dropped_inflight_cap"] += len(frames)
            return
        task = asyncio.create_task(self._post(addr, frames))
        self._posts.add(task)
        task.add_done_callback(self._posts.discard)

    async def _post(self, addr: str, frames: list[bytes]) -> None:
        try:
            answer = await self.client.post(addr, frames)
        except TransportError as exc:
            self.counters["tx.failed"] += 1
            log.debug("mesh: %s", exc)
            self.core.unreachable(addr, self.clock.monotonic())
            self._wake.set()
            return
        now = self.clock.monotonic()
        outs: list[Outgoing] = []
        for frame in answer:
            outs.extend(self._receive(frame, now))
        self._dispatch(outs)
        self._wake.set()

    # ---- loops -------------------------------------------------------------------------

    async def _timer_loop(self) -> None:
        while True:
            try:
                outs = self.core.tick(self.clock.monotonic())
            except Exception:
                self.counters["loop.errors"] += 1
                log.exception("mesh: error in the timer loop")
                outs = []
            self._dispatch(outs)
            delay = self.core.next_wakeup() - self.clock.monotonic()
            self._wake.clear()
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation
            # that comes as the event is set, and aclose would wait on this loop forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(max(delay, 0.001), MAX_IDLE)):
                    await self._wake.wait()

    async def _seed_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.seed_refresh)
            await self._refresh_seeds()

    async def _refresh_seeds(self) -> None:
        addrs: list[str] = []
        for url in self.config.seeds:
            addrs.extend(await self._resolve_seed(url))
        self.core.set_seeds(addrs)

    async def _resolve_seed(self, url: str) -> list[str]:
        parts = urlsplit(url)
        host = parts.hostname
        if host is None or parts.scheme not in ("http", "https"):
            self.counters["seeds.invalid"] += 1
            log.warning("mesh: ignoring seed %r (expected http(s)://host:port)", url)
            return []
        port = parts.port or (443 if parts.scheme == "https" else 80)
        with contextlib.suppress(ValueError):
            ipaddress.ip_address(host)
            return [f"{parts.scheme}://{parts.netloc}"]
        try:
            ips = await self._resolve(host, port)
        except OSError as exc:
            self.counters["seeds.resolve_failed"] += 1
            log.warning("mesh: cannot resolve seed %s: %s", host, exc)
            return [f"{parts.scheme}://{parts.netloc}"]
        out = []
        for ip in ips:
            shown = f"[{ip}]" if ":" in ip else ip
            addr = f"{parts.scheme}://{shown}:{port}"
            if parts.scheme == "https":
                self.client.server_hostnames[addr] = host
            out.append(addr)
        return out

    def _log_event(self, ev: MemberEvent) -> None:
        if ev.kind == "new" and ev.status == Status.ALIVE:
            log.info("mesh: %s joined (generation %d)", ev.node_id, ev.generation)
        elif ev.kind == "restarted":
            log.info("mesh: %s restarted (generation %d)", ev.node_id, ev.generation)
        elif ev.kind == "forgotten":
            log.info("mesh: %s forgotten", ev.node_id)
        elif ev.kind == "status":
            log.info("mesh: %s is %s", ev.node_id, ev.status.name.lower())

    async def _status_route(self, _request: web.Request) -> web.StreamResponse:
        return web.json_response(self.status())
