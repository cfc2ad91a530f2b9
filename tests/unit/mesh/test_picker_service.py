"""The picker's gRPC servicer and protobuf translation against a started Router.

Engines are tiny in-process HTTP servers (health and load only: the picker never sends them
a request); the ext_proc messages are real protobuf objects fed to ``Process``.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2

from mesh.config import build
from mesh.picker import DEST_HEADER, SERVED_KEY, SUBSET_KEY
from mesh.picker_proto import ATTRIBUTE_KEY
from mesh.picker_server import PickerService
from mesh.policies import Decision, Request, View
from mesh.router import Router

CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello " * 40}],
                   "max_tokens": 4}).encode()


class Engine:
    def __init__(self) -> None:
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.add_routes([web.get("/health", self.ok), web.get("/metrics", self.metrics),
                        web.get("/v1/models", self.models)])
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]

    async def ok(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text='vllm:num_requests_waiting{model_name="m"} 0\n'
                                 'vllm:num_requests_running{model_name="m"} 0\n'
                                 'vllm:kv_cache_usage_perc{model_name="m"} 0.1\n')

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})


class AlwaysWait:
    """A policy that holds every request (the engines are "saturated")."""

    name = "always_wait"

    def decide(self, req: Request, view: View, now: float, rng: random.Random) -> Decision:
        return Decision(None, None, "saturated", self.name, wait=True, retry_after=0.01)


async def start_router(n: int, policy: Any = None, picker: dict[str, Any] | None = None,
                       health_interval: float = 30.0) -> tuple[Router, list[Engine]]:
    """Health is checked once at start, then every ``health_interval`` (long: only the
    picker's feedback changes it during a test)."""
    engines = [Engine() for _ in range(n)]
    for e in engines:
        await e.start()
    cfg = build({"region": "us", "listen": "127.0.0.1:0", "health_interval": health_interval,
                 "engines": [e.url for e in engines], "endpoint_picker": picker or {}})
    router = Router(cfg, policy=policy)
    await router.start()
    for _ in range(200):
        if router.ready_reason() is None and all(
                router.engines and router.engines.healthy(e.url) for e in engines):
            break
        await asyncio.sleep(0.01)
    return router, engines


@pytest.fixture
async def rig() -> AsyncIterator[tuple[Router, list[Engine], PickerService]]:
    router, engines = await start_router(2)
    assert router.config.endpoint_picker is not None
    yield router, engines, PickerService(router, router.config.endpoint_picker)
    await router.stop()
    for e in engines:
        assert e.runner is not None
        await e.runner.cleanup()


def headers_msg(phase: str, headers: dict[str, str], eos: bool = False,
                metadata: dict[str, dict[str, Any]] | None = None,
                attributes: dict[str, Any] | None = None) -> Any:
    hm = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode())
                                     for k, v in headers.items()])
    req = ep.ProcessingRequest(**{f"{phase}_headers": ep.HttpHeaders(headers=hm,
                                                                      end_of_stream=eos)})
    for ns, values in (metadata or {}).items():
        st = struct_pb2.Struct()
        st.update(values)
        req.metadata_context.filter_metadata[ns].CopyFrom(st)
    if attributes:
        st = struct_pb2.Struct()
        st.update(attributes)
        req.attributes[ATTRIBUTE_KEY].CopyFrom(st)
    return req


def body_msg(phase: str, data: bytes, eos: bool) -> Any:
    return ep.ProcessingRequest(**{f"{phase}_body": ep.HttpBody(body=data, end_of_stream=eos)})


class Feed:
    """Drives ``Process`` like Envoy: send a message, read the replies it causes."""

    def __init__(self, service: PickerService) -> None:
        self.inbox: asyncio.Queue[Any] = asyncio.Queue()
        self.gen = service.Process(self._requests(), None)

    async def _requests(self) -> AsyncIterator[Any]:
        while True:
            msg = await self.inbox.get()
            if msg is None:
                return
            yield msg

    async def send(self, msg: Any, replies: int) -> list[Any]:
        self.inbox.put_nowait(msg)
        return [await asyncio.wait_for(self.gen.__anext__(), 5) for _ in range(replies)]

    async def close(self) -> None:
        self.inbox.put_nowait(None)
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(self.gen.__anext__(), 5)


