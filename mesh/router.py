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
import json
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

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
from mesh.policies.base import View, cached_tokens
from mesh.proxy import (
    FROM,
    H_REGION,
    H_REPLICA,
    H_ROUTE,
    BadForward,
    Forwarder,
    UpstreamError,
    mark_forward,
    read_forward,
    relay,
    upstream_headers,
)
from mesh.state import LocalOnly, MeshBackend, MeshState
from mesh.view import Dispatches, ReplicaRecord, ViewBuilder, region_key

log = logging.getLogger("kvmesh.router")



def load_tokenizer(spec: str) -> PromptTokenizer:
    """``builtin``, ``hf:<path>`` or ``engine:<url>`` (``kvevents.tokenizer_factory``)."""
    try:
        return make_tokenizer(spec)
    except ImportError as exc:
        raise ValueError(f"tokenizer: {spec!r} needs a missing package ({exc.name})") from None
    except ValueError as exc:
        raise ValueError(f"tokenizer: {exc}") from None


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
        try:
            fwd = read_forward(request.headers, self.config.mesh_keys)
        except BadForward as exc:
            raise ApiError(403, str(exc), type="permission_error",
                           code="bad_forward_signature") from None
        return (False, None) if fwd is None else (True, fwd.target)

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
        headers = upstream_headers(request.headers, request_id)
        url = f"{target.url}{inf.path}"
        if not target.local:
            mark_forward(headers, self.config.node_id, target.replica, request_id, inf.session,
                         self.config.mesh_key)
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


def build_router(config: RouterConfig) -> Router:
    """The router for ``config``: engines' events into the prefix index, gossip with peers."""
    return Router(config, backend=MeshState(config))
