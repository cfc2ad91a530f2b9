"""A KV-event publisher that is wire-identical to vLLM's ``ZmqEventPublisher``.

Live stream: a PUB socket sends one 3-frame message per batch, ``[topic, seq (8 bytes
big-endian, from 0), msgpack payload]``; the payload is the msgspec encoding of
``[ts, events, data_parallel_rank]`` with events as maps (vLLM after #42892, the default) or as
positional arrays (vLLM <= v0.23), hashes as uint64 (default) or 32-byte ``bin``.

Replay: a ROUTER socket answers ``[identity, b"", start_seq]`` with every retained batch whose
seq is >= start_seq, as ``[identity, b"", topic, seq, payload]`` (after vLLM #45177) or
``[identity, b"", seq, payload]`` (``replay_with_topic=False``), then the end marker (seq
``0xFF..FF``, empty payload). The last ``buffer_steps`` batches are retained.

Threading: like vLLM, one daemon thread owns both sockets. ``publish`` encodes on the caller
(microseconds) and hands the bytes to the thread through an inproc PUSH/PULL pair with a bounded
queue, never blocking: a full queue drops the batch but still consumes its seq, so subscribers
see the gap. A thread rather than asyncio tasks because the caller is not always an asyncio
program (the discrete-event simulator, synchronous tests), because serving a large replay must
not stall the engine loop, and because the sockets then have exactly one owner.

For tests: ``drop_next(n)`` loses the next ``n`` batches on the live stream only (as a PUB
socket at its high-water mark does; they remain replayable), ``restart()`` behaves like a new
engine process (seq back to 0, replay history gone), ``flush()`` waits until queued batches are
on the wire.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import zmq

from kvevents.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

log = logging.getLogger(__name__)

EventFormat = Literal["map", "array"]
SocketMode = Literal["auto", "bind", "connect"]
END_SEQ = b"\xff" * 8

Hash = int | bytes

# Field lists mirror vLLM's event structs, in declaration order (= positions in array mode).
_STORED_FIELDS: list[tuple[str, Any] | tuple[str, Any, Any]] = [
    ("block_hashes", list[Hash]),
    ("parent_block_hash", Hash | None),
    ("token_ids", list[int]),
    ("block_size", int),
    ("lora_id", int | None),
    ("medium", str | None),
    ("lora_name", str | None),
    ("extra_keys", list[Any] | None, None),
    ("group_idx", int | None, None),
    ("kv_cache_spec_kind", str | None, None),
    ("kv_cache_spec_sliding_window", int | None, None),
]
_REMOVED_FIELDS: list[tuple[str, Any] | tuple[str, Any, Any]] = [
    ("block_hashes", list[Hash]),
    ("medium", str | None),
    ("group_idx", int | None, None),
]


def _event_structs(array_like: bool) -> tuple[type[Any], type[Any], type[Any]]:
    opts: dict[str, Any] = {"omit_defaults": True, "gc": False, "array_like": array_like}
    return (
        msgspec.defstruct("BlockStored", _STORED_FIELDS, tag="BlockStored", **opts),
        msgspec.defstruct("BlockRemoved", _REMOVED_FIELDS, tag="BlockRemoved", **opts),
        msgspec.defstruct("AllBlocksCleared", [], tag="AllBlocksCleared", **opts),
    )


_STRUCTS: dict[str, tuple[type[Any], type[Any], type[Any]]] = {
    "map": _event_structs(array_like=False),
    "array": _event_structs(array_like=True),
}


class _Batch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


_ENCODER = msgspec.msgpack.Encoder()


def encode_batch(
    events: Sequence[KVEvent],
    ts: float,
    data_parallel_rank: int | None = 0,
    event_format: EventFormat = "map",
    hash_bytes: bool = False,
    digests: Mapping[int, bytes] | None = None,
    kv_cache_spec_kind: str | None = "full_attention",
) -> bytes:
    """The msgpack payload vLLM would publish for ``events``.

    ``hash_bytes`` sends hashes as raw digests (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0``);
    ``digests`` maps each uint64 hash to its digest. ``kv_cache_spec_kind`` is what vLLM puts
    in BlockStored for the attention type of the cache group (None to leave it out).
    """
    if event_format not in _STRUCTS:
        raise ValueError(f"event_format must be 'map' or 'array', got {event_format!r}")
    stored_t, removed_t, cleared_t = _STRUCTS[event_format]

    def h(value: int) -> Hash:
        if not hash_bytes:
            return value
        if digests is None or value not in digests:
            raise ValueError(f"no digest known for hash {value}; cannot publish bytes hashes")
        return digests[value]

    out: list[Any] = []
    for ev in events:
        if isinstance(ev, BlockStored):
            parent = ev.parent_block_hash
            out.append(
                stored_t(
                    block_hashes=[h(x) for x in ev.block_hashes],
                    parent_block_hash=None if parent is None else h(parent),
                    token_ids=list(ev.token_ids),
                    block_size=ev.block_size,
                    lora_id=ev.lora_id,
                    medium=ev.medium,
                    lora_name=ev.lora_name,
                    extra_keys=None if ev.extra_keys is None else list(ev.extra_keys),
                    group_idx=ev.group_idx,
                    kv_cache_spec_kind=kv_cache_spec_kind,
                )
            )
        elif isinstance(ev, BlockRemoved):
            out.append(
                removed_t(
                    block_hashes=[h(x) for x in ev.block_hashes],
                    medium=ev.medium,
                    group_idx=ev.group_idx,
                )
            )
        elif isinstance(ev, AllBlocksCleared):
            out.append(cleared_t())
        else:
            raise TypeError(f"not a KV event: {type(ev).__name__}")
    return _ENCODER.encode(_Batch(ts=ts, events=out, data_parallel_rank=data_parallel_rank))


def should_bind(endpoint: str) -> bool:
    """vLLM's rule: bind stable endpoints (wildcards, ipc, inproc), connect to the others."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


