"""The live dashboard every router serves at ``/dashboard``.

Static assets (``mesh/web/``) ship in the package: no CDN, works offline. The page polls
``/dashboard/api/mesh`` once a second; that answer is this router's own snapshot plus each
live peer's (``/dashboard/api/local``, fetched concurrently with a short timeout), so any
router shows the whole mesh: regions -> routers -> replicas with health, load, KV usage,
indexed blocks, RTT between regions, gossip lag, recent decisions and their reasons. Rates
(throughput, time to first byte, cache hits) are computed in the page from the cumulative
counters of successive snapshots, so the router keeps no time series for it.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterable, Mapping
from importlib import resources
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from mesh.api import error_response
from mesh.config import RouterConfig
from mesh.decision_log import DecisionLog
from mesh.metrics import RouterMetrics
from mesh.policies.base import Policy, View
from mesh.warmup import Warmup

ASSETS = {
    "dashboard.html": "text/html",
    "dashboard.js": "application/javascript",
    "dashboard.css": "text/css",
}
PEER_TIMEOUT = 1.0
"""Seconds a peer's snapshot may take before the page shows it as unreachable."""


class Source(Protocol):
    """What the dashboard reads from a router (``mesh.router.Router``)."""

    metrics: RouterMetrics
    decision_log: DecisionLog
    warmup: Warmup
    backend: Any
    engines: Any
    clock: Callable[[], float]
    config: RouterConfig
    policy: Policy
    started_at: float

    def view(self, now: float | None = None) -> View: ...

    def ready_reason(self) -> str | None: ...


def _samples(metric: Any) -> Iterable[tuple[str, Mapping[str, str], float]]:
    for family in metric.collect():
        for s in family.samples:
            yield s.name, s.labels, s.value


def counters(metrics: RouterMetrics) -> dict[str, float]:
    """Cumulative figures the page turns into rates."""
    out = {"requests": 0.0, "errors": 0.0, "ttfb_sum": 0.0, "ttfb_count": 0.0,
           "prompt_tokens": 0.0, "cached_tokens": 0.0, "forwards": 0.0}
    for name, labels, value in _samples(metrics.requests):
        if name.endswith("_total"):
            out["requests"] += value
            if not labels.get("code", "").startswith("2"):
                out["errors"] += value
    for name, _, value in _samples(metrics.first_byte_seconds):
        if name.endswith("_sum"):
            out["ttfb_sum"] += value
        elif name.endswith("_count"):
            out["ttfb_count"] += value
    for key, metric in (("prompt_tokens", metrics.prompt_tokens),
                        ("cached_tokens", metrics.cached_tokens),
                        ("forwards", metrics.forwards)):
        out[key] = sum(v for n, _, v in _samples(metric) if n.endswith("_total"))
    return out


def _finite(x: float) -> float | None:
    return None if math.isinf(x) or math.isnan(x) else round(x, 3)


def _settled(src: Source) -> None:
    """Run the router's pending accounting first (``mesh.deferred``): a reader sees every
    answer relayed before it asked."""
    deferred = getattr(src, "deferred", None)
    if deferred is not None:
        deferred.run()


def local_snapshot(src: Source) -> dict[str, Any]:
    """This router's part of the mesh, JSON-ready."""
    _settled(src)
    now = src.clock()
    view = src.view(now)
    backend = src.backend
    index = getattr(backend, "index", None)
    status: dict[str, Any] = backend.status()
    owners = {r["url"]: r.get("owner") for r in status.get("replicas", [])
              if isinstance(r, dict)}
    states = src.engines.states if src.engines is not None else {}
    cfg = src.config
    me = {"node_id": cfg.node_id, "region": cfg.region, "advertise": cfg.advertise,
          "policy": src.policy.name, "uptime_s": round(now - src.started_at, 3)}
    replicas: list[dict[str, Any]] = []
    for r in view.replicas:
        own = r.replica in states
        st = states.get(r.replica)
        replicas.append({
            "replica": r.replica, "region": r.region, "healthy": r.healthy, "own": own,
            "owner": me["node_id"] if own else owners.get(r.replica),
            "reason": st.reason if st is not None and not st.healthy else None,
            "waiting": r.waiting, "running": r.running, "kv_usage": round(r.kv_usage, 4),
            "inflight": r.inflight, "load_age_s": _finite(r.load_age),
            "blocks": index.blocks(r.replica) if index is not None else None,
        })
    peers = [{k: p.get(k) for k in ("id", "region", "address", "state", "rtt_ms")}
             for p in status.get("peers", []) if isinstance(p, dict)]
    lags: list[float] = [r["load_age_s"] for r in replicas
                         if not r["own"] and r["load_age_s"] is not None]
    silence: dict[str, float] = {}
    node = getattr(backend, "node", None)
    if node is not None:
        silence = {k: round(now - v, 3)
                   for k, v in node.origin_advanced_at("prefix").items()}
    not_ready = src.ready_reason()
    outcomes = getattr(src, "outcomes", None)  # mesh.outcomes.Outcomes (the router's)
    return {
        "t": round(now, 3),
        "router": {**me, "ready": not_ready is None, "not_ready": not_ready,
                   "warm": src.warmup.status(), "queue": view.queue,
                   "hit_ratio": round(src.metrics.hit_ratio(), 4)},
        "replicas": replicas,
        "peers": peers,
        "region_rtt_ms": status.get("region_rtt_ms", {}),
        "gossip": {"max_lag_s": max(lags) if lags else None,
                   "mean_lag_s": round(sum(lags) / len(lags), 3) if lags else None,
                   "prefix_silence_s": silence},
        "counters": counters(src.metrics),
        "decisions": src.decision_log.recent(now, 30),
        "ttft_model": outcomes.status() if outcomes is not None else None,
    }


