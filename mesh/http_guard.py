"""The router's HTTP edge: bounded bodies, connection timeouts, quiet malformed requests.

aiohttp parses requests for us, but left alone it inflates ``Content-Encoding`` bodies inside
the protocol (a 1 MB gzip bomb becomes seconds of CPU before any handler runs), keeps a
connection with half a header open forever, and logs every malformed request with a
traceback. This module closes those gaps without touching aiohttp internals:

- the server is built with ``auto_decompress=False`` and :func:`read_body` refuses any
  content coding with 415, refuses a declared ``Content-Length`` over the limit with 413
  before reading a byte, stops reading at the limit, and gives the whole body
  ``body_timeout`` seconds (408, connection closed);
- :class:`ConnectionGuard` wraps each connection's protocol and closes connections that sit
  idle longer than ``idle_timeout`` or take longer than ``header_timeout`` from the first
  byte of a request to the handler seeing it (partial headers: slowloris);
- :class:`QuietLogger` turns aiohttp's "Error handling request" tracebacks for malformed
  requests into one counted warning line each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web

log = logging.getLogger("kvmesh.http")

IDENTITY = {"", "identity"}


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Limits of the client-facing listener (configuration keys of the same names)."""

    max_body_bytes: int = 64 * 1024 * 1024
    header_timeout: float = 10.0
    """First byte of a request to its complete header block."""
    body_timeout: float = 60.0
    """Handler start to the last byte of the body."""
    idle_timeout: float = 75.0
    """A keep-alive connection with no request in progress is closed after this long."""


class BodyRefused(Exception):
    """The body was not (fully) read; ``status`` and ``code`` say why."""

    def __init__(self, status: int, message: str, code: str, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.close = close


async def read_body(request: web.BaseRequest, limits: HttpLimits) -> bytes:
    """The request body under ``limits``; ``BodyRefused`` (413/415/408) otherwise."""
    coding = request.headers.get("Content-Encoding", "").strip().lower()
    if coding not in IDENTITY:
        raise BodyRefused(415, f"Content-Encoding {coding[:32]!r} is not accepted: send the "
                          "body uncompressed", "unsupported_content_encoding", close=True)
    limit = limits.max_body_bytes
    declared = request.content_length
    if declared is not None and declared > limit:
        raise BodyRefused(413, f"request body is larger than {limit} bytes",
                          "body_too_large", close=True)
    content = request.content
    if declared is not None and content.is_eof():
        # The whole body came with the head (most requests): nothing left to wait for.
        body = content.read_nowait()
        if len(body) > limit:
            raise BodyRefused(413, f"request body is larger than {limit} bytes",
                              "body_too_large", close=True)
        return body
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(limits.body_timeout):
            while True:
                chunk = await request.content.read(256 * 1024)
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    raise BodyRefused(413, f"request body is larger than {limit} bytes",
                                      "body_too_large", close=True)
                chunks.append(chunk)
    except TimeoutError:
        raise BodyRefused(408, f"request body not received within {limits.body_timeout:g}s",
                          "body_timeout", close=True) from None
    return b"".join(chunks)


class QuietLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's server logger: a malformed request is one warning line, counted by kind."""

    KINDS = 32
    """At most this many distinct exception kinds get their own counter; then ``other``."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(logger, {})
        self.counts: Counter[str] = Counter()

    def _kind(self, exc: object) -> str:
        name = type(exc).__name__ if isinstance(exc, BaseException) else "unknown"
        if name not in self.counts and len(self.counts) >= self.KINDS:
            return "other"
        return name

    def exception(self, msg: object, *args: Any, exc_info: Any = True, **kw: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else None
        kind = self._kind(exc)
        self.counts[kind] += 1
        detail = str(exc).replace("\n", " ")[:200] if exc is not None else ""
        text = (str(msg) % args) if args else str(msg)
        self.logger.warning("%s: %s %s", text, kind, detail)


@dataclass(slots=True)
class _Conn:
    transport: asyncio.Transport
    since: float
    """When the connection last became free of requests (accept, or a response done)."""
    first_byte: float | None = None
    """First byte received since ``since`` (a request is arriving), else None."""
    busy: int = 0


class ConnectionGuard:
    """Per-connection idle and header timeouts around aiohttp's protocol factory."""

    def __init__(self, limits: HttpLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self._conns: dict[int, _Conn] = {}
        self.closed: Counter[str] = Counter()
        """Connections closed by the guard, by reason (``idle``, ``header_timeout``)."""
        self._task: asyncio.Task[None] | None = None

    def protocol_factory(self, inner: Callable[[], asyncio.Protocol]
                         ) -> Callable[[], asyncio.Protocol]:
        guard = self

        class Guarded(asyncio.Protocol):
            def __init__(self) -> None:
                self.inner = inner()
                self.key = 0

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                # uvloop's transports are not asyncio.Transport subclasses; same interface.
                t = cast(asyncio.Transport, transport)
                self.key = id(t)
                guard._conns[self.key] = _Conn(t, guard.clock())
                self.inner.connection_made(transport)

            def data_received(self, data: bytes) -> None:
                c = guard._conns.get(self.key)
                if c is not None and c.busy == 0 and c.first_byte is None:
                    c.first_byte = guard.clock()
                self.inner.data_received(data)

            def eof_received(self) -> bool | None:
                return self.inner.eof_received()

            def connection_lost(self, exc: Exception | None) -> None:
                guard._conns.pop(self.key, None)
                self.inner.connection_lost(exc)

            def pause_writing(self) -> None:
                self.inner.pause_writing()

            def resume_writing(self) -> None:
                self.inner.resume_writing()

        return Guarded

    @web.middleware
    async def middleware(self, request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
        """Marks a connection busy while a request (its headers complete) is handled."""
        c = self._conns.get(id(request.transport)) if request.transport is not None else None
        if c is not None:
            c.busy += 1
        try:
            return await handler(request)
        finally:
            if c is not None:
                c.busy -= 1
                if c.busy == 0:
                    c.since = self.clock()
                    c.first_byte = None

    def sweep(self, now: float) -> list[tuple[asyncio.Transport, str]]:
        """Connections over a limit at ``now`` (sans-I/O: the caller closes them)."""
        out = []
        for c in self._conns.values():
            if c.busy:
                continue
            if c.first_byte is not None:
                if now - c.first_byte > self.limits.header_timeout:
                    out.append((c.transport, "header_timeout"))
            elif now - c.since > self.limits.idle_timeout \
                    and c.transport.get_write_buffer_size() == 0:
                out.append((c.transport, "idle"))
        return out

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="http connection guard")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        tick = max(0.05, min(1.0, self.limits.header_timeout / 4, self.limits.idle_timeout / 4))
        while True:
            await asyncio.sleep(tick)
            for transport, reason in self.sweep(self.clock()):
                self.closed[reason] += 1
                self._conns.pop(id(transport), None)
                log.info("closing a connection: %s", reason.replace("_", " "))
                transport.close()

    def __len__(self) -> int:
        return len(self._conns)
