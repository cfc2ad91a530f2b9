"""The listener's front end: inference requests on a lean HTTP/1.1 protocol, the rest on aiohttp.

A request through aiohttp's web server costs the router more CPU than routing it (request and
response objects, a task, the payload stream, the URL dispatcher, the response writer), and
the OpenAI inference routes are nearly all of a router's requests. So each connection starts
on :class:`FrontProtocol`: it finds a request's head (``\\r\\n\\r\\n``), parses it with
``httptools`` (llhttp) and, for ``POST /v1/completions`` and ``POST /v1/chat/completions``,
serves it itself through the SAME middlewares and handler as the aiohttp app (the app's
middleware list and the handlers :func:`mesh.api.build_app` registers), with a request
object that offers what they use (:class:`FrontRequest`) and a response that writes straight
to the transport (:class:`FrontStream`).

Anything else -- another path or method, a head ``httptools`` refuses, an upgrade, an
``Expect`` other than ``100-continue`` -- and the connection is handed to aiohttp's own
protocol with every byte from the start of that request, and stays there: one port, and
aiohttp answers those requests (errors included) exactly as it did before.

What the aiohttp path guaranteed and this one keeps:

- keep-alive and pipelining: one request at a time per connection, answers in order; bytes
  of the next request wait in the buffer (reading pauses past ``PIPELINE_BYTES``);
- bodies by ``Content-Length`` or chunked; ``Expect: 100-continue`` answered at the head (as
  aiohttp's router does); the body limit, content codings and ``body_timeout`` as
  :func:`mesh.http_guard.read_body` (413/415/408, connection closed) -- the refusal raised
  inside the handler, so it is counted and logged by the same code; a malformed chunk is a
  400 and the connection closes;
- the client going away cancels the handler (so the upstream answer is closed and the
  engine sees the disconnect, as with aiohttp's ``handler_cancellation``);
- streamed answers go out as they come, head with the first bytes, chunked when the length is
  unknown; writes wait while the client's socket buffer is full (backpressure);
- the connection guard's idle and header timeouts (``mesh.http_guard``) cover both paths.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Container, Iterable, Mapping
from email.utils import formatdate
from typing import Any

import httptools
from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy

from mesh.http_guard import IDENTITY, BodyRefused, HttpLimits

log = logging.getLogger("kvmesh.http")

FAST_PATHS = ("/v1/completions", "/v1/chat/completions")
MAX_HEAD = 8190 + 4
"""Longest head served here; a longer one goes to aiohttp (which refuses past its limits)."""
MAX_HEADERS = 128
"""More headers than aiohttp's server accepts: handed to it, to be refused as before."""
PIPELINE_BYTES = 1024 * 1024
"""Buffered bytes of requests not yet served before reading pauses."""

Handler = Callable[[Any], Awaitable[web.StreamResponse]]
FAST_HANDLERS = web.AppKey("kvmesh.fast_handlers", dict[str, Handler])
"""On the app: the inference handlers by path (``mesh.api.build_app``)."""


class _Date:
    """The ``Date`` header, formatted once a second."""

    __slots__ = ("second", "value")

    def __init__(self) -> None:
        self.second = -1
        self.value = ""

    def now(self) -> str:
        second = int(time.time())
        if second != self.second:
            self.second = second
            self.value = formatdate(second, usegmt=True)
        return self.value


_DATE = _Date()


