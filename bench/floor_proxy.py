"""The least a Python proxy does per request: a floor for ``kvmesh bench overhead``.

One uvloop process: a request's head and body are framed with ``httptools`` and written as
they came to one kept-alive upstream connection; the answer's bytes go back to the client as
they arrive (chunked or not), its end found by ``httptools``. No routing, no JSON, no
headers added, no metrics: what Python, the event loop and the kernel cost a proxy on this
host. The gap between it and ``kvmesh router`` is the routing path's own cost; the gap
between it and a compiled router is what the language costs.

Run: ``python -m bench.floor_proxy --port P --upstream http://host:port``. It serves only
what the benchmark sends (keep-alive HTTP/1.1 POSTs and ``GET /health``).
"""

from __future__ import annotations

import argparse
import asyncio
from collections import deque
from urllib.parse import urlsplit

import httptools
import uvloop


class _Framer:
    """httptools callbacks: where one message ends in the bytes fed so far."""

    def __init__(self) -> None:
        self.complete = False

    def on_message_complete(self) -> None:
        self.complete = True


class Upstream(asyncio.Protocol):
    """One kept-alive connection to the engine; relays one answer at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.client: asyncio.Transport | None = None
        self.done: asyncio.Future[None] | None = None
        self._framer = _Framer()
        self._parser = httptools.HttpResponseParser(self._framer)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.client is not None:
            self.client.write(data)
        self._parser.feed_data(data)
        if self._framer.complete and self.done is not None and not self.done.done():
            self._framer.complete = False
            self._parser = httptools.HttpResponseParser(self._framer)
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionResetError("upstream closed"))


class Front(asyncio.Protocol):
    """A client connection: requests are relayed one after the other, in order."""

    def __init__(self, proxy: FloorProxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.queue: deque[bytes] = deque()
        self.buf = bytearray()
        self.framer = _Framer()
        self.parser = httptools.HttpRequestParser(self.framer)
        self.busy = False
        self.task: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.parser.feed_data(data)
        if self.framer.complete:
            self.framer.complete = False
            self.queue.append(bytes(self.buf))
            self.buf.clear()
            if not self.busy:
                self.busy = True
                self.task = asyncio.ensure_future(self._serve())

    async def _serve(self) -> None:
        assert self.transport is not None
        while self.queue:
            request = self.queue.popleft()
            if request.startswith(b"GET /health"):
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                continue
            up = await self.proxy.take()
            assert up.transport is not None
            up.client = self.transport
            up.done = asyncio.get_running_loop().create_future()
            up.transport.write(request)
            try:
                await up.done
            except ConnectionResetError:
                self.transport.close()
                return
            up.client = None
            self.proxy.idle.append(up)
        self.busy = False


class FloorProxy:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[Upstream] = []

    async def take(self) -> Upstream:
        while self.idle:
            up = self.idle.pop()
            if up.transport is not None and not up.transport.is_closing():
                return up
        _, up = await asyncio.get_running_loop().create_connection(
            Upstream, self.host, self.port)
        return up


async def serve(port: int, upstream: str) -> None:
    parts = urlsplit(upstream)
    proxy = FloorProxy(parts.hostname or "127.0.0.1", parts.port or 80)
    server = await asyncio.get_running_loop().create_server(
        lambda: Front(proxy), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.floor_proxy",
                                 description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True, help="http://host:port of the engine")
    args = ap.parse_args()
    uvloop.run(serve(args.port, args.upstream))


if __name__ == "__main__":
    main()
