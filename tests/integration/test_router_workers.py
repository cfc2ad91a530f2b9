"""A router node with several worker processes on one port: real processes, real sockets.

Requests spread over the processes (per-worker counters in /metrics), the node's in-flight
counts are right while many requests are open at once and go back to zero, a killed worker
is restarted and what it held in flight is released, and the node stays the same member of
its mesh throughout (same generation, seen alive by its peer).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from functools import partial
from typing import Any

import aiohttp
import pytest
from router_support import (
    GOSSIP_LOCAL,
    MESH_KEY,
    MODEL,
    Procs,
    chat,
    get_json,
    healthy,
    ready,
    wait_until,
)

from mesh.forward_auth import body_digest, sign_headers
from sim.procs import free_ports

pytestmark = pytest.mark.integration

WORKERS = 3


def node(procs: Procs, speedup: float) -> tuple[str, str, str]:
    """A 3-process node ``us`` and a one-process peer ``eu``, meshed: their URLs, and the
    URL of ``us``'s engine."""
    us_engine, eu_engine = procs.engine("engine-us", speedup), procs.engine("engine-eu", 20.0)
    us_port, eu_port = free_ports(2)
    peers = [f"http://127.0.0.1:{us_port}", f"http://127.0.0.1:{eu_port}"]

    def conf(region: str, eng: Any, port: int, **extra: Any) -> dict[str, Any]:
        return {"region": region, "policy": "kvmesh", "peers": peers, "mesh_key": MESH_KEY,
                "gossip": GOSSIP_LOCAL, "listen": f"127.0.0.1:{port}",
                "engines": [{"url": eng.url, "kv_events": eng.kv_events,
                             "replay": eng.replay}], **extra}

    us = procs.router("router-us", conf("us", us_engine, us_port, workers=WORKERS,
                                        emulate_rtt={"eu": 2.0}))
    eu = procs.router("router-eu", conf("eu", eu_engine, eu_port))
    return us, eu, us_engine.url


async def metric(s: aiohttp.ClientSession, url: str, name: str) -> dict[str, float]:
    async with s.get(f"{url}/metrics") as resp:
        text = await resp.text()
    out = {}
    for m in re.finditer(rf"^{name}(?:\{{(.*?)\}})? (\S+)$", text, re.M):
        out[m.group(1) or ""] = float(m.group(2))
    return out


async def workers_up(s: aiohttp.ClientSession, url: str) -> bool:
    st = await get_json(s, f"{url}/mesh/status")
    return all(w["alive"] for w in st["workers"]["workers"])


async def inflight(s: aiohttp.ClientSession, url: str) -> int:
    st = await get_json(s, f"{url}/mesh/status")
    return sum(st["router"]["inflight"].values())


