"""The router's trust boundary, wired for one router: HTTP limits, preparation, forwards.

``Router`` owns one :class:`Edge`; it builds the aiohttp runner and listening socket
(``mesh.http_guard``), prepares requests off the loop (``mesh.prepare``), and signs and
checks one-hop forwards (``mesh.forward_auth``). Its figures are exported as metrics.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from aiohttp import web

from kvevents.block_sizes import DEFAULT_BLOCK_SIZE
from mesh import forward_auth
from mesh.api import ApiError, Inference, PromptTokenizer, error_response
from mesh.client_auth import ApiKey, ApiKeys, KeyRefused
from mesh.config import RouterConfig
from mesh.front import FrontEnd
from mesh.http_guard import ConnectionGuard, HttpLimits, QuietLogger
from mesh.metrics import RouterMetrics
from mesh.outliers import OutlierDetector
from mesh.prepare import Preparer
from mesh.tls import has_peer_certificate, server_context
from mesh.transport import GOSSIP_PATH

log = logging.getLogger("kvmesh.router")
API_KEY = web.RequestKey("kvmesh.api_key", ApiKey)
"""The ``ApiKey`` a request was admitted with, stored on the aiohttp request."""

DIGEST_INLINE_BYTES = 256 * 1024
"""Bodies hashed on the event loop (SHA-256 runs at ~1 GB/s: 0.25 ms at this size)."""


def relayed(request: web.Request) -> bool:
    """Came over a Unix socket: the node's private one, on which only its own worker
    processes reach the primary (``mesh.workers``), having checked the peer themselves."""
    transport = request.transport
    return transport is not None and isinstance(transport.get_extra_info("sockname"), str)


class Edge:
    def __init__(self, config: RouterConfig, tokenizer: PromptTokenizer,
                 wall: Callable[[], float] = time.time, from_config: bool = True) -> None:
        """``from_config``: ``tokenizer`` was built from ``config.tokenizer`` (so worker
        processes can build their own); else preparation stays in threads."""
        self.config = config
        self.wall = wall
        self.limits = HttpLimits(
            max_body_bytes=config.max_body_bytes, header_timeout=config.header_timeout,
            body_timeout=config.body_timeout, idle_timeout=config.idle_timeout,
        )
        self.guard = ConnectionGuard(self.limits)
        self.http_log = QuietLogger(logging.getLogger("aiohttp.server"))
        in_processes = from_config and config.prepare_in == "process"
        # Keys computed while preparing are at the fallback size; the router keys requests at
        # every size its engines publish (mesh.precision) from the prepared token ids.
        self.preparer = Preparer(tokenizer, config.block_size or DEFAULT_BLOCK_SIZE,
                                 workers=config.prepare_workers,
                                 max_pending=config.max_preparing,
                                 spec=config.tokenizer if in_processes else None,
                                 inline_bytes=config.prepare_inline_bytes)
        self.verifier = forward_auth.ForwardVerifier(config.mesh_keys, config.forward_window)
        self.forward_rejected: Counter[str] = Counter()
        self.outliers = OutlierDetector(config.outlier_consecutive_failures,
                                        config.outlier_ejection, config.outlier_max_ejection)
        self._server: asyncio.base_events.Server | None = None
        self.front: FrontEnd | None = None
        self.ssl: ssl.SSLContext | None = server_context(config)
        self.api_keys = ApiKeys(config.api_keys)
        self.peer_refused = 0

    # -- HTTP --------------------------------------------------------------------------------
    def install(self, app: web.Application, metrics: RouterMetrics) -> None:
        app.middlewares.append(self.guard.middleware)
        app.middlewares.append(self.access)
        metrics.add_provider(self._metrics)

    @web.middleware
    async def access(self, request: web.Request, handler: Callable[[web.Request], Any]
                     ) -> web.StreamResponse:
        """Peers by certificate (mTLS), clients by API key and rate limit."""
        path = request.path
        from_peer = path == GOSSIP_PATH or forward_auth.has_hop(request.headers)
        if from_peer:
            if (self.config.tls_peer_mtls and not has_peer_certificate(request.transport)
                    and not relayed(request)):
                self.peer_refused += 1
                return error_response(403, "peers must present a certificate from tls_ca",
                                      type="permission_error", code="peer_certificate_required")
        elif self.api_keys and path.startswith("/v1/") and not (
                path == "/v1/models" and request.query.get("scope") == "local"):
            # (a peer's model listing asks every router with scope=local, without a key)
            try:
                key = self.api_keys.check(request.headers, time.monotonic())
                request[API_KEY] = key  # its default tier (mesh.tiers)
            except KeyRefused as exc:
                kind = "authentication_error" if exc.status == 401 else "rate_limit_error"
                return error_response(exc.status, exc.message, type=kind, code=exc.code,
                                      headers=exc.headers())
        if path == GOSSIP_PATH:  # a slow gossip body must not hold a handler forever
            try:
                async with asyncio.timeout(self.limits.body_timeout):
                    gossip: web.StreamResponse = await handler(request)
                    return gossip
            except TimeoutError:
                resp = error_response(408, "gossip packet not received in time",
                                      code="body_timeout")
                resp.force_close()
                return resp
        result: web.StreamResponse = await handler(request)
        return result

    def runner(self, app: web.Application) -> web.AppRunner:
        return web.AppRunner(
            app, handler_cancellation=True, access_log=None, auto_decompress=False,
            logger=self.http_log, keepalive_timeout=2 * self.limits.idle_timeout,
            lingering_time=0.0,
        )

    async def listen(self, runner: web.AppRunner, host: str, port: int,
                     reuse_port: bool = False) -> int:
        """Serve ``runner`` on host:port behind the connection guard; the bound port.
        ``reuse_port``: several processes of one node share the port (``mesh.workers``)."""
        assert runner.server is not None
        loop = asyncio.get_running_loop()
        kwargs: dict[str, Any] = {}
        if self.ssl is not None:
            kwargs = {"ssl": self.ssl, "ssl_handshake_timeout": self.limits.header_timeout}
        # Inference requests on mesh.front's protocol, the rest handed to aiohttp's.
        self.front = FrontEnd(runner.app, runner.server, self.limits)
        self._server = await loop.create_server(
            self.guard.protocol_factory(self.front.protocol), host, port, reuse_address=True,
            reuse_port=reuse_port or None, backlog=1024, **kwargs,
        )
        self.guard.start()
        sockets = list(self._server.sockets or ())
        return int(sockets[0].getsockname()[1]) if sockets else port

    async def close(self) -> None:
        await self.guard.stop()
        if self._server is not None:
            self._server.close()
            self._server = None
        if self.front is not None:
            await self.front.close()
        self.preparer.close()

    # -- forwards ----------------------------------------------------------------------------
    async def check_forward(self, headers: Mapping[str, str],
                            inf: Inference) -> forward_auth.Forward | None:
        """None for a client request; the verified forward; ``ApiError`` 403 otherwise."""
        if not forward_auth.has_hop(headers):
            return None
        digest = inf.digest
        if not digest and len(inf.raw) <= DIGEST_INLINE_BYTES:
            digest = forward_auth.body_digest(inf.raw)
        elif not digest:
            digest = await asyncio.to_thread(forward_auth.body_digest, inf.raw)
        try:
            return self.verifier.verify(headers, inf.path, digest, self.wall())
        except forward_auth.ForwardRejected as exc:
            self.forward_rejected[exc.reason] += 1
            log.info("refused a forward: %s", exc)
            raise ApiError(403, f"forwarded request refused: {exc.reason}",
                           type="permission_error", code="bad_forward_signature") from None

    def sign_forward(self, target: str, request_id: str, inf: Inference,
                     tier: str = "") -> dict[str, str]:
        key = self.config.mesh_key
        if key is None:  # no peers without a key (config); nothing would accept it anyway
            return {}
        return forward_auth.sign_headers(
            key, self.config.node_id, target, request_id, inf.path, inf.session,
            inf.digest or forward_auth.body_digest(inf.raw), self.wall(), tier,
        )

    # -- outliers ----------------------------------------------------------------------------
    def dispatch_outcome(self, replica: str, ok: bool, now: float, population: int = 1) -> None:
        if self.outliers.record(replica, ok, now, population):
            log.warning("replica %s ejected after %d failed dispatches in a row (until %s)",
                        replica, self.config.outlier_consecutive_failures,
                        ", ".join(self.outliers.ejected(now)))

    # -- metrics -----------------------------------------------------------------------------
    def _metrics(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        m = CounterMetricFamily("kvmesh_http_malformed_requests",
                                "Requests aiohttp could not parse, by error kind", labels=["kind"])
        for kind, n in sorted(self.http_log.counts.items()):
            m.add_metric([kind], n)
        yield m
        c = CounterMetricFamily("kvmesh_http_connections_closed",
                                "Connections the router closed for a timeout, by reason",
                                labels=["reason"])
        for reason in ("idle", "header_timeout"):
            c.add_metric([reason], self.guard.closed.get(reason, 0))
        yield c
        f = CounterMetricFamily("kvmesh_router_forwards_refused",
                                "Forwarded requests refused, by reason", labels=["reason"])
        for reason, n in sorted(self.forward_rejected.items()):
            f.add_metric([reason], n)
        yield f
        g = GaugeMetricFamily("kvmesh_router_preparing",
                              "Requests being parsed and tokenized off the event loop")
        g.add_metric([], self.preparer.pending)
        yield g
        r = CounterMetricFamily("kvmesh_router_prepare_refused",
                                "Requests refused with 503: too many being prepared")
        r.add_metric([], self.preparer.refused)
        yield r
        now = time.monotonic()
        e = GaugeMetricFamily("kvmesh_replica_ejected",
                              "1 while outlier detection keeps a replica out of this router's "
                              "choices", labels=["replica"])
        for replica in self.outliers.ejected(now):
            e.add_metric([replica], 1.0)
        yield e
        t = CounterMetricFamily("kvmesh_replica_ejections", "Outlier ejections by this router")
        t.add_metric([], self.outliers.ejected_total)
        yield t
        fb = CounterMetricFamily("kvmesh_router_tokenizer_fallbacks",
                                 "Requests tokenized by the builtin tokenizer because the "
                                 "configured one failed")
        fb.add_metric([], self.preparer.fallbacks)
        yield fb
        k = CounterMetricFamily("kvmesh_router_access_refused",
                                "Requests refused at the door, by reason", labels=["reason"])
        for reason, n in sorted(self.api_keys.refused.items()):
            k.add_metric([reason], n)
        k.add_metric(["peer_certificate"], self.peer_refused)
        yield k
        if self.front is not None:
            fr = CounterMetricFamily("kvmesh_http_front_requests",
                                     "Inference requests served on the lean front end")
            fr.add_metric([], self.front.served)
            yield fr
            ho = CounterMetricFamily("kvmesh_http_handed_off_connections",
                                     "Connections handed to aiohttp (other paths, odd heads)")
            ho.add_metric([], self.front.handed_off)
            yield ho
        s = GaugeMetricFamily("kvmesh_http_connections", "Open client connections")
        s.add_metric([], len(self.guard))
        yield s
