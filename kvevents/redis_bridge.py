"""Relay one engine's ZMQ KV events into a Redis Stream (``kvmesh bridge``).

The bridge reads the engine's PUB through the same stream shell as the router's subscriber
(:class:`kvevents.zmq_stream.ZmqStream`) and appends every batch, in seq order and without
duplicates, to the engine's stream (format: :mod:`kvevents.redis_stream`). It fills its own
gaps from the engine's replay socket when it has one, so the stream stays contiguous whenever
the engine still holds the history, and it continues an existing stream where it stopped
(checking it is the same run).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from itertools import islice
from typing import Any

import xxhash
import zmq
import zmq.asyncio
from redis.exceptions import RedisError

from kvevents.decode import RawMessage, WireError
from kvevents.redis_stream import TRANSIENT, check_cancelled, client, entry_fields, entry_message
from kvevents.tracker import Action, Apply, SequenceTracker
from kvevents.zmq_stream import ZmqStream, wants_bind

log = logging.getLogger("kvevents.redis_stream")


class _Relay:
    """The bridge's sans-I/O core: tracker in, stream entries out (in seq order, no dups)."""

    def __init__(self, can_replay: bool, first_seq: int, emit: Callable[[RawMessage], None]):
        self.tracker: SequenceTracker[RawMessage] = SequenceTracker(
            can_replay=can_replay, first_seq=first_seq
        )
        self.emit = emit
        self.malformed = 0
        self._last_log = float("-inf")

    @property
    def replay_from(self) -> int | None:
        return self.tracker.replay_from

    def _run(self, actions: list[Action[RawMessage]]) -> None:
        for action in actions:
            if isinstance(action, Apply):
                self.emit(action.item)

    def on_message(self, msg: RawMessage, now: float) -> bool:
        digest = xxhash.xxh3_64_intdigest(msg.payload)
        self._run(self.tracker.live(msg.seq, 0.0, msg, digest))
        return self.tracker.replaying

    def on_disconnect(self) -> None:
        self.tracker.suspect()

    def on_replay_message(self, msg: RawMessage, now: float) -> bool:
        before = self.tracker.replays
        digest = xxhash.xxh3_64_intdigest(msg.payload)
        self._run(self.tracker.replayed(msg.seq, 0.0, msg, digest))
        return self.tracker.replays != before

    def on_replay_done(self, now: float) -> bool:
        self._run(self.tracker.replay_done())
        return self.tracker.replaying

    def on_bad_message(self, reason: str, now: float) -> None:
        self.malformed += 1
        if now - self._last_log >= 1.0:
            log.warning("bridge: dropped malformed message: %s", reason)
            self._last_log = now


