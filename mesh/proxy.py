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
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import aiohttp
from aiohttp import web

from mesh import upstream
from mesh.front import FrontRequest, FrontStream

# Hop-by-hop or recomputed headers never copied from the upstream response.
_SKIP = frozenset({
    "connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding",
    "date", "server", "proxy-authenticate", "proxy-authorization", "te", "trailers", "upgrade",
})
ERROR_BODY_LIMIT = 4096

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
H_EMULATED_RTT = "x-kvmesh-emulated-rtt"
"""On a forward from a router with ``emulate_rtt``: the seconds the receiving router holds it
before deciding, as a network that far away would deliver it late."""
MAX_EMULATED_RTT = 10.0


def emulated_hold(value: str | None) -> float:
    """Seconds a forward is held for (0 without the header); ``ValueError`` when unusable."""
    if value is None:
        return 0.0
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0.0 <= seconds <= MAX_EMULATED_RTT:
        raise ValueError(f"{H_EMULATED_RTT}: expected seconds in [0, {MAX_EMULATED_RTT:g}], "
                         f"got {value[:40]!r}")
    return seconds


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


@dataclass(slots=True)
class Upstream:
    resp: upstream.Response
    first: bytes

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
        self, url: str, body: bytes, headers: Mapping[str, str],
        first_byte_timeout: float | None = None, sent: Callable[[], None] | None = None,
    ) -> Upstream:
        """POST ``body`` to ``url``; return once the first body bytes are in, or raise
        ``UpstreamError`` (``timeout``) after ``first_byte_timeout`` seconds. ``sent``: see
        :meth:`mesh.upstream.Pool.post`."""
        limit = first_byte_timeout or self.first_byte_timeout
        total = self.request_timeout
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            resp = await self.pool.post(url, body, headers,
                                        total if limit is None else min(limit, total), sent)
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
        return Upstream(resp, first)


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
    declared = up.resp.headers.get("Content-Length")
    length = (int(declared) if declared is not None and declared.isdigit()
              and (tap is None or not tap.rewrites) else None)
    resp: web.StreamResponse
    if isinstance(request, FrontRequest):
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
