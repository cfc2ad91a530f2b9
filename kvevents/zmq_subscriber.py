"""Ingest one engine's KV events from its ZMQ PUB socket (asyncio shell over ``EngineIngest``).

The subscriber connects to the engine's PUB (``tcp://engine:5557``) or binds when the engine
is configured to connect to the router (an endpoint with ``*`` or ``::``, or ``bind=True``).
It keeps reading live messages while a replay runs (the tracker buffers them), so a long
replay does not push the engine's stream past the socket's high-water mark.

Lifecycle: ``await sub.start()`` then ``await sub.aclose()``; or ``await sub.run()`` as a task
(cancel it to stop). ``sub.stats()`` gives counters for metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from kvevents.decode import WireError, split_message
from kvevents.events import IndexWriter
from kvevents.ingest import AliveHook, EngineIngest, EngineStats, Version
from kvevents.replay import recover


def wants_bind(endpoint: str) -> bool:
    """The engines' own rule: wildcard, ipc and inproc endpoints are bound, others connected."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


class ZmqSubscriber:
    """One engine's live stream (plus replay) into one replica's slice.

    ``replica``: slice name (the engine's id in the mesh). ``endpoint``: the engine's PUB
    endpoint, or the address to bind. ``writer``: the index. ``replay_endpoint``: the engine's
    replay ROUTER, if it has one. ``bind``: None = decide from the endpoint (see ``wants_bind``).
    ``topic``: None = every topic; a string = only that exact topic. ``first_seq``: where the
    engine's numbering starts. ``resume_from``: the slice's last version after a router restart.
    ``on_alive(replica, now)``: called for every good batch. ``clock``: wall clock (batch lag).
    ``replay_*``: attempts per start, per-attempt idle timeout, overall limit per attempt.
    """

    def __init__(
        self,
        replica: str,
        endpoint: str,
        writer: IndexWriter,
        *,
        replay_endpoint: str | None = None,
        bind: bool | None = None,
        topic: str | None = None,
        first_seq: int = 0,
        resume_from: Version | None = None,
        on_alive: AliveHook | None = None,
        clock: Callable[[], float] = time.time,
        replay_attempts: int = 3,
        replay_idle_timeout: float = 2.0,
        replay_max_duration: float = 120.0,
        rcvhwm: int = 100_000,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.replica = replica
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.bind = wants_bind(endpoint) if bind is None else bind
        self.topic = topic
        self.clock = clock
        self.replay_attempts = replay_attempts
        self.replay_idle_timeout = replay_idle_timeout
        self.replay_max_duration = replay_max_duration
        self.rcvhwm = rcvhwm
        self.ingest = EngineIngest(
            replica,
            writer,
            can_replay=replay_endpoint is not None,
            first_seq=first_seq,
            resume_from=resume_from,
            on_alive=on_alive,
        )
        self.other_topics = 0
        self._own_ctx = context is None
        self._ctx = context if context is not None else zmq.asyncio.Context()
        self._sock: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._replay_task: asyncio.Task[None] | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._monitor_task: asyncio.Task[None] | None = None
        self.disconnects = 0
        self.bound_endpoint: str | None = None
        """The address actually bound (``tcp://*:0`` becomes a real port), when binding."""

    def stats(self) -> EngineStats:
        return self.ingest.stats(self.clock())

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the socket and start ingesting in a background task."""
        if self._task is not None:
            return
        self._open()
        self._task = asyncio.create_task(self._loop(), name=f"kvevents-zmq-{self.replica}")

    async def run(self) -> None:
        """Ingest until cancelled."""
        if self._task is not None:
            raise RuntimeError("already started")
        self._open()
        try:
            await self._loop()
        finally:
            await self._shutdown()

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._shutdown()

    # -- internals ------------------------------------------------------------------------
    def _open(self) -> None:
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, self.rcvhwm)
        sock.setsockopt(zmq.SUBSCRIBE, (self.topic or "").encode())
        try:
            if self.bind:
                sock.bind(self.endpoint)
                last = sock.getsockopt(zmq.LAST_ENDPOINT)
                self.bound_endpoint = last.decode() if isinstance(last, bytes) else str(last)
            else:
                sock.connect(self.endpoint)
        except zmq.ZMQError:
            sock.close(linger=0)
            raise
        self._sock = sock
        self._monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)

    async def _watch(self) -> None:
        """A dropped connection may hide an engine restart: verify the next batch."""
        monitor = self._monitor
        assert monitor is not None
        while True:
            frames = await monitor.recv_multipart()
            try:
                event = parse_monitor_message(frames)
            except (ValueError, zmq.ZMQError):  # pragma: no cover - libzmq's own frames
                continue
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self.disconnects += 1
                self.ingest.on_disconnect()

    async def _loop(self) -> None:
        sock = self._sock
        assert sock is not None
        self._monitor_task = asyncio.create_task(self._watch(), name=f"kvevents-mon-{self.replica}")
        ingest, clock, topic = self.ingest, self.clock, self.topic
        want = topic.encode() if topic is not None else None
        while True:
            frames = await sock.recv_multipart()
            now = clock()
            try:
                msg = split_message(frames)
            except WireError as exc:
                ingest.on_bad_message(str(exc), now)
                continue
            if want is not None and msg.topic != want:
                self.other_topics += 1
                continue
            if ingest.on_message(msg, now) and self._replay_task is None:
                self._replay_task = asyncio.create_task(
                    self._recover(), name=f"kvevents-replay-{self.replica}"
                )

    async def _recover(self) -> None:
        assert self.replay_endpoint is not None
        try:
            await recover(
                self.ingest,
                self._ctx,
                self.replay_endpoint,
                self.clock,
                attempts=self.replay_attempts,
                idle_timeout=self.replay_idle_timeout,
                max_duration=self.replay_max_duration,
                name=f"engine {self.replica}",
            )
        finally:
            self._replay_task = None

    async def _shutdown(self) -> None:
        for task in (self._replay_task, self._monitor_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._replay_task = self._monitor_task = None
        if self._sock is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._sock.disable_monitor()
            self._sock.close(linger=0)
            self._sock = None
        if self._monitor is not None:
            self._monitor.close(linger=0)
            self._monitor = None
        if self._own_ctx:
            self._ctx.term()
