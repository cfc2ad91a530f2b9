"""The router's HTTP path against small in-process engines on real loopback sockets."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from mesh.config import build
from mesh.limits import field_label
from mesh.policies.base import NoPrefixes
from mesh.router import Router
from mesh.view import RegionRecord, ReplicaRecord


@dataclass
class FakeEngine:
    """An engine with vLLM's endpoints whose behaviour each test sets."""

    waiting: int = 0
    status: int = 200
    chunks: int = 3
    hold: asyncio.Event | None = None
    """When set, the stream pauses after its first chunk until the event is set."""
    die_after_first: bool = False
    stall: float = 0.0
    """Seconds to wait before answering at all (a hung engine)."""
    served: int = 0
    attempts: int = 0
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    runner: web.AppRunner | None = None
    url: str = ""

    async def start(self) -> None:
        app = web.Application()
        app.add_routes([
            web.get("/health", self.health),
            web.get("/metrics", self.metrics),
            web.get("/v1/models", self.models),
            web.post("/v1/chat/completions", self.chat),
            web.post("/v1/completions", self.chat),
        ])
        self.runner = web.AppRunner(app, handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=(
            f'vllm:num_requests_waiting{{model_name="m"}} {self.waiting}\n'
            'vllm:num_requests_running{model_name="m"} 0\n'
            'vllm:kv_cache_usage_perc{model_name="m"} 0.1\n'
        ))

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.attempts += 1
        if self.stall:
            await asyncio.sleep(self.stall)
        if self.status != 200:
            return web.json_response({"error": {"message": "boom"}}, status=self.status)
        self.served += 1
        if not body.get("stream"):
            return web.json_response({
                "id": "c1", "object": "chat.completion", "created": 0, "model": "m",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
            })
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i in range(self.chunks):
                chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0,
                         "model": "m", "choices": [{"index": 0, "delta": {"content": f"t{i} "},
                                                    "finish_reason": None}]}
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
                if i == 0 and self.die_after_first:
                    assert request.transport is not None
                    request.transport.close()
                    return resp
                if i == 0 and self.hold is not None:
                    await self.hold.wait()
            await resp.write(b"data: [DONE]\n\n")
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return resp


async def wait_for(cond: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        got = cond()
        if not isinstance(got, bool):
            got = await got
        if got:
            return
        if loop.time() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.01)


@pytest.fixture
async def engines() -> AsyncIterator[list[FakeEngine]]:
    es = [FakeEngine(), FakeEngine()]
    for e in es:
        await e.start()
    yield es
    for e in es:
        await e.stop()


async def start_router(engines: list[FakeEngine], **extra: object) -> Router:
    raw: dict[str, object] = {"region": "us", "listen": "127.0.0.1:0",
                              "engines": [e.url for e in engines], "health_interval": 0.02,
                              "seed": 1,
                              # threads: no worker processes to spawn per test (the
                              # integration tests run the default, processes)
                              "prepare_in": "thread"}
    raw.update(extra)
    router = Router(build(raw))
    await router.start()
    await wait_for(lambda: router.engines is not None and all(
        s.healthy for s in router.engines.states.values()))
    return router


@pytest.fixture
async def router(engines: list[FakeEngine]) -> AsyncIterator[Router]:
    r = await start_router(engines)
    yield r
    await r.stop()


def base(router: Router) -> str:
    return f"http://127.0.0.1:{router.port}"


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}


async def test_stream_is_relayed_chunk_by_chunk_with_routing_headers(
    engines: list[FakeEngine], router: Router
) -> None:
    hold = asyncio.Event()
    for e in engines:
        e.hold = hold
    async with aiohttp.ClientSession() as s, s.post(
        base(router) + "/v1/chat/completions", json={**CHAT, "stream": True}
    ) as resp:
        assert resp.status == 200
        assert resp.headers["x-kvmesh-replica"] in {e.url for e in engines}
        assert resp.headers["x-kvmesh-region"] == "us"
        assert resp.headers["x-kvmesh-route"].startswith("kvmesh ")
        first = await resp.content.readuntil(b"\n\n")
        # The engine is still holding the rest: the first event got through unbuffered.
        assert b"t0" in first and not hold.is_set()
        hold.set()
        rest = await resp.content.read()
    assert rest.endswith(b"data: [DONE]\n\n")


