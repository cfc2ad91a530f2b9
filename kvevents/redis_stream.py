"""KV events over Redis Streams: a bridge that writes them, a reader that ingests them.

``RedisBridge`` (``kvmesh bridge``) subscribes to one engine's ZMQ PUB and appends every batch
to one Redis Stream per engine: ``XADD <stream> MAXLEN ~ N * topic <bytes> seq <decimal>
payload <bytes>``, the payload untouched. It fills its own gaps from the engine's replay
socket when it has one, so the stream stays contiguous whenever the engine still holds the
history, and it continues an existing stream where it stopped (checking it is the same run).

``RedisStreamReader`` ingests a stream into one replica's slice exactly like the ZMQ
subscriber: the entries carry the engine's seq numbers, so the same tracker sees gaps (trimmed
by MAXLEN, lost when Redis came back empty), restarts and duplicates, and the same replay
endpoint (if configured) repairs them; without one the slice is marked partial and rebuilt.

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
from collections import deque
from collections.abc import Callable, Mapping
from itertools import islice
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
import xxhash
import zmq
import zmq.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from kvevents.decode import RawMessage, WireError, split_message
from kvevents.events import IndexWriter
from kvevents.ingest import AliveHook, EngineIngest, EngineStats, Version
from kvevents.replay import recover
from kvevents.tracker import Action, Apply, SequenceTracker
from kvevents.zmq_subscriber import wants_bind

log = logging.getLogger(__name__)

STREAM_PREFIX = "kvmesh:kv:"
_TRANSIENT = (RedisConnectionError, RedisTimeoutError, OSError)


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


def _check_cancelled() -> None:
    """Raise if this task is being cancelled.

    redis-py can turn a cancellation that lands mid-command into a connection error, or drop
    it and return; a read loop or retry loop would then outlive its own cancellation.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _stream_id(value: bytes | str) -> tuple[int, int]:
    text = value.decode() if isinstance(value, bytes) else value
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


RedisClient = Any
"""``redis.asyncio.Redis``; typed loosely because the installed stubs (types-redis 4.x) lag
the library (no ``aclose``, no asyncio ``Retry``)."""


