"""An engine's answer written to the client from the engine connection's callback
(``mesh.proxy.Early``): the same bytes as the relay writes, only when nothing may still
change them, and the relay still finishes what is left."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from mesh import proxy
from mesh import router as router_module
from mesh.router import Router
from tests.unit.mesh.test_router_api import FakeEngine, start_router, wait_for

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}


class Recorded(proxy.Early):
    """``Early`` as the router uses it, each instance kept for the test to read."""

    made: list[Recorded] = []

    def __init__(self, request: object) -> None:
        super().__init__(request)  # type: ignore[arg-type]
        Recorded.made.append(self)


class Never(Recorded):
    """Never sends anything itself: the relay sends the whole answer (the path before)."""

    def __call__(self, conn: object) -> None:
        return None


class _HeadWithFirstChunk(web.StreamResponse):
    _send_headers_immediately = False


class OneWriteEngine(FakeEngine):
    """Sends a stream's head with its first chunk, in one write (as many servers do): then
    both arrive together and the head can go on at once."""

    async def chat(self, request: web.Request) -> web.StreamResponse:
        original = web.StreamResponse
        web.StreamResponse = _HeadWithFirstChunk  # type: ignore[misc]
        try:
            return await super().chat(request)
        finally:
            web.StreamResponse = original  # type: ignore[misc]


@pytest.fixture
async def engine() -> AsyncIterator[FakeEngine]:
    e = OneWriteEngine()
    await e.start()
    yield e
    await e.stop()


@pytest.fixture
async def router(engine: FakeEngine) -> AsyncIterator[Router]:
    r = await start_router([engine])
    yield r
    await r.stop()


async def exchange(router: Router, body: dict[str, object]) -> bytes:
    """Every byte the router sends back on one ``Connection: close`` request."""
    data = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                 b"Content-Type: application/json\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    async with asyncio.timeout(10):
        out = await reader.read()
    writer.close()
    await writer.wait_closed()
    return out


def dechunked(body: bytes) -> bytes:
    out = b""
    while True:
        line, _, body = body.partition(b"\r\n")
        size = int(line, 16)
        if size == 0:
            assert body == b"\r\n"
            return out
        out, body = out + body[:size], body[size + 2:]


def normalised(raw: bytes) -> bytes:
    """The answer with what differs between two requests by design blanked: the date, the
    router's request id and the predicted TTFT (a cost model's figure that moves); a
    chunked body's content without its framing (a chunk per read from the engine)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    if b"Transfer-Encoding: chunked" in head:
        raw = head + b"\r\n\r\n" + dechunked(body)
    raw = re.sub(rb"\r\nDate: [^\r]*", b"\r\nDate: -", raw)
    raw = re.sub(rb"\r\nx-request-id: [^\r]*", b"\r\nx-request-id: -", raw)
    raw = re.sub(rb"\r\nx-kvmesh-predicted-ttft: [^\r]*", b"\r\nx-kvmesh-predicted-ttft: -",
                 raw)
    return re.sub(rb"(x-kvmesh-route: kvmesh [a-z0-9]+=)[0-9.]+ms", rb"\1-ms", raw)


