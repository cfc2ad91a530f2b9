"""The listener's front end (``mesh.front``) on real loopback sockets: raw HTTP/1.1 edge cases
of the inference routes, and the hand-off of every other request to aiohttp on the same port
and connection."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from mesh.router import Router
from tests.unit.mesh.test_router_api import FakeEngine, start_router, wait_for

CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello there"}]})


@pytest.fixture
async def engines() -> AsyncIterator[list[FakeEngine]]:
    es = [FakeEngine()]
    for e in es:
        await e.start()
    yield es
    for e in es:
        await e.stop()


@pytest.fixture
async def router(engines: list[FakeEngine]) -> AsyncIterator[Router]:
    r = await start_router(engines, max_body_bytes=4096, body_timeout=0.5)
    yield r
    await r.stop()


class Client:
    """One raw connection; reads answers by their framing."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, router: Router) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
        return cls(reader, writer)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def answer(self) -> tuple[int, dict[str, str], bytes]:
        """Status, headers (lower-case names) and the de-chunked body of the next answer."""
        async with asyncio.timeout(10):
            line = await self.reader.readuntil(b"\r\n")
            status = int(line.split()[1])
            headers: dict[str, str] = {}
            while (line := await self.reader.readuntil(b"\r\n")) != b"\r\n":
                name, _, value = line.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            if status == 100:
                return await self.answer()
            if "content-length" in headers:
                return status, headers, await self.reader.readexactly(
                    int(headers["content-length"]))
            if headers.get("transfer-encoding") == "chunked":
                body = b""
                while True:
                    size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
                    if size == 0:
                        await self.reader.readuntil(b"\r\n")
                        return status, headers, body
                    body += await self.reader.readexactly(size)
                    await self.reader.readexactly(2)
            return status, headers, await self.reader.read()

    async def closed_by_peer(self) -> bool:
        async with asyncio.timeout(10):
            return await self.reader.read() == b""

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def post(body: str | bytes, path: str = "/v1/chat/completions", extra: str = "") -> bytes:
    data = body.encode() if isinstance(body, str) else body
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n{extra}\r\n").encode() + data


def chunked(body: str, size: int = 7) -> bytes:
    data = body.encode()
    parts = [f"{len(data[i:i + size]):x}\r\n".encode() + data[i:i + size] + b"\r\n"
             for i in range(0, len(data), size)]
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(parts) + b"0\r\n\r\n")


async def test_inference_is_served_by_the_front_end_with_routing_headers(
        router: Router) -> None:
    c = await Client.open(router)
    c.send(post(CHAT))
    status, headers, body = await c.answer()
    assert status == 200
    assert json.loads(body)["choices"][0]["message"]["content"] == "hello"
    assert headers["x-kvmesh-region"] == "us" and headers["x-kvmesh-route"].startswith("kvmesh")
    assert headers["x-request-id"].startswith("kvm-")
    assert "date" in headers and headers["server"].startswith("Python/")
    assert router.edge.front is not None
    assert router.edge.front.served == 1 and router.edge.front.handed_off == 0
    await c.close()


async def test_pipelined_requests_are_answered_in_order(router: Router) -> None:
    c = await Client.open(router)
    bad = json.dumps({"model": "m", "messages": []})
    c.send(post(CHAT) + post(bad) + chunked(CHAT) + post(CHAT))  # one write
    statuses = [(await c.answer())[0] for _ in range(4)]
    assert statuses == [200, 400, 200, 200]
    assert router.edge.front is not None
    assert router.edge.front.served == 4 and router.edge.front.handed_off == 0
    await c.close()


async def test_a_chunked_body_split_across_writes(router: Router) -> None:
    c = await Client.open(router)
    data = chunked(CHAT, size=5)
    for i in range(0, len(data), 9):  # the framing arrives in pieces
        c.send(data[i:i + 9])
        await c.writer.drain()
        await asyncio.sleep(0)
    status, _, body = await c.answer()
    assert status == 200 and b"hello" in body
    c.send(post(CHAT))  # the connection is still good
    assert (await c.answer())[0] == 200
    await c.close()


async def test_a_malformed_chunk_is_a_400_and_the_connection_closes(router: Router) -> None:
    c = await Client.open(router)
    c.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
           b"\r\nzz\r\n{}\r\n0\r\n\r\n")
    status, headers, body = await c.answer()
    assert status == 400 and headers.get("connection") == "close"
    assert json.loads(body)["error"]["code"] == "bad_chunked_body"
    assert await c.closed_by_peer()


async def test_oversize_bodies_are_413_and_counted(router: Router) -> None:
    big = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 5000}]})
    c = await Client.open(router)
    c.send(post(big))  # declared over the limit: refused before reading
    status, headers, body = await c.answer()
    assert status == 413 and headers.get("connection") == "close"
    assert json.loads(body)["error"]["code"] == "body_too_large"
    assert await c.closed_by_peer()
    c = await Client.open(router)
    c.send(chunked(big, size=1000))  # chunked past the limit: refused while reading
    status, _, body = await c.answer()
    assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"
    assert await c.closed_by_peer()
    metrics = router.metrics.render().decode()
    assert 'field="body_too_large"' in metrics


