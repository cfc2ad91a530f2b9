"""Forwarding to an engine or to another region's router, and streaming the answer back.

``open`` sends the request and waits for the first body bytes. Until they arrive nothing
has reached the client, so a refused connection, a reset, a timeout or a 5xx answer is an
:class:`UpstreamError` and the router tries the next-best target. ``relay`` then copies
the body to the client chunk by chunk as it arrives (SSE is never buffered); an error after
the first byte ends an SSE stream with an OpenAI-style ``data: {"error": ...}`` event (what
vLLM sends, and what the OpenAI clients raise on), any other body as a cut stream. If the
client goes away the handler is cancelled, the upstream response is closed, and the engine
sees the disconnect. ``first_byte_timeout`` bounds the wait for the first byte (a hung engine
is a retry elsewhere, not a request held for the whole ``request_timeout``).

The forwarding protocol between routers is ``mesh/forward_auth.py`` (signed, body-bound,
single-use hops); here are the headers a dispatch carries: :func:`upstream_headers`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import aiohttp
from aiohttp import web

from mesh import upstream
from mesh.front import FrontRequest, FrontStream, RelayExtra

# Hop-by-hop or recomputed headers never copied from the upstream response.
_SKIP = frozenset({
    "connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding",
    "date", "server", "proxy-authenticate", "proxy-authorization", "te", "trailers", "upgrade",
})
ERROR_BODY_LIMIT = 4096
log = logging.getLogger("kvmesh.router")

H_REPLICA = "x-kvmesh-replica"
H_REGION = "x-kvmesh-region"
H_ROUTE = "x-kvmesh-route"
H_CLIENT_ID = "x-client-request-id"
PASS_HEADERS = ("authorization", "openai-organization", "openai-project")
"""Client headers passed to a local engine; a hop to another router carries none of them."""
_HEADER_SAFE = frozenset(range(0x20, 0x7F))
H_PREDICTED_TTFT = "x-kvmesh-predicted-ttft"
"""On answers to clients: the TTFT, in seconds from the decision, the cost model predicted."""
H_PREDICTED = "x-kvmesh-predicted-cached-tokens"
"""On answers from this router's own engines: the cached prompt tokens it predicted there."""


def upstream_headers(incoming: Mapping[str, str], request_id: str, *, local: bool,
                     pass_authorization: bool = True) -> dict[str, str]:
    """Headers of the request to the target: the router's request id, and for a local engine
    the client's pass-through headers (printable ASCII only; ``authorization`` unless it is
    the router's own API key). The client's ``x-request-id`` never goes upstream."""
    headers = {"Content-Type": "application/json", "Accept-Encoding": "identity",
               "x-request-id": request_id}
    if local:
        for h in PASS_HEADERS:
            value = incoming.get(h)
            if value is None or (h == "authorization" and not pass_authorization):
                continue
            if value and all(ord(c) in _HEADER_SAFE for c in value):
                headers[h] = value
    return headers


class UpstreamError(Exception):
    """The target failed before sending any body: safe to retry elsewhere."""

    def __init__(self, kind: str, detail: str, status: int | None = None,
                 body: bytes = b"") -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        """``connect`` (never reached it), ``status`` (answered 5xx), ``reset`` (died early),
        ``timeout`` (no first byte in time)."""
        self.detail = detail
        self.status = status
        self.body = body