@pytest.mark.parametrize("stream", [False, True])
async def test_an_answer_sent_early_is_the_same_bytes_as_the_relays(
        engine: FakeEngine, router: Router, monkeypatch: pytest.MonkeyPatch,
        stream: bool) -> None:
    # (a stream that asks for usage itself: the router strips nothing from it)
    body = {**CHAT, "stream": stream, **({"stream_options": {"include_usage": True}}
                                         if stream else {})}
    Recorded.made.clear()
    monkeypatch.setattr(router_module, "Early", Never)
    before = await exchange(router, body)
    assert [e.resp for e in Recorded.made] == [None]  # all of it by the relay
    monkeypatch.setattr(router_module, "Early", Recorded)
    Recorded.made.clear()
    hold = engine.hold = asyncio.Event()  # a stream pauses after its first chunk
    exchanging = asyncio.create_task(exchange(router, body))
    await wait_for(lambda: bool(Recorded.made) and Recorded.made[0].resp is not None)
    (early,) = Recorded.made  # the head and the first bytes went out early
    assert early.ended is not stream  # a whole answer ends there; a stream goes on
    hold.set()
    after = await exchanging
    assert normalised(after) == normalised(before)
    assert after.startswith(b"HTTP/1.1 200 OK\r\n")
    if stream:
        assert b"t0" in after and b"t2" in after and after.endswith(b"0\r\n\r\n")
    else:
        assert json.loads(after.split(b"\r\n\r\n", 1)[1])["choices"][0]["message"][
            "content"] == "hello"
    # The accounting that follows the relay still ran: the answers were counted.
    router.deferred.run()
    text = router.metrics.render().decode()
    assert 'kvmesh_router_requests_total{code="200",route="/v1/chat/completions"} 2.0' in text
    assert 'kvmesh_tier_requests_total{slo="met",tier="standard"} 2.0' in text


async def test_a_5xx_is_not_sent_early_and_is_tried_elsewhere(
        engine: FakeEngine, router: Router, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(router_module, "Early", Recorded)
    Recorded.made.clear()
    engine.status = 503
    raw = await exchange(router, CHAT)
    assert raw.startswith(b"HTTP/1.1 502 ")  # every attempt failed before the first byte
    assert Recorded.made and all(e.resp is None for e in Recorded.made)
    engine.status = 200
    Recorded.made.clear()
    assert (await exchange(router, CHAT)).startswith(b"HTTP/1.1 200 ")
    assert Recorded.made[0].resp is not None


async def test_a_tap_that_rewrites_leaves_the_answer_to_the_relay(
        router: Router, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream whose client did not ask for usage: the router asks the engine for it and
    strips that chunk on the way (``UsageTap``), so nothing is sent before the relay."""
    monkeypatch.setattr(router_module, "Early", Recorded)
    Recorded.made.clear()
    raw = await exchange(router, {**CHAT, "stream": True})
    (early,) = Recorded.made
    if early.tap is not None and early.tap.rewrites:
        assert early.resp is None
    else:
        pytest.fail("this request's usage tap does not rewrite: the test needs one that does")
    assert b"t0" in raw and raw.endswith(b"0\r\n\r\n")


async def test_a_whole_answer_lets_the_connection_go_on_before_its_handler_ends(
        router: Router, monkeypatch: pytest.MonkeyPatch) -> None:
    """Answered whole: the ledger and the engine connection are free at once, the client's
    next request (here pipelined in the same write) is served on the same connections, and
    the handler's own end and the accounting follow."""
    monkeypatch.setattr(router_module, "Early", Recorded)
    Recorded.made.clear()
    data = json.dumps(CHAT).encode()
    one = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
           b"Content-Type: application/json\r\n"
           + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
    try:
        writer.write(one + one)  # two requests, pipelined
        bodies = []
        async with asyncio.timeout(10):
            for _ in range(2):
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200 ")
                length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
                bodies.append(json.loads(await reader.readexactly(length)))
        assert [b["choices"][0]["message"]["content"] for b in bodies] == ["hello", "hello"]
        assert len(Recorded.made) == 2 and all(e.response is not None for e in Recorded.made)
        assert router.dispatches.total() == 0  # the ledger was updated with each answer
        assert router.forwarder is not None and router.forwarder.pool.opened == 1
        writer.write(one)  # and the kept-alive connection serves the next one
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert router.forwarder.pool.opened == 1  # one engine connection for all three
    finally:
        writer.close()
        await writer.wait_closed()
    router.deferred.run()
    await wait_for(lambda: 'code="200",route="/v1/chat/completions"} 3.0'
                   in router.metrics.render().decode())
