"""Two regions on loopback: real engines, real routers, real gossip, one-hop forwarding."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from router_support import (
    MESH_KEY,
    MODEL,
    Engine,
    Procs,
    chat,
    get_json,
    healthy,
    sees_replicas,
    wait_until,
)

from mesh.forward_auth import body_digest, sign_headers
from mesh.proxy import H_EMULATED_RTT

pytestmark = pytest.mark.integration

GOSSIP = {"profile": "local", "gossip_interval": 0.05}


def router_conf(region: str, engine: Engine, policy: str, peers: list[str],
                **extra: Any) -> dict[str, Any]:
    return {"region": region, "policy": policy, "peers": peers, "mesh_key": MESH_KEY,
            "gossip": GOSSIP,
            "engines": [{"url": engine.url, "kv_events": engine.kv_events,
                         "replay": engine.replay}], **extra}


def two_regions(procs: Procs, policy: str, us_engine_args: tuple[str, ...] = (),
                us_speedup: float = 20.0, **extra: Any) -> tuple[Engine, Engine, str, str]:
    from router_support import free_ports

    us_engine = procs.engine("engine-us", us_speedup, *us_engine_args)
    eu_engine = procs.engine("engine-eu", 20.0)
    us_port, eu_port = free_ports(2)
    peers = [f"http://127.0.0.1:{us_port}", f"http://127.0.0.1:{eu_port}"]
    us = procs.router("router-us", {**router_conf("us", us_engine, policy, peers, **extra),
                                    "listen": f"127.0.0.1:{us_port}"})
    eu = procs.router("router-eu", {**router_conf("eu", eu_engine, policy, peers, **extra),
                                    "listen": f"127.0.0.1:{eu_port}"})
    return us_engine, eu_engine, us, eu


async def converge(s: aiohttp.ClientSession, *routers: str, replicas: int = 2) -> None:
    for r in routers:
        await wait_until(partial(healthy, s, r), what=f"{r} up")
    for r in routers:
        await wait_until(partial(sees_replicas, s, r, replicas), timeout=30,
                         what=f"{r} sees {replicas} replicas")


async def test_streaming_through_one_hop_with_the_openai_client(procs: Procs) -> None:
    us_engine, eu_engine, us, eu = two_regions(procs, "round_robin")
    async with aiohttp.ClientSession() as s:
        await converge(s, us, eu)
    client = openai.AsyncOpenAI(base_url=f"{us}/v1", api_key="unused", max_retries=0)
    served: Counter[str] = Counter()
    try:
        for i in range(4):
            raw = await client.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": f"question {i} " * 20}],
                max_tokens=12, stream=True)
            region = raw.headers["x-kvmesh-region"]
            served[region] += 1
            if region == "eu":
                assert raw.headers["x-kvmesh-replica"] == eu_engine.url
                assert "via eu" in raw.headers["x-kvmesh-route"]
            else:
                assert raw.headers["x-kvmesh-replica"] == us_engine.url
            stream = raw.parse()
            text = "".join([c.choices[0].delta.content or "" async for c in stream
                            if c.choices])
            assert len(text) > 0
    finally:
        await client.close()
    assert served == {"us": 2, "eu": 2}
    async with aiohttp.ClientSession() as s, s.get(f"{us}/metrics") as resp:
        metrics = await resp.text()
    assert 'kvmesh_router_forwards_total{region="eu"} 2.0' in metrics


async def test_forwarded_request_is_never_forwarded_again(procs: Procs) -> None:
    us_engine, eu_engine, us, eu = two_regions(procs, "kvmesh")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}

    raw = json.dumps(body).encode()

    def hop(target: str, rid: str, key: str = MESH_KEY) -> dict[str, str]:
        return {"Content-Type": "application/json",
                **sign_headers(key, "router-us", target, rid, "/v1/chat/completions", None,
                               body_digest(raw), time.time())}

    async with aiohttp.ClientSession() as s:
        await converge(s, us, eu)
        async with s.post(f"{eu}/v1/chat/completions", data=raw,
                          headers=hop(eu_engine.url, "r1")) as resp:
            assert resp.status == 200
            assert resp.headers["x-kvmesh-replica"] == eu_engine.url
            assert resp.headers["x-kvmesh-route"].startswith("pinned by router-us")
        # It names a replica of another region: the receiver picks at home, never forwards.
        async with s.post(f"{eu}/v1/chat/completions", data=raw,
                          headers=hop(us_engine.url, "r2")) as resp:
            assert resp.status == 200
            assert resp.headers["x-kvmesh-replica"] == eu_engine.url
            assert resp.headers["x-kvmesh-region"] == "eu"
        async with s.post(f"{eu}/v1/chat/completions", data=raw,
                          headers=hop(eu_engine.url, "r3", "a different key of 32 bytes!!")) \
                as resp:
            assert resp.status == 403
            err = (await resp.json())["error"]
            assert err["code"] == "bad_forward_signature"
        # An emulated far region: the receiver holds the forward for the round trip it names.
        started = time.monotonic()
        async with s.post(f"{eu}/v1/chat/completions", data=raw,
                          headers={**hop(eu_engine.url, "r4"), H_EMULATED_RTT: "0.4"}) as resp:
            assert resp.status == 200
            await resp.read()
        assert time.monotonic() - started >= 0.4
        for bad in ("-1", "nan", "11", "soon"):
            async with s.post(f"{eu}/v1/chat/completions", data=raw,
                              headers={**hop(eu_engine.url, f"r5{bad}"), H_EMULATED_RTT: bad}) \
                    as resp:
                assert resp.status == 400
                err = (await resp.json())["error"]
                assert err["code"] == "bad_forward" and H_EMULATED_RTT in err["message"]
        async with s.get(f"{eu}/metrics") as resp:
            metrics = await resp.text()
    assert "kvmesh_router_forwards_total{" not in metrics  # eu forwarded nothing


@pytest.mark.parametrize("policy", ["skylb", "kvmesh"])
async def test_a_saturated_region_pushes_work_to_another(procs: Procs, policy: str) -> None:
    # us: one slow engine that runs one sequence at a time; eu: an idle, fast one.
    _, _, us, eu = two_regions(
        procs, policy, ("--max-num-seqs", "1"), us_speedup=2.0,
        emulate_rtt={"eu": 0.02, "us": 0.02},
        policy_params={"prefill_rate": 3400.0} if policy == "kvmesh" else {},
    )
    async with aiohttp.ClientSession() as s:
        await converge(s, us, eu)

        async def one(i: int) -> dict[str, str]:
            messages = [{"role": "user", "content": f"long request number {i} " * 120}]
            status, headers, _ = await chat(s, us, messages, max_tokens=24)
            assert status == 200
            return headers

        results = await asyncio.gather(*(one(i) for i in range(6)))
    regions = Counter(h["x-kvmesh-region"] for h in results)
    assert regions["us"] >= 1, regions
    assert regions["eu"] >= 1, regions
    pushed = [h["x-kvmesh-route"] for h in results if h["x-kvmesh-region"] == "eu"]
    assert all("via eu" in r for r in pushed)


async def test_a_down_engine_is_seen_down_across_the_mesh(procs: Procs) -> None:
    us_engine, eu_engine, us, eu = two_regions(procs, "round_robin")
    async with aiohttp.ClientSession() as s:
        await converge(s, us, eu)
        async with s.post(f"{eu_engine.url}/debug/fault", json={"unhealthy": True}) as resp:
            assert resp.status == 200

        async def eu_down_at_us() -> bool:
            status = await get_json(s, f"{us}/mesh/status")
            rows = {r["replica"]: r for r in status["routing"]["replicas"]}
            return not rows[eu_engine.url]["healthy"]

        await wait_until(eu_down_at_us, what="us sees the eu engine down")
        for i in range(4):
            status, headers, _ = await chat(s, us, [{"role": "user", "content": f"q{i}"}])
            assert status == 200 and headers["x-kvmesh-replica"] == us_engine.url


async def test_models_are_the_union_across_the_mesh(procs: Procs, tmp_path: Path) -> None:
    us_engine = procs.engine("engine-us", 20.0)
    eu_engine = procs.engine("engine-eu", 20.0, "--model", "other-model")
    from router_support import free_ports

    ports = free_ports(2)
    peers = [f"http://127.0.0.1:{p}" for p in ports]
    us = procs.router("router-us", {**router_conf("us", us_engine, "kvmesh", peers),
                                    "listen": f"127.0.0.1:{ports[0]}"})
    eu = procs.router("router-eu", {**router_conf("eu", eu_engine, "kvmesh", peers),
                                    "listen": f"127.0.0.1:{ports[1]}"})
    async with aiohttp.ClientSession() as s:
        await converge(s, us, eu)

        async def union() -> bool:
            models = await get_json(s, f"{us}/v1/models")
            return {m["id"] for m in models["data"]} == {MODEL, "other-model"}

        await wait_until(union, what="both models listed")

        async def routes_other_model_to_eu() -> bool:
            body = {"model": "other-model", "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 2}
            async with s.post(f"{us}/v1/chat/completions", json=body) as resp:
                await resp.read()
                return resp.status == 200 and resp.headers["x-kvmesh-replica"] == eu_engine.url

        await wait_until(routes_other_model_to_eu, what="us learns eu serves other-model")
        for _ in range(3):  # only the engine serving the model is a candidate
            assert await routes_other_model_to_eu()
        async with s.post(f"{us}/v1/chat/completions", data=b"{oops") as resp:
            assert resp.status == 400
            err = json.loads(await resp.read())["error"]
            assert err["type"] == "invalid_request_error"


async def test_prefix_learned_by_gossip_routes_through_the_engines_own_router(
    procs: Procs,
) -> None:
    # Two routers in one region, one engine each. Turn 1 goes straight to engine B; router A
    # only hears of it through gossip (B's router ingests B's events), yet sends the
    # follow-up turns to engine B, through router B.
    from router_support import free_ports

    engine_a, engine_b = procs.engine("engine-a"), procs.engine("engine-b")
    ports = free_ports(2)
    peers = [f"http://127.0.0.1:{p}" for p in ports]
    router_a = procs.router("router-a", {**router_conf("us", engine_a, "kvmesh", peers),
                                        "listen": f"127.0.0.1:{ports[0]}"})
    router_b = procs.router("router-b", {**router_conf("us", engine_b, "kvmesh", peers),
                                        "listen": f"127.0.0.1:{ports[1]}"})
    async with aiohttp.ClientSession() as s:
        await converge(s, router_a, router_b)
        messages = [{"role": "system", "content": "a long shared system prompt " * 60},
                    {"role": "user", "content": "first question " * 10}]
        status, _, reply = await chat(s, engine_b.url, messages)
        assert status == 200

        async def a_knows() -> bool:
            from router_support import index_blocks

            return (await index_blocks(s, router_a)).get(engine_b.url, 0) > 0

        await wait_until(a_knows, what="router A learns engine B's blocks by gossip")
        for turn in range(3):
            messages += [{"role": "assistant", "content": reply},
                         {"role": "user", "content": f"follow-up {turn} " * 8}]
            status, headers, reply = await chat(s, router_a, messages)
            assert status == 200
            assert headers["x-kvmesh-replica"] == engine_b.url, headers["x-kvmesh-route"]
            assert "pinned by router-a" in headers["x-kvmesh-route"]