async def test_expect_100_continue_and_compressed_bodies(router: Router) -> None:
    c = await Client.open(router)
    data = CHAT.encode()
    c.send(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n"
           "Expect: 100-continue\r\n\r\n".encode())
    async with asyncio.timeout(10):
        assert await c.reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    c.send(data)
    assert (await c.answer())[0] == 200
    c.send(post(CHAT, extra="Content-Encoding: gzip\r\n"))
    status, _, body = await c.answer()
    assert status == 415 and json.loads(body)["error"]["code"] == "unsupported_content_encoding"
    assert await c.closed_by_peer()


async def test_a_body_that_never_completes_is_408(router: Router) -> None:
    c = await Client.open(router)
    c.send(post(CHAT)[:-5])  # the last bytes never come (body_timeout 0.5 s)
    status, _, body = await c.answer()
    assert status == 408 and json.loads(body)["error"]["code"] == "body_timeout"
    assert await c.closed_by_peer()


async def test_other_paths_go_to_aiohttp_on_the_same_connection_and_port(
        router: Router) -> None:
    c = await Client.open(router)
    c.send(post(CHAT))
    assert (await c.answer())[0] == 200
    c.send(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # after a served one: handed off
    status, _, body = await c.answer()
    assert status == 200 and json.loads(body)["status"] == "ok"
    c.send(post(CHAT))  # aiohttp serves the rest of this connection, same answers
    status, headers, _ = await c.answer()
    assert status == 200 and headers["x-kvmesh-region"] == "us"
    c.send(b"GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = await c.answer()
    assert status == 405 and "allowed" in json.loads(body)["error"]["message"]
    await c.close()
    assert router.edge.front is not None and router.edge.front.handed_off == 1
    c = await Client.open(router)  # a connection that starts elsewhere: aiohttp's from the start
    c.send(b"GET /v1/models?scope=local HTTP/1.1\r\nHost: x\r\n\r\n" + post(CHAT))
    assert (await c.answer())[0] == 200
    assert (await c.answer())[0] == 200
    await c.close()


async def test_malformed_request_lines_get_aiohttps_400(router: Router) -> None:
    for raw in (b"POST /v1/chat/completions HTTP/9.9\r\nHost: x\r\n\r\n",
                b"POST /v1/chat/completions\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
                b"GARBAGE\r\n\r\n",
                b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 1\r\n"
                b"Content-Length: 2\r\n\r\n{}",
                post(CHAT, extra="".join(f"x-h{i}: v\r\n" for i in range(200)))):
        c = await Client.open(router)
        c.send(raw)
        status, _, _ = await c.answer()
        assert status == 400, raw
        await c.close()
    metrics = router.metrics.render().decode()
    assert "kvmesh_http_malformed_requests_total{kind=" in metrics


async def test_client_disconnect_mid_stream_cancels_the_upstream(
        engines: list[FakeEngine], router: Router) -> None:
    hold = asyncio.Event()
    engines[0].hold = hold
    c = await Client.open(router)
    c.send(post(json.dumps({"model": "m", "stream": True,
                            "messages": [{"role": "user", "content": "hi"}]})))
    async with asyncio.timeout(10):
        head = await c.reader.readuntil(b"\r\n\r\n")
        assert b"Transfer-Encoding: chunked" in head
        first = await c.reader.readuntil(b"\n\n")
    assert b"t0" in first
    c.writer.transport.abort()  # gone mid-stream
    await wait_for(engines[0].cancelled.is_set)
    await wait_for(lambda: router.dispatches.counts().get(engines[0].url, 0) == 0)
    hold.set()


async def test_http_1_0_closes_after_the_answer(router: Router) -> None:
    c = await Client.open(router)
    data = CHAT.encode()
    c.send(f"POST /v1/chat/completions HTTP/1.0\r\nContent-Length: {len(data)}\r\n\r\n"
           .encode() + data)
    status, _, body = await c.answer()
    assert status == 200 and b"hello" in body
    assert await c.closed_by_peer()


class _Transport:
    """A transport whose peer reads nothing: what was written, and whether it closed."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closing = False

    def write(self, data: bytes) -> None:
        self.data += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True


async def test_writes_wait_while_the_client_is_not_reading() -> None:
    from aiohttp import web

    from mesh.front import FAST_HANDLERS, FrontEnd, FrontProtocol
    from mesh.http_guard import HttpLimits

    app = web.Application()
    app[FAST_HANDLERS] = {}
    proto = FrontProtocol(FrontEnd(app, asyncio.Protocol, HttpLimits()))
    t = _Transport()
    proto.connection_made(t)  # type: ignore[arg-type]
    proto.pause_writing()  # the client's socket buffer is full
    send = asyncio.ensure_future(proto.send(b"chunk"))
    for _ in range(10):  # loop turns: nothing but resume_writing can release it
        await asyncio.sleep(0)
    assert not send.done() and bytes(t.data) == b"chunk"  # written, then waiting
    proto.resume_writing()
    await asyncio.wait_for(send, 5)
    proto.pause_writing()
    send = asyncio.ensure_future(proto.send(b"more"))
    await asyncio.sleep(0)
    proto.connection_lost(None)  # the client went away while we waited
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(send, 5)


class _HeadOnly:
    """What ``FrontStream`` needs of its connection to build a head (no socket)."""

    transport = None

    def head_bytes(self, resp: object, req: object, length: int | None = None) -> bytes:
        from mesh.front import FrontProtocol

        return FrontProtocol.head_bytes(self, resp, req, length)  # type: ignore[arg-type]


@pytest.mark.parametrize("version", [(1, 1), (1, 0)])
@pytest.mark.parametrize("length", [432, None])
@pytest.mark.parametrize("headers", [
    {"Content-Type": "application/json", "x-kvmesh-route": "r", "x-request-id": "a"},
    {"content-type": "text/event-stream", "X-Request-Id": "up", "x-request-id": "ours"},
    {"x-kvmesh-replica": "http://e:1"},
])
def test_a_relayed_head_from_plain_headers_is_the_same_bytes(
        headers: dict[str, str], length: int | None, version: tuple[int, int]) -> None:
    """``FrontStream.begin(headers, length)`` (the proxy's relay) writes what the response
    object's own headers and length would have made aiohttp write."""
    from multidict import CIMultiDict, CIMultiDictProxy

    from mesh.front import FrontRequest, FrontStream

    conn = _HeadOnly()
    req = FrontRequest(conn, "POST", "/v1/chat/completions", "",  # type: ignore[arg-type]
                       CIMultiDictProxy(CIMultiDict()), None, version, True)  # type: ignore[arg-type]
    old = FrontStream(req, status=200, headers=headers)
    if length is not None:
        old.content_length = length
    old.begin()
    new = FrontStream(req, status=200)
    new.begin(headers, length)
    assert new._head == old._head and new._head
    assert (new._chunk, new.keep) == (old._chunk, old.keep)


@pytest.mark.parametrize("version", [(1, 1), (1, 0)])
@pytest.mark.parametrize("length", [310, None])
@pytest.mark.parametrize(("upstream", "extra"), [
    ([("date", "x"), ("server", "uvicorn"), ("content-length", "310"),
      ("content-type", "application/json"), ("x-request-id", "up")],
     {"x-kvmesh-replica": "http://e:1", "x-kvmesh-route": "r", "x-request-id": "ours"}),
    ([("Content-Type", "text/event-stream"), ("X-A", "1"), ("x-a", "2"), ("X-A", "3"),
      ("Connection", "keep-alive"), ("Transfer-Encoding", "chunked")],
     {"X-A": "ours", "x-kvmesh-tier": "standard"}),
    ([("x-b", "1")], {"Content-Type": "application/json", "Date": "never copied"}),
    ([], {}),
])
def test_a_relay_head_in_one_pass_is_the_same_bytes_as_merging_first(
        upstream: list[tuple[str, str]], extra: dict[str, str], length: int | None,
        version: tuple[int, int]) -> None:
    """``FrontStream.begin_relay`` writes what ``begin`` writes for the merged headers
    (``{k: v for k, v in upstream if k.lower() not in skip}`` updated with ``extra``):
    duplicates, case variants, an extra over an upstream header, own headers left out."""
    from multidict import CIMultiDict, CIMultiDictProxy

    from mesh.front import FrontRequest, FrontStream
    from mesh.proxy import _SKIP

    conn = _HeadOnly()
    req = FrontRequest(conn, "POST", "/v1/chat/completions", "",  # type: ignore[arg-type]
                       CIMultiDictProxy(CIMultiDict()), None, version, True)  # type: ignore[arg-type]
    merged = {k: v for k, v in upstream if k.lower() not in _SKIP}
    merged.update(extra)
    old = FrontStream(req, status=200)
    old.begin(merged, length)
    new = FrontStream(req, status=200)
    new.begin_relay(upstream, _SKIP, extra, length)
    assert new._head == old._head and new._head
    assert (new._chunk, new.keep) == (old._chunk, old.keep)


@pytest.mark.parametrize("bad", [("x-a", "1\r\nx-b: 2"), ("x-a", "1\n"), ("x\ra", "1")])
def test_a_relay_head_refuses_a_line_break_as_before(bad: tuple[str, str]) -> None:
    from multidict import CIMultiDict, CIMultiDictProxy

    from mesh.front import FrontRequest, FrontStream

    req = FrontRequest(_HeadOnly(), "POST", "/v1/completions", "",  # type: ignore[arg-type]
                       CIMultiDictProxy(CIMultiDict()), None, (1, 1), True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="line break"):
        FrontStream(req, status=200).begin(dict([bad]), 3)
    with pytest.raises(ValueError, match="line break"):
        FrontStream(req, status=200).begin_relay([bad], frozenset(), {}, 3)
    with pytest.raises(ValueError, match="line break"):
        FrontStream(req, status=200).begin_relay([], frozenset(), dict([bad]), 3)