class RedisBridge:
    """Relay one engine's ZMQ KV events into a Redis Stream (``kvmesh bridge``).

    ``zmq_endpoint``: the engine's PUB (bound when it has ``*``/``::``, or ``bind=True``).
    ``redis_url``/``stream``: where to append. ``replay_endpoint``: the engine's replay ROUTER,
    used to fill gaps. ``maxlen``: approximate stream length kept (``XADD MAXLEN ~``).
    ``topic``: only this exact topic (None: all). ``queue``: entries held while Redis is down
    (the oldest are dropped beyond it; the reader then sees the gap).
    """

    def __init__(
        self,
        zmq_endpoint: str,
        redis_url: str,
        stream: str,
        *,
        replay_endpoint: str | None = None,
        maxlen: int = 100_000,
        topic: str | None = None,
        bind: bool | None = None,
        first_seq: int = 0,
        queue: int = 100_000,
        clock: Callable[[], float] = time.time,
        retry_delay: float = 0.1,
        max_retry_delay: float = 2.0,
        replay_attempts: int = 3,
        replay_idle_timeout: float = 2.0,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.zmq_endpoint = zmq_endpoint
        self.redis_url = redis_url
        self.stream = stream
        self.replay_endpoint = replay_endpoint
        self.maxlen = maxlen
        self.topic = topic
        self.bind = wants_bind(zmq_endpoint) if bind is None else bind
        self.queue_size = queue
        self.clock = clock
        self.retry_delay = retry_delay
        self.max_retry_delay = max_retry_delay
        self.relay = _Relay(replay_endpoint is not None, first_seq, self._enqueue)
        self.written = 0
        self.dropped = 0
        self.redis_errors = 0
        self.ready = asyncio.Event()
        """Set once the bridge is subscribed and knows where the stream stands."""
        self._pending: deque[RawMessage] = deque()
        self._wake = asyncio.Event()
        self._own_ctx = context is None
        self._ctx = context if context is not None else zmq.asyncio.Context()
        self.zmq = ZmqStream(
            "bridge", zmq_endpoint, self.relay, self._ctx, replay_endpoint=replay_endpoint,
            bind=self.bind, topic=topic, clock=clock, replay_attempts=replay_attempts,
            replay_idle_timeout=replay_idle_timeout,
        )
        self._task: asyncio.Task[None] | None = None

    @property
    def disconnects(self) -> int:
        return self.zmq.disconnects

    @property
    def bound_endpoint(self) -> str | None:
        return self.zmq.bound_endpoint

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="kvevents-bridge")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _enqueue(self, msg: RawMessage) -> None:
        if len(self._pending) >= self.queue_size:
            self._pending.popleft()
            self.dropped += 1
        self._pending.append(msg)
        self._wake.set()

    async def run(self) -> None:
        writer: asyncio.Task[None] | None = None
        try:
            await self._seed_from_stream()
            self.zmq.open()
            writer = asyncio.create_task(self._write_loop())
            self.ready.set()
            await self.zmq.read()
        finally:
            if writer is not None:
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writer
            self.zmq.close()
            if self._own_ctx:
                self._ctx.term()

    async def _seed_from_stream(self) -> None:
        """Continue an existing stream: its last entry is where this bridge stands."""
        delay = self.retry_delay
        while True:
            conn = client(self.redis_url, 5.0)
            try:
                last: Any = await conn.xrevrange(self.stream, "+", "-", count=1)
                check_cancelled()
                break
            except TRANSIENT as exc:
                check_cancelled()
                self.redis_errors += 1
                log.warning("bridge: redis unavailable (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_retry_delay)
            finally:
                with contextlib.suppress(Exception):
                    await conn.aclose()
        if last:
            try:
                msg = entry_message(last[0][1])
            except WireError as exc:
                log.warning(
                    "bridge: last entry of %s unusable (%s); starting fresh", self.stream, exc
                )
                return
            digest = xxhash.xxh3_64_intdigest(msg.payload)
            self.relay.tracker.assume(0, msg.seq, digest)
            self.relay.tracker.suspect()  # the engine may have restarted meanwhile: verify

    async def _write_loop(self) -> None:
        delay = self.retry_delay
        conn = client(self.redis_url, 5.0)
        try:
            while True:
                if not self._pending:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                batch = list(islice(self._pending, 256))
                try:
                    pipe = conn.pipeline(transaction=False)
                    for msg in batch:
                        pipe.xadd(
                            self.stream,
                            entry_fields(msg.topic, msg.seq, msg.payload),
                            maxlen=self.maxlen,
                            approximate=True,
                        )
                    await pipe.execute()
                    check_cancelled()
                except (*TRANSIENT, RedisError) as exc:
                    check_cancelled()
                    self.redis_errors += 1
                    log.warning("bridge: XADD failed (%s); retrying in %.1fs", exc, delay)
                    with contextlib.suppress(Exception):
                        await conn.aclose()
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.max_retry_delay)
                    conn = client(self.redis_url, 5.0)
                    continue
                delay = self.retry_delay
                for msg in batch:
                    # Entries appended while we wrote stay queued; the oldest may have been
                    # dropped meanwhile (queue full), so pop by identity.
                    if self._pending and self._pending[0] is msg:
                        self._pending.popleft()
                self.written += len(batch)
        finally:
            with contextlib.suppress(Exception):
                await conn.aclose()
