"""Two real routers: predicted vs observed TTFT in the metrics, learned figures gossiped."""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import aiohttp
import pytest
from router_support import (
    GOSSIP_LOCAL,
    MESH_KEY,
    MODEL,
    Procs,
    free_ports,
    get_json,
    healthy,
    sees_replicas,
    wait_until,
)

pytestmark = pytest.mark.integration


async def metric(s: aiohttp.ClientSession, router: str, name: str, labels: str) -> float:
    async with s.get(f"{router}/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and labels in line:
            return float(line.rsplit(" ", 1)[1])
    return math.nan


async def complete(s: aiohttp.ClientSession, router: str, prompt: str,
                   stream: bool = True) -> tuple[int, dict[str, str]]:
    """A completion (streamed: its first byte is its first token; a streamed chat's first
    chunk is the role, which the simulated engine sends before any token)."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "stream": stream}
    async with s.post(f"{router}/v1/completions", json=body) as resp:
        await resp.read()
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}


async def learned_at(s: aiohttp.ClientSession, router: str, replica: str) -> dict[str, Any]:
    status = await get_json(s, f"{router}/mesh/status")
    return next(r for r in status["routing"]["replicas"] if r["replica"] == replica)


async def test_outcomes_are_measured_and_the_owners_figures_reach_the_peer(
        procs: Procs) -> None:
    us_engine = procs.engine("engine-us", 4.0)
    eu_engine = procs.engine("engine-eu", 4.0)
    ports = free_ports(2)
    peers = [f"http://127.0.0.1:{p}" for p in ports]
    routers = {}
    for (region, eng), port in zip((("us", us_engine), ("eu", eu_engine)), ports, strict=True):
        # No prefill_rate configured: the policy's default is the prior, the rest is learned.
        routers[region] = procs.router(f"router-{region}", {
            "region": region, "policy": "kvmesh", "peers": peers, "mesh_key": MESH_KEY,
            "gossip": GOSSIP_LOCAL, "listen": f"127.0.0.1:{port}",
            # A far peer: every request stays in its region.
            "emulate_rtt": {"eu": 0.5} if region == "us" else {"us": 0.5},
            "engines": [{"url": eng.url, "kv_events": eng.kv_events, "replay": eng.replay}]})
    us, eu = routers["us"], routers["eu"]
    async with aiohttp.ClientSession() as s:
        for r in (us, eu):
            await wait_until(partial(healthy, s, r), what=f"{r} up")
            await wait_until(partial(sees_replicas, s, r, 2), timeout=30, what="both replicas")
        n = 20
        for i in range(n):
            words = " ".join(f"w{i}x{j}" for j in range(40 + 60 * (i % 10)))
            status, headers = await complete(s, us, words)
            assert status == 200
            assert headers["x-kvmesh-region"] == "us"
            assert float(headers["x-kvmesh-predicted-ttft"]) > 0
        seen = await metric(s, us, "kvmesh_ttft_predictions_total",
                            'kind="local",pair="us->us"')
        assert seen == n
        # A whole answer's first byte is not a first token: not an outcome.
        status, headers = await complete(s, us, "hi", stream=False)
        assert status == 200 and "x-kvmesh-predicted-ttft" not in headers
        assert await metric(s, us, "kvmesh_ttft_predictions_total",
                            'kind="local",pair="us->us"') == n
        assert await metric(s, us, "kvmesh_ttft_prediction_error_ratio",
                            'pair="us->us",quantile="0.5"') >= 0
        doc = await get_json(s, f"{us}/mesh/status")
        own = doc["ttft_model"]["calibration"]["replicas"][us_engine.url]
        assert own["prefill_rate"] > 0 and own["samples"]["prefill"] == n
        assert doc["ttft_model"]["errors"]["kinds"]["local"]["count"] == n
        trace = (await get_json(s, f"{us}/dashboard/api/outcomes"))["outcomes"]
        assert len(trace) == n and all(r["kind"] == "local" for r in trace)
        assert all(r["observed_s"] > 0 and "prefill" in r["parts"] for r in trace)
        assert len((await get_json(s, f"{us}/dashboard/api/outcomes?limit=3"))["outcomes"]) == 3
        async with s.get(f"{us}/dashboard/api/outcomes?limit=many") as resp:
            assert resp.status == 400 and "limit" in (await resp.json())["error"]["message"]

        async def eu_prices_it_as_us_does() -> bool:
            mine = await learned_at(s, us, us_engine.url)
            theirs = await learned_at(s, eu, us_engine.url)
            # The meta record carries the figures rounded to 6 decimals.
            return all(theirs[k] is not None and mine[k] is not None
                       and theirs[k] == pytest.approx(mine[k], rel=1e-4, abs=1e-6)
                       for k in ("prefill_rate", "overhead"))

        await wait_until(eu_prices_it_as_us_does, timeout=20,
                         what="eu's view of the us engine carries us's learned figures")
        theirs = await learned_at(s, eu, us_engine.url)
        assert theirs["prefill_rate"] != 8000.0  # learned, not the policy's default
        # The KV outlook: kept by the router that scrapes the engine, never gossiped.
        mine = await learned_at(s, us, us_engine.url)
        assert 0.0 <= mine["kv_peak"] <= 1.0 and mine["kv_trend"] is not None
        assert theirs["kv_peak"] is None and theirs["kv_trend"] is None