async def test_openai_client_works_unchanged(router: Router) -> None:
    client = openai.AsyncOpenAI(base_url=base(router) + "/v1", api_key="unused")
    try:
        out = await client.chat.completions.create(model="m", messages=[
            {"role": "user", "content": "hi"}])
        assert out.choices[0].message.content == "hello"
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
        parts = [c.choices[0].delta.content async for c in stream if c.choices]
        assert "".join(p or "" for p in parts) == "t0 t1 t2 "
        models = await client.models.list()
        assert [m.id for m in models.data] == ["m"]
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="m", messages=[])
        assert info.value.status_code == 400
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", b"{not json", None),
        ("/v1/chat/completions", b"[1, 2]", None),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "user"}]}).encode(), "model"),
        ("/v1/chat/completions", json.dumps({"model": "m", "messages": "hi"}).encode(),
         "messages"),
        ("/v1/chat/completions",
         json.dumps({"model": "m", "messages": [{"content": "x"}]}).encode(), "messages[0].role"),
        ("/v1/chat/completions", json.dumps({**CHAT, "stream": "yes"}).encode(), "stream"),
        ("/v1/chat/completions", json.dumps({**CHAT, "max_tokens": 0}).encode(), "max_tokens"),
        ("/v1/completions", json.dumps({"model": "m", "prompt": {"a": 1}}).encode(), "prompt"),
        ("/v1/completions", json.dumps({"model": "m", "prompt": [1, -2]}).encode(), "prompt"),
    ],
)
async def test_malformed_requests_get_400_in_openai_error_format(
    engines: list[FakeEngine], router: Router, path: str, body: bytes, param: str | None
) -> None:
    async with aiohttp.ClientSession() as s, s.post(
        base(router) + path, data=body, headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 400
        err = (await resp.json())["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param
    assert sum(e.served for e in engines) == 0
    assert router.metrics.rejected.labels(path, field_label(param))._value.get() == 1


async def test_unknown_route_is_json_404(router: Router) -> None:
    async with aiohttp.ClientSession() as s, s.get(base(router) + "/v1/nothing") as resp:
        assert resp.status == 404
        assert "no route" in (await resp.json())["error"]["message"]


async def test_5xx_before_first_byte_retries_on_the_next_replica(
    engines: list[FakeEngine], router: Router
) -> None:
    engines[0].status = 503
    engines[1].status = 503
    async with aiohttp.ClientSession() as s:
        async with s.post(base(router) + "/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 502
            assert (await resp.json())["error"]["code"] == "upstream_failed"
        engines[1].status = 200
        for _ in range(4):
            async with s.post(base(router) + "/v1/chat/completions", json=CHAT) as resp:
                assert resp.status == 200
                assert resp.headers["x-kvmesh-replica"] == engines[1].url
    assert engines[1].served == 4
    assert router.metrics.retries.labels("status")._value.get() >= 2


async def test_dead_engine_is_marked_down_and_avoided(
    engines: list[FakeEngine], router: Router
) -> None:
    dead = engines[0].url
    await engines[0].stop()
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.post(base(router) + "/v1/chat/completions", json=CHAT) as resp:
                assert resp.status == 200
                assert resp.headers["x-kvmesh-replica"] == engines[1].url
    assert router.engines is not None and not router.engines.states[dead].healthy


async def test_error_after_first_byte_reaches_the_client(
    engines: list[FakeEngine], router: Router
) -> None:
    for e in engines:
        e.die_after_first = True
    async with aiohttp.ClientSession() as s, s.post(
        base(router) + "/v1/chat/completions", json={**CHAT, "stream": True}
    ) as resp:
        assert resp.status == 200
        body = await resp.content.read()
    # The stream ends with an SSE error event (what OpenAI clients raise on), not silence.
    last = body.rstrip().rsplit(b"\n\n", 1)[-1]
    assert last.startswith(b"data: ") and json.loads(last[6:])["error"]["type"] == "server_error"
    assert b"[DONE]" not in body
    assert sum(e.served for e in engines) == 1  # no second attempt after the first byte


async def test_the_openai_client_raises_on_a_mid_stream_failure(
    engines: list[FakeEngine], router: Router
) -> None:
    for e in engines:
        e.die_after_first = True
    client = openai.AsyncOpenAI(base_url=base(router) + "/v1", api_key="unused", max_retries=0)
    try:
        stream = await client.chat.completions.create(model="m", messages=CHAT["messages"],
                                                      stream=True)
        with pytest.raises(openai.APIError, match="mid-stream"):
            async for _ in stream:
                pass
    finally:
        await client.close()


async def test_a_hung_engine_is_a_retry_after_the_first_byte_timeout(
    engines: list[FakeEngine],
) -> None:
    router = await start_router(engines, first_byte_timeout=0.3)
    try:
        engines[0].stall = engines[1].stall = 30.0
        async with aiohttp.ClientSession() as s:
            t0 = asyncio.get_running_loop().time()
            async with s.post(base(router) + "/v1/chat/completions", json=CHAT) as resp:
                assert resp.status == 502
            assert asyncio.get_running_loop().time() - t0 < 5.0
            engines[1].stall = 0.0
            async with s.post(base(router) + "/v1/chat/completions", json=CHAT) as resp:
                assert resp.status == 200
                assert resp.headers["x-kvmesh-replica"] == engines[1].url
        assert router.metrics.retries.labels("timeout")._value.get() >= 2
    finally:
        await router.stop()


async def test_a_failing_engine_is_ejected_then_readmitted_by_one_trial(
    engines: list[FakeEngine],
) -> None:
    router = await start_router(engines, outlier_consecutive_failures=2,
                                outlier_ejection=0.5, max_attempts=1)
    try:
        engines[0].status = 503
        async with aiohttp.ClientSession() as s:
            async def ask() -> int:
                async with s.post(base(router) + "/v1/chat/completions", json=CHAT) as resp:
                    return resp.status

            for _ in range(12):
                await ask()
            tried = engines[0].attempts
            assert tried == 2  # then ejected: no more attempts on it
            for _ in range(6):
                assert await ask() == 200
            assert engines[0].attempts == tried
            engines[0].status = 200
            await asyncio.sleep(0.6)  # the ejection ends: a trial goes there, and succeeds

            async def readmitted() -> bool:
                assert await ask() == 200
                return engines[0].served > 0

            await wait_for(readmitted, timeout=10)
            assert router.edge.outliers.excluded(router.clock()) == frozenset()
    finally:
        await router.stop()


async def test_a_failing_engine_tokenizer_falls_back_to_the_builtin_one(
    engines: list[FakeEngine],
) -> None:
    router = await start_router(engines, tokenizer="engine:http://127.0.0.1:9")
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(2):
                async with s.post(base(router) + "/v1/chat/completions", json=CHAT) as resp:
                    assert resp.status == 200
        assert router.preparer.fallbacks == 2
    finally:
        await router.stop()


async def test_client_disconnect_cancels_the_upstream_request(
    engines: list[FakeEngine], router: Router
) -> None:
    hold = asyncio.Event()
    for e in engines:
        e.hold = hold
    s = aiohttp.ClientSession()
    resp = await s.post(base(router) + "/v1/chat/completions", json={**CHAT, "stream": True})
    await resp.content.readuntil(b"\n\n")
    resp.close()
    await s.close()
    await wait_for(lambda: any(e.cancelled.is_set() for e in engines))
    await wait_for(lambda: router.dispatches.total() == 0)


async def test_probes_and_metrics(engines: list[FakeEngine], router: Router) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(base(router) + "/health") as resp:
            assert resp.status == 200
        async with s.get(base(router) + "/ready") as resp:
            assert resp.status == 200
        async with s.post(base(router) + "/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 200
        async with s.get(base(router) + "/metrics") as resp:
            text = await resp.text()
        async with s.get(base(router) + "/mesh/status") as resp:
            status = await resp.json()
    assert 'kvmesh_router_decisions_total{outcome="local",policy="kvmesh"} 1.0' in text
    assert "kvmesh_replica_load{" in text and "kvmesh_router_estimated_cache_hit_ratio" in text
    assert status["router"]["region"] == "us" and len(status["router"]["engines"]) == 2
    assert {r["replica"] for r in status["routing"]["replicas"]} == {e.url for e in engines}
    for e in engines:
        await e.stop()
    await wait_for(lambda: router.ready_reason() is not None)
    async with aiohttp.ClientSession() as s, s.get(base(router) + "/ready") as resp:
        assert resp.status == 503


async def test_selective_pushing_waits_in_fcfs_order_until_a_replica_frees(
    engines: list[FakeEngine],
) -> None:
    for e in engines:
        e.waiting = 1
    router = await start_router(engines, policy="skylb")
    try:
        async with aiohttp.ClientSession() as s:
            async def send(i: int) -> tuple[int, float]:
                async with s.post(base(router) + "/v1/chat/completions", json={
                    **CHAT, "messages": [{"role": "user", "content": f"q{i}"}]}) as resp:
                    await resp.read()
                    return resp.status, asyncio.get_running_loop().time()

            tasks = [asyncio.create_task(send(i)) for i in range(3)]
            await wait_for(lambda: router.dispatcher.queued() == 3)
            assert sum(e.served for e in engines) == 0
            engines[0].waiting = 0
            results = await asyncio.gather(*tasks)
        assert [status for status, _ in results] == [200, 200, 200]
        assert router.metrics.decisions.labels("skylb", "wait")._value.get() == 1
    finally:
        await router.stop()


async def test_an_unexpected_failure_is_a_json_500(router: Router) -> None:
    def broken(*args: object) -> object:
        raise RuntimeError("boom")

    router.policy.decide = broken  # type: ignore[method-assign,assignment]
    async with aiohttp.ClientSession() as s, s.post(
        base(router) + "/v1/chat/completions", json=CHAT
    ) as resp:
        assert resp.status == 500
        err = (await resp.json())["error"]
    assert err["type"] == "server_error" and err["code"] == "internal_error"


async def test_api_keys_and_per_key_rate_limits(engines: list[FakeEngine]) -> None:
    router = await start_router(engines, api_keys=[
        {"key": "sk-open-0123456789abcdef", "name": "open"},
        {"key": "sk-slow-0123456789abcdef", "name": "slow", "rate": 0.5, "burst": 2}])
    try:
        async with aiohttp.ClientSession() as s:
            async def ask(key: str | None) -> aiohttp.ClientResponse:
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                async with s.post(base(router) + "/v1/chat/completions", json=CHAT,
                                  headers=headers) as resp:
                    await resp.read()
                    return resp

            for key in (None, "sk-wrong-0123456789abcdef"):
                resp = await ask(key)
                assert resp.status == 401
                assert resp.headers["WWW-Authenticate"] == "Bearer"
            assert (await ask("sk-open-0123456789abcdef")).status == 200
            assert [(await ask("sk-slow-0123456789abcdef")).status for _ in range(2)] == [200] * 2
            limited = await ask("sk-slow-0123456789abcdef")
            assert limited.status == 429 and int(limited.headers["Retry-After"]) >= 1
            assert (await ask("sk-open-0123456789abcdef")).status == 200  # other keys unaffected
            async with s.get(base(router) + "/health") as resp:
                assert resp.status == 200  # probes need no key
        assert sum(e.served for e in engines) == 4
    finally:
        await router.stop()


@dataclass
class OneRemoteRegion:
    """A mesh backend that knows one replica in region eu, served by the router at ``peer``."""

    peer: str
    replica: str = "http://eu-engine:8000"
    prefix: Any = field(default_factory=NoPrefixes)

    def remote_records(self, now: float) -> list[ReplicaRecord]:
        return [ReplicaRecord(self.replica, "eu", True, 0, 0, 0.0, 0.1)]

    def others_inflight(self, replica: str) -> int:
        return 0

    def regions(self, now: float) -> dict[str, RegionRecord]:
        return {"eu": RegionRecord("eu", 0.01, (self.peer,))}

    def owner_router(self, replica: str, now: float) -> str | None:
        return self.peer

    def publish_engine(self, *args: object) -> None: ...
    def publish_inflight(self, *args: object) -> None: ...
    def routes(self) -> list[Any]:
        return []

    async def start(self, session: object) -> None: ...
    async def start_gossip(self) -> None: ...
    async def stop(self) -> None: ...
    def status(self) -> dict[str, Any]:
        return {}

    def metric_providers(self) -> list[Any]:
        return []


async def test_a_forward_carries_a_signature_and_none_of_the_clients_headers() -> None:
    seen: list[dict[str, str]] = []
    peer = FakeEngine()
    await peer.start()
    original = peer.chat

    async def record(request: web.Request) -> web.StreamResponse:
        seen.append(dict(request.headers))
        return await original(request)

    peer.chat = record  # type: ignore[method-assign]
    await peer.stop()
    await peer.start()  # routes bound again, now to the recording handler
    config = build({"region": "us", "listen": "127.0.0.1:0", "engines": [],
                    "mesh_key": "unit-test mesh key of 32 bytes!!", "prepare_in": "thread"})
    router = Router(config, backend=OneRemoteRegion(peer.url))  # type: ignore[arg-type]
    await router.start()
    try:
        async with aiohttp.ClientSession() as s, s.post(
            base(router) + "/v1/chat/completions", json=CHAT,
            headers={"Authorization": "Bearer client-secret", "x-request-id": "client-1",
                     "OpenAI-Organization": "org-1"},
        ) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.headers["x-client-request-id"] == "client-1"
        (hop,) = seen
        lowered = {k.lower(): v for k, v in hop.items()}
        assert "authorization" not in lowered and "openai-organization" not in lowered
        assert lowered["x-kvmesh-hop"] == "2" and len(lowered["x-kvmesh-sig"]) == 64
        assert lowered["x-request-id"].startswith("kvm-")
        assert lowered["x-kvmesh-target"] == "http://eu-engine:8000"
    finally:
        await router.stop()
        await peer.stop()


async def test_demand_and_plan_target_metrics(
    engines: list[FakeEngine], tmp_path: Path
) -> None:
    plan = {"day_s": 86400, "slot_s": 3600, "targets": {"us": {"m": list(range(24))}}}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    router = await start_router(engines, plan_file=str(path))
    try:
        await wait_for(lambda: router.ready_reason() is None)
        # Healthy replicas are counted per model once the engines' /v1/models has been read.
        await wait_for(lambda: all(
            r.models for r in router._records(router.clock()) if r.replica in router.local_engines
        ))
        body = {**CHAT, "max_tokens": 7}
        async with aiohttp.ClientSession() as s:
            for _ in range(2):
                async with s.post(base(router) + "/v1/chat/completions", json=body) as resp:
                    assert resp.status == 200
            async with s.get(base(router) + "/metrics") as resp:
                text = await resp.text()
        prompt = router.demand.totals[("m", "in")]
        assert prompt > 0
        assert (
            f'kvmesh_demand_tokens_total{{direction="in",model="m",region="us"}} {prompt}' in text
        )
        assert 'kvmesh_demand_tokens_total{direction="out",model="m",region="us"} 14.0' in text
        assert 'kvmesh_demand_tokens_per_second{direction="out",model="m",region="us"}' in text
        assert [x for x in text.splitlines() if x.startswith("kvmesh_healthy_replicas{")] == [
            'kvmesh_healthy_replicas{model="m",region="us"} 2.0'
        ]
        hour = int(time.time() % 86400 // 3600)
        line = next(x for x in text.splitlines() if x.startswith("kvmesh_plan_target_replicas{"))
        assert line == f'kvmesh_plan_target_replicas{{model="m",region="us"}} {float(hour)}' or (
            # the hour turned between the scrape and this line
            line.endswith(f" {float((hour - 1) % 24)}")
        )
    finally:
        await router.stop()


async def test_response_lengths_are_learned_from_the_engines_usage(router: Router) -> None:
    client = openai.AsyncOpenAI(base_url=base(router) + "/v1", api_key="unused")
    try:
        for _ in range(3):
            out = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}],
                extra_headers={"x-kvmesh-app": "greeter"})
            assert out.usage is not None and out.usage.completion_tokens == 1
    finally:
        await client.close()
    async with aiohttp.ClientSession() as s:
        async with s.get(base(router) + "/mesh/status") as resp:
            status = await resp.json()
        async with s.get(base(router) + "/metrics") as resp:
            text = await resp.text()
    lengths = status["router"]["response_lengths"]
    assert lengths["observed"] == 3 and lengths["scored"] == 3
    # The first guess is the prior (256 tokens, bucket 256-1023); the tag's count table then
    # pulls the next guesses into the true bucket.
    assert lengths["buckets"]["0-63"]["n"] == 3
    assert ("a", "m", "greeter") in router.dispatcher.lengths.tables
    assert 'kvmesh_router_length_scored{bucket="0-63"} 3.0' in text
    assert 'kvmesh_router_length_accuracy{bucket="0-63",model="predictor"}' in text
    assert 'kvmesh_router_length_accuracy{bucket="0-63",model="mean"}' in text
