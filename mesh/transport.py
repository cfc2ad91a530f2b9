"""Mesh frames over HTTP: ``POST /mesh/gossip`` on the router's own aiohttp server.

A request body and a response body are both a *packet*: a msgpack array of sealed frames
(``mesh.auth``), content type :data:`CONTENT_TYPE`. The server hands each frame to the
mesh core and answers with the frames the core addressed back to the sender (a ping's
ack, a push's ack, a sync's reply), so one HTTP exchange is one protocol round trip and
a probe's RTT is the real HTTP path's. Packets are bounded by the configured message
size plus a small allowance for the array header; a frame inside is checked again by the
core. Problems with the packet itself are answered 400 / 413 with a reason; refused
frames inside a valid packet are named in the ``x-kvmesh-rejected`` header (the sender
learns of a key mismatch without being told anything it could exploit).

Nothing here knows the protocol: this module moves bytes and reports failures.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import aiohttp
import msgpack  # type: ignore[import-untyped,unused-ignore]
from aiohttp import web

from crdt.base import DecodeError
from mesh.messages import unpack

GOSSIP_PATH = "/mesh/gossip"
STATUS_PATH = "/mesh/status"
CONTENT_TYPE = "application/x-kvmesh-frames"
REJECTED_HEADER = "x-kvmesh-rejected"
PACKET_SLACK = 4096
"""Bytes a packet may exceed the message limit by: the array header and a few small frames."""
MAX_FRAMES = 256


class TransportError(Exception):
    """A packet could not be delivered or its answer could not be read."""


def pack_frames(frames: Sequence[bytes]) -> bytes:
    data: bytes = msgpack.packb(list(frames), use_bin_type=True)
    return data


def unpack_frames(body: bytes) -> list[bytes]:
    """A packet's frames; ``DecodeError`` for anything that is not a list of byte strings."""
    obj = unpack(body)
    if type(obj) is not list:
        raise DecodeError("packet: not a list of frames")
    if len(obj) > MAX_FRAMES:
        raise DecodeError(f"packet: more than {MAX_FRAMES} frames")
    if not all(type(f) is bytes for f in obj):
        raise DecodeError("packet: a frame is not bytes")
    return obj


def packet_limit(max_message_bytes: int) -> int:
    return max_message_bytes + PACKET_SLACK


async def read_limited(stream: aiohttp.StreamReader, limit: int) -> bytes | None:
    """The whole body, or None as soon as it exceeds ``limit`` (whatever client_max_size says)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)


@dataclass(frozen=True, slots=True)
class Answer:
    """What the gossip handler decided: reply frames and the reasons of refused frames."""

    frames: list[bytes]
    rejected: list[str]


Handler = Callable[[list[bytes]], Awaitable[Answer]]


def gossip_handler(
    handle: Handler, max_message_bytes: int, on_bad_packet: Callable[[str], None]
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The aiohttp handler for ``POST /mesh/gossip`` around a frames -> Answer coroutine."""
    limit = packet_limit(max_message_bytes)

    async def handler(request: web.Request) -> web.StreamResponse:
        too_big = request.content_length is not None and request.content_length > limit
        body = None if too_big else await read_limited(request.content, limit)
        if body is None:
            on_bad_packet("oversize_packet")
            return web.Response(status=413, text=f"packet larger than {limit} bytes")
        try:
            frames = unpack_frames(body)
        except DecodeError as exc:
            on_bad_packet("bad_packet")
            return web.Response(status=400, text=f"bad packet: {exc}")
        answer = await handle(frames)
        headers = {}
        if answer.rejected:
            headers[REJECTED_HEADER] = ",".join(sorted(set(answer.rejected)))
        return web.Response(
            body=pack_frames(answer.frames), content_type=CONTENT_TYPE, headers=headers
        )

    return handler


class GossipClient:
    """Posts packets to peers; one pooled session, optional TLS, bounded answers."""

    def __init__(
        self,
        *,
        timeout: float,
        max_message_bytes: int,
        ssl_context: ssl.SSLContext | None = None,
        session: aiohttp.ClientSession | None = None,
        limit_per_host: int = 8,
    ) -> None:
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.limit = packet_limit(max_message_bytes)
        self.ssl_context = ssl_context
        self._session = session
        self._own_session = session is None
        self._limit_per_host = limit_per_host
        self.server_hostnames: dict[str, str] = {}
        """addr -> TLS server name, for seed URLs whose host was resolved to an address."""

    async def start(self) -> None:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=256, limit_per_host=self._limit_per_host, ssl=self.ssl_context or True
            )
            self._session = aiohttp.ClientSession(connector=connector, timeout=self.timeout)

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
        self._session = None

    async def post(self, addr: str, frames: Sequence[bytes]) -> list[bytes]:
        """Deliver frames to ``addr`` and return the frames of its answer."""
        if self._session is None:
            raise TransportError("client not started")
        url = addr.rstrip("/") + GOSSIP_PATH
        kwargs: dict[str, object] = {}
        if url.startswith("https:"):
            if self.ssl_context is not None:
                kwargs["ssl"] = self.ssl_context
            host = self.server_hostnames.get(addr)
            if host is not None:
                kwargs["server_hostname"] = host
        try:
            async with self._session.post(
                url,
                data=pack_frames(frames),
                headers={"Content-Type": CONTENT_TYPE},
                timeout=self.timeout,
                **kwargs,  # type: ignore[arg-type]
            ) as resp:
                if resp.status != 200:
                    text = (await resp.content.read(200)).decode(errors="replace")
                    raise TransportError(f"{addr}: HTTP {resp.status} {text}")
                body = await read_limited(resp.content, self.limit)
                if body is None:
                    raise TransportError(f"{addr}: answer larger than {self.limit} bytes")
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise TransportError(f"{addr}: {type(exc).__name__}: {exc}") from exc
        try:
            return unpack_frames(body)
        except DecodeError as exc:
            raise TransportError(f"{addr}: bad answer: {exc}") from exc