class Early:
    """An answer's head and first bytes written to the client from the engine connection's
    own callback (``upstream.Pool.post(early=)``), before the request's task wakes.

    The relay's path to the client otherwise waits for a loop turn, the answer objects and
    the first-byte bookkeeping; here the client's bytes leave as soon as they are in. The
    bytes are those :func:`relay` writes, in the same writes: the same head
    (:meth:`FrontStream.begin_relay` from the same headers), the same body. Only for the
    front end's own connections, an answer that is not a 5xx (those are tried elsewhere)
    and a tap that passes bytes unchanged; else it does nothing and :func:`relay` sends the
    answer as before.

    When the whole answer was in and is out, the request is over for its client, and what
    is left of it (the answer objects, the relay's end, the handler's return, accounting)
    need not come before the client's next request: the engine connection goes back to the
    pool, the router's ledger and what decides the next request are updated
    (``answered``), the client's connection goes on to its next request
    (:meth:`mesh.front.FrontProtocol.go_on`), and the request's task is woken by ``later``
    (``mesh.deferred``: once the next request is at its engine). :meth:`ready` sets what
    this needs, once the request is written; until then nothing is sent early."""

    __slots__ = ("answered", "at", "clock", "drain", "ended", "extra", "first", "later",
                 "request", "resp", "response", "stream", "tap")

    def __init__(self, request: FrontRequest) -> None:
        self.request = request
        self.extra: RelayExtra | None = None
        self.tap: Tap | None = None
        self.stream: FrontStream | None = None
        """The answer, made ahead (:meth:`ready`); its status is set when it comes."""
        self.resp: FrontStream | None = None
        """Set once the head has gone out."""
        self.first = b""
        self.drain = False
        """The client's buffer was full after the write: :func:`relay` waits on it."""
        self.ended = False
        """The whole answer was in: its end was written too."""
        self.response: upstream.Response | None = None
        """The whole answer, taken from its connection (``upstream.Early``)."""
        self.at: float | None = None
        """When it was taken (``clock``): its first byte, and its end, for the books."""
        self.answered: Callable[[float, int], None] | None = None
        self.later: Callable[[Callable[[], None]], None] | None = None
        self.clock: Callable[[], float] | None = None

    def ready(self, extra: Mapping[str, str], tap: Tap | None, *,
              answered: Callable[[float, int], None] | None = None,
              later: Callable[[Callable[[], None]], None] | None = None,
              clock: Callable[[], float] | None = None) -> None:
        """The request is written: what the answer's head needs besides the engine's own
        headers, made while the engine works; with ``answered``, ``later`` and ``clock``, a
        whole answer also ends the request for its client (see the class)."""
        self.extra = RelayExtra(extra)
        self.tap = tap
        self.stream = FrontStream(self.request)
        self.answered, self.later, self.clock = answered, later, clock

    def __call__(self, conn: upstream._Conn) -> bool:
        extra, req, tap, resp = self.extra, self.request, self.tap, self.stream
        front = req.conn
        t = front.transport
        headers = conn._headers
        if (extra is None or resp is None or headers is None or conn.status >= 500
                or (tap is not None and tap.rewrites)
                or front.closed or t is None or t.is_closing()):
            return False
        try:
            declared = headers.get("Content-Length")
            length = int(declared) if declared is not None and declared.isdigit() else None
            if conn.status != resp.status:
                resp.set_status(conn.status)
            resp.begin_relay_pre(conn._raw_headers, _SKIP, extra, length)
            first = conn.read_now()
            if first is None:
                return False
        except Exception:  # nothing sent: the relay decides, as without this
            return False
        self.resp, self.first = resp, first
        drain = resp.write_now(first) if first else False
        if conn.at_eof:
            drain = resp.write_eof_now() or drain
            self.ended = True
        self.drain = drain
        answered, later, clock = self.answered, self.later, self.clock
        if (not self.ended or drain or answered is None or later is None or clock is None
                or not front.may_go_on(req, resp)):
            return False
        at = self.at = clock()
        self.response, waiter = conn.hand_over()
        try:
            if tap is not None:  # what relay would show it (it passes the bytes unchanged)
                if first:
                    tap.feed(first)
                tap.finish()
            answered(at, conn.status)
        except Exception:  # bookkeeping only: the answer is out, the task still wakes
            log.exception("accounting of an answer failed")
        finally:
            front.go_on(req)
            if waiter is not None:
                later(partial(_wake, waiter))
        return True


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


