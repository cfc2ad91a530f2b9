"""A lean HTTP/1.1 client for the request path: pooled keep-alive connections to engines.

The proxy sends one POST per request and streams the answer back. A general client pays per
request for what this path never uses (cookies, redirects, proxies, tracing, a fresh timeout
context, a payload object); here one request is one ``transport.write`` of head and body on
a kept-alive connection, and the answer is parsed by ``httptools`` (llhttp, as in Node.js)
straight into the chunks the relay sends on. Measured under load it removes most of the
client's share of the router's CPU (``kvmesh bench overhead``).

Semantics the proxy relies on:

- a connection goes back to the pool only after a complete answer that allows keep-alive;
  closing an unfinished answer closes the connection (the engine sees the disconnect);
- a pooled connection the server closed while idle fails before any answer byte: the request
  is sent once more on a new connection (it never reached the server);
- ``connect_timeout`` bounds connecting, ``deadline`` (``first_byte`` then ``total``) bounds
  the wait for the head and first body bytes and then the whole answer;
- the body buffered per connection is bounded: past ``HIGH_WATER`` reading pauses until the
  relay catches up.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

MAX_HEAD = 64 * 1024
"""Bytes an answer's status line and headers may take (a broken engine's endless head is a
reset, not memory)."""
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
MAX_IDLE = 256
"""Idle connections kept per origin."""


class ConnectError(OSError):
    """The connection could not be made (refused, unreachable, DNS, TLS, timeout)."""


class UpstreamBroken(Exception):
    """The answer ended abnormally: connection lost or unparsable. Not a client reset."""


class _Conn(asyncio.Protocol):
    __slots__ = (
        "_body_done",
        "_buffered",
        "_chunks",
        "_error",
        "_head_bytes",
        "_head_waiter",
        "_headers",
        "_paused",
        "_pool_key",
        "_raw_headers",
        "_read_waiter",
        "_timer",
        "closed",
        "got_bytes",
        "keep_alive",
        "loop",
        "parser",
        "status",
        "transport",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.loop = loop if loop is not None else asyncio.get_running_loop()
        """Kept: each ``asyncio.get_running_loop()`` is a ``getpid`` system call."""
        self.closed = False
        self._pool_key: tuple[str, int, bool] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._reset()

    def _reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.got_bytes = False
        self._head_bytes = 0
        self.status = 0
        self.keep_alive = False
        self._raw_headers: list[tuple[str, str]] = []
        self._headers: CIMultiDictProxy[str] | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._body_done = False
        self._error: BaseException | None = None
        self._head_waiter: asyncio.Future[None] | None = None
        self._read_waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        if self._headers is None:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD:
                self._fail(UpstreamBroken(f"answer head larger than {MAX_HEAD} bytes"))
                self.abort()
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamBroken(f"unparsable answer: {exc}"))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._body_done:
            return
        if (exc is None and self._headers is not None
                and "content-length" not in self._headers
                and "chunked" not in self._headers.get("transfer-encoding", "").lower()):
            self._body_done = True  # an answer delimited by the end of the connection
            self._wake()
            return
        self._fail(UpstreamBroken(f"connection lost: {exc or 'closed by the server'}"))

    def pause_writing(self) -> None:  # the request body is written at once
        return None

    def resume_writing(self) -> None:
        return None

    # -- httptools callbacks -----------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        self._headers = CIMultiDictProxy(CIMultiDict(self._raw_headers))
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self._body_done = True
        self._wake()

    # -- the request's side ------------------------------------------------------------------
    def _wake(self) -> None:
        waiter = self._read_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        for waiter in (self._head_waiter, self._read_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_exception(exc)

    def arm(self, delay: float | None, what: str = "") -> None:
        """Fail the request with ``TimeoutError("<what> within <delay>s")`` in ``delay``
        seconds (None: never). The error is made when the time is up (most requests never
        need it)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if delay is not None:
            self._timer = self.loop.call_later(delay, self._expire, what, delay)

    def _expire(self, what: str, delay: float) -> None:
        self._timer = None
        self._fail(TimeoutError(f"{what} within {delay:g}s") if what and delay
                   else TimeoutError())
        self.abort()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    async def head(self) -> None:
        if self._headers is None:
            if self._error is not None:
                raise self._error
            self._head_waiter = self.loop.create_future()
            try:
                await self._head_waiter
            finally:
                self._head_waiter = None

    async def read(self) -> bytes:
        """The next body bytes; b"" at the end of the answer."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._body_done:
                return b""
            self._read_waiter = self.loop.create_future()
            try:
                await self._read_waiter
            finally:
                self._read_waiter = None
        return self._take_chunks()

    def read_now(self) -> bytes | None:
        """:meth:`read` when it need not wait (the bytes are in, or the answer is over or
        failed: the same result or error); None when it would wait."""
        if not self._chunks:
            if self._error is not None:
                raise self._error
            if self._body_done:
                return b""
            return None
        return self._take_chunks()

    def _take_chunks(self) -> bytes:
        chunk = self._chunks.popleft()
        if len(self._chunks) > 0:
            chunk = b"".join([chunk, *self._chunks])
            self._chunks.clear()
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return chunk

    @property
    def at_eof(self) -> bool:
        return self._body_done and not self._chunks


class Response:
    """One answer: status and head at once, the body by :meth:`readany`."""

    __slots__ = ("_conn", "_pool", "_released", "headers", "raw_headers", "status")

    def __init__(self, conn: _Conn, pool: Pool) -> None:
        self._conn = conn
        self._pool = pool
        self._released = False
        self.status = conn.status
        assert conn._headers is not None
        self.headers: CIMultiDictProxy[str] = conn._headers
        self.raw_headers: list[tuple[str, str]] = conn._raw_headers
        """The same headers as sent, in order (what the relay copies)."""

    async def readany(self) -> bytes:
        return await self._conn.read()

    def readany_now(self) -> bytes | None:
        """:meth:`readany` without a wait, or None when it would wait (then ``readany``)."""
        return self._conn.read_now()

    async def read(self, limit: int) -> bytes:
        """Up to ``limit`` bytes of the body (for error answers)."""
        out = bytearray()
        while len(out) < limit:
            chunk = await self._conn.read()
            if not chunk:
                break
            out += chunk
        return bytes(out[:limit])

    def at_eof(self) -> bool:
        return self._conn.at_eof

    def close(self) -> None:
        """Done with the answer: the connection back to the pool if it can serve another."""
        if self._released:
            return
        self._released = True
        conn = self._conn
        conn.arm(None)
        if conn.at_eof and conn.keep_alive and not conn.closed and conn._error is None:
            self._pool._put(conn)
        elif conn.at_eof and conn.transport is not None:
            conn.closed = True
            conn.transport.close()
        else:
            conn.abort()  # an unfinished answer: the engine sees the disconnect

    def deadline(self, seconds: float | None) -> None:
        """From now on, fail the answer with ``TimeoutError`` after ``seconds``."""
        self._conn.arm(seconds, "answer not complete")


class Pool:
    """Keep-alive connections by origin; ``post`` sends one request on one of them."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None,
                 connect_timeout: float = 2.0, max_idle: int = MAX_IDLE) -> None:
        self.ssl = ssl_context
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self._idle: dict[tuple[str, int, bool], list[_Conn]] = {}
        self._origins: dict[str, tuple[tuple[str, int, bool], str, str]] = {}
        self.opened = 0
        """Connections opened so far (a figure for tests and metrics)."""
        self._closed = False
        self.on_sent: Callable[[], None] | None = None
        """Called after each request is written: work that waited for a moment when no
        client waits on this process (``mesh.deferred``)."""

    def _origin(self, url: str) -> tuple[tuple[str, int, bool], str, str]:
        """(pool key, Host header, path) of ``url``."""
        parts = urlsplit(url)
        tls = parts.scheme == "https"
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ConnectError(f"not an http(s) URL: {url!r}")
        port = parts.port or (443 if tls else 80)
        path = parts.path or "/"
        if parts.query:
            path = f"{path}?{parts.query}"
        return (parts.hostname, port, tls), parts.netloc, path

    async def post(self, url: str, body: bytes,
                   headers: Mapping[str, str] | list[tuple[str, str]],
                   limit: float | None = None,
                   sent: Callable[[], None] | None = None) -> Response:
        """Send ``body``; return once the answer's head is in. ``ConnectError`` when no
        connection could be made; ``UpstreamBroken``, or ``TimeoutError`` after ``limit``
        seconds. The limit stays armed until :meth:`Response.deadline` changes it.
        ``sent``: called as soon as the request is written (again if it is sent again on a
        new connection), before the wait for the answer: work for the caller to do while
        the server works."""
        origin = self._origins.get(url)
        if origin is None:
            origin = self._origin(url)
            if len(self._origins) < 4096:
                self._origins[url] = origin
        key, host, path = origin
        items = headers if isinstance(headers, list) else headers.items()
        lines = [f"{name}: {value}\r\n" for name, value in items]
        block = "".join(lines)
        # Each line holds exactly one CR and one LF unless a name or value has a break.
        if block.count("\r") != len(lines) or block.count("\n") != len(lines):
            for name, value in items:
                if "\n" in value or "\r" in value or "\n" in name or "\r" in name:
                    raise ValueError(f"header {name!r} has a line break")
        request = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
                   f"{block}\r\n").encode("latin-1") + body
        for attempt in (0, 1):
            conn = self._take(key) if attempt == 0 else None  # a retry: a new connection
            reused = conn is not None
            if conn is None:
                conn = await self._connect(key)
            conn.arm(limit, "no answer")
            assert conn.transport is not None
            conn.transport.write(request)
            try:
                if sent is not None:
                    sent()
                if self.on_sent is not None:
                    self.on_sent()
                await conn.head()
            except UpstreamBroken:
                conn.arm(None)
                if reused and attempt == 0 and not conn.got_bytes:
                    continue  # closed by the server while idle: never reached it
                raise
            except BaseException:
                conn.arm(None)
                conn.abort()
                raise
            return Response(conn, self)
        raise AssertionError("unreachable")  # pragma: no cover

    def _take(self, key: tuple[str, int, bool]) -> _Conn | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                conn._reset()
                return conn
        return None

    def _put(self, conn: _Conn) -> None:
        key = conn._pool_key
        if self._closed or key is None:
            conn.abort()
            return
        idle = self._idle.setdefault(key, [])
        if len(idle) >= self.max_idle:
            conn.abort()
            return
        idle.append(conn)

    async def _connect(self, key: tuple[str, int, bool]) -> _Conn:
        host, port, tls = key
        loop = asyncio.get_running_loop()
        conn = _Conn(loop)
        conn._pool_key = key
        context: ssl.SSLContext | None = None
        if tls:
            context = self.ssl if self.ssl is not None else ssl.create_default_context()
        try:
            async with asyncio.timeout(self.connect_timeout):
                await loop.create_connection(lambda: conn, host, port, ssl=context)
        except TimeoutError:
            raise ConnectError(f"connecting to {host}:{port} timed out after "
                               f"{self.connect_timeout:g}s") from None
        except (OSError, ssl.SSLError) as exc:
            raise ConnectError(f"cannot connect to {host}:{port}: {exc}") from None
        self.opened += 1
        return conn

    def idle(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def close(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.abort()
        self._idle.clear()
