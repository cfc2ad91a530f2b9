"""The router service: API, view, policy, proxy, engine health and the mesh, wired together.

One request (``Router.infer``)::

    tokens -> block keys -> view -> policy -> dispatch (counted at once) -> open upstream
        -> (failed before the first byte: exclude it, decide again, up to max_attempts)
        -> relay the stream -> release the dispatch

A request forwarded by another router (``x-kvmesh-hop``) is never forwarded again: it goes
to the replica it names if that engine is healthy, otherwise the policy picks among this
region's replicas only. A policy may answer "wait" (selective pushing); the request then
joins this router's FCFS queue, whose head is re-evaluated every ``retry_after`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from kvevents.keys import request_keys
from kvevents.tokenizer_factory import make_tokenizer
from mesh.api import (
    ApiError,
    Inference,
    PromptTokenizer,
    build_app,
    error_response,
)
from mesh.config import RouterConfig
from mesh.engines import EngineMonitor, EngineState
from mesh.metrics import RouterMetrics, gauge
from mesh.policies import Decision, Policy, Request, make_policy
from mesh.policies.base import NoPrefixes, PrefixLookup, View, cached_tokens
from mesh.proxy import Forwarder, UpstreamError, relay
from mesh.view import Dispatches, RegionRecord, ReplicaRecord, ViewBuilder, region_key

log = logging.getLogger("kvmesh.router")

HOP = "x-kvmesh-hop"
FROM = "x-kvmesh-from"
TARGET = "x-kvmesh-target"
SIG = "x-kvmesh-sig"
H_REPLICA = "x-kvmesh-replica"
H_REGION = "x-kvmesh-region"
H_ROUTE = "x-kvmesh-route"
_PASS_HEADERS = ("authorization", "x-request-id", "openai-organization", "openai-project")


class MeshBackend(Protocol):
    """The replicated side of the router: what other regions know, and how we tell them."""

    prefix: PrefixLookup

    def remote_records(self, now: float) -> Iterable[ReplicaRecord]:
        """Records of replicas this router does not probe itself."""
        ...

    def others_inflight(self, replica: str) -> int: ...

    def regions(self, now: float) -> Mapping[str, RegionRecord]: ...

    def owner_router(self, replica: str, now: float) -> str | None:
        """Base URL of a live router that serves ``replica`` itself (reports its load)."""
        ...

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

    def owner_router(self, replica: str, now: float) -> str | None:
        return None

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


def load_tokenizer(spec: str) -> PromptTokenizer:
    """``builtin``, ``hf:<path>`` or ``engine:<url>`` (``kvevents.tokenizer_factory``)."""
    try:
        return make_tokenizer(spec)
    except ImportError as exc:
        raise ValueError(f"tokenizer: {spec!r} needs a missing package ({exc.name})") from None
    except ValueError as exc:
        raise ValueError(f"tokenizer: {exc}") from None


def forward_signature(key: str, origin: str, target: str, request_id: str) -> str:
    msg = f"{origin}\n{target}\n{request_id}".encode()
    return hmac.new(key.encode(), msg, hashlib.sha256).hexdigest()


@dataclass(slots=True)
class _Waiter:
    request: Request
    forwarded: bool
    excluded: tuple[frozenset[str], frozenset[str]]
    future: asyncio.Future[Decision]
    enqueued: float


@dataclass(frozen=True, slots=True)
class Target:
    url: str
    replica: str
    region: str
    local: bool
    delay: float = 0.0


class Router:
    """One router node: serves the API, decides, dispatches; see the module docstring."""

    def __init__(
        self,
        config: RouterConfig,
        *,
        backend: MeshBackend | None = None,
        policy: Policy | None = None,
        tokenizer: PromptTokenizer | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.rng = rng or random.Random(config.seed)
        self.tokenizer = tokenizer or load_tokenizer(config.tokenizer)
        self.policy = policy or make_policy(config.policy, config.policy_params)
        self.backend: MeshBackend = backend or LocalOnly()
        self.metrics = RouterMetrics()
        self.dispatches = Dispatches()
        self.local_engines = {e.url: e for e in config.engines}
        self.views = ViewBuilder(
            region=config.region,
            dispatches=self.dispatches,
            records=self._records,
            regions=self.backend.regions,
            prefix=self.backend.prefix,
            static_rtt=config.rtt,
            emulated_rtt=config.emulate_rtt,
        )
        self.mean_prompt_tokens = 256.0
        self._published: tuple[int, int, float] = (-1, -1, float("-inf"))
        self._queue: deque[_Waiter] = deque()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self.engines: EngineMonitor | None = None
        self.forwarder: Forwarder | None = None
        self._runner: web.AppRunner | None = None
        self.started_at = clock()
        self.port: int | None = None
        self.app = build_app(self, self.backend.routes())
        self.metrics.add_provider(self._state_metrics)
        for p in self.backend.metric_providers():
            self.metrics.add_provider(p)

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        self.forwarder = Forwarder(
            self._session,
            connect_timeout=self.config.connect_timeout,
            request_timeout=self.config.request_timeout,
        )
        self.engines = EngineMonitor(
            self.config.engines,
            self._session,
            interval=self.config.health_interval,
            timeout=self.config.health_timeout,
            on_update=self._engine_update,
            clock=self.clock,
        )
        await self.backend.start(self._session)
        self.engines.start()
        self._tasks.append(asyncio.create_task(self._queue_loop(), name="fcfs queue"))
        self._tasks.append(asyncio.create_task(self._publish_loop(), name="publish inflight"))
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port,
                           reuse_address=True)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self.config.port
        await self.backend.start_gossip()
        log.info("router %s (%s) listening on %s:%s, policy %s, %d engines",
                 self.config.node_id, self.config.region, self.config.host, self.port,
                 self.policy.name, len(self.config.engines))

    async def stop(self) -> None:
        for w in list(self._queue):
            if not w.future.done():
                w.future.cancel()
        self._queue.clear()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.engines is not None:
            await self.engines.stop()
        await self.backend.stop()
        await self.tokenizer.aclose()
        if self._session is not None:
            await self._session.close()

    # -- state -----------------------------------------------------------------------------
    def _engine_update(self, state: EngineState) -> None:
        self.backend.publish_engine(state, self.config.region, self.clock())

    def _records(self, now: float) -> Iterable[ReplicaRecord]:
        mon = self.engines
        for url, eng in self.local_engines.items():
            st = mon.states.get(url) if mon is not None else None
            if st is None or st.load is None:
                yield ReplicaRecord(url, self.config.region, False, 0, 0, 0, float("inf"),
                                    self.backend.others_inflight(url), eng.prefill_rate)
                continue
            yield ReplicaRecord(
                url, self.config.region, st.healthy, st.load.waiting, st.load.running,
                st.load.kv_usage, max(0.0, now - st.measured_at),
                self.backend.others_inflight(url), eng.prefill_rate, st.models,
            )
        for rec in self.backend.remote_records(now):
            if rec.replica not in self.local_engines:
                yield rec

    def view(self, now: float | None = None) -> View:
        now = self.clock() if now is None else now
        return self.views.build(now, max(0, len(self._queue) - 1), self.mean_prompt_tokens)

    # -- decisions -------------------------------------------------------------------------
    def _decide_now(self, req: Request, forwarded: bool,
                    excluded: tuple[frozenset[str], frozenset[str]]) -> Decision:
        started = time.perf_counter()
        now = self.clock()
        view = self.views.build(now, max(0, len(self._queue) - 1), self.mean_prompt_tokens,
                                req.model)
        if forwarded:
            # Never a second hop: only engines this router serves itself.
            view = view.local_only()
            view = view.without([r.replica for r in view.replicas
                                 if r.replica not in self.local_engines])
        view = view.without(excluded[0], excluded[1])
        decision = self.policy.decide(req, view, now, self.rng)
        self.metrics.decision_seconds.observe(time.perf_counter() - started)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("decide %s -> %s | %s | top: %s", req.request_id,
                      decision.replica or decision.region or decision.outcome, decision.reason,
                      "; ".join(c.describe() for c in decision.candidates))
        return decision

    async def decide(self, req: Request, forwarded: bool = False,
                     excluded: tuple[frozenset[str], frozenset[str]] = (frozenset(), frozenset())
                     ) -> Decision:
        """A decision now, or after waiting in the FCFS queue when the policy says so."""
        if not self._queue:
            d = self._decide_now(req, forwarded, excluded)
            if not d.wait:
                return d
            self.metrics.decisions.labels(d.policy or self.policy.name, "wait").inc()
        if len(self._queue) >= self.config.max_queue:
            return Decision(None, None, "router queue full", self.policy.name)
        fut: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(req, forwarded, excluded, fut, self.clock())
        self._queue.append(waiter)
        self._wake.set()
        try:
            return await fut
        finally:
            with contextlib.suppress(ValueError):
                self._queue.remove(waiter)
            self.metrics.queue_wait_seconds.observe(self.clock() - waiter.enqueued)

    async def _queue_loop(self) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            head = self._queue[0]
            if head.future.done():
                self._queue.popleft()
                continue
            try:
                d = self._decide_now(head.request, head.forwarded, head.excluded)
            except Exception as exc:  # never let one request stop the queue
                log.exception("policy failed on a queued request")
                d = Decision(None, None, f"policy error: {type(exc).__name__}", self.policy.name)
            if d.wait:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), d.retry_after)
                continue
            self._queue.popleft()
            if not head.future.done():
                head.future.set_result(d)

    def _publish(self) -> None:
        """Own in-flight counts and queue length into the replicated state, now."""
        self._published = (self.dispatches.version, len(self._queue), self.clock())
        try:
            self.backend.publish_inflight(self.dispatches.counts(published_only=True),
                                          len(self._queue), self._published[2])
        except Exception:
            log.exception("publishing in-flight counts failed")

    async def _publish_loop(self) -> None:
        """Dispatches publish at once; this catches queue changes (every 20 ms) and refreshes
        the record every few seconds so peers never see it age out."""
        while True:
            await asyncio.sleep(0.02)
            version, queue, at = self._published
            if (self.dispatches.version != version or len(self._queue) != queue
                    or self.clock() - at >= 5.0):
                self._publish()

    # -- the request path ------------------------------------------------------------------
    def _target(self, d: Decision, forwarded: bool) -> Target | None:
        """Where to send the request: the engine itself, or the router that serves it."""
        region = d.region or self.config.region
        if d.replica is not None and d.replica in self.local_engines:
            return Target(d.replica, d.replica, self.config.region, True)
        if forwarded:
            return None
        now = self.clock()
        router = self.backend.owner_router(d.replica, now) if d.replica else None
        if router is None:
            info = self.backend.regions(now).get(region)
            if info is None or not info.routers:
                return None
            router = self.rng.choice(info.routers)
        return Target(router, d.replica or "", region, False,
                      self.config.emulate_rtt.get(region, 0.0))

    def _forward_ok(self, request: web.Request) -> tuple[bool, str | None]:
        """(is this a forwarded request, replica it names); raises ApiError on a bad signature."""
        if request.headers.get(HOP) is None:
            return False, None
        target = request.headers.get(TARGET) or None
        if self.config.mesh_keys:
            sig = request.headers.get(SIG, "")
            origin, rid = request.headers.get(FROM, ""), request.headers.get("x-request-id", "")
            if not any(
                hmac.compare_digest(sig, forward_signature(key, origin, target or "", rid))
                for key in self.config.mesh_keys
            ):
                raise ApiError(403, "forwarded request with a bad or missing mesh signature",
                               type="permission_error", code="bad_forward_signature")
        return True, target

    async def infer(self, request: web.Request, inf: Inference) -> web.StreamResponse:
        arrival = self.clock()
        route = inf.path
        try:
            forwarded, pinned = self._forward_ok(request)
        except ApiError as exc:
            self.metrics.requests.labels(route, str(exc.status)).inc()
            return exc.response()
        request_id = request.headers.get("x-request-id") or f"kvm-{uuid.uuid4().hex[:16]}"
        self.metrics.tokenize_seconds.observe(inf.parse_seconds)
        t0 = time.perf_counter()
        salt = inf.body.get("cache_salt")
        keys = request_keys(inf.token_ids, self.config.block_size,
                            salt=salt if isinstance(salt, str) else None)
        self.metrics.block_keys_seconds.observe(time.perf_counter() - t0)
        req = Request(request_id, inf.token_ids, keys, self.config.block_size, inf.session,
                      inf.max_tokens, arrival, inf.model)
        return await self._place(request, inf, req, forwarded, pinned, request_id, arrival)

    async def _place(
        self, request: web.Request, inf: Inference, req: Request, forwarded: bool,
        pinned: str | None, request_id: str, arrival: float,
    ) -> web.StreamResponse:
        """Decide, dispatch and relay, retrying on the next-best target before the first byte."""
        route = inf.path
        excluded_replicas: set[str] = set()
        excluded_regions: set[str] = set()
        failures: list[str] = []
        for attempt in range(1, self.config.max_attempts + 1):
            excluded = (frozenset(excluded_replicas), frozenset(excluded_regions))
            if forwarded and pinned and attempt == 1 and pinned in self.local_engines \
                    and self.engines is not None and self.engines.healthy(pinned):
                d = Decision(pinned, self.config.region,
                             f"pinned by {request.headers.get(FROM, 'peer')}", "forwarded")
                self.metrics.forwarded_in.labels("pinned").inc()
                outcome = "pinned"
            else:
                d = await self.decide(req, forwarded, excluded)
                if forwarded and attempt == 1:
                    self.metrics.forwarded_in.labels("repicked").inc()
                outcome = ""
            target = self._target(d, forwarded) if d.routed else None
            if target is None:
                self.metrics.decisions.labels(d.policy or self.policy.name, "none").inc()
                if failures:
                    break
                self.metrics.requests.labels(route, "503").inc()
                return error_response(503, f"no replica can serve this request: {d.reason}",
                                      type="server_error", code="no_replica",
                                      headers={H_ROUTE: d.reason, H_REGION: self.config.region})
            outcome = outcome or ("local" if target.local else
                                  "remote" if d.replica else "region")
            self.metrics.decisions.labels(d.policy or self.policy.name, outcome).inc()
            if attempt == 1:
                self._note_prompt(req, d)
            resp = await self._attempt(request, inf, req, d, target, arrival, forwarded,
                                       request_id, route)
            if resp is not None:
                return resp
            failures.append(f"{target.replica or target.region}")
            if target.local:
                excluded_replicas.add(target.replica)
            elif d.replica:
                excluded_replicas.add(d.replica)
            else:
                excluded_regions.add(target.region)
        self.metrics.requests.labels(route, "502").inc()
        return error_response(
            502, f"every attempt failed before the first byte ({', '.join(failures)})",
            type="server_error", code="upstream_failed",
            headers={H_REGION: self.config.region},
        )

    def _note_prompt(self, req: Request, d: Decision) -> None:
        cached = cached_tokens(req, d.matched_blocks)
        self.metrics.observe_hit(cached, req.num_tokens)
        uncached = req.num_tokens - cached
        self.mean_prompt_tokens += 0.05 * (uncached - self.mean_prompt_tokens)

    async def _attempt(
        self, request: web.Request, inf: Inference, req: Request, d: Decision, target: Target,
        arrival: float, forwarded: bool, request_id: str, route: str,
    ) -> web.StreamResponse | None:
        """One dispatch; None when it failed before the first byte (try the next target)."""
        assert self.forwarder is not None
        headers = {"Content-Type": "application/json", "Accept-Encoding": "identity",
                   "x-request-id": request_id}
        for h in _PASS_HEADERS:
            if h in request.headers and h != "x-request-id":
                headers[h] = request.headers[h]
        url = f"{target.url}{inf.path}"
        if not target.local:
            headers[HOP] = "1"
            headers[FROM] = self.config.node_id
            headers[TARGET] = target.replica
            if inf.session:
                headers["x-session-id"] = inf.session
            if self.config.mesh_key is not None:
                headers[SIG] = forward_signature(self.config.mesh_key, self.config.node_id,
                                                 target.replica, request_id)
            self.metrics.forwards.labels(target.region).inc()
        replica = target.replica or region_key(target.region)
        # A forward is published by the router that dispatches it to the engine, not here,
        # so the mesh counts it once; this router still counts it at once in its own view.
        ticket = self.dispatches.start(replica, target.region, req.num_tokens, self.clock(),
                                       publish=target.local)
        if ticket.publish:
            self._publish()
        try:
            try:
                up = await self.forwarder.open(url, inf.raw, headers, target.delay)
            except UpstreamError as exc:
                self.metrics.retries.labels(exc.kind).inc()
                log.warning("attempt on %s failed before the first byte: %s", url, exc)
                if target.local and exc.kind in {"connect", "reset"} and self.engines:
                    self.engines.mark_down(target.replica, str(exc))
                return None
            self.metrics.first_byte_seconds.observe(self.clock() - arrival)
            extra = {H_REPLICA: target.replica, H_REGION: target.region, H_ROUTE: d.reason}
            if not target.local:
                remote_route = up.resp.headers.get(H_ROUTE, "")
                extra[H_REPLICA] = up.resp.headers.get(H_REPLICA, target.replica)
                extra[H_REGION] = up.resp.headers.get(H_REGION, target.region)
                extra[H_ROUTE] = f"{d.reason} | via {target.region}: {remote_route}"
            if forwarded:
                extra[H_ROUTE] = f"{d.reason} (forwarded)"
            extra["x-request-id"] = request_id
            resp, _, completed = await relay(request, up, extra)
            self.metrics.requests.labels(route, str(up.status)).inc()
            if not completed:
                log.info("stream %s to %s ended early", request_id, target.replica)
            return resp
        finally:
            self.dispatches.done(ticket)
            if ticket.publish:
                self._publish()

    # -- other routes ----------------------------------------------------------------------
    def count_rejected(self, path: str, reason: str) -> None:
        self.metrics.rejected.labels(path, reason).inc()
        self.metrics.requests.labels(path, "400").inc()

    def local_models(self) -> list[str]:
        if self.engines is None:
            return []
        out: list[str] = []
        for st in self.engines.states.values():
            for m in st.models:
                if m not in out:
                    out.append(m)
        return out

    async def models_page(self, request: web.Request) -> web.Response:
        names = self.local_models()
        if request.query.get("scope") != "local" and self._session is not None:
            urls = [u for info in self.backend.regions(self.clock()).values()
                    for u in info.routers]
            results = await asyncio.gather(*(self._peer_models(u) for u in urls))
            for found in results:
                for m in found:
                    if m not in names:
                        names.append(m)
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "kvmesh"} for m in names]
        return web.json_response({"object": "list", "data": data})

    async def _peer_models(self, url: str) -> list[str]:
        assert self._session is not None
        try:
            async with self._session.get(f"{url}/v1/models", params={"scope": "local"},
                                         timeout=aiohttp.ClientTimeout(total=1.0)) as resp:
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return []
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            return []
        return [str(m["id"]) for m in data if isinstance(m, dict) and "id" in m]

    async def health_page(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "node_id": self.config.node_id,
                                  "region": self.config.region})

    def ready_reason(self) -> str | None:
        if self.engines is None:
            return "starting"
        view = self.view()
        if not view.healthy("mesh"):
            return "no healthy replica in the mesh"
        return None

    async def ready_page(self, request: web.Request) -> web.Response:
        why = self.ready_reason()
        if why is None:
            return web.json_response({"status": "ready"})
        return error_response(503, why, type="server_error", code="not_ready")

    async def metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def status_page(self, request: web.Request) -> web.Response:
        return web.Response(text=json.dumps(self.status_dict(), default=str, indent=1),
                            content_type="application/json")

    def status_dict(self) -> dict[str, Any]:
        """The mesh document (node, peers, replicas by index and load) plus this router's part."""
        now = self.clock()
        view = self.view(now)
        doc = dict(self.backend.status())
        doc["router"] = {
            "node_id": self.config.node_id,
            "region": self.config.region,
            "advertise": self.config.advertise,
            "policy": self.policy.name,
            "uptime_s": round(now - self.started_at, 3),
            "queue": len(self._queue),
            "inflight": self.dispatches.counts(),
            "estimated_cache_hit_ratio": round(self.metrics.hit_ratio(), 4),
            "engines": [
                {"url": s.url, "healthy": s.healthy, "reason": s.reason,
                 "load": None if s.load is None else {
                     "waiting": s.load.waiting, "running": s.load.running,
                     "kv_usage": s.load.kv_usage},
                 "models": list(s.models)}
                for s in (self.engines.states.values() if self.engines else [])
            ],
        }
        doc["routing"] = {
            "replicas": [
                {"replica": r.replica, "region": r.region, "healthy": r.healthy,
                 "waiting": r.waiting, "running": r.running, "kv_usage": r.kv_usage,
                 "age_s": None if r.load_age == float("inf") else round(r.load_age, 3),
                 "inflight": r.inflight, "fresh": r.fresh}
                for r in view.replicas
            ],
            "regions": {k: {"rtt_s": v.rtt, "reachable": v.reachable, "queue": v.queue}
                        for k, v in view.regions.items()},
        }
        return doc

    def _state_metrics(self) -> Iterable[Any]:
        view = self.view()
        rows: list[tuple[list[str], float]] = []
        health: list[tuple[list[str], float]] = []
        for r in view.replicas:
            labels = [r.replica, r.region]
            rows += [([*labels, "waiting"], r.waiting), ([*labels, "running"], r.running),
                     ([*labels, "kv_usage"], r.kv_usage), ([*labels, "inflight"], r.inflight)]
            if r.load_age != float("inf"):
                rows.append(([*labels, "age_seconds"], r.load_age))
            health.append((labels, 1.0 if r.healthy else 0.0))
        yield gauge("kvmesh_replica_load", "Per-replica load as this router sees it",
                    ["replica", "region", "field"], rows)
        yield gauge("kvmesh_replica_healthy", "1 if the replica takes new requests",
                    ["replica", "region"], health)
        yield gauge("kvmesh_router_queue_length", "Requests waiting in the FCFS queue", [],
                    [([], float(len(self._queue)))])
        yield gauge("kvmesh_router_inflight", "This router's requests in flight, by target",
                    ["replica"], [([k], float(v)) for k, v in self.dispatches.counts().items()])


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
        from crdt.load_vector import LoadVector
        from crdt.lww_map import LWWMap
        from crdt.prefix_index import PrefixIndex
        from crdt.versions import VersionClock

        self.config = config
        self.clock = clock
        self.slice_expiry = slice_expiry
        self.stale_after = stale_after
        self.me = config.node_id
        self.index = PrefixIndex()
        self.prefix: PrefixLookup = self.index
        self.loads = LoadVector(node_id=self.me)
        self.meta = LWWMap()
        self.subscribers: list[Any] = []
        self.node: Any = None
        self._down_since: dict[str, float] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._queue = 0
        self._models: dict[str, tuple[str, ...]] = {}
        for i, eng in enumerate(config.engines):
            if eng.kv_events is None:
                continue
            self.subscribers.append(self._subscriber(i, eng.url, eng.kv_events, eng.replay))
        if config.peers:
            self.node = self._node()
        generation = self.node.generation if self.node is not None else int(time.time() * 1000)
        self.versions = VersionClock(generation)
        self._write_meta(clock())

    def _subscriber(self, i: int, url: str, source: str, replay: str | None) -> Any:
        """The engine's event source: ZMQ PUB (``tcp://``, ``ipc://``) or a Redis stream."""
        try:
            from kvevents.sources import open_event_source
        except ImportError:  # a build without the Redis reader
            if source.startswith(("redis://", "rediss://", "unix://")):
                raise ValueError(f"engines[{i}].kv_events: Redis stream sources are not "
                                 "available in this build") from None
            from kvevents.zmq_subscriber import ZmqSubscriber

            return ZmqSubscriber(url, source, self.index, replay_endpoint=replay)
        try:
            return open_event_source(url, source, self.index, replay=replay)
        except ValueError as exc:
            raise ValueError(f"engines[{i}].kv_events: {exc}") from None

    def _node(self) -> Any:
        from mesh.node import MeshConfig, MeshNode

        if self.config.mesh_key is None:
            raise ValueError("mesh_key: required when peers are configured (it signs gossip)")
        mesh_config = MeshConfig.from_options(
            node_id=self.config.node_id, region=self.config.region,
            advertise=self.config.advertise, keys=list(self.config.mesh_keys),
            seeds=self.config.peers, options=self.config.gossip,
        )
        return MeshNode(mesh_config, {"prefix": self.index, "load": self.loads,
                                      "meta": self.meta}, replicas=self._status_rows)

    def _write_meta(self, now: float) -> None:
        engines = {e.url: {"prefill_rate": e.prefill_rate,
                           "models": list(self._models.get(e.url, ()))}
                   for e in self.config.engines}
        self.meta.set(self.me, {"region": self.config.region, "addr": self.config.advertise,
                                "engines": engines, "queue": self._queue},
                      self.versions.next(), now)

    def _router_meta(self, router: str) -> dict[str, Any]:
        value = self.meta.get(router)
        return value if isinstance(value, dict) else {}

    # -- MeshBackend -------------------------------------------------------------------------
    def remote_records(self, now: float) -> Iterable[ReplicaRecord]:
        own = {e.url for e in self.config.engines}
        alive = self._alive_routers()
        for replica, load in self.loads.loads(now).items():
            if replica in own:
                continue
            meta = self._router_meta(load.reporter)
            region = meta.get("region")
            if not isinstance(region, str):
                continue
            engines = meta.get("engines")
            info = engines.get(replica) if isinstance(engines, dict) else None
            info = info if isinstance(info, dict) else {}
            rate = info.get("prefill_rate")
            models = info.get("models")
            healthy = (load.healthy and load.age <= self.stale_after
                       and (alive is None or load.reporter in alive))
            yield ReplicaRecord(
                replica, region, healthy, float(load.waiting), float(load.running),
                load.kv_usage, load.age, self.loads.inflight(replica, exclude_router=self.me),
                float(rate) if isinstance(rate, int | float) else None,
                tuple(m for m in models if isinstance(m, str)) if isinstance(models, list)
                else (),
            )

    def owner_router(self, replica: str, now: float) -> str | None:
        alive = self._alive_routers()
        for load in sorted(self.loads.reports(replica, now), key=lambda r: r.age):
            if load.reporter == self.me or (alive is not None and load.reporter not in alive):
                continue
            addr = self._router_meta(load.reporter).get("addr")
            if isinstance(addr, str) and addr:
                return addr
        return None

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
        from mesh.transport import STATUS_PATH

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
            if now - since >= self.slice_expiry and self.index.version(url) is not None:
                log.info("engine %s down for %.0fs: dropping its slice", url, now - since)
                self.index.drop(url, now=now)
        self.index.gc(now, 60.0)
        self.loads.expire(now)
        self.meta.gc(now, 300.0)
        # Refresh our own meta entry now and then so it never looks abandoned.
        self._write_meta(now)

    def _status_rows(self, now: float) -> list[Any]:
        from mesh.status import ReplicaLoad, replica_rows

        loads = {}
        for replica, load in self.loads.loads(now).items():
            region = self._router_meta(load.reporter).get("region")
            loads[replica] = ReplicaLoad(str(region), load.reporter, load.waiting, load.running,
                                         load.kv_usage, load.age)
        return replica_rows(self.index.slices(), loads)

    def status(self) -> dict[str, Any]:
        if self.node is None:
            return {"index": {"replicas": len(self.index.replicas()),
                              "pairs": self.index.pair_count()}}
        doc: dict[str, Any] = self.node.status()
        return doc

    def metric_providers(self) -> list[Callable[[], Iterable[Any]]]:
        return [self._ingest_metrics, self._gossip_metrics]

    def _ingest_metrics(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily

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
        from prometheus_client.core import CounterMetricFamily

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


def build_router(config: RouterConfig) -> Router:
    """The router for ``config``: engines' events into the prefix index, gossip with peers."""
    return Router(config, backend=MeshState(config))
