"""KV events over Redis Streams: the entry format and the client settings both ends share.

``kvevents.redis_bridge.RedisBridge`` (``kvmesh bridge``) appends one engine's ZMQ batches to
one stream per engine: ``XADD <stream> MAXLEN ~ N * topic <bytes> seq <decimal> payload
<bytes>``, the payload untouched. ``kvevents.redis_reader.RedisStreamReader`` ingests a stream
into one replica's slice exactly like the ZMQ subscriber (the entries carry the engine's seq
numbers, so the same tracker sees gaps, restarts and duplicates).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from kvevents.decode import RawMessage, WireError

STREAM_PREFIX = "kvmesh:kv:"
TRANSIENT = (RedisConnectionError, RedisTimeoutError, OSError)


def default_stream(engine: str) -> str:
    """The stream name for an engine id (the router's replica id: the engine's base URL)."""
    return STREAM_PREFIX + engine


def split_redis_url(url: str, engine: str) -> tuple[str, str]:
    """``redis://host:6379/0#stream`` -> (connection URL, stream); no fragment: the default."""
    parts = urlsplit(url)
    stream = parts.fragment or default_stream(engine)
    return urlunsplit(parts._replace(fragment="")), stream


def entry_fields(topic: bytes, seq: int, payload: bytes) -> dict[str, bytes]:
    return {"topic": topic, "seq": str(seq).encode(), "payload": payload}


def entry_message(fields: Mapping[bytes, bytes]) -> RawMessage:
    """A stream entry back into the message the engine sent; ``WireError`` if it is not one."""
    seq_raw = fields.get(b"seq")
    payload = fields.get(b"payload")
    if not isinstance(seq_raw, bytes) or not seq_raw.isdigit() or len(seq_raw) > 20:
        raise WireError(f"stream entry seq must be a decimal u64, got {seq_raw!r:.40}")
    seq = int(seq_raw)
    if seq >= 1 << 64:
        raise WireError("stream entry seq out of range")
    if not isinstance(payload, bytes):
        raise WireError("stream entry has no payload")
    topic = fields.get(b"topic", b"")
    return RawMessage(topic if isinstance(topic, bytes) else b"", seq, payload)


def check_cancelled() -> None:
    """Raise if this task is being cancelled.

    redis-py can turn a cancellation that lands mid-command into a connection error, or drop
    it and return; a read loop or retry loop would then outlive its own cancellation.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def stream_id(value: bytes | str) -> tuple[int, int]:
    text = value.decode() if isinstance(value, bytes) else value
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


RedisClient = Any
"""``redis.asyncio.Redis``; typed loosely because the installed stubs (types-redis 4.x) lag
the library (no ``aclose``, no asyncio ``Retry``)."""


def client(url: str, read_timeout: float | None) -> RedisClient:
    # No client-side retries: a dead Redis is reported at once and handled by our own loop.
    return aioredis.Redis.from_url(  # type: ignore[call-overload,unused-ignore]
        url,
        socket_timeout=read_timeout,
        socket_connect_timeout=2.0,
        retry=Retry(NoBackoff(), 0),
    )
