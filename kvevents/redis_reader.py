"""Ingest one engine's KV events from a Redis Stream into one replica's slice.

The entries carry the engine's seq numbers, so the same tracker as the ZMQ subscriber's sees
gaps (trimmed by MAXLEN, lost when Redis came back empty), restarts and duplicates, and the
same replay endpoint (if configured) repairs them; without one the slice is marked partial and
rebuilt.

Resuming after a reader restart: pass the slice's last applied version (``resume_from``,
e.g. ``PrefixIndex.version(replica)``). The reader reads the stream from its first entry,
rebuilding the engine-hash map without writing, and writes from the first batch after that
version: nothing lost, nothing applied twice. If the stream no longer holds the start of that
run (trimmed, or Redis lost it), the map cannot be rebuilt and the reader resyncs (replay from
the engine, else a partial slice) instead of guessing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import zmq
import zmq.asyncio
from redis.exceptions import ResponseError

from kvevents.decode import WireError
from kvevents.events import IndexWriter
from kvevents.ingest import AliveHook, EngineIngest, EngineStats, Version
from kvevents.redis_stream import (
    TRANSIENT,
    RedisClient,
    check_cancelled,
    client,
    default_stream,
    entry_message,
    stream_id,
)
from kvevents.replay import recover

log = logging.getLogger("kvevents.redis_stream")


class RedisStreamReader:
    """One engine's Redis Stream into one replica's slice.

    ``replica``: slice name. ``redis_url``: ``redis://host:port/db``. ``stream``: the stream
    name (default ``kvmesh:kv:<replica>``). ``writer``: the index. ``replay_endpoint``: the
    engine's replay ROUTER, to resync when the stream lost history. ``resume_from``: the
    slice's last applied version when the router restarts. ``on_alive(replica, now)``: called
    for every good batch. ``block``: seconds one XREAD waits. ``count``: entries per read.
    """

    def __init__(
        self,
        replica: str,
        redis_url: str,
        writer: IndexWriter,
        *,
        stream: str | None = None,
        replay_endpoint: str | None = None,
        resume_from: Version | None = None,
        first_seq: int = 0,
        on_alive: AliveHook | None = None,
        clock: Callable[[], float] = time.time,
        block: float = 1.0,
        count: int = 512,
        retry_delay: float = 0.1,
        max_retry_delay: float = 2.0,
        replay_attempts: int = 3,
        replay_idle_timeout: float = 2.0,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.replica = replica
        self.redis_url = redis_url
        self.stream = stream or default_stream(replica)
        self.replay_endpoint = replay_endpoint
        self.clock = clock
        self.block = block
        self.count = count
        self.retry_delay = retry_delay
        self.max_retry_delay = max_retry_delay
        self.replay_attempts = replay_attempts
        self.replay_idle_timeout = replay_idle_timeout
        self.ingest = EngineIngest(
            replica,
            writer,
            can_replay=replay_endpoint is not None,
            first_seq=first_seq,
            resume_from=resume_from,
            on_alive=on_alive,
        )
        self.last_id: bytes = b"0-0"
        """Stream id of the last entry read."""
        self.caught_up = False
        """True once the reader has reached the end of the stream at least once."""
        self.redis_errors = 0
        self.stream_resets = 0
        self._ctx = context
        self._own_ctx = False
        self._task: asyncio.Task[None] | None = None

    def stats(self) -> EngineStats:
        return self.ingest.stats(self.clock())

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name=f"kvevents-redis-{self.replica}")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def run(self) -> None:
        """Read until cancelled, reconnecting to Redis with backoff."""
        delay = self.retry_delay
        connected_before = False
        try:
            while True:
                conn = client(self.redis_url, self.block + 5.0)
                try:
                    if connected_before:
                        await self._check_stream(conn)
                    connected_before = True
                    await self._read(conn)
                except TRANSIENT as exc:
                    check_cancelled()
                    self.redis_errors += 1
                    log.warning(
                        "engine %s: redis stream %s unavailable (%s); retrying in %.1fs",
                        self.replica,
                        self.stream,
                        exc,
                        delay,
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.max_retry_delay)
                else:  # pragma: no cover - _read only returns by raising
                    delay = self.retry_delay
                finally:
                    with contextlib.suppress(Exception):
                        await conn.aclose()
        finally:
            if self._ctx is not None and self._own_ctx:
                self._ctx.term()
                self._ctx = None

    async def _check_stream(self, conn: RedisClient) -> None:
        """After a reconnect: a stream whose ids went backwards was recreated; read it all."""
        try:
            info: dict[Any, Any] = await conn.xinfo_stream(self.stream)
            last = info.get(b"last-generated-id", info.get("last-generated-id", b"0-0"))
        except ResponseError:  # no such stream (Redis came back empty, nothing written yet)
            last = b"0-0"
        if stream_id(last) < stream_id(self.last_id):
            self.stream_resets += 1
            log.warning(
                "engine %s: stream %s restarted below the last id read; reading it from the start",
                self.replica,
                self.stream,
            )
            self.last_id = b"0-0"

    async def _read(self, conn: RedisClient) -> None:
        block_ms = max(1, int(self.block * 1000))
        while True:
            resp: Any = await conn.xread(
                {self.stream: self.last_id},
                count=self.count,
                block=block_ms if self.caught_up else None,
            )
            check_cancelled()  # redis-py can swallow a cancellation that lands mid-read
            if not resp:
                if not self.caught_up:
                    self.caught_up = True
                    self.ingest.end_catch_up(self.clock())
                continue
            for _name, entries in resp:
                for entry_id, fields in entries:
                    self.last_id = entry_id
                    await self._handle(entry_id, fields)

    async def _handle(self, entry_id: bytes, fields: Mapping[bytes, bytes]) -> None:
        now = self.clock()
        try:
            msg = entry_message(fields)
        except WireError as exc:
            self.ingest.on_bad_message(f"stream entry {entry_id!r}: {exc}", now)
            return
        if self.ingest.on_message(msg, now) and self.replay_endpoint is not None:
            if self._ctx is None:
                self._ctx = zmq.asyncio.Context()
                self._own_ctx = True
            await recover(
                self.ingest,
                self._ctx,
                self.replay_endpoint,
                self.clock,
                attempts=self.replay_attempts,
                idle_timeout=self.replay_idle_timeout,
                name=f"engine {self.replica}",
            )