async def test_workers_share_the_port_the_ledger_and_the_mesh(procs: Procs) -> None:
    us, eu, us_engine = node(procs, speedup=1.0)
    async with aiohttp.ClientSession() as s:
        for r in (us, eu):
            await wait_until(partial(healthy, s, r), timeout=60, what=f"{r} up")
            await wait_until(partial(ready, s, r), timeout=60, what=f"{r} ready")
        await wait_until(partial(workers_up, s, us), timeout=60, what="workers up")
        status = await get_json(s, f"{us}/mesh/status")
        generation = status["node"]["generation"]
        pids = {w["index"]: w["pid"] for w in status["workers"]["workers"]}
        assert len(pids) == WORKERS - 1

        # Spread: one connection per request, so the kernel picks a process each time.
        async def one(i: int) -> int:
            async with aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(force_close=True)) as c:
                code, _, _ = await chat(c, us, [{"role": "user", "content": f"hi {i}"}],
                                        max_tokens=1)
                return code

        codes = await asyncio.gather(*(one(i) for i in range(60)))
        assert codes == [200] * 60
        served = await metric(s, us, "kvmesh_router_worker_requests_total")
        assert sum(served.values()) == 60
        assert sum(1 for v in served.values() if v > 0) >= 2, served
        total = await metric(s, us, "kvmesh_router_requests_total")
        assert sum(total.values()) == 60  # the node's total, whichever process answers

        # Keys chained in the workers match the primary's index: a prompt the engine has
        # stored is predicted cached, whichever process the request lands on.
        long = [{"role": "user", "content": " ".join(f"word{i}" for i in range(300))}]
        code, _, _ = await chat(s, us, long, max_tokens=1)
        assert code == 200

        async def indexed() -> bool:
            blocks = await metric(s, us, "kvmesh_index_blocks")
            return sum(blocks.values()) >= 10

        await wait_until(indexed, timeout=30, what="the prompt indexed")
        before = await metric(s, us, "kvmesh_router_worker_requests_total")

        async def again() -> int:
            async with aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(force_close=True)) as c:
                _, headers, _ = await chat(c, us, long, max_tokens=1)
                return int(headers["x-kvmesh-predicted-cached-tokens"])

        predicted = [await again() for _ in range(12)]
        assert all(n >= 160 for n in predicted), predicted
        after = await metric(s, us, "kvmesh_router_worker_requests_total")
        assert any(after[k] > before.get(k, 0) for k in after if k != 'worker="0"'), after

        # A signed forward is accepted once by the node, whichever process receives it.
        raw = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "fwd"}],
                          "max_tokens": 1}).encode()
        hop = {"Content-Type": "application/json",
               **sign_headers(MESH_KEY, "router-eu", us_engine, "replay-1",
                              "/v1/chat/completions", None, body_digest(raw), time.time())}

        async def forward() -> tuple[int, str]:
            async with aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(force_close=True)) as c, c.post(
                    f"{us}/v1/chat/completions", data=raw, headers=hop) as resp:
                return resp.status, await resp.text()

        answers = [await forward() for _ in range(9)]
        assert sorted(code for code, _ in answers) == [200] + [403] * 8, answers
        assert all("replayed" in text for code, text in answers if code == 403)

        # In flight: many long streams open at once are counted once each, node-wide.
        held = 24
        conns = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
                 for _ in range(held)]
        body = {"model": MODEL, "messages": [{"role": "user", "content": "a long one"}],
                "max_tokens": 2000, "stream": True}
        resps = await asyncio.gather(*(c.post(f"{us}/v1/chat/completions", json=body)
                                       for c in conns))
        try:
            assert [r.status for r in resps] == [200] * held

            async def all_counted() -> bool:
                return await inflight(s, us) == held

            await wait_until(all_counted, timeout=30, what=f"{held} in flight")
            st = await get_json(s, f"{us}/mesh/status")
            by_worker = {w["index"]: w["inflight"] for w in st["workers"]["workers"]}
            assert sum(by_worker.values()) <= held

            # Kill a worker that holds streams: it is restarted, its dispatches released.
            victim = max(by_worker, key=lambda i: by_worker[i])
            lost = by_worker[victim]
            assert lost > 0, by_worker
            os.kill(pids[victim], signal.SIGKILL)

            async def released() -> bool:
                return await inflight(s, us) == held - lost

            await wait_until(released, timeout=30, what="the dead worker's dispatches released")

            async def restarted() -> bool:
                st = await get_json(s, f"{us}/mesh/status")
                w = st["workers"]["workers"][victim - 1]
                return bool(w["alive"] and w["pid"] != pids[victim] and w["restarts"] == 1)

            await wait_until(restarted, timeout=60, what="the worker restarted")
        finally:
            for r in resps:
                r.close()  # the clients go away: the node ends those dispatches
            for c in conns:
                await c.close()

        async def drained() -> bool:
            return await inflight(s, us) == 0

        await wait_until(drained, timeout=60, what="nothing in flight")
        restarts = await metric(s, us, "kvmesh_router_worker_restarts_total")
        assert restarts == {"": 1.0}

        # The node is the same member of its mesh, and its peer still sees it alive.
        status = await get_json(s, f"{us}/mesh/status")
        assert status["node"]["generation"] == generation
        peer = await get_json(s, f"{eu}/mesh/status")
        seen = [p for p in peer["peers"] if p["id"] == status["node"]["id"]]
        assert seen and seen[0]["state"] == "alive" and seen[0]["generation"] == generation
        code, _, _ = await chat(s, us, [{"role": "user", "content": "after"}], max_tokens=1)
        assert code == 200
    all_pids = [*pids.values(), status["workers"]["primary"]["pid"],
                *(w["pid"] for w in status["workers"]["workers"])]
    procs.close()

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    async def all_gone() -> bool:
        return all(gone(p) for p in all_pids)

    await wait_until(all_gone, timeout=30, what="every process of the node exited")
