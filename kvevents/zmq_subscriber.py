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

from kvevents.events import IndexWriter
from kvevents.ingest import AliveHook, EngineIngest, EngineStats, Version
from kvevents.zmq_stream import ZmqStream, wants_bind

__all__ = ["ZmqSubscriber", "wants_bind"]


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
        self.ingest = EngineIngest(
            replica,
            writer,
            can_replay=replay_endpoint is not None,
            first_seq=first_seq,
            resume_from=resume_from,
            on_alive=on_alive,
        )
        self._own_ctx = context is None
        self._ctx = context if context is not None else zmq.asyncio.Context()
        self.zmq = ZmqStream(
            f"engine {replica}", endpoint, self.ingest, self._ctx,
            replay_endpoint=replay_endpoint, bind=self.bind, topic=topic, clock=clock,
            replay_attempts=replay_attempts, replay_idle_timeout=replay_idle_timeout,
            replay_max_duration=replay_max_duration, rcvhwm=rcvhwm,
        )
        self._task: asyncio.Task[None] | None = None

    @property
    def other_topics(self) -> int:
        return self.zmq.other_topics

    @property
    def disconnects(self) -> int:
        return self.zmq.disconnects

    @property
    def bound_endpoint(self) -> str | None:
        """The address actually bound (``tcp://*:0`` becomes a real port), when binding."""
        return self.zmq.bound_endpoint

    def stats(self) -> EngineStats:
        return self.ingest.stats(self.clock())

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the socket and start ingesting in a background task."""
        if self._task is not None:
            return
        self.zmq.open()
        # join: an idle engine's blocks would otherwise stay unknown until it serves again.
        self._task = asyncio.create_task(self.zmq.read(join=self.ingest.join),
                                         name=f"kvevents-zmq-{self.replica}")

    async def run(self) -> None:
        """Ingest until cancelled."""
        if self._task is not None:
            raise RuntimeError("already started")
        self.zmq.open()
        try:
            await self.zmq.read(join=self.ingest.join)
        finally:
            self._shutdown()

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._shutdown()

    def _shutdown(self) -> None:
        self.zmq.close()
        if self._own_ctx and not self._ctx.closed:
            self._ctx.term()