def offset_endpoint_port(endpoint: str, data_parallel_rank: int) -> str:
    """One publisher per data-parallel rank: tcp ports shift by the rank, inproc gets a suffix."""
    if data_parallel_rank == 0:
        return endpoint
    if endpoint.startswith("inproc://"):
        return f"{endpoint}_dp{data_parallel_rank}"
    if endpoint.startswith("tcp://"):
        head, _, port = endpoint.rpartition(":")
        return f"{head}:{int(port) + data_parallel_rank}"
    raise ValueError(f"cannot offset endpoint {endpoint!r} for data parallel rank")


def _last_endpoint(sock: zmq.Socket[bytes]) -> str:
    value = sock.getsockopt(zmq.LAST_ENDPOINT)
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(slots=True)
class PublisherStats:
    published: int = 0
    """Batches handed to the sender thread."""
    sent_live: int = 0
    dropped_queue_full: int = 0
    dropped_injected: int = 0
    replay_requests: int = 0
    replay_bad_requests: int = 0
    replayed_batches: int = 0


class ZmqEventPublisher:
    def __init__(
        self,
        endpoint: str,
        *,
        replay_endpoint: str | None = None,
        topic: str = "",
        buffer_steps: int = 10_000,
        hwm: int = 100_000,
        max_queue_size: int = 100_000,
        data_parallel_rank: int = 0,
        event_format: EventFormat = "map",
        hash_bytes: bool = False,
        replay_with_topic: bool = True,
        kv_cache_spec_kind: str | None = "full_attention",
        mode: SocketMode = "auto",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if event_format not in _STRUCTS:
            raise ValueError(f"event_format must be 'map' or 'array', got {event_format!r}")
        if buffer_steps < 1:
            raise ValueError(f"buffer_steps must be >= 1, got {buffer_steps}")
        self.topic = topic
        self.data_parallel_rank = data_parallel_rank
        self.event_format: EventFormat = event_format
        self.hash_bytes = hash_bytes
        self.replay_with_topic = replay_with_topic
        self.kv_cache_spec_kind = kv_cache_spec_kind
        self.stats = PublisherStats()
        self._clock = clock
        self._topic = topic.encode()
        self._lock = threading.Lock()
        self._next_seq = 0
        self._drop = 0
        self._queued = 0
        self._done = 0
        self._done_cv = threading.Condition()
        self._buffer: deque[tuple[bytes, bytes]] = deque(maxlen=buffer_steps)

        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._replay: zmq.Socket[bytes] | None = None
        inproc = f"inproc://kvmesh-publisher-{uuid.uuid4().hex}"
        self._pull = self._ctx.socket(zmq.PULL)
        self._push = self._ctx.socket(zmq.PUSH)
        try:
            self._pub.set_hwm(hwm)
            self._pub.setsockopt(zmq.LINGER, 500)
            pub_endpoint = offset_endpoint_port(endpoint, data_parallel_rank)
            bind = should_bind(pub_endpoint) if mode == "auto" else mode == "bind"
            if bind:
                self._pub.bind(pub_endpoint)
                self.endpoint = _last_endpoint(self._pub)
            else:
                self._pub.connect(pub_endpoint)
                self.endpoint = pub_endpoint
            self.bound = bind
            self.replay_endpoint: str | None = None
            if replay_endpoint is not None:
                self._replay = self._ctx.socket(zmq.ROUTER)
                self._replay.setsockopt(zmq.LINGER, 500)
                self._replay.bind(offset_endpoint_port(replay_endpoint, data_parallel_rank))
                self.replay_endpoint = _last_endpoint(self._replay)
            self._pull.set_hwm(max_queue_size)
            self._push.set_hwm(max_queue_size)
            self._pull.bind(inproc)
            self._push.connect(inproc)
        except Exception:
            self._close_sockets(linger=0)
            raise
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="zmq-publisher", daemon=True)
        self._thread.start()

    # -- caller side -------------------------------------------------------------------------

    def publish(
        self,
        events: Sequence[KVEvent],
        *,
        digests: Mapping[int, bytes] | None = None,
        ts: float | None = None,
    ) -> int | None:
        """Encode and queue one batch; returns its seq, or None when the queue was full (the
        seq is consumed anyway so subscribers can detect the loss)."""
        payload = encode_batch(
            events,
            self._clock() if ts is None else ts,
            self.data_parallel_rank,
            self.event_format,
            self.hash_bytes,
            digests,
            self.kv_cache_spec_kind,
        )
        with self._lock:
            if self._closed:
                raise RuntimeError("publisher is closed")
            seq = self._next_seq
            self._next_seq += 1
            live = self._drop == 0
            if not live:
                self._drop -= 1
                self.stats.dropped_injected += 1
            try:
                self._push.send_multipart(
                    [b"pub", seq.to_bytes(8, "big"), payload, b"1" if live else b"0"],
                    flags=zmq.NOBLOCK,
                )
            except zmq.Again:
                self.stats.dropped_queue_full += 1
                log.warning("KV event queue full: batch seq=%d dropped", seq)
                return None
            self._queued += 1
            self.stats.published += 1
        return seq

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def last_seq(self) -> int | None:
        """Seq of the last batch published, None before the first (or right after restart)."""
        return self._next_seq - 1 if self._next_seq else None

    def drop_next(self, n: int) -> None:
        """Lose the next ``n`` batches on the live stream (they stay replayable)."""
        if n < 0:
            raise ValueError("n must be >= 0")
        with self._lock:
            self._drop += n

    def restart(self) -> None:
        """Behave like a restarted engine: seq from 0 again, replay history forgotten."""
        with self._lock:
            self._next_seq = 0
            self._drop = 0
            self._push.send_multipart([b"reset"])
            self._queued += 1

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued so far has been sent; False on timeout."""
        with self._lock:
            target = self._queued
        with self._done_cv:
            return self._done_cv.wait_for(lambda: self._done >= target, timeout)

    def close(self, timeout: float = 2.0) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._push.send_multipart([b"stop"])
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("publisher thread did not stop within %.1fs", timeout)
            return
        self._close_sockets(linger=500)

    def __enter__(self) -> ZmqEventPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sender thread -----------------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._pull, zmq.POLLIN)
        if self._replay is not None:
            poller.register(self._replay, zmq.POLLIN)
        while True:
            ready = dict(poller.poll())
            if self._replay is not None and self._replay in ready:
                self._serve_replays()
            if self._pull in ready and not self._drain_queue():
                return

    def _drain_queue(self) -> bool:
        """Process queued commands; False once asked to stop."""
        while True:
            try:
                frames = self._pull.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return True
            kind = frames[0]
            if kind == b"pub":
                _, seq, payload, live = frames
                if live == b"1":
                    self._pub.send_multipart([self._topic, seq, payload])
                    self.stats.sent_live += 1
                self._buffer.append((seq, payload))
            elif kind == b"reset":
                self._buffer.clear()
            elif kind == b"stop":
                return False
            with self._done_cv:
                self._done += 1
                self._done_cv.notify_all()

    def _serve_replays(self) -> None:
        assert self._replay is not None
        while True:
            try:
                frames = self._replay.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            self.stats.replay_requests += 1
            if len(frames) != 3 or len(frames[2]) != 8:
                self.stats.replay_bad_requests += 1
                log.warning("ignoring replay request with %d frames", len(frames))
                continue
            identity, _, start = frames
            start_seq = int.from_bytes(start, "big")
            head = [identity, b"", self._topic] if self.replay_with_topic else [identity, b""]
            for seq, payload in list(self._buffer):
                if int.from_bytes(seq, "big") >= start_seq:
                    self._replay.send_multipart([*head, seq, payload])
                    self.stats.replayed_batches += 1
            end = [identity, b"", b""] if self.replay_with_topic else [identity, b""]
            self._replay.send_multipart([*end, END_SEQ, b""])

    def _close_sockets(self, linger: int) -> None:
        for sock in (self._push, self._pull, self._pub, self._replay):
            if sock is not None:
                sock.close(linger=linger)
        self._ctx.term()
