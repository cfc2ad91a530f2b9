"""The endpoint picker's gRPC shell: ext_proc streams in, the router's decision core behind.

Each ext_proc stream is one HTTP request through the gateway. ``mesh.picker`` turns its
messages into notes; this shell answers them: ``NeedPick`` runs the router's own request
path up to the dispatch (validate, tokenize, block keys, view, policy: ``Router.pick``) and
counts the request in flight; ``Served`` feeds a failed endpoint to the engine monitor;
``Finished`` (or the stream ending any way) releases the in-flight count. The gRPC health
service answers ``liveness``, ``readiness`` and the ext_proc service name.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from typing import Any
from urllib.parse import urlsplit

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import Counter, Histogram

from mesh.api import ApiError, parse_inference, tokenize
from mesh.dispatch import Target
from mesh.forward_auth import body_digest, sign_headers
from mesh.limits import field_label
from mesh.metrics import gauge
from mesh.picker import (
    Ask,
    Finished,
    ImmediateReply,
    NeedPick,
    Out,
    Pick,
    PickerError,
    PickerStream,
    Refusal,
    Served,
    StreamSettings,
    endpoint_of,
)
from mesh.picker_config import PickerConfig
from mesh.picker_proto import to_event, to_response
from mesh.policies import Request
from mesh.router import Router
from mesh.tiers import forward_value
from mesh.view import Ticket

log = logging.getLogger("kvmesh.picker")

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)


class _Metrics:
    def __init__(self, router: Router) -> None:
        r = router.metrics.registry
        self.picks = Counter("kvmesh_picker_picks", "Endpoint picks answered, by result "
                             "(local, remote, 400, 413, 429, 503)", ["result"], registry=r)
        self.served = Counter("kvmesh_picker_served", "Responses the gateway reported, by "
                              "status class and whether a fallback served", ["status", "by"],
                              registry=r)
        self.failures = Counter("kvmesh_picker_endpoint_failures",
                                "Served-endpoint failures fed back to engine health",
                                ["replica"], registry=r)
        self.streams = Counter("kvmesh_picker_streams", "ext_proc streams, by how they ended "
                               "(complete, broken)", ["end"], registry=r)
        self.pick_seconds = Histogram("kvmesh_picker_pick_seconds", "From the request body's "
                                      "end to the pick: parse, tokenize, keys, decide",
                                      buckets=_BUCKETS, registry=r)


class PickerService(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """ext_proc ``Process``: one stream per gateway request."""

    def __init__(self, router: Router, config: PickerConfig) -> None:
        self.router = router
        self.config = config
        self.settings = StreamSettings(priority_header=config.priority_header,
                                       shed_below=config.shed_below,
                                       dest_namespace=config.dest_namespace,
                                       subset_namespace=config.subset_namespace,
                                       max_body=config.max_body)
        self.endpoints = {url: endpoint_of(url) for url in router.local_engines}
        """Engine URL -> the ``ip:port`` the proxy dials (host names resolved by
        :meth:`resolve`; the protocol speaks addresses)."""
        self.by_endpoint = {ep: url for url, ep in self.endpoints.items()}
        self._routers: dict[str, str] = {}
        self.metrics = _Metrics(router)
        self.active = 0
        self.counts: dict[str, int] = {}

    async def Process(self, requests: AsyncIterator[Any],
                      context: Any) -> AsyncIterator[Any]:
        stream = PickerStream(self.settings)
        held: list[Ticket] = []
        self.active += 1
        try:
            async for msg in requests:
                ev = to_event(msg)
                if ev is None:
                    continue
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("ext_proc %s %s eos=%s", type(ev).__name__, ev.phase,
                              getattr(ev, "end_of_stream", None))
                pending: list[Out] = stream.feed(ev)
                while pending:
                    out, pending = pending[0], pending[1:]
                    if isinstance(out, NeedPick):
                        pending = [*await self._pick(out.ask, stream, held), *pending]
                    elif isinstance(out, Served):
                        self._served(out, stream.pick)
                        if stream.ask is not None:
                            self.router.metrics.requests.labels(stream.ask.path,
                                                                str(out.status)).inc()
                    elif isinstance(out, Finished):
                        self._end(held, "complete" if out.complete else "broken")
                    else:
                        if isinstance(out, ImmediateReply):
                            self._count(str(out.status))
                        yield to_response(out)
        finally:
            # Envoy may cancel the RPC as soon as it has the last reply: whatever is still
            # held is released here, however the stream ended.
            complete = stream.finished and stream.served is not None
            stream.close()
            self._end(held, "complete" if complete else "broken")
            self.active -= 1

    async def _pick(self, ask: Ask, stream: PickerStream, held: list[Ticket]) -> list[Out]:
        started = time.perf_counter()
        try:
            result, target, tokens = await self._decide(ask)
        except Exception as exc:  # a bug here must answer this request, not kill the server
            log.exception("endpoint pick failed")
            result, target, tokens = PickerError(500, f"picker error: {type(exc).__name__}",
                                                 "internal_error"), None, 0
        self.metrics.pick_seconds.observe(time.perf_counter() - started)
        if isinstance(result, Pick):
            assert target is not None
            held.append(self.router.hold(target, tokens))
            self._count("local" if target.local else "remote")
        return stream.decided(result)

    def _count(self, label: str) -> None:
        self.metrics.picks.labels(label).inc()
        self.counts[label] = self.counts.get(label, 0) + 1

    async def _decide(self, ask: Ask) -> tuple[Pick | Refusal | PickerError, Target | None, int]:
        router = self.router
        arrival = router.clock()
        token_ids: list[int] = []
        requested = ask.tier
        session: str | None = None
        model: str | None = None
        max_tokens = 0
        body: dict[str, Any] = {}
        if ask.kind is not None:
            t0 = time.perf_counter()
            # The priority header is the gateway's (an integer or a tier name), parsed already.
            given = {k: v for k, v in ask.headers.items()
                     if k != self.settings.priority_header}
            try:
                inf = parse_inference(ask.kind, ask.path, ask.body, given)
                token_ids = await tokenize(inf, router.tokenizer)
            except ApiError as exc:
                router.count_rejected(ask.path, field_label(exc.param), str(exc.status))
                return PickerError(exc.status, exc.message, exc.code or "invalid_request"), \
                    None, 0
            router.metrics.tokenize_seconds.observe(time.perf_counter() - t0)
            session, model, max_tokens = inf.session, inf.model, inf.max_tokens
            body = inf.body
            requested = ask.tier or inf.tier
        request_id = ask.headers.get("x-request-id") or f"kvm-{uuid.uuid4().hex[:16]}"
        t0 = time.perf_counter()
        keys = router.precision.keys(token_ids, model, body, arrival)
        router.metrics.block_keys_seconds.observe(time.perf_counter() - t0)
        tier = router.config.tiers.resolve(requested)
        req = Request(request_id, token_ids, keys, keys.unit, session, max_tokens, arrival,
                      model, tier=tier, deadline=router.config.tiers.deadline(tier, arrival))
        allowed = None
        if ask.subset is not None:
            allowed = frozenset(url for ep, url in self.by_endpoint.items() if ep in ask.subset)
            if not allowed:
                return Refusal(503, "no endpoint of the subset hint is a replica here",
                               "no_replica"), None, 0
        placed = await router.pick(req, allowed=allowed, remote=self.config.remote,
                                   sheddable=ask.sheddable)
        d, target = placed.decision, placed.target
        if target is None:
            if placed.outcome == "shed":
                return Refusal(429, f"shed (priority {ask.priority}, {tier}): {d.reason}",
                               "shed", max(d.retry_after, 1.0)), None, 0
            return Refusal(503, f"no replica can serve this request: {d.reason}",
                           "no_replica"), None, 0
        endpoints = [self.endpoint(target.url) if target.local
                     else await self.remote_endpoint(target.url)]
        headers: tuple[tuple[str, str], ...] = ()
        if target.local:
            for c in d.candidates:
                if len(endpoints) > self.config.fallbacks:
                    break
                if c.replica in router.local_engines and c.replica != target.replica \
                        and (allowed is None or c.replica in allowed) \
                        and router.engines is not None and router.engines.healthy(c.replica):
                    endpoints.append(self.endpoint(c.replica))
        else:
            hop: dict[str, str] = {"x-request-id": request_id}
            if router.config.mesh_key is not None:  # signed over the body Envoy will send
                hop = sign_headers(router.config.mesh_key, router.config.node_id,
                                   target.replica, request_id, ask.path, session,
                                   body_digest(ask.body), time.time(),
                                   forward_value(tier, req.deadline, router.clock()))
            headers = tuple(hop.items())
        pick = Pick(tuple(endpoints), target.replica, target.region, d.reason, headers)
        return pick, target, req.num_tokens

    def endpoint(self, url: str) -> str:
        return self.endpoints.get(url) or endpoint_of(url)

    async def resolve(self) -> None:
        """Resolve engine URLs given by host name to ``ip:port`` (a pod's address behind a
        headless Service); literal addresses are kept as they are."""
        for url in list(self.router.local_engines):
            ep = await _lookup(url)
            if ep is not None and self.endpoints.get(url) != ep:
                log.info("engine %s is %s", url, ep)
                self.endpoints[url] = ep
        self.by_endpoint = {ep: url for url, ep in self.endpoints.items()}
        self._routers.clear()  # peer routers' addresses are looked up again when next used

    async def remote_endpoint(self, url: str) -> str:
        """``ip:port`` of another router (its advertised URL may name a Service)."""
        ep = self._routers.get(url)
        if ep is None:
            ep = await _lookup(url) or endpoint_of(url)
            self._routers[url] = ep
        return ep

    def _served(self, s: Served, pick: Pick | None) -> None:
        by = "primary" if not s.picked or s.endpoint in (None, s.picked[0]) else "fallback"
        self.metrics.served.labels(f"{s.status // 100}xx", by).inc()
        if pick is None or s.status not in self.config.mark_down_statuses:
            return
        endpoint = s.endpoint or (s.picked[0] if s.picked else "")
        replica = self.by_endpoint.get(endpoint)
        if replica is not None:
            self.metrics.failures.labels(replica).inc()
            self.router.report_failure(replica, f"gateway got {s.status} from {endpoint}")

    def _end(self, held: list[Ticket], how: str) -> None:
        if not held:
            return
        for t in held:
            self.router.release(t)
        held.clear()
        self.metrics.streams.labels(how).inc()

    def status(self) -> dict[str, Any]:
        return {"listen": self.config.listen, "active_streams": self.active,
                "picks": dict(self.counts), "fallbacks": self.config.fallbacks,
                "remote": self.config.remote}

    def metric_rows(self) -> Iterable[Any]:
        yield gauge("kvmesh_picker_active_streams", "ext_proc streams open now", [],
                    [([], float(self.active))])


async def _lookup(url: str) -> str | None:
    """``ip:port`` for a URL whose host is a name; None for a literal address or a failure."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port,
                                                             type=socket.SOCK_STREAM)
    except OSError as exc:
        log.warning("cannot resolve %s: %s", url, exc)
        return None
    if not infos:
        return None
    addr = str(infos[0][4][0])
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


