"""Forwarding to an engine or to another region's router, and streaming the answer back.

``open`` sends the request and waits for the first body bytes. Until they arrive nothing
has reached the client, so a refused connection, a reset, a timeout or a 5xx answer is an
:class:`UpstreamError` and the router tries the next-best target. ``relay`` then copies
the body to the client chunk by chunk as it arrives (SSE is never buffered); an error after
the first byte reaches the client as a cut stream. If the client goes away the handler is
cancelled, the upstream response is closed, and the engine sees the disconnect.

The forwarding protocol between routers lives here too: a forwarded request carries
``x-kvmesh-hop`` (never forwarded again), the sender's node id, the replica it picked (empty:
"pick one yourself") and, when mesh keys are set, an HMAC over those three and the request id.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import aiohttp
from aiohttp import web

# Hop-by-hop or recomputed headers never copied from the upstream response.
_SKIP = {
    "connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding",
    "date", "server", "proxy-authenticate", "proxy-authorization", "te", "trailers", "upgrade",
}
ERROR_BODY_LIMIT = 4096

HOP = "x-kvmesh-hop"
FROM = "x-kvmesh-from"
TARGET = "x-kvmesh-target"
SIG = "x-kvmesh-sig"
H_REPLICA = "x-kvmesh-replica"
H_REGION = "x-kvmesh-region"
H_ROUTE = "x-kvmesh-route"
PASS_HEADERS = ("authorization", "x-request-id", "openai-organization", "openai-project")
"""Client request headers copied onto the upstream request."""


def forward_signature(key: str, origin: str, target: str, request_id: str) -> str:
    msg = f"{origin}\n{target}\n{request_id}".encode()
    return hmac.new(key.encode(), msg, hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class Forwarded:
    """What a forwarded request's headers say about it."""

    origin: str
    target: str | None
    """The replica the sending router picked; None: this router picks among its own."""


class BadForward(Exception):
    """A forwarded request whose signature no mesh key verifies."""


def read_forward(headers: Mapping[str, str], keys: Sequence[str]) -> Forwarded | None:
    """None for a client's request; raises :class:`BadForward` on a bad signature."""
    if headers.get(HOP) is None:
        return None
    target = headers.get(TARGET) or None
    origin = headers.get(FROM, "")
    if keys:
        sig, rid = headers.get(SIG, ""), headers.get("x-request-id", "")
        if not any(hmac.compare_digest(sig, forward_signature(k, origin, target or "", rid))
                   for k in keys):
            raise BadForward("forwarded request with a bad or missing mesh signature")
    return Forwarded(origin, target)


def upstream_headers(incoming: Mapping[str, str], request_id: str) -> dict[str, str]:
    """Headers of the request to the target: the client's pass-through ones and the id."""
    headers = {"Content-Type": "application/json", "Accept-Encoding": "identity",
               "x-request-id": request_id}
    for h in PASS_HEADERS:
        if h in incoming and h != "x-request-id":
            headers[h] = incoming[h]
    return headers


def mark_forward(headers: dict[str, str], origin: str, target: str, request_id: str,
                 session: str | None, key: str | None) -> None:
    """Turn ``headers`` into a forward to another region's router (one hop, signed)."""
    headers[HOP] = "1"
    headers[FROM] = origin
    headers[TARGET] = target
    if session:
        headers["x-session-id"] = session
    if key is not None:
        headers[SIG] = forward_signature(key, origin, target, request_id)


class UpstreamError(Exception):
    """The target failed before sending any body: safe to retry elsewhere."""

    def __init__(self, kind: str, detail: str, status: int | None = None,
                 body: bytes = b"") -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        """``connect`` (never reached it), ``status`` (answered 5xx), ``reset`` (died early)."""
        self.detail = detail
        self.status = status
        self.body = body


@dataclass(slots=True)
class Upstream:
    resp: aiohttp.ClientResponse
    first: bytes

    @property
    def status(self) -> int:
        return self.resp.status

    def close(self) -> None:
        self.resp.close()


class Forwarder:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        connect_timeout: float = 2.0,
        request_timeout: float = 600.0,
    ) -> None:
        self.session = session
        self.timeout = aiohttp.ClientTimeout(
            total=request_timeout, sock_connect=connect_timeout, connect=connect_timeout
        )

    async def open(
        self, url: str, body: bytes, headers: Mapping[str, str], delay: float = 0.0
    ) -> Upstream:
        """POST ``body`` to ``url``; return once the first body bytes are in."""
        if delay > 0:
            # Emulated round trip to a far region (demo): the request leaves late.
            await asyncio.sleep(delay)
        try:
            resp = await self.session.post(url, data=body, headers=headers, timeout=self.timeout)
        except (aiohttp.ClientConnectorError, aiohttp.ClientConnectionError, TimeoutError,
                OSError) as exc:
            raise UpstreamError("connect", str(exc) or type(exc).__name__) from None
        if resp.status >= 500:
            try:
                data = await resp.content.read(ERROR_BODY_LIMIT)
            except (aiohttp.ClientError, TimeoutError):
                data = b""
            finally:
                resp.close()
            raise UpstreamError("status", f"answered {resp.status}", resp.status, data)
        try:
            first = await resp.content.readany()
        except (aiohttp.ClientError, TimeoutError) as exc:
            resp.close()
            raise UpstreamError("reset", str(exc) or type(exc).__name__) from None
        if not first and not resp.content.at_eof():
            resp.close()
            raise UpstreamError("reset", "empty first read")
        return Upstream(resp, first)


def response_headers(up: Upstream) -> dict[str, str]:
    return {k: v for k, v in up.resp.headers.items() if k.lower() not in _SKIP}


async def relay(
    request: web.Request, up: Upstream, extra_headers: Mapping[str, str]
) -> tuple[web.StreamResponse, int, bool]:
    """Copy ``up`` to the client as it arrives; returns (response, bytes sent, completed)."""
    headers = response_headers(up)
    headers.update(extra_headers)
    resp = web.StreamResponse(status=up.status, headers=headers)
    length = up.resp.headers.get("Content-Length")
    if length is not None and length.isdigit():
        resp.content_length = int(length)
    await resp.prepare(request)
    sent = 0
    completed = False
    try:
        if up.first:
            await resp.write(up.first)
            sent += len(up.first)
        while True:
            chunk = await up.resp.content.readany()
            if not chunk:
                break
            await resp.write(chunk)
            sent += len(chunk)
        await resp.write_eof()
        completed = True
    except (aiohttp.ClientError, TimeoutError, ConnectionResetError):
        # After the first byte there is no retry: the client sees the stream end early.
        with contextlib.suppress(Exception):
            if request.transport is not None:
                request.transport.close()
    finally:
        up.close()
    return resp, sent, completed
