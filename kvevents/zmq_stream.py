"""The asyncio shell around one engine's ZMQ PUB stream, shared by the subscriber and the bridge.

It opens the SUB socket (connecting to the engine's PUB, or binding when the engine connects:
see :func:`wants_bind`), watches it for disconnects, reads and splits every message, keeps
only the wanted topic, and hands each message to a :class:`StreamSink`, a sans-I/O core
(``EngineIngest`` for the router, the bridge's relay). When the sink says the stream has a gap,
it runs the replay from the engine's ROUTER socket (:func:`kvevents.replay.recover`) while it
keeps reading live messages, so a long replay does not push the engine past the socket's
high-water mark.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Protocol

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from kvevents.decode import RawMessage, WireError, split_message
from kvevents.replay import ReplayTarget, recover


def wants_bind(endpoint: str) -> bool:
    """The engines' own rule: wildcard, ipc and inproc endpoints are bound, others connected."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


class StreamSink(ReplayTarget, Protocol):
    """What the stream feeds: live messages, malformed ones, and dropped connections."""

    def on_message(self, msg: RawMessage, now: float) -> bool:
        """Take one live message; True when a replay should start."""
        ...

    def on_bad_message(self, reason: str, now: float) -> None: ...

    def on_disconnect(self) -> None:
        """A connection dropped: the engine may have restarted, so verify the next batch."""
        ...


class ZmqStream:
    """One SUB socket feeding one sink; ``open`` then ``await read()`` (cancel to stop),
    ``close`` afterwards."""

    def __init__(
        self,
        name: str,
        endpoint: str,
        sink: StreamSink,
        context: zmq.asyncio.Context,
        *,
        replay_endpoint: str | None = None,
        bind: bool | None = None,
        topic: str | None = None,
        clock: Callable[[], float] = time.time,
        replay_attempts: int = 3,
        replay_idle_timeout: float = 2.0,
        replay_max_duration: float = 120.0,
        rcvhwm: int = 100_000,
    ) -> None:
        self.name = name
        self.endpoint = endpoint
        self.sink = sink
        self.replay_endpoint = replay_endpoint
        self.bind = wants_bind(endpoint) if bind is None else bind
        self.topic = topic
        self.clock = clock
        self.replay_attempts = replay_attempts
        self.replay_idle_timeout = replay_idle_timeout
        self.replay_max_duration = replay_max_duration
        self.rcvhwm = rcvhwm
        self.other_topics = 0
        self.disconnects = 0
        self.bound_endpoint: str | None = None
        """The address actually bound (``tcp://*:0`` becomes a real port), when binding."""
        self._ctx = context
        self._sock: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None

    def open(self) -> None:
        """Create, bind or connect the socket (raises ``zmq.ZMQError`` on a bad endpoint)."""
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

    async def read(self, join: Callable[[], bool] | None = None) -> None:
        """Feed the sink until cancelled (the socket must be open). ``join``: asked once
        before the first message; True starts a replay of the run so far at once."""
        sock = self._sock
        assert sock is not None, "open() first"
        watch = asyncio.create_task(self._watch(), name=f"kvevents-mon-{self.name}")
        replay: asyncio.Task[None] | None = None
        sink, clock = self.sink, self.clock
        want = self.topic.encode() if self.topic is not None else None
        try:
            if join is not None and self.replay_endpoint is not None and join():
                replay = asyncio.create_task(self._recover(), name=f"kvevents-replay-{self.name}")
            while True:
                frames = await sock.recv_multipart()
                now = clock()
                try:
                    msg = split_message(frames)
                except WireError as exc:
                    sink.on_bad_message(str(exc), now)
                    continue
                if want is not None and msg.topic != want:
                    self.other_topics += 1
                    continue
                if (sink.on_message(msg, now) and self.replay_endpoint is not None
                        and (replay is None or replay.done())):
                    replay = asyncio.create_task(
                        self._recover(), name=f"kvevents-replay-{self.name}")
        finally:
            for task in (replay, watch):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    async def _watch(self) -> None:
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
                self.sink.on_disconnect()

    async def _recover(self) -> None:
        assert self.replay_endpoint is not None
        await recover(
            self.sink,
            self._ctx,
            self.replay_endpoint,
            self.clock,
            attempts=self.replay_attempts,
            idle_timeout=self.replay_idle_timeout,
            max_duration=self.replay_max_duration,
            name=self.name,
        )

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._sock.disable_monitor()
            self._sock.close(linger=0)
            self._sock = None
        if self._monitor is not None:
            self._monitor.close(linger=0)
            self._monitor = None