class FrontRequest:
    """The part of ``aiohttp.web.Request`` the inference middlewares and handlers use."""

    __slots__ = ("_body", "_query", "_store", "conn", "headers", "keep_alive", "method", "path",
                 "query_string", "transport", "version")

    def __init__(self, conn: FrontProtocol, method: str, path: str, query_string: str,
                 headers: CIMultiDictProxy[str], transport: asyncio.Transport,
                 version: tuple[int, int], keep_alive: bool) -> None:
        self.conn = conn
        self.method = method
        self.path = path
        self.query_string = query_string
        self.headers = headers
        self.transport: asyncio.Transport | None = transport
        self.version = version
        self.keep_alive = keep_alive
        self._store: dict[Any, Any] = {}
        self._query: MultiDictProxy[str] | None = None
        self._body: asyncio.Future[bytes] | None = None

    def get(self, key: Any, default: Any = None) -> Any:
        return self._store.get(key, default)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._store[key] = value

    def __getitem__(self, key: Any) -> Any:
        return self._store[key]

    @property
    def query(self) -> MultiDictProxy[str]:
        if self._query is None:
            from urllib.parse import parse_qsl

            self._query = MultiDictProxy(MultiDict(parse_qsl(self.query_string,
                                                             keep_blank_values=True)))
        return self._query

    def body_now(self) -> bytes | None:
        """The body if it is all in already (the usual case), else None: then
        :meth:`read_limited` waits for it. A refused body raises its ``BodyRefused``."""
        fut = self._body
        return fut.result() if fut is not None and fut.done() else None

    async def read_limited(self, limits: HttpLimits) -> bytes:
        """The body as :func:`mesh.http_guard.read_body` gives it; ``BodyRefused`` else."""
        assert self._body is not None
        if self._body.done():
            return self._body.result()
        try:
            async with asyncio.timeout(limits.body_timeout):
                return await asyncio.shield(self._body)
        except TimeoutError:
            raise BodyRefused(408, f"request body not received within "
                              f"{limits.body_timeout:g}s", "body_timeout", close=True) from None


class FrontStream(web.StreamResponse):
    """A response written straight to a :class:`FrontProtocol` connection."""

    def __init__(self, req: FrontRequest, *, status: int = 200, reason: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(status=status, reason=reason, headers=headers)
        self._front_req = req
        self._conn: FrontProtocol | None = None
        self._chunk = False
        self._head: bytes | None = None
        self._ended = False
        self.keep = True

    def begin(self, headers: Mapping[str, str] | None = None, length: int | None = None
              ) -> None:
        """Builds the head; it goes out with the first body bytes (one write, not two).

        ``headers`` (a plain mapping, in order) and ``length``: the head is built from them
        instead of this response's ``headers`` and ``content_length`` (the proxy's relay:
        no multidict built only to be read once). The bytes are the same either way."""
        if self._head is None and not self._ended:
            conn = self._conn = self._front_req.conn
            if headers is None:
                self._head = conn.head_bytes(self, self._front_req)
                return
            has_type = any(k.lower() == "content-type" for k in headers)
            self._head, self._chunk, self.keep = head_of(
                self._front_req, self.status, self.reason, headers.items(), has_type, length,
                self.keep_alive)

    def begin_relay(self, upstream: Iterable[tuple[str, str]], skip: Container[str],
                    extra: Mapping[str, str], length: int | None) -> None:
        """:meth:`begin` for a relayed answer: the upstream's headers (less the names in
        ``skip``, lower case), then ``extra`` over them, as ``begin(headers, length)`` with
        ``headers = {k: v for k, v in upstream if k.lower() not in skip} | extra`` writes
        them (the same bytes), in one pass instead of four."""
        if self._head is not None or self._ended:
            return
        req = self._front_req
        self._conn = req.conn
        headers: dict[str, str] = {}
        has_type = False
        for name, value in upstream:
            low = name.lower()
            if low not in skip and low not in _OWN_HEADERS:
                headers[name] = value
                if low == "content-type":
                    has_type = True
        for name, value in extra.items():
            low = name.lower()
            if low in _OWN_HEADERS:
                continue  # as ``begin``: the server's own, never copied
            headers[name] = value
            if low == "content-type":
                has_type = True
        self._head, self._chunk, self.keep = head_of(
            req, self.status, self.reason, headers.items(), has_type, length, self.keep_alive,
            filtered=True)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.write_now(data):
            await self.drain()

    def write_now(self, data: bytes | bytearray | memoryview) -> bool:
        """:meth:`write` up to its wait: True when the client's buffer is full (then
        :meth:`drain`, as ``write`` does)."""
        conn = self._conn
        if conn is None or self._head is None:
            raise RuntimeError("write before prepare")
        if not data:
            return False
        if self._chunk:
            out = b"".join([self._head, f"{len(data):x}\r\n".encode(), data, b"\r\n"])
        else:
            out = self._head + data if self._head else bytes(data)
        self._head = b""
        return conn.push(out)

    async def drain(self) -> None:
        """Wait while the client's buffer is full (backpressure)."""
        if self._conn is not None:
            await self._conn.drain()

    async def write_eof(self, data: bytes = b"") -> None:
        if self._ended:
            return
        if data:
            await self.write(data)
        if self.write_eof_now():
            await self.drain()

    def write_eof_now(self) -> bool:
        """:meth:`write_eof` (without data) up to its wait: True when it must
        :meth:`drain`."""
        if self._ended:
            return False
        conn = self._conn
        if conn is None or self._head is None:
            raise RuntimeError("write_eof before prepare")
        out = self._head + (b"0\r\n\r\n" if self._chunk else b"")
        self._head = b""
        self._ended = True
        return conn.push(out) if out else False


def chain(handler: Handler, middlewares: Iterable[Any]) -> Handler:
    """``handler`` wrapped in ``middlewares`` as aiohttp applies them (first is outermost)."""
    for m in reversed(list(middlewares)):
        handler = functools.partial(m, handler=handler)
    return handler


class FrontEnd:
    """What all connections of one listener share: the app's handlers, limits, the guard."""

    def __init__(self, app: web.Application, inner: Callable[[], asyncio.Protocol],
                 limits: HttpLimits) -> None:
        handlers = app[FAST_HANDLERS]
        self.handlers = {path: chain(h, app.middlewares) for path, h in handlers.items()}
        self.inner = inner
        self.limits = limits
        self.served = 0
        """Requests served on the front end's own protocol."""
        self.handed_off = 0
        """Connections handed to aiohttp."""
        self.conns: set[FrontProtocol] = set()
        self.closing = False

    def protocol(self) -> FrontProtocol:
        return FrontProtocol(self)

    async def close(self, grace: float = 5.0) -> None:
        """Stop serving: idle connections close now, busy ones after their request (or after
        ``grace`` seconds, cancelled). Connections handed to aiohttp are its runner's."""
        self.closing = True
        tasks = []
        for conn in list(self.conns):
            if conn.task is None:
                conn.close()
            else:
                tasks.append(conn.task)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for t in pending:
                t.cancel()
        for conn in list(self.conns):
            conn.close()


class _Head:
    """httptools callbacks for one request head."""

    __slots__ = ("headers", "url")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[str, str]] = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))


