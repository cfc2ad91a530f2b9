"""Replay client: ask an engine's ROUTER socket for past batches over a DEALER.

Request ``[b"", start_seq (8 bytes BE)]``; replies ``[b"", topic, seq, payload]`` (vLLM with
topic frames) or ``[b"", seq, payload]``, until the end marker (seq ``0xFF..FF``). Each attempt
uses a fresh DEALER, so a reply to an attempt that timed out can never be mistaken for a reply
to the next one. An attempt ends at the end marker, when the engine stays silent for
``idle_timeout`` seconds, or when the consumer asks to stop (it wants another start).
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from typing import Protocol

import zmq
import zmq.asyncio

from kvevents.decode import RawMessage, WireError, split_replay_reply

log = logging.getLogger(__name__)


class ReplayOutcome(enum.Enum):
    END = "end"
    """The end marker arrived: the engine sent all it retains."""
    TIMEOUT = "timeout"
    """Silence for ``idle_timeout`` (or the overall limit): try again or give up."""
    STOPPED = "stopped"
    """The consumer asked to stop (it needs a replay from another start)."""


async def replay_once(
    ctx: zmq.asyncio.Context,
    endpoint: str,
    start: int,
    on_message: Callable[[RawMessage], bool],
    on_bad: Callable[[str], None],
    *,
    idle_timeout: float = 2.0,
    max_duration: float = 120.0,
) -> ReplayOutcome:
    """One replay attempt from ``start``. ``on_message`` returns True to stop reading."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    deadline = time.monotonic() + max_duration
    try:
        sock.connect(endpoint)
        await sock.send_multipart([b"", start.to_bytes(8, "big")])
        while True:
            wait = min(idle_timeout, deadline - time.monotonic())
            if wait <= 0 or not await sock.poll(int(wait * 1000)):
                return ReplayOutcome.TIMEOUT
            frames = await sock.recv_multipart()
            try:
                msg = split_replay_reply(frames)
            except WireError as exc:
                on_bad(f"replay reply: {exc}")
                continue
            if msg is None:
                return ReplayOutcome.END
            if on_message(msg):
                return ReplayOutcome.STOPPED
    finally:
        sock.close(linger=0)


class ReplayTarget(Protocol):
    """What consumes a replay: ``EngineIngest``, or the bridge's relay."""

    @property
    def replay_from(self) -> int | None: ...

    def on_replay_message(self, msg: RawMessage, now: float) -> bool: ...

    def on_replay_done(self, now: float) -> bool: ...

    def on_bad_message(self, reason: str, now: float) -> None: ...


async def recover(
    ingest: ReplayTarget,
    ctx: zmq.asyncio.Context,
    endpoint: str,
    clock: Callable[[], float],
    *,
    attempts: int = 3,
    idle_timeout: float = 2.0,
    max_duration: float = 120.0,
    name: str = "",
) -> None:
    """Run replays for ``ingest`` until it wants none (each start gets ``attempts`` tries).

    When the attempts are used up, or the replay socket fails outright, the ingest is told
    the replay is over: it then decides what was lost (and marks the slice partial) from what
    it did get. ``name`` labels the log line of a socket failure.
    """
    try:
        await _recover(ingest, ctx, endpoint, clock, attempts, idle_timeout, max_duration)
    except zmq.ZMQError as exc:
        log.warning("%s: replay from %s failed: %s", name or "engine", endpoint, exc)
        ingest.on_replay_done(clock())


async def _recover(
    ingest: ReplayTarget,
    ctx: zmq.asyncio.Context,
    endpoint: str,
    clock: Callable[[], float],
    attempts: int,
    idle_timeout: float,
    max_duration: float,
) -> None:
    tries = 0
    while (start := ingest.replay_from) is not None:
        if tries >= attempts:
            if not ingest.on_replay_done(clock()):
                return
            tries = 0
            continue
        tries += 1
        outcome = await replay_once(
            ctx,
            endpoint,
            start,
            lambda msg: ingest.on_replay_message(msg, clock()),
            lambda reason: ingest.on_bad_message(reason, clock()),
            idle_timeout=idle_timeout,
            max_duration=max_duration,
        )
        if outcome is ReplayOutcome.STOPPED:
            tries = 0  # a new start (the engine restarted): a fresh set of attempts
        elif outcome is ReplayOutcome.END:
            if not ingest.on_replay_done(clock()):
                return
            tries = 0
