"""The router service: the asyncio shell around the decision core, wired to API, proxy and mesh.

One request (``Router.infer``)::

    tokens -> block keys -> mesh.dispatch (view, filters, policy, queue, target)
        -> open upstream (counted at once in the ledger)
        -> (failed before the first byte: exclude it, decide again, up to max_attempts)
        -> relay the stream -> release the dispatch

Every decision is :class:`mesh.dispatch.Dispatcher`'s (the simulator runs the same one); this
module only does what needs I/O: reading requests, timers that wake the FCFS queue (on
arrivals, completions, engine load changes and the "wait" retry time), HTTP to engines and
peer routers, and publishing in-flight counts into the replicated state.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import replace
from functools import partial
from typing import Any

import aiohttp
from aiohttp import web

from kvevents.tokenizers.factory import make_tokenizer
from mesh import dashboard, upstream, warmup
from mesh.api import (
    ApiError,
    Inference,
    PromptTokenizer,
    build_app,
    error_response,
    header_safe,
)
from mesh.config import RouterConfig
from mesh.decision_log import DecisionEntry, DecisionLog
from mesh.deferred import Deferred
from mesh.demand import DemandMeter, PlanTargets, hint_metrics
from mesh.dispatch import Ask, Dispatcher, Placement, Target, Waiter
from mesh.edge import API_KEY, Edge
from mesh.engines import EngineMonitor, EngineState
from mesh.forward_auth import Forward, has_hop
from mesh.front import FrontRequest
from mesh.mesh_metrics import mesh_metrics
from mesh.metrics import RouterMetrics, gauge, length_metrics
from mesh.outcomes import Pending, outcomes_for
from mesh.policies import Decision, Policy, Request, make_policy
from mesh.policies.base import View, cached_tokens
from mesh.precision import Check, Precision
from mesh.proxy import (
    H_CLIENT_ID,
    H_EMULATED_RTT,
    H_PREDICTED,
    H_PREDICTED_TTFT,
    H_REGION,
    H_REPLICA,
    H_ROUTE,
    Forwarder,
    UpstreamError,
    emulated_hold,
    relay,
    upstream_headers,
)
from mesh.state import LocalOnly, MeshBackend, MeshState, view_records
from mesh.tier_metrics import TierMetrics
from mesh.tiers import H_TIER, TierRules, forward_value, parse_forwarded
from mesh.tls import client_context
from mesh.view import Dispatches, ReplicaRecord, Ticket, ViewBuilder, region_key

H_APP = "x-kvmesh-app"
"""Optional client header: the application a request belongs to (a length-predictor feature)."""

log = logging.getLogger("kvmesh.router")

PUBLISH_EVERY = 0.005
"""Seconds between publications of this router's in-flight counts, at most (see
``Router._publish_soon``)."""



def load_tokenizer(spec: str) -> PromptTokenizer:
    """``builtin``, ``hf:<path>`` or ``engine:<url>`` (``kvevents.tokenizers.factory``)."""
    try:
        return make_tokenizer(spec)
    except ImportError as exc:
        raise ValueError(f"tokenizer: {spec!r} needs a missing package ({exc.name})") from None
    except ValueError as exc:
        raise ValueError(f"tokenizer: {exc}") from None


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
        self.precision = Precision(config, self.backend, self._adapters)
        self.outcomes = outcomes_for(config, self.policy)
        if isinstance(self.backend, MeshState):
            self.backend.learned = self.outcomes.published
        self.views = ViewBuilder(
            region=config.region,
            dispatches=self.dispatches,
            records=self._records,
            regions=self.backend.regions,
            prefix=self.precision.lookup,
            static_rtt=config.rtt,
            emulated_rtt=config.emulate_rtt,
            learned_rtt=self.outcomes.rtt,
            margins=self.outcomes.margins,
            prior_margin=self.outcomes.prior_margin,
        )
        self.dispatcher = Dispatcher(
            region=config.region,
            policy=self.policy,
            views=self.views,
            local=self.local_engines.__contains__,
            healthy=self._engine_healthy,
            rng=self.rng,
            max_queue=config.max_queue,
            emulated_rtt=config.emulate_rtt,
            on_decision=self._observe_decision,
            tiers=TierRules(config.tiers) if config.tiers.enabled else None,
        )
        self.tier_metrics = TierMetrics(self.metrics, config.tiers, self.dispatcher.queue)
        self._published: tuple[int, int, float] = (-1, -1, float("-inf"))
        self._publish_queued = False
        self.deferred = Deferred()
        """Accounting of relayed answers, run while the next request is at its engine."""
        self._id_prefix = f"kvm-{uuid.uuid4().hex[:16]}-"
        """Request ids: a random prefix per router process and a counter (unique without a
        random draw per request)."""
        self._ids = itertools.count()
        self._waiting: dict[Waiter, asyncio.Future[Placement]] = {}
        self._place_inline = type(self).place is Router.place
        """:meth:`place` is this class's own (a subclass may place elsewhere, e.g. a worker
        process asks its node's primary): the request path calls :meth:`place_now`."""
        self._wake = asyncio.Event()
        self._pump_due = False
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self.engines: EngineMonitor | None = None
        self.forwarder: Forwarder | None = None
        self._runner: web.AppRunner | None = None
        self._client_ids: dict[str, str | None] = {}
        self.started_at = clock()
        self.port: int | None = None
        self.status_sections: dict[str, Callable[[], dict[str, Any]]] = {}
        """Extra parts of ``/mesh/status`` by name (the endpoint picker's)."""
        self.status_sections["precision"] = self.precision.status
        self.status_sections["tiers"] = self.tier_metrics.status
        self.status_sections["ttft_model"] = self.outcomes.status
        self.decision_log = DecisionLog()
        self.warmup = warmup.Warmup(self.started_at, config.warm_timeout)
        self.edge = Edge(config, self.tokenizer, from_config=tokenizer is None)
        self.preparer = self.edge.preparer
        self.http_limits = self.edge.limits
        self.node_metrics: Callable[[], Awaitable[bytes]] | None = None
        """The node's metrics when this process is one of several (``mesh.workers``)."""
        self.app = build_app(self, self._routes())
        self.edge.install(self.app, self.metrics)
        self.metrics.add_provider(self._state_metrics)
        self.metrics.add_provider(self.precision.metrics)
        self.metrics.add_provider(length_metrics(self.dispatcher.lengths.stats))
        self.metrics.add_provider(self.outcomes.metrics)
        self.metrics.add_provider(lambda: warmup.metrics(self.warmup))
        self.metrics.add_provider(lambda: mesh_metrics(self.backend))
        self.demand = DemandMeter()
        self.plan = PlanTargets.from_file(config.plan_file) if config.plan_file else None
        self.metrics.add_provider(self._hint_metrics)
        for p in self.backend.metric_providers():
            self.metrics.add_provider(p)

    def _routes(self) -> list[web.RouteDef]:
        """Routes besides the API's: the mesh's (gossip, status) and the dashboard's."""
        return [*self.backend.routes(), *dashboard.routes(self)]

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        tls = client_context(self.config)
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300,
                                         ssl=tls if tls is not None else True)
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        self.forwarder = Forwarder(
            upstream.Pool(tls, self.config.connect_timeout),
            request_timeout=self.config.request_timeout,
            first_byte_timeout=self.config.first_byte_timeout,
        )
        self.forwarder.pool.on_sent = self.deferred.run
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
        self._tasks.append(asyncio.create_task(
            warmup.watch(self.warmup, self.backend, {e.url: e.replay for e in self.config.engines
                                                     if e.kv_events and e.replay}, self.clock),
            name="warmup"))
        self._runner = self.edge.runner(self.app)
        await self._runner.setup()
        self.port = await self.edge.listen(self._runner, self.config.host, self.config.port,
                                           reuse_port=self.config.workers > 1)
        await self.backend.start_gossip()
        log.info("router %s (%s) listening on %s:%s, policy %s, %d engines",
                 self.config.node_id, self.config.region, self.config.host, self.port,
                 self.policy.name, len(self.config.engines))

    async def stop(self) -> None:
        self.dispatcher.clear()
        for fut in self._waiting.values():
            if not fut.done():
                fut.cancel()
        self._waiting.clear()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        await self.edge.close()
        if self._runner is not None:
            await self._runner.cleanup()
        self.deferred.close()
        if self.engines is not None:
            await self.engines.stop()
        await self.backend.stop()
        await self.tokenizer.aclose()
        if self.forwarder is not None:
            self.forwarder.pool.close()
        if self._session is not None:
            await self._session.close()

    # -- state -----------------------------------------------------------------------------
    def _adapters(self) -> Mapping[str, frozenset[str]]:
        return self.engines.adapters if self.engines is not None else {}

    def _engine_update(self, state: EngineState) -> None:
        self.backend.publish_engine(state, self.config.region, self.clock())
        if state.healthy and state.load is not None:
            self.outcomes.scraped(state.url, state.load.kv_usage, state.measured_at)
        self.kick()  # a load change: re-evaluate a waiting head

    def _engine_healthy(self, replica: str) -> bool:
        return self.engines is not None and self.engines.healthy(replica)

    def _records(self, now: float) -> Iterable[ReplicaRecord]:
        states = self.engines.states if self.engines is not None else {}
        region = self.config.region
        own = ((url, region, states.get(url), eng.prefill_rate)
               for url, eng in self.local_engines.items())
        return view_records(own, self.local_engines, self.backend, now,
                            self.outcomes.published, self.outcomes.kv.get)

    def view(self, now: float | None = None) -> View:
        return self.dispatcher.view(self.clock() if now is None else now)

    @property
    def mean_prompt_tokens(self) -> float:
        return self.dispatcher.mean_prompt_tokens

    # -- decisions (mesh.dispatch) ------------------------------------------------------------
    def _observe_decision(self, req: Request, view: View, d: Decision, seconds: float) -> None:
        self.deferred.add(partial(self.metrics.decision_seconds.observe, seconds))
        if log.isEnabledFor(logging.DEBUG):
            log.debug("decide %s -> %s | %s | top: %s", req.request_id,
                      d.replica or d.region or d.outcome, d.reason,
                      "; ".join(c.describe() for c in d.candidates))

    async def place(self, ask: Ask) -> Placement:
        """A placement now, or after waiting in the FCFS queue when the policy says so."""
        got = self.place_now(ask)
        return got if isinstance(got, Placement) else await self.wait(ask, got)

    def place_now(self, ask: Ask) -> Placement | Waiter:
        """:meth:`place` up to the wait: the placement, or the waiter to :meth:`wait` for
        (the request path's usual case without a coroutine)."""
        got = self.dispatcher.submit(ask, self.clock())
        if isinstance(got, Placement) and got.outcome == "shed":
            self.tier_metrics.was_shed(ask.request.tier)
        return got

    async def wait(self, ask: Ask, got: Waiter) -> Placement:
        """The placement of a request queued as ``got`` (:meth:`place_now`)."""
        if got.first is not None:
            self.metrics.decisions.labels(got.first.policy or self.policy.name, "wait").inc()
            self._wake.set()  # a new retry time; nothing to re-evaluate yet
        else:
            self.kick()  # an arrival behind others: re-evaluate the head
        fut: asyncio.Future[Placement] = asyncio.get_running_loop().create_future()
        self._waiting[got] = fut
        try:
            return await fut
        finally:
            self.dispatcher.cancel(got)  # a no-op once it has left the queue
            self._waiting.pop(got, None)
            self.metrics.queue_wait_seconds.observe(self.clock() - got.since)
            self.tier_metrics.waited(ask.request.tier, self.clock() - got.since)

    def kick(self) -> None:
        """Re-evaluate a waiting head now (an arrival, a completion, a load change)."""
        if not self.dispatcher.queue:
            return  # no one waits: nothing to re-evaluate (and no task switch per request)
        self._pump_due = True
        self._wake.set()

    async def _queue_loop(self) -> None:
        """Re-evaluates the queue head when kicked and when the last "wait" asked to be asked
        again (``Dispatcher.retry_at``)."""
        while True:
            self._wake.clear()
            retry_at = self.dispatcher.retry_at
            now = self.clock()
            if self._pump_due or (retry_at is not None and now >= retry_at):
                self._pump_due = False
                for waiter, placement in self.dispatcher.pump(now):
                    fut = self._waiting.get(waiter)
                    if fut is not None and not fut.done():
                        fut.set_result(placement)
                retry_at = self.dispatcher.retry_at
            timeout = None if retry_at is None else max(0.0, retry_at - self.clock())
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation
            # that comes as the loop is kicked, and stop would wait on this loop forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    def _publish(self) -> None:
        """Own in-flight counts and queue length into the replicated state, now."""
        queue = self.dispatcher.queued()
        self._published = (self.dispatches.version, queue, self.clock())
        try:
            self.backend.publish_inflight(self.dispatches.counts(published_only=True),
                                          queue, self._published[2])
        except Exception:
            log.exception("publishing in-flight counts failed")

    def _publish_soon(self) -> None:
        """Publish at the end of this loop turn, or ``PUBLISH_EVERY`` after the last
        publication: the dispatches and completions in between go into the replicated state
        in one write. Peers see the counts when gossip next pushes (every
        ``gossip_interval``, 0.2 s by default), and this router's own decisions read its
        ledger, never the published counts, so nothing waits on this but a record."""
        if not self._publish_queued:
            self._publish_queued = True
            loop = asyncio.get_running_loop()
            wait = self._published[2] + PUBLISH_EVERY - self.clock()
            if wait > 0:
                loop.call_later(wait, self._publish_queued_now)
            else:
                loop.call_soon(self._publish_queued_now)

    def _publish_queued_now(self) -> None:
        self._publish_queued = False
        self._publish()

    async def _publish_loop(self) -> None:
        """Dispatches publish at once; this catches queue changes (every 20 ms) and refreshes
        the record every few seconds so peers never see it age out."""
        while True:
            await asyncio.sleep(0.02)
            version, queue, at = self._published
            if (self.dispatches.version != version or self.dispatcher.queued() != queue
                    or self.clock() - at >= 5.0):
                self._publish()

    # -- the request path ------------------------------------------------------------------
    async def infer(self, request: web.Request | FrontRequest,
                    inf: Inference) -> web.StreamResponse:
        arrival = self.clock()
        route = inf.path
        try:
            fwd = (await self.edge.check_forward(request.headers, inf)  # mesh.forward_auth
                   if has_hop(request.headers) else None)
        except ApiError as exc:
            self.metrics.requests.labels(route, str(exc.status)).inc()
            return exc.response()
        if fwd is not None and H_EMULATED_RTT in request.headers:
            try:
                hold = emulated_hold(request.headers[H_EMULATED_RTT])
            except ValueError as exc:
                self.metrics.requests.labels(route, "400").inc()
                return error_response(400, str(exc), code="bad_forward",
                                      headers={H_REGION: self.config.region})
            # An emulated far region (``emulate_rtt``): the forward is decided as late as a
            # network that far would deliver it. Held here, not by the sender, so that the
            # hop costs one wake-up of this router, as a real network's would.
            await asyncio.sleep(hold)
            arrival = self.clock()
        # The router owns request ids (unique per dispatch); the client's id is echoed back.
        request_id = fwd.request_id if fwd else f"{self._id_prefix}{next(self._ids):08x}"
        keys = self.precision.keys_for(inf, arrival)
        tier, deadline = self._tier(request, inf, fwd, arrival)
        req = self.dispatcher.arrival(request_id, inf.token_ids, keys, keys.unit, inf.session,
                                      inf.max_tokens, arrival, inf.model,
                                      header_safe(request.headers.get(H_APP)), tier, deadline)
        # Counters only: recorded once the request is at its engine (mesh.deferred).
        self.deferred.add(partial(self._arrived, inf, req.num_tokens, arrival, fwd is None))
        ask = Ask(req) if fwd is None else Ask(req, True, fwd.target or None, fwd.origin)
        self._client_ids[request_id] = (
            None if fwd else header_safe(request.headers.get("x-request-id")))
        try:
            return await self._place(request, inf, ask, request_id, arrival)
        finally:
            self._client_ids.pop(request_id, None)

    def _arrived(self, inf: Inference, tokens: int, arrival: float, client: bool) -> None:
        """An arrival's figures: its preparation time and (from a client) its demand."""
        self.metrics.tokenize_seconds.observe(inf.parse_seconds)
        if client:
            self.demand.observe(inf.model, tokens, inf.max_tokens, arrival)

    def _tier(self, request: web.Request | FrontRequest, inf: Inference, fwd: Forward | None,
              arrival: float) -> tuple[str, float]:
        """The request's tier and SLO deadline: a peer's signed ones for a forward, else its
        own choice, its API key's default, the configured default (``mesh.tiers``)."""
        tiers = self.config.tiers
        if fwd is not None and fwd.tier:
            got = parse_forwarded(fwd.tier, arrival)
            if got is not None:
                return got
        key = request.get(API_KEY)
        tier = tiers.resolve(inf.tier, key.name if key is not None else None)
        return tier, tiers.deadline(tier, arrival)

    async def _place(
        self, request: web.Request | FrontRequest, inf: Inference, first: Ask, request_id: str,
        arrival: float,
    ) -> web.StreamResponse:
        """Decide, dispatch and relay, retrying on the next-best target before the first byte."""
        route = inf.path
        req = first.request
        excluded_replicas: set[str] = set(self.edge.outliers.excluded(self.clock()))
        excluded_regions: set[str] = set()
        failures: list[str] = []
        for attempt in range(1, self.config.max_attempts + 1):
            if attempt == 1 and not excluded_replicas and not excluded_regions \
                    and first.attempt == 1 and not first.excluded_replicas \
                    and not first.excluded_regions:
                ask = first  # the common case: nothing to exclude (no copy per request)
            else:
                ask = replace(first, excluded_replicas=frozenset(excluded_replicas),
                              excluded_regions=frozenset(excluded_regions), attempt=attempt)
            if self._place_inline:
                got = self.place_now(ask)
                p = got if isinstance(got, Placement) else await self.wait(ask, got)
            else:
                p = await self.place(ask)
            d, target = p.decision, p.target
            # The decision's log entry and counters: recorded once the request is at its
            # engine (mesh.deferred), or within 2 ms when it goes nowhere.
            self.deferred.add(partial(self._decided, p, req, request_id, attempt,
                                      ask.forwarded, self.clock()))
            if p.outcome == "shed":
                self.metrics.requests.labels(route, "429").inc()
                return error_response(
                    429, f"the {req.tier} tier is shed while a higher tier's SLO is at risk; "
                    "retry later", type="rate_limit_error", code="tier_shed",
                    headers={"Retry-After": str(max(1, math.ceil(d.retry_after))),
                             H_ROUTE: d.reason, H_REGION: self.config.region})
            if target is None:
                if failures:
                    break
                self.metrics.requests.labels(route, "503").inc()
                return error_response(503, f"no replica can serve this request: {d.reason}",
                                      type="server_error", code="no_replica",
                                      headers={H_ROUTE: d.reason, H_REGION: self.config.region})
            resp = await self._attempt(request, inf, req, d, target, arrival, ask.forwarded,
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
        self.tier_metrics.ended(req.tier, self.clock(), req.deadline, False, False)
        return error_response(
            502, f"every attempt failed before the first byte ({', '.join(failures)})",
            type="server_error", code="upstream_failed",
            headers={H_REGION: self.config.region},
        )

    def _decided(self, p: Placement, req: Request, request_id: str, attempt: int,
                 forwarded: bool, now: float) -> None:
        """A placement's log entry and counters (``mesh.deferred``)."""
        d = p.decision
        self.decision_log.add(DecisionEntry(
            now, request_id, p.outcome, d.replica, d.region, d.reason,
            d.policy or self.policy.name, req.num_tokens, d.matched_blocks, attempt))
        if forwarded and attempt == 1:
            self.metrics.forwarded_in.labels(
                "pinned" if p.outcome == "pinned" else "repicked").inc()
        outcome = p.outcome if p.outcome == "shed" or p.target is not None else "none"
        self.metrics.decision_count(d.policy or self.policy.name, outcome).inc()
        if p.target is not None and p.outcome != "shed" and attempt == 1:
            self.metrics.observe_hit(cached_tokens(req, d.matched_blocks), req.num_tokens)

    async def _attempt(
        self, request: web.Request | FrontRequest, inf: Inference, req: Request, d: Decision,
        target: Target, arrival: float, forwarded: bool, request_id: str, route: str,
    ) -> web.StreamResponse | None:
        """One dispatch; None when it failed before the first byte (try the next target)."""
        assert self.forwarder is not None
        headers = upstream_headers(request.headers, request_id, local=target.local,
                                   pass_authorization=not self.config.api_keys)
        url = f"{target.url}{inf.path}"
        if not target.local:
            headers.update(self.edge.sign_forward(
                target.replica, request_id, inf,
                forward_value(req.tier, req.deadline, self.clock())))
            if target.delay > 0:
                headers[H_EMULATED_RTT] = f"{target.delay:.6f}"
            self.metrics.forwards.labels(target.region).inc()
        body = self.precision.body_for(inf) if target.local else inf.raw
        concurrent = target.local and self.dispatches.inflight(target.replica) > 0
        ticket = self.dispatcher.start(target, req.num_tokens, self.clock(),
                                       req.predicted.tokens if req.predicted else 0.0)
        if ticket.publish:
            self._publish_soon()
        # Only a streamed answer's first byte is its first token.
        pending = self.outcomes.begin(d, req, target.local, ticket.at) if inf.stream else None
        ttfb = self.local_engines[target.replica].first_byte_timeout if target.local else None
        replica = target.replica or region_key(target.region)
        self.edge.outliers.admit(replica, self.clock())
        check: Check | None = None
        extra: dict[str, str] | None = None

        def written() -> None:
            """The request is on its way: while the engine works, the cache prediction for
            this dispatch and the answer's own headers (once, if it is sent twice)."""
            nonlocal check, extra
            if extra is not None:
                return
            if target.local:
                check = self.precision.prepare(inf, target.replica, req.keys, req.block_size,
                                               concurrent, body)
            extra = self._answer_headers(d, target, req, request_id, forwarded, check,
                                         pending)

        try:
            try:
                up = await self.forwarder.open(url, body, headers, ttfb, written)
            except UpstreamError as exc:
                self.metrics.retries.labels(exc.kind).inc()
                log.warning("attempt on %s failed before the first byte: %s", url, exc)
                if target.local and exc.kind in {"connect", "reset"} and self.engines:
                    self.engines.mark_down(target.replica, str(exc))
                self.edge.dispatch_outcome(replica, False, self.clock(),
                                           sum(1 for _ in self._records(self.clock())))
                return None
            self.edge.dispatch_outcome(replica, True, self.clock())
            first_byte = self.clock()
            if pending is not None:
                self.outcomes.ended(pending)  # now, not when the figures are taken
            self.dispatcher.observe_first_token(req, first_byte)
            # Figures, the SLO judgement, and error and calibration bookkeeping (a refit of
            # the prefill rate is a few hundred microseconds): after the next dispatch.
            self.deferred.add(partial(self._first_byte, req, forwarded, arrival, first_byte,
                                      pending if up.status < 400 else None))
            if extra is None:
                written()  # (made when the request was written; not otherwise reached)
            assert extra is not None
            if not target.local:
                remote_route = up.resp.headers.get(H_ROUTE, "")
                extra[H_REPLICA] = up.resp.headers.get(H_REPLICA, target.replica)
                extra[H_REGION] = up.resp.headers.get(H_REGION, target.region)
                if not forwarded:
                    extra[H_ROUTE] = f"{d.reason} | via {target.region}: {remote_route}"
            try:
                resp, _, completed = await relay(request, up, extra,
                                                 check.tap if check else None)
            except asyncio.CancelledError:
                # The client left before the end (e.g. once it had read a stream's last
                # event): what was relayed is still accounted for (a usage seen is scored).
                self.deferred.add(partial(self._relayed, req, check, up.status, False,
                                          forwarded, route, self.clock()))
                raise
            self.deferred.add(partial(self._relayed, req, check, up.status, completed,
                                      forwarded, route, self.clock()))
            if not completed:
                log.info("stream %s to %s ended early", request_id, target.replica)
            return resp
        finally:
            if pending is not None:
                self.outcomes.ended(pending)  # a failed or cancelled one, too
            self.dispatcher.done(ticket)
            self.kick()  # a completion: re-evaluate a waiting head
            if ticket.publish:
                self._publish_soon()

    def _answer_headers(self, d: Decision, target: Target, req: Request, request_id: str,
                        forwarded: bool, check: Check | None, pending: Pending | None
                        ) -> dict[str, str]:
        """The headers the router adds to an answer, in their order (a remote target's
        replica, region and route are filled in from its answer)."""
        extra = {H_REPLICA: target.replica, H_REGION: target.region, H_ROUTE: d.reason,
                 H_TIER: req.tier}
        if forwarded:
            extra[H_ROUTE] = f"{d.reason} (forwarded)"
        extra["x-request-id"] = request_id
        client_id = self._client_ids.get(request_id)
        if client_id is not None:
            extra[H_CLIENT_ID] = client_id
        if check is not None:
            extra[H_PREDICTED] = str(check.predicted)
        if pending is not None and not forwarded:
            extra[H_PREDICTED_TTFT] = f"{pending.prediction.cost:.6f}"
        return extra

    def _first_byte(self, req: Request, forwarded: bool, arrival: float, at: float,
                    pending: Pending | None) -> None:
        """An answer's first byte came back at ``at`` (``mesh.deferred``)."""
        self.metrics.first_byte_seconds.observe(at - arrival)
        if not forwarded:  # judged once, by the router the client talks to
            self.tier_metrics.first_byte(req.tier, at, req.deadline)
        if pending is not None:
            self.outcomes.first_byte(pending, at)

    def _relayed(self, req: Request, check: Check | None, status: int, completed: bool,
                 forwarded: bool, route: str, now: float) -> None:
        """An answer was relayed at ``now``: how the prediction fared, what its length
        teaches, its tier's SLO, its status (``mesh.deferred``: after the next dispatch)."""
        if check is not None:
            self.precision.observe(check, status, completed, now)
            if completed and status == 200:
                self._learn_length(req, check.tap.usage)
        if not forwarded:
            self.tier_metrics.ended(req.tier, now, req.deadline, completed and status < 400,
                                    True)
        self.metrics.request_count(route, str(status)).inc()

    def _learn_length(self, req: Request, usage: Mapping[str, Any] | None) -> None:
        """An answer from an own engine ended: its output tokens teach the length predictor
        (learned where the engine's usage is seen, once per request)."""
        tokens = usage.get("completion_tokens") if usage is not None else None
        if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0:
            self.dispatcher.completed(req, tokens)
        else:
            self.metrics.length_unknown.inc()

    # -- the endpoint-picker seam (mesh.picker_server) ---------------------------------------
    async def pick(self, req: Request, *, allowed: frozenset[str] | None = None,
                   remote: bool = True, sheddable: bool = False) -> Placement:
        """Place ``req`` as ``infer`` does before dispatching, for a gateway to send it.

        ``allowed``: the only replicas that may be picked (a gateway's subset hint), which
        also keeps the pick in this region; ``remote=False`` does the latter alone. A
        ``sheddable`` request is not queued: when it would wait, the placement has no target
        and the outcome ``shed``.
        """
        ask = Ask(req)
        now = self.clock()
        if allowed is not None or not remote:
            keep = allowed if allowed is not None else set(self.local_engines)
            names = {r.replica for r in self._records(now)}
            ask = replace(ask, excluded_replicas=frozenset(names - keep),
                          excluded_regions=frozenset(self.backend.regions(now)))
        policy = self.policy.name
        if sheddable:
            p = self.dispatcher.offer(ask, now)
            if p.outcome == "shed":
                self.tier_metrics.was_shed(req.tier)
        else:
            p = await self.place(ask)
        d = p.decision
        if p.outcome == "shed":
            self.metrics.decisions.labels(d.policy or policy, "shed").inc()
            return p
        if p.target is None:
            self.metrics.decisions.labels(d.policy or policy, "none").inc()
            return p
        self.metrics.decisions.labels(d.policy or policy, p.outcome).inc()
        if not p.target.local:
            self.metrics.forwards.labels(p.target.region).inc()
        self.metrics.observe_hit(cached_tokens(req, d.matched_blocks), req.num_tokens)
        return p

    def hold(self, target: Target, tokens: int) -> Ticket:
        """Count a picked request in flight now (published at once when local)."""
        ticket = self.dispatcher.start(target, tokens, self.clock())
        if ticket.publish:
            self._publish()
        return ticket

    def release(self, ticket: Ticket) -> None:
        self.dispatcher.done(ticket)
        self.kick()  # a completion: re-evaluate a waiting head
        if ticket.publish:
            self._publish()

    def report_failure(self, replica: str, reason: str) -> None:
        """A local engine failed a request the gateway sent it: out until its next health check."""
        if self.engines is not None and replica in self.local_engines:
            self.engines.mark_down(replica, reason)

    # -- other routes ----------------------------------------------------------------------
    def count_rejected(self, path: str, reason: str, status: str = "400") -> None:
        self.metrics.rejected.labels(path, reason).inc()
        self.metrics.requests.labels(path, status).inc()

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
        names = await self.model_names(request.query.get("scope") == "local")
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "kvmesh"} for m in names]
        return web.json_response({"object": "list", "data": data})

    async def model_names(self, local_only: bool) -> list[str]:
        """This router's engines' models, and (unless ``local_only``) every other router's."""
        names = self.local_models()
        if not local_only and self._session is not None:
            urls = [u for info in self.backend.regions(self.clock()).values()
                    for u in info.routers]
            results = await asyncio.gather(*(self._peer_models(u) for u in urls))
            for found in results:
                for m in found:
                    if m not in names:
                        names.append(m)
        return names

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
        if not self.warmup.warm:
            return f"warming up: {self.warmup.waiting_for}"
        return None

    async def ready_page(self, request: web.Request) -> web.Response:
        why = self.ready_reason()
        if why is None:
            return web.json_response({"status": "ready"})
        return error_response(503, why, type="server_error", code="not_ready")

    async def metrics_page(self, request: web.Request) -> web.Response:
        self.deferred.run()  # a reader sees every answer relayed before it asked
        body = self.metrics.render() if self.node_metrics is None else await self.node_metrics()
        return web.Response(body=body,
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def status_page(self, request: web.Request) -> web.Response:
        return web.Response(text=json.dumps(self.status_dict(), default=str, indent=1),
                            content_type="application/json")

    def status_dict(self) -> dict[str, Any]:
        """The mesh document (node, peers, replicas by index and load) plus this router's part."""
        self.deferred.run()  # a reader sees every answer relayed before it asked
        now = self.clock()
        view = self.view(now)
        doc = dict(self.backend.status())
        doc["router"] = {
            "node_id": self.config.node_id,
            "region": self.config.region,
            "advertise": self.config.advertise,
            "policy": self.policy.name,
            "uptime_s": round(now - self.started_at, 3),
            "queue": self.dispatcher.queued(),
            "inflight": self.dispatches.counts(),
            "estimated_cache_hit_ratio": round(self.metrics.hit_ratio(), 4),
            "response_lengths": self.dispatcher.lengths.stats(),
            "warmup": self.warmup.status(),
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
                 "inflight": r.inflight, "fresh": r.fresh,
                 "prefill_rate": r.prefill_rate, "queue_delay": r.queue_delay,
                 "overhead": r.overhead, "kv_scale": r.kv_scale,
                 "kv_peak": r.kv_peak, "kv_trend": r.kv_trend}
                for r in view.replicas
            ],
            "regions": {k: {"rtt_s": v.rtt, "reachable": v.reachable, "queue": v.queue,
                            "margin_s": v.margin}
                        for k, v in view.regions.items()},
        }
        for name, section in self.status_sections.items():
            doc[name] = section()
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
                    [([], float(self.dispatcher.queued()))])
        yield gauge("kvmesh_router_inflight", "This router's requests in flight, by target",
                    ["replica"], [([k], float(v)) for k, v in self.dispatches.counts().items()])

    def _hint_metrics(self) -> Iterable[Any]:
        healthy: dict[str, int] = {}
        for r in self._records(self.clock()):
            if r.replica in self.local_engines and r.healthy:
                for m in r.models or ("any",):
                    healthy[m] = healthy.get(m, 0) + 1
        return hint_metrics(self.config.region, self.demand, self.plan, healthy,
                            self.clock(), time.time())


def build_router(config: RouterConfig) -> Router:
    """The router for ``config``: engines' events into the prefix index, gossip with peers."""
    return Router(config, backend=MeshState(config))