def picked(resp: Any) -> tuple[str, str]:
    muts = resp.request_headers.response.header_mutation.set_headers
    header = next(h.header.raw_value.decode() for h in muts if h.header.key == DEST_HEADER)
    meta = resp.dynamic_metadata.fields["envoy.lb"].struct_value.fields[DEST_HEADER]
    return header, meta.string_value


async def test_a_full_exchange_picks_streams_and_releases(
    rig: tuple[Router, list[Engine], PickerService],
) -> None:
    router, engines, service = rig
    f = Feed(service)
    assert await f.send(headers_msg("request", {":path": "/v1/chat/completions",
                                                "x-request-id": "r1"}), 0) == []
    head, body = await f.send(body_msg("request", CHAT, True), 2)
    header, meta = picked(head)
    assert header == meta and header in {e.url.split("//")[1] for e in engines}
    assert head.request_headers.response.clear_route_cache
    assert body.request_body.response.body_mutation.streamed_response.body == CHAT
    assert body.request_body.response.body_mutation.streamed_response.end_of_stream
    assert sum(router.dispatches.counts().values()) == 1
    [resp_head] = await f.send(headers_msg("response", {":status": "200"},
                                           attributes={"upstream.address": header}), 1)
    assert resp_head.HasField("response_headers")
    [chunk] = await f.send(body_msg("response", b"data: x\n\n", False), 1)
    assert chunk.response_body.response.body_mutation.streamed_response.body == b"data: x\n\n"
    assert sum(router.dispatches.counts().values()) == 1  # until the end of the stream
    await f.send(body_msg("response", b"", True), 1)
    assert router.dispatches.counts() == {}
    await f.close()
    assert service.status()["picks"] == {"local": 1}
    assert 'kvmesh_router_requests_total{code="200",route="/v1/chat/completions"} 1.0' \
        in router.metrics.render().decode()
    assert router.status_dict()["router"]["estimated_cache_hit_ratio"] == 0.0


async def test_served_failure_marks_the_engine_down_and_a_break_releases(
    rig: tuple[Router, list[Engine], PickerService],
) -> None:
    router, _engines, service = rig
    f = Feed(service)
    await f.send(headers_msg("request", {":path": "/v1/chat/completions"}), 0)
    head, _ = await f.send(body_msg("request", CHAT, True), 2)
    header, _ = picked(head)
    failed = f"http://{header}"
    await f.send(headers_msg("response", {":status": "503"},
                             metadata={"envoy.lb": {SERVED_KEY: header}}), 1)
    assert router.engines is not None and not router.engines.healthy(failed)
    await f.close()  # the proxy ends the stream without the response's end
    assert router.dispatches.counts() == {}
    # The next pick avoids the failed engine.
    f = Feed(service)
    await f.send(headers_msg("request", {":path": "/v1/chat/completions"}), 0)
    head, _ = await f.send(body_msg("request", CHAT, True), 2)
    assert f"http://{picked(head)[0]}" != failed
    await f.close()


async def test_subset_hint_limits_the_pick(
    rig: tuple[Router, list[Engine], PickerService],
) -> None:
    _router, engines, service = rig
    only = engines[1].url.split("//")[1]
    for _ in range(3):
        f = Feed(service)
        await f.send(headers_msg("request", {":path": "/v1/chat/completions"},
                                 metadata={"envoy.lb.subset_hint": {SUBSET_KEY: [only]}}), 0)
        head, _ = await f.send(body_msg("request", CHAT, True), 2)
        assert picked(head) == (only, only)
        await f.close()
    f = Feed(service)
    await f.send(headers_msg("request", {":path": "/v1/chat/completions"},
                             metadata={"envoy.lb.subset_hint": {SUBSET_KEY: []}}), 0)
    [resp] = await f.send(body_msg("request", CHAT, True), 1)
    assert resp.immediate_response.status.code == 503
    await f.close()


async def test_fallbacks_list_next_best_local_engines() -> None:
    router, engines = await start_router(2, picker={"fallbacks": 1})
    try:
        assert router.config.endpoint_picker is not None
        service = PickerService(router, router.config.endpoint_picker)
        f = Feed(service)
        await f.send(headers_msg("request", {":path": "/v1/chat/completions"}), 0)
        head, _ = await f.send(body_msg("request", CHAT, True), 2)
        header, meta = picked(head)
        assert header == meta
        assert sorted(header.split(",")) == sorted(e.url.split("//")[1] for e in engines)
        await f.close()
    finally:
        await router.stop()
        for e in engines:
            assert e.runner is not None
            await e.runner.cleanup()


