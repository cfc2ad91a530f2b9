"""The live dashboard in a real browser: Debian's Chromium driven by Playwright.

A 3-region mesh on loopback (simulated engines, real routers and gossip) with traffic
flowing; the page must show every region, router and replica, draw its charts from live
data, mark a replica down when its engine stops, and log no console error. A screenshot is
kept under ``results/test-artifacts/`` (ignored by git).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from router_support import (
    ROOT,
    Procs,
    chat,
    healthy,
    mesh_of,
    ready,
    sees_replicas,
    wait_until,
)

pytestmark = pytest.mark.integration

CHROMIUM = os.environ.get("KVMESH_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage"]
ARTIFACTS = ROOT / "results" / "test-artifacts"


@contextlib.asynccontextmanager
async def browser_page() -> AsyncIterator[tuple[Any, list[str]]]:
    """A Chromium page (Debian's binary, never a downloaded one) and its console errors."""
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]')")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (deploy/setup.sh --full installs it)")
    errors: list[str] = []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                           headless=True)
        try:
            page = await browser.new_page(viewport={"width": 1500, "height": 1250})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            yield page, errors
        finally:
            await browser.close()


async def traffic(routers: list[str], stop: asyncio.Event, limit: int = 400) -> int:
    """Chats with shared prefixes to random routers until ``stop`` (bounded in count)."""
    rng = random.Random(7)
    prefixes = [f"System prompt {k}: you answer questions about topic {k}. " * 12
                for k in range(4)]
    sent = 0
    async with aiohttp.ClientSession() as s:
        while not stop.is_set() and sent < limit:
            prompt = rng.choice(prefixes) + f"question {rng.randrange(1000)}"
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                await chat(s, rng.choice(routers), [{"role": "user", "content": prompt}],
                           max_tokens=4, stream=True)
            sent += 1
            await asyncio.sleep(0.1)
    return sent


async def test_dashboard_shows_a_live_three_region_mesh(procs: Procs) -> None:
    engines, routers = mesh_of(procs, {"us": 2, "eu": 1, "ap": 1})
    urls = list(routers.values())
    async with aiohttp.ClientSession() as s:
        for r in urls:
            await wait_until(partial(healthy, s, r), 30, f"{r} up")
        for r in urls:
            await wait_until(partial(sees_replicas, s, r, 4), 40, f"{r} sees 4 replicas")
            await wait_until(partial(ready, s, r), 40, f"{r} ready")
    stop = asyncio.Event()
    load = asyncio.create_task(traffic(urls, stop))
    try:
        async with browser_page() as (page, errors):
            await page.goto(f"{routers['us']}/dashboard")
            # Every region, router and replica, all healthy, from live snapshots.
            await page.wait_for_function(
                "document.querySelectorAll('[data-replica][data-healthy=true]').length >= 4",
                timeout=30_000)
            for region in routers:
                assert await page.locator(f'.region[data-region="{region}"]').count() == 1
                assert await page.locator(f'[data-router="router-{region}"]').count() == 1
            for engs in engines.values():
                for e in engs:
                    assert await page.locator(f'tr[data-replica="{e.url}"]').count() == 1
            # Charts drawn from live rates; decisions with their reasons.
            await page.wait_for_function(
                "Number(document.getElementById('chart-rps').dataset.points || 0) >= 3 && "
                "Number(document.getElementById('chart-hit').dataset.points || 0) >= 3",
                timeout=40_000)
            await page.wait_for_function(
                "document.querySelectorAll('#decisions td.reason').length >= 3", timeout=20_000)
            await page.wait_for_function(
                "[...document.querySelectorAll('td.blocks')]"
                ".some(td => Number(td.textContent) > 0)",
                timeout=20_000)
            # Predicted vs observed TTFT of the streamed answers, per router and route.
            await page.wait_for_function(
                "document.querySelectorAll('#ttft-model tr[data-ttft]').length >= 1",
                timeout=20_000)
            rtt = await page.locator('[data-rtt="us:eu"]').inner_text()
            assert float(rtt) > 0
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "dashboard-3-regions.png"), full_page=True)

            # A replica goes down: the page marks it within a few polls.
            down = engines["eu"][0]
            procs.stop("engine-eu-0")
            await page.wait_for_function(
                f"document.querySelector('tr[data-replica=\"{down.url}\"]')"
                "?.dataset.healthy === 'false'", timeout=30_000)
            assert await page.locator('[data-replica][data-healthy="true"]').count() == 3
            await page.screenshot(path=str(ARTIFACTS / "dashboard-replica-down.png"),
                                  full_page=True)
            assert errors == [], f"console errors: {errors}"
    finally:
        stop.set()
        sent = await load
    assert sent > 0


async def test_dashboard_assets_are_served_from_the_package(procs: Procs) -> None:
    _, routers = mesh_of(procs, {"us": 1})
    async with aiohttp.ClientSession() as s:
        await wait_until(partial(healthy, s, routers["us"]), 30, "router up")
        async with s.get(f"{routers['us']}/dashboard", allow_redirects=True) as resp:
            assert resp.status == 200
            html = await resp.text()
            assert resp.content_type == "text/html"
        assert "/dashboard/dashboard.js" in html and "http" not in html.split("<body>")[1]
        for name, kind in (("dashboard.js", "application/javascript"),
                           ("dashboard.css", "text/css")):
            async with s.get(f"{routers['us']}/dashboard/{name}") as resp:
                assert resp.status == 200 and resp.content_type == kind
        async with s.get(f"{routers['us']}/dashboard/../router.py") as resp:
            assert resp.status == 404
        async with s.get(f"{routers['us']}/dashboard/api/mesh") as resp:
            doc = await resp.json()
        assert doc["served_by"] == "router-us"
        assert [r["router"]["region"] for r in doc["routers"]] == ["us"]