@dataclass(slots=True)
class Upstream:
    resp: upstream.Response
    first: bytes
    early: Early | None = None
    """The request's :class:`Early`: its ``resp`` is set when the head and ``first`` went
    to the client already; else :func:`relay` uses what it made ahead."""

    @property
    def status(self) -> int:
        return self.resp.status

    def close(self) -> None:
        self.resp.close()


class Forwarder:
    """Sends dispatches over pooled keep-alive connections (:mod:`mesh.upstream`)."""

    def __init__(
        self,
        pool: upstream.Pool,
        *,
        request_timeout: float = 600.0,
        first_byte_timeout: float | None = None,
    ) -> None:
        self.pool = pool
        self.first_byte_timeout = first_byte_timeout
        self.request_timeout = request_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        """Kept while it runs: each ``asyncio.get_running_loop()`` is a ``getpid`` call."""

    async def open(
        self, url: str, body: bytes, headers: Mapping[str, str], delay: float = 0.0,
        first_byte_timeout: float | None = None, sent: Callable[[], None] | None = None,
        early: Early | None = None,
    ) -> Upstream:
        """POST ``body`` to ``url``; return once the first body bytes are in, or raise
        ``UpstreamError`` (``timeout``) after ``first_byte_timeout`` seconds. ``sent``: see
        :meth:`mesh.upstream.Pool.post`; ``early``: :class:`Early`."""
        if delay > 0:
            # Emulated round trip to a far region (demo): the request leaves late.
            await asyncio.sleep(delay)
        limit = first_byte_timeout or self.first_byte_timeout
        total = self.request_timeout
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            resp = await self.pool.post(url, body, headers,
                                        total if limit is None else min(limit, total), sent,
                                        early)
        except upstream.ConnectError as exc:
            raise UpstreamError("connect", str(exc)) from None
        except TimeoutError:
            if limit is not None and limit <= total:
                raise UpstreamError("timeout", f"no first byte within {limit:g}s") from None
            raise UpstreamError("connect", "no answer in time") from None
        except upstream.UpstreamBroken as exc:
            raise UpstreamError("reset", str(exc)) from None
        if resp.status >= 500:
            try:
                data = await resp.read(ERROR_BODY_LIMIT)
            except (upstream.UpstreamBroken, TimeoutError):
                data = b""
            finally:
                resp.close()
            raise UpstreamError("status", f"answered {resp.status}", resp.status, data)
        if early is not None and early.resp is not None:  # at the client already
            if limit is not None and limit < total:
                resp.deadline(max(0.0, total - (loop.time() - started)))
            return Upstream(resp, early.first, early)
        try:
            got = resp.readany_now()  # the usual case: the first bytes came with the head
            first = got if got is not None else await resp.readany()
        except TimeoutError:
            resp.close()
            if limit is not None and limit <= total:
                raise UpstreamError("timeout", f"no first byte within {limit:g}s") from None
            raise UpstreamError("reset", "no answer in time") from None
        except upstream.UpstreamBroken as exc:
            resp.close()
            raise UpstreamError("reset", str(exc)) from None
        except asyncio.CancelledError:  # the client left
            resp.close()
            raise
        if not first and not resp.at_eof():
            resp.close()
            raise UpstreamError("reset", "empty first read")
        if limit is not None and limit < total:
            # The rest of the answer within the whole request's limit.
            resp.deadline(max(0.0, total - (loop.time() - started)))
        return Upstream(resp, first, early)


def sse_error(exc: BaseException) -> bytes:
    """The SSE event that tells a streaming client its upstream failed mid-stream."""
    kind = "timeout" if isinstance(exc, TimeoutError) else "upstream_failed"
    body = {"error": {"message": f"the engine failed mid-stream: {type(exc).__name__}",
                      "type": "server_error", "param": None, "code": kind}}
    return f"data: {json.dumps(body)}\n\n".encode()