async def _peer_snapshot(session: aiohttp.ClientSession, peer: Mapping[str, Any]
                         ) -> dict[str, Any]:
    url = f"{peer['address']}/dashboard/api/local"
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=PEER_TIMEOUT)) as resp:
            if resp.status != 200:
                raise ValueError(f"HTTP {resp.status}")
            doc = await resp.json(content_type=None)
            if not isinstance(doc, dict) or "router" not in doc:
                raise ValueError("not a dashboard snapshot")
            return doc
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return {"unreachable": {"node_id": peer.get("id"), "region": peer.get("region"),
                                "address": peer.get("address"), "state": peer.get("state"),
                                "error": str(exc) or type(exc).__name__}}


async def mesh_snapshot(src: Source) -> dict[str, Any]:
    """This router's snapshot and every known peer's (live ones fetched, others listed)."""
    mine = local_snapshot(src)
    peers = [p for p in mine["peers"] if p.get("address")]
    live = [p for p in peers if p.get("state") in ("alive", "suspect")]
    others: list[dict[str, Any]] = []
    if live:
        async with aiohttp.ClientSession() as session:
            others = list(await asyncio.gather(*(_peer_snapshot(session, p) for p in live)))
    for p in peers:
        if p not in live:
            others.append({"unreachable": {"node_id": p.get("id"), "region": p.get("region"),
                                           "address": p.get("address"), "state": p.get("state"),
                                           "error": f"peer is {p.get('state')}"}})
    routers = [mine] + [o for o in others if "router" in o]
    down = [o["unreachable"] for o in others if "unreachable" in o]
    return {"served_by": mine["router"]["node_id"], "routers": routers, "unreachable": down}


def routes(src: Source) -> list[web.RouteDef]:
    """``/dashboard`` (the page and its assets) and its JSON endpoints."""

    async def page(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/dashboard/")

    async def asset(request: web.Request) -> web.StreamResponse:
        name = request.match_info.get("name") or "dashboard.html"
        kind = ASSETS.get(name)
        if kind is None:
            raise web.HTTPNotFound()
        body = resources.files("mesh").joinpath("web", name).read_bytes()
        return web.Response(body=body, content_type=kind,
                            headers={"Cache-Control": "no-cache"})

    async def local(request: web.Request) -> web.StreamResponse:
        return web.json_response(local_snapshot(src))

    async def mesh(request: web.Request) -> web.StreamResponse:
        return web.json_response(await mesh_snapshot(src))

    async def outcomes(request: web.Request) -> web.StreamResponse:
        """The router's newest outcomes: each placement's predicted parts beside its
        observed TTFT (``mesh.outcomes``), ``?limit=N`` of them (default all kept)."""
        raw = request.query.get("limit", "")
        try:
            limit = int(raw) if raw else None
        except ValueError:
            limit = -1
        if limit is not None and limit < 0:
            return error_response(
                400, f"limit: expected a count of outcomes, got {raw!r}", param="limit")
        _settled(src)
        out = getattr(src, "outcomes", None)
        rows = [] if out is None else out.recent() if limit is None else out.recent(limit)
        return web.json_response({"outcomes": rows})

    return [
        web.get("/dashboard", page),
        web.get("/dashboard/", asset),
        web.get("/dashboard/api/local", local),
        web.get("/dashboard/api/mesh", mesh),
        web.get("/dashboard/api/outcomes", outcomes),
        web.get("/dashboard/{name}", asset),
    ]
