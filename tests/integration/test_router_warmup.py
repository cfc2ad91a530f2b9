"""Readiness that means warm, on real processes: a restarted router answers /ready only
once its index holds its engines' history and the other regions' slices."""

from __future__ import annotations

import asyncio
import signal
import time
from functools import partial

import aiohttp
import pytest
from router_support import (
    GOSSIP_LOCAL,
    MESH_KEY,
    Procs,
    chat,
    get_json,
    healthy,
    index_blocks,
    mesh_of,
    ready,
    sees_replicas,
    wait_until,
)

pytestmark = pytest.mark.integration


def _time_to_warm(metrics: str) -> tuple[str, float] | None:
    for line in metrics.splitlines():
        if line.startswith("kvmesh_time_to_warm_seconds{"):
            how = line.split('how="', 1)[1].split('"', 1)[0]
            return how, float(line.rsplit(" ", 1)[1])
    return None


async def test_a_restarted_router_is_ready_only_when_warm(procs: Procs) -> None:
    engines, routers = mesh_of(procs, {"us": 1, "eu": 1})
    us, eu = routers["us"], routers["eu"]
    us_engine, eu_engine = engines["us"][0], engines["eu"][0]
    async with aiohttp.ClientSession() as s:
        for r in (us, eu):
            await wait_until(partial(healthy, s, r), 30, f"{r} up")
            await wait_until(partial(sees_replicas, s, r, 2), 40, f"{r} sees 2 replicas")
            await wait_until(partial(ready, s, r), 40, f"{r} ready")
            async with s.get(f"{r}/metrics") as resp:
                warm = _time_to_warm(await resp.text())
            # Fresh engines with no history: covered at once by the replay probe, not by
            # the bounded wait.
            assert warm is not None and warm[0] == "covered" and warm[1] < 30, warm
        # Give both engines history, then wait until each router's index holds both. Sent
        # to the engines themselves: through the routers, a prompt whose prefix the other
        # region's engine already holds may be routed there, and one engine may end up with
        # no history at all (how the requests and the gossip interleave decides it).
        for engine in (us_engine, eu_engine):
            prefix = f"A long system prompt about routing and caches, for {engine.url}. " * 12
            for i in range(3):
                status, _, _ = await chat(s, engine.url,
                                          [{"role": "user", "content": f"{prefix}{i}"}], 4)
                assert status == 200

        async def both_indexed() -> bool:
            blocks = await index_blocks(s, eu)
            return blocks.get(us_engine.url, 0) > 0 and blocks.get(eu_engine.url, 0) > 0

        await wait_until(both_indexed, 30, "eu indexes both engines")

        # Kill router-us hard; start it again on the same address (a new generation).
        procs.stop("router-us", signal.SIGKILL)
        listen = us.removeprefix("http://")
        peers = [us, eu]
        started = time.monotonic()
        procs.router("router-us-restarted", {
            "node_id": "router-us", "region": "us", "policy": "kvmesh", "peers": peers,
            "mesh_key": MESH_KEY, "gossip": GOSSIP_LOCAL, "listen": listen,
            "engines": [{"url": us_engine.url, "kv_events": us_engine.kv_events,
                         "replay": us_engine.replay}]})
        await wait_until(partial(healthy, s, us), 30, "restarted router up")
        while True:
            async with s.get(f"{us}/ready") as resp:
                if resp.status == 200:
                    break
                body = await resp.json()
                assert body["error"]["code"] == "not_ready"
            assert time.monotonic() - started < 40, "never ready"
            await asyncio.sleep(0.02)
        # The first moment it says ready, its index already holds both engines' blocks.
        blocks = await index_blocks(s, us)
        assert blocks.get(us_engine.url, 0) > 0, blocks
        assert blocks.get(eu_engine.url, 0) > 0, blocks
        async with s.get(f"{us}/metrics") as resp:
            warm = _time_to_warm(await resp.text())
        assert warm is not None and warm[0] == "covered", warm
        status_doc = await get_json(s, f"{us}/mesh/status")
        assert status_doc["router"]["warmup"]["warm"] is True


async def test_the_wait_is_bounded_when_no_peer_answers(procs: Procs) -> None:
    # One router whose only peer never comes up: warm by the bounded wait, not before.
    engine = procs.engine("engine-us-0")
    from router_support import free_ports

    (dead_port,) = free_ports(1)
    us = procs.router("router-us", {
        "region": "us", "peers": [f"http://127.0.0.1:{dead_port}"], "mesh_key": MESH_KEY,
        "gossip": GOSSIP_LOCAL, "warm_timeout": 12.0,
        "engines": [{"url": engine.url, "kv_events": engine.kv_events,
                     "replay": engine.replay}]})
    async with aiohttp.ClientSession() as s:
        await wait_until(partial(healthy, s, us), 30, "router up")
        await wait_until(partial(sees_replicas, s, us, 1), 30, "router sees its engine")
        async with s.get(f"{us}/ready") as resp:
            body = await resp.json()
        # Not ready until the bounded wait ends: covering the engine is not enough.
        assert resp.status == 503 and "warming up" in body["error"]["message"], body
        await wait_until(partial(ready, s, us), 30, "ready after the bounded wait")
        async with s.get(f"{us}/metrics") as resp:
            warm = _time_to_warm(await resp.text())
    assert warm is not None and warm[0] == "timeout" and warm[1] >= 12.0, warm


async def test_a_router_started_beside_idle_engines_with_history_replays_it(
    procs: Procs,
) -> None:
    # The engine served before any router existed, then went quiet: no live batch will ever
    # reveal its blocks, so the router must replay the run so far before it is ready.
    engine = procs.engine("engine-us-0")
    async with aiohttp.ClientSession() as s:
        await wait_until(partial(healthy, s, engine.url), 30, "engine up")
        prefix = "History that only the engine's replay buffer still knows about. " * 12
        for i in range(3):
            status, _, _ = await chat(s, engine.url,
                                      [{"role": "user", "content": f"{prefix}{i}"}], 4)
            assert status == 200
        us = procs.router("router-us", {
            "region": "us", "engines": [{"url": engine.url, "kv_events": engine.kv_events,
                                         "replay": engine.replay}]})
        await wait_until(partial(healthy, s, us), 30, "router up")
        await wait_until(partial(ready, s, us), 30, "router ready")
        blocks = await index_blocks(s, us)
        assert blocks.get(engine.url, 0) > 0, blocks
        async with s.get(f"{us}/metrics") as resp:
            warm = _time_to_warm(await resp.text())
    assert warm is not None and warm[0] == "covered", warm