class _Body:
    """The body of the request being read: by length, or chunked."""

    __slots__ = ("chunked", "fut", "left", "parts", "size", "state")

    def __init__(self, fut: asyncio.Future[bytes], length: int | None) -> None:
        self.fut = fut
        self.chunked = length is None
        self.left = 0 if length is None else length
        self.parts: list[bytes] = []
        self.size = 0
        self.state = "size"  # chunked: size line, data, data's CRLF, trailers


class _BadChunk(Exception):
    pass


class FrontProtocol(asyncio.Protocol):
    """One client connection; see the module docstring."""

    def __init__(self, front: FrontEnd) -> None:
        self.front = front
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.inner: asyncio.Protocol | None = None
        self.task: asyncio.Task[None] | None = None
        self.body: _Body | None = None
        self.closed = False
        self.paused = False
        self._writable: asyncio.Future[None] | None = None
        self._write_paused = False
        self.loop: asyncio.AbstractEventLoop | None = None
        """The connection's loop, kept: each ``asyncio.get_running_loop()`` is a ``getpid``
        system call (its fork check), several per request otherwise."""

    # -- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.loop = asyncio.get_running_loop()
        self.front.conns.add(self)

    def close(self) -> None:
        if self.inner is None and self.transport is not None and not self.closed:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.data_received(data)
            return
        self.buf += data
        if self.body is not None:
            self._feed_body()
        if self.task is None:
            self._next()
        elif (len(self.buf) > PIPELINE_BYTES and not self.paused
              and self.transport is not None and self.body is None):
            self.paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        if self.inner is not None:
            return self.inner.eof_received()
        return None  # close the transport: nothing more can arrive

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.front.conns.discard(self)
        if self.inner is not None:
            self.inner.connection_lost(exc)
            return
        if self.body is not None and not self.body.fut.done():
            self.body.fut.set_exception(ConnectionResetError("client disconnected"))
        if self.task is not None and not self.task.done():
            self.task.cancel()  # the client left: the upstream answer is closed
        self._wake_writer(ConnectionResetError("client disconnected"))

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()
            return
        self._write_paused = True

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()
            return
        self._write_paused = False
        self._wake_writer(None)

    # -- writing -----------------------------------------------------------------------------
    def _wake_writer(self, exc: BaseException | None) -> None:
        w = self._writable
        if w is not None and not w.done():
            if exc is None:
                w.set_result(None)
            else:
                w.set_exception(exc)

    async def send(self, data: bytes) -> None:
        """Write, then wait while the client's buffer is full (backpressure)."""
        if self.push(data):
            await self.drain()

    def push(self, data: bytes) -> bool:
        """Write; True when the client's buffer is full (then :meth:`drain`)."""
        t = self.transport
        if self.closed or t is None or t.is_closing():
            raise ConnectionResetError("Cannot write to closing transport")
        t.write(data)
        return self._write_paused and not self.closed

    async def drain(self) -> None:
        """Wait while the client's buffer is full."""
        while self._write_paused and not self.closed:
            self._writable = asyncio.get_running_loop().create_future()
            try:
                await self._writable
            finally:
                self._writable = None

    def head_bytes(self, resp: web.StreamResponse, req: FrontRequest,
                   length: int | None = None) -> bytes:
        """The status line and headers as aiohttp would write them for ``resp``."""
        headers = resp.headers
        if length is None:
            length = resp.content_length
        head, chunked, keep = head_of(req, resp.status, resp.reason, headers.items(),
                                      "Content-Type" in headers, length, resp.keep_alive)
        if isinstance(resp, FrontStream):
            resp._chunk = chunked
            resp.keep = keep
        return head

    # -- requests ----------------------------------------------------------------------------
    def _next(self) -> None:
        """Start the next request in the buffer, or hand the connection to aiohttp."""
        if self.closed or self.inner is not None or self.task is not None or not self.buf:
            return
        if self.front.closing:
            self.close()
            return
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        end = self.buf.find(b"\r\n\r\n", 0, MAX_HEAD)
        if end < 0:
            if len(self.buf) >= MAX_HEAD or self.buf.find(b"\n\n", 0, MAX_HEAD) >= 0:
                self._hand_off()  # too long, or bare LF line ends: aiohttp's to judge
            return
        head = _Head()
        parser = httptools.HttpRequestParser(head)
        try:
            parser.feed_data(self.buf[:end + 4])
        except httptools.HttpParserError:
            self._hand_off()
            return
        method = parser.get_method()
        url = head.url
        q = url.find(b"?")
        path = (url if q < 0 else url[:q]).decode("latin-1")
        if (method != b"POST" or path not in self.front.handlers or parser.should_upgrade()
                or len(head.headers) > MAX_HEADERS):
            self._hand_off()
            return
        headers = CIMultiDictProxy(CIMultiDict(head.headers))
        expect = headers.get("Expect")
        if expect is not None and expect.lower() != "100-continue":
            self._hand_off()
            return
        te = headers.get("Transfer-Encoding")
        cl = headers.get("Content-Length")
        if te is not None and te.strip().lower() != "chunked":
            self._hand_off()  # a coding other than chunked: aiohttp refuses it
            return
        length: int | None
        if te is not None:
            length = None
        elif cl is not None:
            if not cl.isdigit():
                self._hand_off()
                return
            length = int(cl)
        else:
            length = 0
        version = _VERSIONS.get(parser.get_http_version())
        if version is None:
            self._hand_off()
            return
        assert self.transport is not None
        req = FrontRequest(self, "POST", path, "" if q < 0 else url[q + 1:].decode("latin-1"),
                           headers, self.transport, version, parser.should_keep_alive())
        del self.buf[:end + 4]
        loop = self.loop if self.loop is not None else asyncio.get_running_loop()
        fut: asyncio.Future[bytes] = loop.create_future()
        req._body = fut
        limits = self.front.limits
        coding = headers.get("Content-Encoding", "").strip().lower()
        refused: BodyRefused | None = None
        if coding not in IDENTITY:
            refused = BodyRefused(415, f"Content-Encoding {coding[:32]!r} is not accepted: send "
                                  "the body uncompressed", "unsupported_content_encoding",
                                  close=True)
        elif length is not None and length > limits.max_body_bytes:
            refused = BodyRefused(413, f"request body is larger than {limits.max_body_bytes} "
                                  "bytes", "body_too_large", close=True)
        if expect is not None and version >= (1, 1):
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if refused is not None:
            fut.set_exception(refused)
            fut.exception()  # retrieved by the handler, or never needed (access refused)
            req.keep_alive = False  # the body is not read: the connection cannot go on
        elif length == 0:
            fut.set_result(b"")
        else:
            self.body = _Body(fut, length)
            self._feed_body()
        self.front.served += 1
        self.task = loop.create_task(self._serve(req))

    def _feed_body(self) -> None:
        b = self.body
        assert b is not None
        try:
            done = self._feed_chunked(b) if b.chunked else self._feed_length(b)
        except _BadChunk as exc:
            self.body = None
            b.fut.set_exception(BodyRefused(400, f"malformed chunked request body: {exc}",
                                            "bad_chunked_body", close=True))
            b.fut.exception()
            return
        except BodyRefused as refused:
            self.body = None
            b.fut.set_exception(refused)
            b.fut.exception()
            return
        if done:
            self.body = None
            if not b.fut.done():
                b.fut.set_result(b.parts[0] if len(b.parts) == 1 else b"".join(b.parts))

    def _feed_length(self, b: _Body) -> bool:
        take = min(b.left, len(self.buf))
        if take:
            b.parts.append(bytes(self.buf[:take]))
            del self.buf[:take]
            b.left -= take
        return b.left == 0

    def _feed_chunked(self, b: _Body) -> bool:
        buf = self.buf
        limit = self.front.limits.max_body_bytes
        while True:
            if b.state == "size":
                nl = buf.find(b"\r\n")
                if nl < 0:
                    if len(buf) > 1024:
                        raise _BadChunk("chunk size line too long")
                    return False
                line = bytes(buf[:nl]).split(b";", 1)[0].strip()
                del buf[:nl + 2]
                try:
                    size = int(line, 16)
                except ValueError:
                    raise _BadChunk(f"bad chunk size {line[:16]!r}") from None
                if size < 0 or not line or any(c not in b"0123456789abcdefABCDEF" for c in line):
                    raise _BadChunk(f"bad chunk size {line[:16]!r}")
                if size == 0:
                    b.state = "trailer"
                    continue
                b.size += size
                if b.size > limit:
                    raise BodyRefused(413, f"request body is larger than {limit} bytes",
                                      "body_too_large", close=True)
                b.left = size
                b.state = "data"
            elif b.state == "data":
                take = min(b.left, len(buf))
                if take:
                    b.parts.append(bytes(buf[:take]))
                    del buf[:take]
                    b.left -= take
                if b.left:
                    return False
                b.state = "crlf"
            elif b.state == "crlf":
                if len(buf) < 2:
                    return False
                if buf[:2] != b"\r\n":
                    raise _BadChunk("chunk data not followed by CRLF")
                del buf[:2]
                b.state = "size"
            else:  # trailers, up to an empty line
                nl = buf.find(b"\r\n")
                if nl < 0:
                    if len(buf) > 8192:
                        raise _BadChunk("trailers too long")
                    return False
                del buf[:nl + 2]
                if nl == 0:
                    return True

    async def _serve(self, req: FrontRequest) -> None:
        keep = False
        try:
            handler = self.front.handlers[req.path]
            resp = await handler(req)
            if isinstance(resp, FrontStream):
                if resp._head is None:  # never prepared: nothing was sent
                    await self._write_whole(resp, req)
                keep = resp.keep
            else:
                keep = await self._write_whole(resp, req)
            fut = req._body
            if fut is not None and not fut.done():
                keep = False  # answered before its body arrived: cannot find the next head
            if self.front.closing or self.transport is None or self.transport.is_closing():
                keep = False
        except asyncio.CancelledError:
            keep = False
            if not self.closed:
                raise
        except ConnectionResetError:
            keep = False
        except Exception:
            keep = False
            log.exception("unexpected error serving %s", req.path)
        finally:
            self.task = None
            if not keep:
                self.body = None
                if self.transport is not None and not self.closed:
                    self.transport.close()
            elif not self.closed:
                self._next()

    async def _write_whole(self, resp: web.StreamResponse, req: FrontRequest) -> bool:
        """Write a response that was not streamed (a ``web.Response``); keep-alive after?"""
        body = getattr(resp, "body", None)
        data = bytes(body) if isinstance(body, bytes | bytearray) else b""
        head = self.head_bytes(resp, req, len(data))
        await self.send(head + data)
        return req.keep_alive and resp.keep_alive is not False

    def _hand_off(self) -> None:
        """From this request on, the connection is aiohttp's."""
        assert self.transport is not None
        self.front.handed_off += 1
        inner = self.front.inner()
        self.inner = inner
        self.front.conns.discard(self)
        data = bytes(self.buf)
        self.buf.clear()
        if self.paused:
            self.paused = False
            self.transport.resume_reading()
        inner.connection_made(self.transport)
        if data:
            inner.data_received(data)
        if self._write_paused:
            inner.pause_writing()


