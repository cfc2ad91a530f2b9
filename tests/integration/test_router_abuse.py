"""Abuse probes against a real mesh on loopback: each gets a 4xx, a closed connection or a
bounded delay, and no healthy router is suspected, declared dead or loses its engine.

The mesh: two regions with one simulated engine each (``eu``, ``us``), a router with no
engine of its own (``gw``: everything it serves is forwarded one hop), all on the default
``lan`` failure detector; and a router with no mesh key (``solo``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import aiohttp
import pytest
from router_support import (
    MESH_KEY,
    MODEL,
    Procs,
    free_ports,
    get_json,
    healthy,
    processes,
    sees_replicas,
    wait_until,
)

from mesh.auth import Authenticator
from mesh.forward_auth import body_digest, sign_headers
from mesh.messages import Envelope, NodeInfo, Ping, encode_envelope
from mesh.transport import CONTENT_TYPE, REJECTED_HEADER, pack_frames

pytestmark = pytest.mark.integration

EDGE = {"header_timeout": 1.0, "body_timeout": 2.0, "idle_timeout": 3.0}
FLAP_COUNTERS = ("membership.became_suspect", "membership.became_dead")


@dataclass
class Mesh:
    procs: Procs
    eu: str
    us: str
    gw: str
    solo: str
    eu_engine: str
    us_engine: str
    fallback: str

    @property
    def meshed(self) -> dict[str, str]:
        return {"router-eu": self.eu, "router-us": self.us, "router-gw": self.gw}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with processes(tmp_path_factory.mktemp("abuse")) as procs:
        e_eu = procs.engine("engine-eu")
        e_us = procs.engine("engine-us")
        ports = free_ports(3)
        peers = [f"http://127.0.0.1:{p}" for p in ports]
        urls = {}
        for (name, region, eng), port in zip(
            [("router-eu", "eu", e_eu), ("router-us", "us", e_us), ("router-gw", "gw", None)],
            ports, strict=True,
        ):
            engines = [] if eng is None else [{"url": eng.url, "kv_events": eng.kv_events,
                                               "replay": eng.replay}]
            urls[name] = procs.router(name, {
                "region": region, "listen": f"127.0.0.1:{port}", "peers": peers,
                "mesh_key": MESH_KEY, "engines": engines, "policy": "kvmesh", **EDGE})
        solo = procs.router("router-solo", {"region": "solo", "engines": [e_eu.url], **EDGE})
        # its tokenizer is an engine that is not there: every request falls back
        # (and every body goes through a worker process: prepare_inline_bytes 1)
        fallback = procs.router("router-fallback", {
            "region": "fb", "engines": [e_eu.url], "tokenizer": "engine:http://127.0.0.1:9",
            "prepare_inline_bytes": 1})
        m = Mesh(procs, urls["router-eu"], urls["router-us"], urls["router-gw"], solo,
                 e_eu.url, e_us.url, fallback)

        async def ready() -> None:
            async with aiohttp.ClientSession() as s:
                for r in [*m.meshed.values(), solo]:
                    await wait_until(partial(healthy, s, r), what=f"{r} up")
                for r in m.meshed.values():
                    await wait_until(partial(sees_replicas, s, r, 2), timeout=40,
                                     what=f"{r} sees both replicas")
                await wait_until(partial(sees_replicas, s, solo, 1), what="solo's engine")
                await wait_until(partial(sees_replicas, s, m.fallback, 1),
                                 what="fallback router's engine")

        asyncio.run(ready())
        yield m


# ---- helpers ---------------------------------------------------------------------------


async def metrics(s: aiohttp.ClientSession, router: str) -> str:
    async with s.get(f"{router}/metrics", timeout=aiohttp.ClientTimeout(total=5)) as resp:
        return await resp.text()


def metric(text: str, family: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(family + "{") and not line.startswith(family + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def flaps(s: aiohttp.ClientSession, m: Mesh) -> dict[str, float]:
    """Suspicions and deaths each meshed router has applied, and engines it marked down."""
    out = {}
    for name, r in m.meshed.items():
        text = await metrics(s, r)
        out[name] = sum(metric(text, "kvmesh_gossip_events_total", name=c)
                        for c in FLAP_COUNTERS)
        out[name + ".engine_down"] = float(m.procs.log(name).count(" down: "))
    return out


class Watch:
    """Polls a router's /health every 50 ms while a probe runs: the slowest answer."""

    def __init__(self, s: aiohttp.ClientSession, router: str) -> None:
        self.s, self.router = s, router
        self.worst = 0.0
        self.answers = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            t0 = time.monotonic()
            async with self.s.get(f"{self.router}/health",
                                  timeout=aiohttp.ClientTimeout(total=30)) as resp:
                assert resp.status == 200
            self.worst = max(self.worst, time.monotonic() - t0)
            self.answers += 1
            await asyncio.sleep(0.05)

    async def __aenter__(self) -> Watch:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def steady(s: aiohttp.ClientSession, m: Mesh, before: dict[str, float]) -> None:
    """No flap since ``before``, a little after the probe (a suspicion takes a round)."""
    await asyncio.sleep(2.5)  # longer than one probe interval + its indirect probes
    after = await flaps(s, m)
    assert after == before, {k: (before[k], after[k]) for k in after if after[k] != before[k]}