class PickerServer:
    """The gRPC server beside a running router: ext_proc plus gRPC health."""

    def __init__(self, router: Router, config: PickerConfig) -> None:
        self.router = router
        self.config = config
        self.service = PickerService(router, config)
        self.health = health.aio.HealthServicer()
        self.server: Any = None
        self.port: int | None = None
        self._task: asyncio.Task[None] | None = None
        router.status_sections["endpoint_picker"] = self.service.status
        router.metrics.add_provider(self.service.metric_rows)

    async def start(self) -> None:
        self.server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", self.config.max_body + 1024 * 1024),
            ("grpc.max_send_message_length", self.config.max_body + 1024 * 1024),
            ("grpc.so_reuseport", 0),  # a second picker on the same port is an error
        ])
        ep_grpc.add_ExternalProcessorServicer_to_server(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        host = self.config.host
        addr = f"[{host}]:{self.config.port}" if ":" in host else f"{host}:{self.config.port}"
        try:
            self.port = self.server.add_insecure_port(addr)
        except RuntimeError as exc:  # grpc reports a busy port this way
            raise OSError(f"endpoint_picker: cannot listen on {self.config.listen}: "
                          f"{exc}") from None
        if not self.port:
            raise OSError(f"endpoint_picker: cannot listen on {self.config.listen}")
        await self.service.resolve()
        await self.server.start()
        await self.health.set("liveness", health_pb2.HealthCheckResponse.SERVING)
        await self._update_health()
        self._task = asyncio.create_task(self._health_loop(), name="picker health")
        log.info("endpoint picker (ext_proc) listening on %s:%s", host, self.port)

    async def _update_health(self) -> None:
        ready = self.router.ready_reason() is None
        status = (health_pb2.HealthCheckResponse.SERVING if ready
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", "readiness", EXT_PROC_SERVICE):
            await self.health.set(name, status)

    async def _health_loop(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(0.5)
            ticks += 1
            try:
                await self._update_health()
                if ticks % 10 == 0:  # pods behind a headless Service come and go
                    await self.service.resolve()
            except Exception:  # health reporting must never stop
                log.exception("picker health update failed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.server is not None:
            await self.health.enter_graceful_shutdown()
            await self.server.stop(grace=1.0)