async def test_sheddable_requests_get_429_while_others_wait() -> None:
    router, engines = await start_router(1, policy=AlwaysWait())
    try:
        assert router.config.endpoint_picker is not None
        service = PickerService(router, router.config.endpoint_picker)
        f = Feed(service)
        await f.send(headers_msg("request", {":path": "/v1/chat/completions",
                                             "x-kvmesh-priority": "-1"}), 0)
        [resp] = await f.send(body_msg("request", CHAT, True), 1)
        assert resp.immediate_response.status.code == 429
        assert b"shed" in resp.immediate_response.body
        await f.close()
        # A normal request waits in the router's queue instead of being refused.
        g = Feed(service)
        await g.send(headers_msg("request", {":path": "/v1/chat/completions"}), 0)
        g.inbox.put_nowait(body_msg("request", CHAT, True))
        waiting = asyncio.ensure_future(g.gen.__anext__())
        for _ in range(100):
            if router.status_dict()["router"]["queue"] == 1:
                break
            await asyncio.sleep(0.01)
        assert router.status_dict()["router"]["queue"] == 1 and not waiting.done()
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        metrics = router.metrics.render().decode()
        assert 'kvmesh_picker_picks_total{result="429"} 1.0' in metrics
        assert 'kvmesh_router_decisions_total{outcome="shed",policy="always_wait"} 1.0' \
            in metrics
    finally:
        await router.stop()
        for e in engines:
            assert e.runner is not None
            await e.runner.cleanup()


async def test_bad_body_is_a_400_counted_like_the_http_api(
    rig: tuple[Router, list[Engine], PickerService],
) -> None:
    router, _, service = rig
    f = Feed(service)
    await f.send(headers_msg("request", {":path": "/v1/chat/completions"}), 0)
    [resp] = await f.send(body_msg("request", b'{"model": "m"}', True), 1)
    assert resp.immediate_response.status.code == 400
    err = json.loads(resp.immediate_response.body)["error"]
    assert err["param"] is None and "messages" in err["message"]
    await f.close()
    assert 'kvmesh_router_rejected_total{field="messages",route="/v1/chat/completions"} 1.0' \
        in router.metrics.render().decode()


async def test_engine_host_names_are_resolved_to_addresses() -> None:
    engine = Engine()
    await engine.start()
    port = engine.url.rsplit(":", 1)[1]
    cfg = build({"region": "us", "listen": "127.0.0.1:0",
                 "engines": [f"http://localhost:{port}"], "endpoint_picker": {}})
    router = Router(cfg)
    try:
        assert cfg.endpoint_picker is not None
        service = PickerService(router, cfg.endpoint_picker)
        assert service.endpoint(f"http://localhost:{port}") == f"localhost:{port}"
        await service.resolve()
        assert service.endpoint(f"http://localhost:{port}") in {f"127.0.0.1:{port}",
                                                                 f"[::1]:{port}"}
        assert set(service.by_endpoint.values()) == {f"http://localhost:{port}"}
        # Another router's advertised name is looked up too; an address stays as it is.
        assert await service.remote_endpoint("http://localhost:8000") in {"127.0.0.1:8000",
                                                                          "[::1]:8000"}
        assert await service.remote_endpoint("http://10.1.2.3:8000") == "10.1.2.3:8000"
    finally:
        await router.tokenizer.aclose()
        assert engine.runner is not None
        await engine.runner.cleanup()


async def test_a_busy_picker_port_is_a_clear_error() -> None:
    import socket

    from mesh.picker_server import PickerServer

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    router, engines = await start_router(1, picker={"listen": f"127.0.0.1:{port}"})
    try:
        assert router.config.endpoint_picker is not None
        server = PickerServer(router, router.config.endpoint_picker)
        with pytest.raises(OSError, match="endpoint_picker: cannot listen"):
            await server.start()
        await server.stop()
    finally:
        busy.close()
        await router.stop()
        for e in engines:
            assert e.runner is not None
            await e.runner.cleanup()
