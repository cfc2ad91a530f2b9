"""The pooled upstream client against small servers on real loopback sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from mesh import upstream
from sim.procs import free_ports

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await reader.readexactly(length)


class Server:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[tuple[bytes, bytes]] = []
        self.closed = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.url = ""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed.set()
            writer.close()

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/v1/completions"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


@pytest.fixture
async def pool() -> AsyncIterator[upstream.Pool]:
    p = upstream.Pool(connect_timeout=2.0)
    yield p
    p.close()


def keep_alive(server_ref: list[Server], body: bytes = b'{"ok":true}') -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            server_ref[0].requests.append(await read_request(reader))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"X-Kvmesh-Replica: e1\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
            await writer.drain()

    return handle


async def body_of(resp: upstream.Response) -> bytes:
    out = b""
    while chunk := await resp.readany():
        out += chunk
    return out


async def test_requests_reuse_one_kept_alive_connection(pool: upstream.Pool) -> None:
    ref: list[Server] = []
    async with Server(keep_alive(ref)) as srv:
        ref.append(srv)
        for i in range(3):
            resp = await pool.post(srv.url, b'{"n":%d}' % i, {"x-request-id": f"r{i}"}, 5.0)
            assert resp.status == 200
            assert resp.headers["x-kvmesh-replica"] == "e1"  # case-insensitive
            assert await body_of(resp) == b'{"ok":true}'
            assert resp.at_eof()
            resp.close()
        assert srv.connections == 1 and pool.opened == 1
        head, body = srv.requests[2]
        assert head.startswith(b"POST /v1/completions HTTP/1.1\r\n")
        assert b"\r\nx-request-id: r2\r\n" in head and b"\r\nContent-Length: 7\r\n" in head
        assert body == b'{"n":2}'


async def test_chunked_answer_is_dechunked_and_streamed(pool: upstream.Pool) -> None:
    release = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n6\r\ndata: \r\n")
        await writer.drain()
        await release.wait()
        writer.write(b"3\r\nabc\r\n0\r\n\r\n")
        await writer.drain()
        await reader.read()  # keep the connection until the client is done

    async with Server(handle) as srv:
        resp = await pool.post(srv.url, b"{}", {}, 5.0)
        assert await resp.readany() == b"data: "  # before the rest exists
        release.set()
        assert await body_of(resp) == b"abc"
        resp.close()
        assert pool.idle() == 1


async def test_answer_delimited_by_close_is_complete_and_not_pooled(
        pool: upstream.Pool) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        await writer.drain()

    async with Server(handle) as srv:
        resp = await pool.post(srv.url, b"{}", {}, 5.0)
        assert await body_of(resp) == b"all of it"
        resp.close()
        assert pool.idle() == 0


async def test_idle_connection_closed_by_the_server_is_replaced(pool: upstream.Pool) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        # then close while the client holds the connection idle (a keep-alive timeout)

    async with Server(handle) as srv:
        resp = await pool.post(srv.url, b"{}", {}, 5.0)
        assert await body_of(resp) == b"ok"
        resp.close()
        await asyncio.wait_for(srv.closed.wait(), 5.0)
        resp = await pool.post(srv.url, b"{}", {}, 5.0)
        assert await body_of(resp) == b"ok"
        resp.close()
        assert srv.connections == 2


async def test_refused_connection_is_a_connect_error(pool: upstream.Pool) -> None:
    (port,) = free_ports(1)
    with pytest.raises(upstream.ConnectError):
        await pool.post(f"http://127.0.0.1:{port}/v1/completions", b"{}", {}, 5.0)


async def test_no_head_in_time_is_a_timeout_and_the_connection_is_dropped(
        pool: upstream.Pool) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.read()  # never answers; returns when the client closes

    async with Server(handle) as srv:
        with pytest.raises(TimeoutError):
            await pool.post(srv.url, b"{}", {}, 0.2)
        await asyncio.wait_for(srv.closed.wait(), 5.0)  # the server saw the disconnect
        assert pool.idle() == 0


async def test_closing_an_unfinished_answer_disconnects(pool: upstream.Pool) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart")
        await writer.drain()
        await reader.read()

    async with Server(handle) as srv:
        resp = await pool.post(srv.url, b"{}", {}, 5.0)
        assert await resp.readany() == b"part"
        resp.close()
        await asyncio.wait_for(srv.closed.wait(), 5.0)
        assert pool.idle() == 0


async def test_cut_answer_raises_upstream_broken(pool: upstream.Pool) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart")
        await writer.drain()

    async with Server(handle) as srv:
        resp = await pool.post(srv.url, b"{}", {}, 5.0)
        assert await resp.readany() == b"part"
        with pytest.raises(upstream.UpstreamBroken):
            await resp.readany()
        resp.close()


async def test_garbage_answer_is_upstream_broken(pool: upstream.Pool) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with Server(handle) as srv:
        with pytest.raises(upstream.UpstreamBroken):
            await pool.post(srv.url, b"{}", {}, 5.0)


async def test_header_with_a_line_break_is_refused(pool: upstream.Pool) -> None:
    with pytest.raises(ValueError, match="line break"):
        await pool.post("http://127.0.0.1:9/x", b"{}", {"x-a": "b\r\nx-evil: 1"}, 5.0)


async def test_total_deadline_bounds_a_slow_body(pool: upstream.Pool) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart")
        await writer.drain()
        await reader.read()

    async with Server(handle) as srv:
        resp = await pool.post(srv.url, b"{}", {}, 5.0)
        assert await resp.readany() == b"part"
        resp.deadline(0.2)
        with pytest.raises(TimeoutError):
            await resp.readany()
        resp.close()


async def test_endless_answer_head_is_cut_at_the_limit(pool: upstream.Pool) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n")
        for i in range(upstream.MAX_HEAD // 1000 + 10):
            writer.write(b"x-junk-%d: %s\r\n" % (i, b"j" * 1000))
            await writer.drain()
        await reader.read()

    async with Server(handle) as srv:
        with pytest.raises(upstream.UpstreamBroken, match="head larger"):
            await pool.post(srv.url, b"{}", {}, 5.0)
        await asyncio.wait_for(srv.closed.wait(), 5.0)


async def test_request_on_a_connection_dying_unanswered_is_sent_once_more(
        pool: upstream.Pool) -> None:
    """A kept-alive connection the server drops as the request arrives (its idle timeout
    racing the request) gets the request again on a new connection."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await read_request(reader)  # the next request on this connection: dropped

    async with Server(handle) as srv:
        resp = await pool.post(srv.url, b"{}", {}, 5.0)
        assert await body_of(resp) == b"ok"
        resp.close()
        resp = await pool.post(srv.url, b"{}", {}, 5.0)
        assert await body_of(resp) == b"ok"
        resp.close()
        assert srv.connections == 2 and pool.opened == 2


