"""One entry point for the router: an engine's ``kv_events`` setting -> a running source.

``tcp://engine:5557`` (or ``ipc://``/``inproc://``; ``tcp://*:5557`` binds) gives a
:class:`ZmqSubscriber`; ``redis://host:6379/0#stream`` gives a :class:`RedisStreamReader`
(stream defaults to ``kvmesh:kv:<replica>``, the name ``kvmesh bridge --engine`` writes).
Both have ``start()``, ``aclose()``, ``run()``, ``stats()`` and ``ingest``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import zmq.asyncio

from kvevents.events import IndexWriter
from kvevents.ingest import AliveHook, Version
from kvevents.redis_reader import RedisStreamReader
from kvevents.redis_stream import split_redis_url
from kvevents.zmq_subscriber import ZmqSubscriber

EventSource = ZmqSubscriber | RedisStreamReader


def open_event_source(
    replica: str,
    kv_events: str,
    writer: IndexWriter,
    *,
    replay: str | None = None,
    resume_from: Version | None = None,
    on_alive: AliveHook | None = None,
    clock: Callable[[], float] = time.time,
    context: zmq.asyncio.Context | None = None,
) -> EventSource:
    """Build (not start) the source for one engine. ``replay``: its replay ROUTER endpoint."""
    scheme = kv_events.split("://", 1)[0].lower()
    if scheme in ("redis", "rediss", "unix"):
        url, stream = split_redis_url(kv_events, replica)
        return RedisStreamReader(
            replica,
            url,
            writer,
            stream=stream,
            replay_endpoint=replay,
            resume_from=resume_from,
            on_alive=on_alive,
            clock=clock,
            context=context,
        )
    if scheme in ("tcp", "ipc", "inproc"):
        return ZmqSubscriber(
            replica,
            kv_events,
            writer,
            replay_endpoint=replay,
            resume_from=resume_from,
            on_alive=on_alive,
            clock=clock,
            context=context,
        )
    raise ValueError(f"kv_events must be tcp://, ipc://, inproc:// or redis://, got {kv_events!r}")