def _client(url: str, read_timeout: float | None) -> RedisClient:
    # No client-side retries: a dead Redis is reported at once and handled by our own loop.
    return aioredis.Redis.from_url(  # type: ignore[call-overload,unused-ignore]
        url,
        socket_timeout=read_timeout,
        socket_connect_timeout=2.0,
        retry=Retry(NoBackoff(), 0),
    )


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
                client = _client(self.redis_url, self.block + 5.0)
                try:
                    if connected_before:
                        await self._check_stream(client)
                    connected_before = True
                    await self._read(client)
                except _TRANSIENT as exc:
                    _check_cancelled()
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
                        await client.aclose()
        finally:
            if self._ctx is not None and self._own_ctx:
                self._ctx.term()
                self._ctx = None

    async def _check_stream(self, client: RedisClient) -> None:
        """After a reconnect: a stream whose ids went backwards was recreated; read it all."""
        try:
            info: dict[Any, Any] = await client.xinfo_stream(self.stream)
            last = info.get(b"last-generated-id", info.get("last-generated-id", b"0-0"))
        except ResponseError:  # no such stream (Redis came back empty, nothing written yet)
            last = b"0-0"
        if _stream_id(last) < _stream_id(self.last_id):
            self.stream_resets += 1
            log.warning(
                "engine %s: stream %s restarted below the last id read; reading it from the start",
                self.replica,
                self.stream,
            )
            self.last_id = b"0-0"

    async def _read(self, client: RedisClient) -> None:
        block_ms = max(1, int(self.block * 1000))
        while True:
            resp: Any = await client.xread(
                {self.stream: self.last_id},
                count=self.count,
                block=block_ms if self.caught_up else None,
            )
            _check_cancelled()  # redis-py can swallow a cancellation that lands mid-read
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

    def on_message(self, msg: RawMessage) -> bool:
        digest = xxhash.xxh3_64_intdigest(msg.payload)
        self._run(self.tracker.live(msg.seq, 0.0, msg, digest))
        return self.tracker.replaying

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
        self.replay_attempts = replay_attempts
        self.replay_idle_timeout = replay_idle_timeout
        self.relay = _Relay(replay_endpoint is not None, first_seq, self._enqueue)
        self.written = 0
        self.dropped = 0
        self.redis_errors = 0
        self.disconnects = 0
        self.ready = asyncio.Event()
        """Set once the bridge is subscribed and knows where the stream stands."""
        self.bound_endpoint: str | None = None
        self._pending: deque[RawMessage] = deque()
        self._wake = asyncio.Event()
        self._own_ctx = context is None
        self._ctx = context if context is not None else zmq.asyncio.Context()
        self._task: asyncio.Task[None] | None = None

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
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.SUBSCRIBE, (self.topic or "").encode())
        monitor: zmq.asyncio.Socket | None = None
        tasks: list[asyncio.Task[None]] = []
        try:
            await self._seed_from_stream()
            if self.bind:
                sock.bind(self.zmq_endpoint)
                last = sock.getsockopt(zmq.LAST_ENDPOINT)
                self.bound_endpoint = last.decode() if isinstance(last, bytes) else str(last)
            else:
                sock.connect(self.zmq_endpoint)
            monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            tasks.append(asyncio.create_task(self._write_loop()))
            tasks.append(asyncio.create_task(self._watch(monitor)))
            self.ready.set()
            await self._read_loop(sock)
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            with contextlib.suppress(zmq.ZMQError):
                sock.disable_monitor()
            sock.close(linger=0)
            if monitor is not None:
                monitor.close(linger=0)
            if self._own_ctx:
                self._ctx.term()

    async def _seed_from_stream(self) -> None:
        """Continue an existing stream: its last entry is where this bridge stands."""
        delay = self.retry_delay
        while True:
            client = _client(self.redis_url, 5.0)
            try:
                last: Any = await client.xrevrange(self.stream, "+", "-", count=1)
                _check_cancelled()
                break
            except _TRANSIENT as exc:
                _check_cancelled()
                self.redis_errors += 1
                log.warning("bridge: redis unavailable (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_retry_delay)
            finally:
                with contextlib.suppress(Exception):
                    await client.aclose()
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

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        from zmq.utils.monitor import parse_monitor_message

        while True:
            frames = await monitor.recv_multipart()
            with contextlib.suppress(ValueError, zmq.ZMQError):
                if parse_monitor_message(frames)["event"] == zmq.EVENT_DISCONNECTED:
                    self.disconnects += 1
                    self.relay.tracker.suspect()

    async def _read_loop(self, sock: zmq.asyncio.Socket) -> None:
        want = self.topic.encode() if self.topic is not None else None
        replay: asyncio.Task[None] | None = None
        try:
            while True:
                frames = await sock.recv_multipart()
                try:
                    msg = split_message(frames)
                except WireError as exc:
                    self.relay.on_bad_message(str(exc), self.clock())
                    continue
                if want is not None and msg.topic != want:
                    continue
                if self.relay.on_message(msg) and (replay is None or replay.done()):
                    replay = asyncio.create_task(self._recover())
        finally:
            if replay is not None:
                replay.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await replay

    async def _recover(self) -> None:
        assert self.replay_endpoint is not None
        await recover(
            self.relay,
            self._ctx,
            self.replay_endpoint,
            self.clock,
            attempts=self.replay_attempts,
            idle_timeout=self.replay_idle_timeout,
            name="bridge",
        )

    async def _write_loop(self) -> None:
        delay = self.retry_delay
        client = _client(self.redis_url, 5.0)
        try:
            while True:
                if not self._pending:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                batch = list(islice(self._pending, 256))
                try:
                    pipe = client.pipeline(transaction=False)
                    for msg in batch:
                        pipe.xadd(
                            self.stream,
                            entry_fields(msg.topic, msg.seq, msg.payload),
                            maxlen=self.maxlen,
                            approximate=True,
                        )
                    await pipe.execute()
                    _check_cancelled()
                except (*_TRANSIENT, RedisError) as exc:
                    _check_cancelled()
                    self.redis_errors += 1
                    log.warning("bridge: XADD failed (%s); retrying in %.1fs", exc, delay)
                    with contextlib.suppress(Exception):
                        await client.aclose()
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.max_retry_delay)
                    client = _client(self.redis_url, 5.0)
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
                await client.aclose()