async def test_read_now_gives_what_is_in_and_none_while_the_rest_is_due(
        pool: upstream.Pool) -> None:
    release = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-A: 1\r\nx-a: 2\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await writer.drain()
        await release.wait()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with Server(handle) as srv:
        sent: list[int] = []
        resp = await pool.post(srv.url, b"{}", {}, 5.0, sent=lambda: sent.append(1))
        assert sent == [1]  # called once the request was written
        assert resp.raw_headers == [("X-A", "1"), ("x-a", "2"),
                                    ("Transfer-Encoding", "chunked")]
        for _ in range(100):  # the first chunk may trail the head by a read
            if (first := resp.readany_now()) is not None:
                break
            await asyncio.sleep(0.01)
        assert first == b"abc"
        assert resp.readany_now() is None  # nothing in, the answer not over: await then
        release.set()
        assert await resp.readany() == b""
        assert resp.readany_now() == b""  # over: b"" again, as readany
        resp.close()
        assert pool.idle() == 1


async def test_read_now_raises_what_read_would(pool: upstream.Pool) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await writer.drain()  # then the connection closes: cut short

    async with Server(handle) as srv:
        resp = await pool.post(srv.url, b"{}", {}, 5.0)
        assert await resp.readany() == b"abc"
        with pytest.raises(upstream.UpstreamBroken):
            await resp.readany()
        with pytest.raises(upstream.UpstreamBroken):
            resp.readany_now()
        resp.close()