def head_of(req: FrontRequest, status: int, reason: str, items: Iterable[tuple[str, str]],
            has_type: bool, length: int | None, keep_alive: bool | None,
            filtered: bool = False) -> tuple[bytes, bool, bool]:
    """(head bytes, chunked, keep-alive after) of an answer to ``req``, as aiohttp writes
    them: ``items`` in order less the headers the server sets itself (``filtered``: the
    caller left them out already), a default ``Content-Type`` when ``has_type`` is false,
    the length or chunked framing, ``Date``, ``Server`` and the ``Connection`` header the
    version needs."""
    keep = req.keep_alive and keep_alive is not False
    chunked = False
    if length is None and req.version >= (1, 1):
        chunked = True
    elif length is None:
        keep = False
    lines = [f"HTTP/{req.version[0]}.{req.version[1]} {status} {reason}\r\n"]
    if filtered:
        own = [f"{name}: {value}\r\n" for name, value in items]
        block = "".join(own)
        lines.append(block)
        # Each line holds exactly one CR and one LF unless a name or value has a break.
        if block.count("\r") != len(own) or block.count("\n") != len(own):
            for name, value in items:
                if "\n" in value or "\r" in value or "\n" in name or "\r" in name:
                    raise ValueError(f"header {name!r} has a line break")
    else:
        for name, value in items:
            if name.lower() in _OWN_HEADERS:
                continue
            if "\n" in value or "\r" in value or "\n" in name or "\r" in name:
                raise ValueError(f"header {name!r} has a line break")
            lines.append(f"{name}: {value}\r\n")
    if not has_type:
        lines.append("Content-Type: application/octet-stream\r\n")
    if chunked:
        lines.append("Transfer-Encoding: chunked\r\n")
    elif length is not None:
        lines.append(f"Content-Length: {length}\r\n")
    lines.append(f"Date: {_DATE.now()}\r\nServer: {SERVER_SOFTWARE}\r\n")
    if keep and req.version == (1, 0):
        lines.append("Connection: keep-alive\r\n")
    elif not keep and req.version >= (1, 1):
        lines.append("Connection: close\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1"), chunked, keep


_VERSIONS = {"1.1": (1, 1), "1.0": (1, 0)}
_OWN_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "date", "server",
                          "keep-alive"})