async def post(s: aiohttp.ClientSession, url: str, data: bytes,
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    async with s.post(url, data=data, headers={"Content-Type": "application/json",
                                                 **(headers or {})}) as resp:
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.read()


def chat_body(content: str, **extra: object) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}],
                       "max_tokens": 4, **extra}).encode()


def gzip_bomb(inflated: int) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [c.compress(b'{"model":"sim-model","prompt":"')]
    block = b"a" * (1 << 20)
    for _ in range(inflated >> 20):
        parts.append(c.compress(block))
    parts.append(c.compress(b'"}'))
    parts.append(c.flush())
    return b"".join(parts)


async def raw_exchange(url: str, data: bytes, wait: float) -> tuple[bytes, float]:
    """Send raw bytes; what came back and how long until the server closed (or ``wait``)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    t0 = time.monotonic()
    writer.write(data)
    await writer.drain()
    got = b""
    try:
        async with asyncio.timeout(wait):
            while chunk := await reader.read(65536):
                got += chunk
    except TimeoutError:
        pass
    elapsed = time.monotonic() - t0
    writer.close()
    return got, elapsed


# ---- the probes ------------------------------------------------------------------------


async def test_compressed_bodies_are_refused_before_inflating(mesh: Mesh) -> None:
    bomb = gzip_bomb(1 << 30)  # 1 GiB of "a" in ~1 MB
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        before = await flaps(s, mesh)
        async with Watch(s, mesh.eu) as watch:
            for _ in range(3):
                t0 = time.monotonic()
                status, _, body = await post(s, f"{mesh.eu}/v1/completions", bomb,
                                             {"Content-Encoding": "gzip"})
                assert status == 415, body
                assert json.loads(body)["error"]["code"] == "unsupported_content_encoding"
                assert time.monotonic() - t0 < 2.0
            # gzip declared on a plain body: the same refusal, not a 500
            status, _, body = await post(s, f"{mesh.eu}/v1/chat/completions",
                                         chat_body("hi"), {"Content-Encoding": "gzip"})
            assert status == 415
        assert watch.answers > 0 and watch.worst < 1.0, watch.worst
        await steady(s, mesh, before)


async def test_a_heavy_body_does_not_stall_gossip_or_health(mesh: Mesh) -> None:
    # ~20 MB of short words, an unknown model: parse and tokenize run off the event loop.
    words = " ".join(f"w{i % 5000}" for i in range(3_500_000))
    body = json.dumps({"model": "no-such-model",
                       "messages": [{"role": "user", "content": words}]}).encode()
    assert len(body) > 20_000_000
    async with aiohttp.ClientSession() as s:
        before = await flaps(s, mesh)
        async with Watch(s, mesh.us) as watch:
            t0 = time.monotonic()
            status, _, answer = await post(s, f"{mesh.us}/v1/chat/completions", body)
            took = time.monotonic() - t0
            assert status == 503 and b"no replica" in answer, (status, answer[:200])
        # The router kept answering while it worked on it: far inside the failure detector's
        # probe timeout (lan: 0.5 s), however long the request itself took.
        assert watch.answers >= 3, (watch.answers, took)
        assert watch.worst < 0.5, (watch.worst, took)
        # Many small arrays: one json.loads of this holds the interpreter lock for seconds,
        # so it is parsed in a worker process, never in the router's own.
        nested = (b'{"model": "no-such-model", "prompt": "x", "extra": ['
                  + b",".join([b"[1]"] * 2_500_000) + b"]}")
        async with Watch(s, mesh.us) as watch:
            status, _, answer = await post(s, f"{mesh.us}/v1/completions", nested)
            assert status == 503, (status, answer[:200])
        assert watch.worst < 0.5, watch.worst
        await steady(s, mesh, before)


async def test_the_engine_tokenizer_failing_falls_back_to_the_builtin_one(mesh: Mesh) -> None:
    async with aiohttp.ClientSession() as s:
        for i in range(3):
            status, _, answer = await post(s, f"{mesh.fallback}/v1/chat/completions",
                                           chat_body(f"tokenize me {i}"))
            assert status == 200, answer
        text = await metrics(s, mesh.fallback)
    assert metric(text, "kvmesh_router_tokenizer_fallbacks_total") == 3


async def test_unique_huge_words_do_not_grow_the_tokenizer_cache(mesh: Mesh) -> None:
    pid = next(p.pid for n, p in mesh.procs.procs if n == "router-solo")

    def rss_mb() -> float:
        status = Path(f"/proc/{pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]

    async with aiohttp.ClientSession() as s:
        for i in range(3):  # warm up: buffers, thread stacks
            await post(s, f"{mesh.solo}/v1/completions", json.dumps(
                {"model": "nope", "prompt": f"warm{i} " + "z" * 1_000_000}).encode())
        start = rss_mb()
        for i in range(60):
            words = " ".join(f"{i}{k}" + chr(97 + k) * 1_000_000 for k in range(4))
            status, _, _ = await post(s, f"{mesh.solo}/v1/completions",
                                      json.dumps({"model": "nope", "prompt": words}).encode())
            assert status == 503
        grown = rss_mb() - start
    # Unbounded, 240 MB of words would stay cached; transient buffers come and go.
    assert grown < 100, f"resident memory grew {grown:.0f} MB"


async def test_a_captured_forward_cannot_be_replayed_or_reused_with_another_body(
    mesh: Mesh,
) -> None:
    path = "/v1/chat/completions"
    body = chat_body("forwarded once")
    other = chat_body("a different body under the same signature")

    def hop(rid: str, data: bytes, wall: float | None = None) -> dict[str, str]:
        return sign_headers(MESH_KEY, "router-gw", mesh.eu_engine, rid, path, None,
                            body_digest(data), time.time() if wall is None else wall)

    async with aiohttp.ClientSession() as s:
        headers = hop("gw-capture-1", body)
        status, h, _ = await post(s, f"{mesh.eu}{path}", body, headers)
        assert status == 200 and h["x-kvmesh-route"].startswith("pinned by router-gw")
        for data, why in ((other, "bad_signature"), (body, "replayed")):
            status, _, answer = await post(s, f"{mesh.eu}{path}", data, headers)
            assert status == 403, answer
            assert why in json.loads(answer)["error"]["message"]
        stale = hop("gw-capture-2", body, time.time() - 120)
        status, _, answer = await post(s, f"{mesh.eu}{path}", body, stale)
        assert status == 403 and b"stale_timestamp" in answer
        # a non-ASCII signature is a refusal too, not a 500
        bad = {**hop("gw-capture-3", body), "x-kvmesh-sig": "\u00e9" * 64}
        status, _, _ = await post(s, f"{mesh.eu}{path}",
                                  body, {k: v.encode().decode("latin-1") for k, v in bad.items()})
        assert status == 403
        text = await metrics(s, mesh.eu)
    assert metric(text, "kvmesh_router_forwards_refused_total", reason="replayed") >= 1
    assert metric(text, "kvmesh_router_forwards_refused_total", reason="bad_signature") >= 1


async def test_hop_headers_are_refused_without_a_mesh_key(mesh: Mesh) -> None:
    async with aiohttp.ClientSession() as s:
        for headers in ({"x-kvmesh-hop": ""}, {"x-kvmesh-hop": "1", "x-kvmesh-from": "evil",
                                                "x-kvmesh-target": mesh.eu_engine}):
            status, h, answer = await post(s, f"{mesh.solo}/v1/chat/completions",
                                           chat_body("pin me"), headers)
            assert status == 403, answer
            assert "evil" not in h.get("x-kvmesh-route", "")
            assert json.loads(answer)["error"]["type"] == "permission_error"


async def test_input_errors_are_4xx_and_counted(mesh: Mesh) -> None:
    deep = "[" * 10_000 + "]" * 10_000
    probes: list[tuple[str, str, bytes, dict[str, str], int]] = [
        ("/v1/completions", "ids >= 2**32",
         json.dumps({"model": MODEL, "prompt": [2**32 + i for i in range(20)]}).encode(), {},
         400),
        ("/v1/completions", "nested 10k deep",
         f'{{"model": "{MODEL}", "prompt": "x", "extra": {deep}}}'.encode(), {}, 400),
        ("/v1/chat/completions", "nested in a message",
         f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": {deep}}}]}}'
         .encode(), {}, 400),
        ("/v1/completions", "lone surrogate prompt",
         f'{{"model": "{MODEL}", "prompt": "a\\ud800b"}}'.encode(), {}, 400),
        ("/v1/completions", "lone surrogate salt",
         f'{{"model": "{MODEL}", "prompt": "ab", "cache_salt": "\\udfff"}}'.encode(), {}, 400),
        ("/v1/completions", "gzip on a plain body",
         json.dumps({"model": MODEL, "prompt": "x"}).encode(), {"Content-Encoding": "gzip"},
         415),
    ]
    async with aiohttp.ClientSession() as s:
        before = metric(await metrics(s, mesh.eu), "kvmesh_router_requests_total")
        for path, what, data, headers, want in probes:
            status, _, answer = await post(s, f"{mesh.eu}{path}", data, headers)
            assert status == want, (what, status, answer[:300])
            err = json.loads(answer)["error"]
            assert err["type"] == "invalid_request_error" and err["message"], what
        after = metric(await metrics(s, mesh.eu), "kvmesh_router_requests_total")
        assert after - before == len(probes)
        # On the router that forwards everything: a session with a newline, a non-UTF-8 id.
        status, h, answer = await post(s, f"{mesh.gw}/v1/chat/completions",
                                       chat_body("via a hop", user="a\nb"))
        assert status == 200, answer
        assert "via" in h["x-kvmesh-route"]
        async with s.post(f"{mesh.gw}/v1/chat/completions", data=chat_body("odd id"),
                          headers={"Content-Type": "application/json",
                                   "x-request-id": "\u00ff\u00fe".encode().decode("latin-1")}
                          ) as resp:
            assert resp.status == 200, await resp.text()


async def test_request_ids_belong_to_the_router(mesh: Mesh) -> None:
    async with aiohttp.ClientSession() as s:
        results = await asyncio.gather(*(
            post(s, f"{mesh.eu}/v1/chat/completions", chat_body(f"dup {i}"),
                 {"x-request-id": "client-dup"}) for i in range(3)))
        ids = set()
        for status, h, answer in results:
            assert status == 200, answer
            assert h["x-client-request-id"] == "client-dup"
            ids.add(h["x-request-id"])
        assert len(ids) == 3 and all(i.startswith("kvm-") for i in ids)
        async with s.get(f"{mesh.eu}/v1/completions") as resp:
            assert resp.status == 405
            assert "POST" in resp.headers["Allow"]
            assert (await resp.json())["error"]["type"] == "invalid_request_error"


async def test_slow_and_idle_connections_are_closed_without_slowing_others(
    mesh: Mesh,
) -> None:
    # A declared body over the limit: refused before a byte of it is sent.
    got, took = await raw_exchange(
        mesh.eu, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
        b"\r\nContent-Length: 999999999999\r\n\r\n", 5.0)
    assert got.startswith(b"HTTP/1.1 413"), got[:100]
    assert took < 2.0

    async def slow(kind: str) -> tuple[bytes, float]:
        if kind == "idle":
            return await raw_exchange(mesh.eu, b"", 15.0)
        if kind == "headers":
            return await raw_exchange(mesh.eu, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n",
                                      15.0)
        if kind == "gossip":
            return await raw_exchange(
                mesh.eu, b"POST /mesh/gossip HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                b"Content-Type: application/x-kvmesh-frames\r\n\r\n\x91", 15.0)
        return await raw_exchange(
            mesh.eu, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
            b"Content-Type: application/json\r\n\r\n{\"model\":", 15.0)

    async with aiohttp.ClientSession() as s:
        before = await flaps(s, mesh)
        kinds = ("idle", "headers", "body", "gossip") * 10
        tasks = [asyncio.create_task(slow(k)) for k in kinds]
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        status, _, _ = await post(s, f"{mesh.eu}/v1/chat/completions", chat_body("normal"))
        assert status == 200 and time.monotonic() - t0 < 2.0
        results = await asyncio.gather(*tasks)
        for (got, took), kind in zip(results, kinds, strict=True):
            limit = {"idle": EDGE["idle_timeout"], "headers": EDGE["header_timeout"],
                     "body": EDGE["body_timeout"], "gossip": EDGE["body_timeout"]}[kind]
            assert took < limit + 2.0, (kind, took)
            if kind in ("body", "gossip"):
                assert got.startswith(b"HTTP/1.1 408"), (kind, got[:100])
        text = await metrics(s, mesh.eu)
        assert metric(text, "kvmesh_http_connections_closed_total", reason="idle") >= 10
        assert metric(text, "kvmesh_http_connections_closed_total",
                      reason="header_timeout") >= 10
        await steady(s, mesh, before)


async def test_rejected_request_labels_stay_bounded(mesh: Mesh) -> None:
    async with aiohttp.ClientSession() as s:
        for i in range(300):
            messages = [{"role": "user", "content": "x"}] * i + [{"role": "user", "content": 5}]
            status, _, _ = await post(s, f"{mesh.eu}/v1/chat/completions", json.dumps(
                {"model": MODEL, "messages": messages}).encode())
            assert status == 400
        text = await metrics(s, mesh.eu)
    series = [ln for ln in text.splitlines() if ln.startswith("kvmesh_router_rejected_total{")]
    assert 0 < len(series) <= 20, series


async def test_a_gossip_frame_for_one_router_is_refused_by_another(mesh: Mesh) -> None:
    """A frame sealed with the mesh key for router-eu, replayed at router-us."""
    auth = Authenticator([MESH_KEY.encode()])
    env = Envelope(NodeInfo("router-probe", "eu", "http://127.0.0.1:9"), 1, 0, 1,
                   int(time.time()), Ping(1, "router-eu"), (), "router-eu")
    frame = auth.seal(encode_envelope(env))
    async with aiohttp.ClientSession() as s, s.post(
        f"{mesh.us}/mesh/gossip", data=pack_frames([frame]),
        headers={"Content-Type": CONTENT_TYPE},
    ) as resp:
        assert resp.status == 200
        assert resp.headers.get(REJECTED_HEADER) == "wrong_recipient"


async def test_malformed_http_is_one_counted_line_without_a_traceback(mesh: Mesh) -> None:
    bad = [
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(
            b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ]
    async with aiohttp.ClientSession() as s:
        before = metric(await metrics(s, mesh.us), "kvmesh_http_malformed_requests_total")
        log_before = mesh.procs.log("router-us")
        for data in bad * 5:
            got, _ = await raw_exchange(mesh.us, data, 5.0)
            assert re.match(rb"HTTP/1\.[01] 4\d\d ", got), got[:80]
        after = metric(await metrics(s, mesh.us), "kvmesh_http_malformed_requests_total")
        assert await get_json(s, f"{mesh.us}/health")
    new_log = mesh.procs.log("router-us")[len(log_before):]
    assert "Traceback" not in new_log
    assert after - before == len(bad) * 5
    assert new_log.count("Error handling request") == len(bad) * 5