class Tap(Protocol):
    """Watches (and may rewrite) the body on its way to the client (``mesh.selfcheck``)."""

    @property
    def rewrites(self) -> bool:
        """True when ``feed`` may send other bytes than it got."""
        ...

    def feed(self, chunk: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


class _Relayed(web.StreamResponse):
    """The head goes out with the first body bytes, in one write: on loopback or a LAN a
    write costs the TCP path of both ends, so a separate one for the head doubles it."""

    _send_headers_immediately = False


def response_headers(up: Upstream) -> dict[str, str]:
    return {k: v for k, v in up.resp.headers.items() if k.lower() not in _SKIP}


async def relay(
    request: web.Request | FrontRequest, up: Upstream, extra_headers: Mapping[str, str],
    tap: Tap | None = None,
) -> tuple[web.StreamResponse, int, bool]:
    """Copy ``up`` to the client as it arrives; returns (response, bytes sent, completed).

    A ``tap`` sees every chunk and says what to send on (a tap that rewrites makes the
    length unknown in advance, so the answer is then chunked)."""
    early = up.early
    pre = early.stream if early is not None and early.resp is None else None
    if early is not None and early.resp is None:
        early = None  # nothing went out early: the relay sends it all
    declared = up.resp.headers.get("Content-Length")
    length = (int(declared) if declared is not None and declared.isdigit()
              and (tap is None or not tap.rewrites) else None)
    resp: web.StreamResponse
    if early is not None and early.resp is not None:
        resp = early.resp  # its head is out (the same one, from the same headers)
    elif (isinstance(request, FrontRequest) and pre is not None and up.early is not None
          and up.early.extra is not None and pre._head is None
          and up.early.extra.extra is extra_headers):
        # Made while the engine worked (Early.ready): the same head as below.
        resp = pre
        if up.status != pre.status:
            pre.set_status(up.status)
        pre.begin_relay_pre(up.resp.raw_headers, _SKIP, up.early.extra, length)
    elif isinstance(request, FrontRequest):
        resp = FrontStream(request, status=up.status)
        # The head from the upstream's headers and ours, as aiohttp would write them.
        resp.begin_relay(up.resp.raw_headers, _SKIP, extra_headers, length)
    else:
        headers = response_headers(up)
        headers.update(extra_headers)
        resp = _Relayed(status=up.status, headers=headers)
        if length is not None:
            resp.content_length = length
        await resp.prepare(request)
    sent = 0
    completed = False
    # The front end's answers are written without a coroutine per write (waiting only while
    # the client's buffer is full); aiohttp's through its own writer.
    front = resp if isinstance(resp, FrontStream) else None
    try:
        chunk = up.first
        if early is not None:  # the head and first bytes are out (Early): what is left
            if tap is not None and chunk:
                tap.feed(chunk)  # passes them unchanged (else nothing went out early)
            sent = len(chunk)
            if early.drain and front is not None:
                await front.drain()
            if early.ended:
                chunk = b""
            else:
                got = up.resp.readany_now()
                chunk = got if got is not None else await up.resp.readany()
        while chunk:
            out = tap.feed(chunk) if tap is not None else chunk
            if out:
                if front is None:
                    await resp.write(out)
                elif front.write_now(out):
                    await front.drain()
                sent += len(out)
            got = up.resp.readany_now()
            chunk = got if got is not None else await up.resp.readany()
        if tap is not None:
            rest = tap.finish()
            if rest:
                await resp.write(rest)
                sent += len(rest)
        if front is None:
            await resp.write_eof()
        elif front.write_eof_now():
            await front.drain()
        completed = True
    except (upstream.UpstreamBroken, aiohttp.ClientError, TimeoutError,
            ConnectionResetError) as exc:
        # After the first byte there is no retry: the client sees the stream end early.
        sse = up.resp.headers.get("Content-Type", "").startswith("text/event-stream")
        ended = False
        if sse and not isinstance(exc, ConnectionResetError):
            with contextlib.suppress(Exception):
                await resp.write(sse_error(exc))
                await resp.write_eof()
                ended = True
        if not ended:
            with contextlib.suppress(Exception):
                if request.transport is not None:
                    request.transport.close()
    finally:
        up.close()
    return resp, sent, completed
