"""Service tiers through the HTTP API with the official ``openai`` client, against real router
processes and simulated engines: tiers from each source, a shed batch request (429 and
``Retry-After``), an interactive request overtaking queued batch work, the tier metrics."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import pytest
from router_support import MODEL, Procs, get_json, sees_replicas, wait_until

pytestmark = pytest.mark.integration

KEY_BATCH = "batch-key-0123456789abcdef"
KEY_WEB = "web-key-0123456789abcdefgh"
MSG = [{"role": "user", "content": "say something about queues"}]


def start(procs: Procs, tiers: dict[str, Any], speedup: float = 20.0,
          **extra: Any) -> str:
    eng = procs.engine("engine", speedup)
    return procs.router("router", {"region": "us", "engines": [{"url": eng.url}],
                                   "tiers": tiers, **extra})


async def up(url: str) -> None:
    async with aiohttp.ClientSession() as s:
        await wait_until(lambda: sees_replicas(s, url, 1), what="router sees its engine")


def client(url: str, key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


async def metrics(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/metrics") as resp:
        return await resp.text()


async def test_tiers_from_each_source_and_invalid_values(procs: Procs) -> None:
    url = start(procs, {"default": "standard"},
                api_keys=[{"key": KEY_BATCH, "name": "jobs", "tier": "batch"},
                          {"key": KEY_WEB, "name": "web"}])
    await up(url)
    web, jobs = client(url, KEY_WEB), client(url, KEY_BATCH)
    try:
        async def tier_of(c: openai.AsyncOpenAI, **kw: Any) -> str:
            raw = await c.chat.completions.with_raw_response.create(
                model=MODEL, messages=MSG, max_tokens=4, **kw)
            assert raw.parse().choices[0].message.content
            return raw.headers["x-kvmesh-tier"]

        assert await tier_of(web) == "standard"  # the configured default
        assert await tier_of(jobs) == "batch"  # the key's default
        assert await tier_of(jobs, service_tier="priority") == "interactive"
        assert await tier_of(web, service_tier="flex") == "batch"
        assert await tier_of(web, service_tier="auto") == "standard"
        assert await tier_of(web, extra_body={"priority": -1}) == "interactive"
        assert await tier_of(web, extra_body={"priority": 3}) == "batch"
        assert await tier_of(jobs, extra_headers={"x-kvmesh-priority": "interactive"}) \
            == "interactive"
        for kw, param in [({"service_tier": "gold"}, "service_tier"),
                          ({"extra_body": {"priority": "high"}}, "priority"),
                          ({"extra_headers": {"x-kvmesh-priority": "urgent"}},
                           "x-kvmesh-priority")]:
            with pytest.raises(openai.BadRequestError) as err:
                await web.chat.completions.create(model=MODEL, messages=MSG, max_tokens=4,
                                                  **kw)
            assert err.value.status_code == 400
            body = err.value.body
            assert isinstance(body, dict) and body.get("param") == param
            assert body.get("code") == "invalid_service_tier"
    finally:
        await web.close()
        await jobs.close()
    text = await metrics(url)
    for param in ("service_tier", "priority", "x-kvmesh-priority"):
        assert f'kvmesh_router_rejected_total{{field="{param}",route="/v1/chat/completions"}} 1.0' \
            in text
    assert 'kvmesh_tier_requests_total{slo="met",tier="batch"} 3.0' in text
    assert 'kvmesh_tier_requests_total{slo="met",tier="interactive"} 3.0' in text
    assert 'kvmesh_tier_requests_total{slo="met",tier="standard"} 2.0' in text
    assert 'kvmesh_tier_slo_attainment{tier="batch"} 1.0' in text
    assert 'kvmesh_tier_queue_length{tier="batch"} 0.0' in text
    async with aiohttp.ClientSession() as s:
        status = await get_json(s, f"{url}/mesh/status")
    assert status["tiers"]["batch"]["met"] == 3
    assert status["tiers"]["interactive"]["slo_kind"] == "ttft"
    assert status["tiers"]["batch"]["slo_kind"] == "completion"


async def test_batch_is_shed_with_retry_after_while_interactive_misses(procs: Procs) -> None:
    # An interactive TTFT target no request can meet: the first one puts the tier at risk.
    url = start(procs, {"interactive": {"ttft": 0.001}, "shed_window": 30})
    await up(url)
    c = client(url)
    try:
        await c.chat.completions.create(model=MODEL, messages=MSG, max_tokens=4,
                                        service_tier="priority")
        with pytest.raises(openai.RateLimitError) as err:
            await c.chat.completions.create(model=MODEL, messages=MSG, max_tokens=4,
                                            service_tier="flex")
        resp = err.value.response
        assert resp.status_code == 429
        retry = int(resp.headers["retry-after"])
        assert 1 <= retry <= 30
        assert isinstance(err.value.body, dict) and err.value.body.get("code") == "tier_shed"
        # standard work is not sheddable: served
        ok = await c.chat.completions.create(model=MODEL, messages=MSG, max_tokens=4)
        assert ok.choices[0].message.content
    finally:
        await c.close()
    text = await metrics(url)
    assert 'kvmesh_tier_shed_total{tier="batch"} 1.0' in text
    assert 'kvmesh_tier_requests_total{slo="missed",tier="interactive"} 1.0' in text
    assert 'kvmesh_router_requests_total{code="429",route="/v1/chat/completions"} 1.0' in text


async def test_interactive_overtakes_queued_batch_work(procs: Procs) -> None:
    # Spare capacity for batch work: an engine with nothing running or waiting.
    url = start(procs, {"batch": {"running_below": 0.5}}, speedup=4.0)
    await up(url)
    c = client(url)
    done: list[str] = []

    async def ask(name: str, max_tokens: int, **kw: Any) -> None:
        r = await c.chat.completions.create(model=MODEL, messages=MSG, max_tokens=max_tokens,
                                            **kw)
        assert r.choices[0].message.content
        done.append(name)

    async def status() -> dict[str, Any]:
        async with aiohttp.ClientSession() as s:
            got: dict[str, Any] = await get_json(s, f"{url}/mesh/status")
            return got

    async def inflight(n: int) -> bool:
        return sum((await status())["router"]["inflight"].values()) == n

    async def batch_queued(n: int) -> bool:
        return int((await status())["tiers"]["batch"]["queued_now"]) == n

    try:
        long_batch = asyncio.create_task(ask("batch-1", 600, service_tier="flex"))
        await wait_until(lambda: inflight(1), what="the first batch request runs")
        queued_batch = asyncio.create_task(ask("batch-2", 4, service_tier="flex"))
        await wait_until(lambda: batch_queued(1), what="the second batch request is held")
        await ask("interactive", 4, service_tier="priority")
        # it went past the held batch request, which is still waiting for spare capacity
        assert done == ["interactive"]
        assert await batch_queued(1)
        await asyncio.wait_for(asyncio.gather(long_batch, queued_batch), 120)
    finally:
        await c.close()
    assert done == ["interactive", "batch-1", "batch-2"]
    text = await metrics(url)
    assert 'kvmesh_tier_queue_seconds_count{tier="batch"} 1.0' in text
    assert 'kvmesh_tier_queue_seconds_count{tier="interactive"} 0.0' in text
    tiers = (await status())["tiers"]
    assert tiers["batch"]["met"] == 2 and tiers["batch"]["queue_mean_s"] > 0
