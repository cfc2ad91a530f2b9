"""The vLLM-wire publisher on real ZMQ sockets: frames, sequence numbers, replay shapes,
injected loss, restart, connect mode."""

from __future__ import annotations

import time
from collections.abc import Iterator

import msgpack  # type: ignore[import-untyped,unused-ignore]
import pytest
import zmq

from kvevents.events import AllBlocksCleared, BlockRemoved, BlockStored
from kvevents.publisher import END_SEQ, ZmqEventPublisher

pytestmark = pytest.mark.integration

STORED = BlockStored([11, 12], None, [1, 2, 3, 4], 2, medium="GPU", group_idx=0)


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield context
    context.destroy(linger=0)


def subscribe(
    ctx: zmq.Context[zmq.Socket[bytes]], pub: ZmqEventPublisher, topic: bytes = b""
) -> zmq.Socket[bytes]:
    """A SUB that is known to receive: publish until one batch arrives (slow joiner)."""
    sub = ctx.socket(zmq.SUB)
    sub.connect(pub.endpoint)
    sub.subscribe(topic)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pub.publish([AllBlocksCleared()])
        if sub.poll(50):
            while sub.poll(50):
                sub.recv_multipart()
            return sub
    raise AssertionError("subscription never became active")


def recv(sub: zmq.Socket[bytes]) -> list[bytes]:
    assert sub.poll(5000), "no message before the deadline"
    return sub.recv_multipart()


def replay(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, start: int) -> list[list[bytes]]:
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(endpoint)
    dealer.send_multipart([b"", start.to_bytes(8, "big")])
    out = []
    try:
        while True:
            assert dealer.poll(5000), "replay timed out"
            frames = dealer.recv_multipart()
            out.append(frames)
            if END_SEQ in frames:
                return out
    finally:
        dealer.close(linger=0)


def test_live_frames_are_topic_seq_payload_with_seq_from_zero(
    ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    with ZmqEventPublisher("tcp://127.0.0.1:*", topic="kv@p@m") as pub:
        assert pub.bound and pub.last_seq is None
        sub = subscribe(ctx, pub, b"kv@")
        warmup = pub.last_seq
        assert warmup is not None
        seq = pub.publish([STORED, BlockRemoved([11], medium="GPU", group_idx=0)])
        assert seq == warmup + 1
        topic, seq_bytes, payload = recv(sub)
        assert topic == b"kv@p@m" and len(seq_bytes) == 8
        assert int.from_bytes(seq_bytes, "big") == seq
        ts, events, rank = msgpack.unpackb(payload, raw=False)
        assert isinstance(ts, float) and rank == 0
        assert [e["type"] for e in events] == ["BlockStored", "BlockRemoved"]
        assert events[0]["block_hashes"] == [11, 12] and events[0]["token_ids"] == [1, 2, 3, 4]
        sub.close(linger=0)


def test_first_seq_is_zero_on_the_replay_socket(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    with ZmqEventPublisher("tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*") as pub:
        for _ in range(3):
            pub.publish([STORED])
        assert pub.flush()
        assert pub.replay_endpoint is not None
        frames = replay(ctx, pub.replay_endpoint, 0)
        assert [int.from_bytes(f[2], "big") for f in frames[:-1]] == [0, 1, 2]
        assert frames[-1] == [b"", b"", END_SEQ, b""]


def test_dropped_batches_leave_a_gap_that_replay_fills(
    ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    with ZmqEventPublisher(
        "tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*", topic="t", buffer_steps=100
    ) as pub:
        sub = subscribe(ctx, pub)
        base = (pub.last_seq or 0) + 1
        pub.drop_next(2)
        for _ in range(4):
            pub.publish([STORED])
        live = [int.from_bytes(recv(sub)[1], "big") for _ in range(2)]
        assert live == [base + 2, base + 3]
        assert pub.stats.dropped_injected == 2
        assert pub.replay_endpoint is not None
        frames = replay(ctx, pub.replay_endpoint, base)
        assert [f[1] for f in frames[:-1]] == [b"t"] * 4
        assert [int.from_bytes(f[2], "big") for f in frames[:-1]] == list(range(base, base + 4))
        sub.close(linger=0)


def test_replay_buffer_is_bounded_and_legacy_shape_has_no_topic(
    ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    with ZmqEventPublisher(
        "tcp://127.0.0.1:*",
        replay_endpoint="tcp://127.0.0.1:*",
        topic="t",
        buffer_steps=3,
        replay_with_topic=False,
    ) as pub:
        for _ in range(5):
            pub.publish([STORED])
        assert pub.flush() and pub.replay_endpoint is not None
        frames = replay(ctx, pub.replay_endpoint, 0)
        assert [len(f) for f in frames] == [3, 3, 3, 3]
        assert [int.from_bytes(f[1], "big") for f in frames[:-1]] == [2, 3, 4]
        assert frames[-1] == [b"", END_SEQ, b""]


def test_restart_sends_seq_from_zero_and_forgets_history(
    ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    with ZmqEventPublisher("tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*") as pub:
        sub = subscribe(ctx, pub)
        pub.publish([STORED])
        recv(sub)
        pub.restart()
        assert pub.last_seq is None
        assert pub.publish([AllBlocksCleared()]) == 0
        assert int.from_bytes(recv(sub)[1], "big") == 0
        assert pub.replay_endpoint is not None
        frames = replay(ctx, pub.replay_endpoint, 0)
        assert [int.from_bytes(f[2], "big") for f in frames] == [0, 2**64 - 1]
        sub.close(linger=0)


def test_malformed_replay_requests_are_counted_and_ignored(
    ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    with ZmqEventPublisher("tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*") as pub:
        pub.publish([STORED])
        assert pub.flush() and pub.replay_endpoint is not None
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(pub.replay_endpoint)
        dealer.send_multipart([b"", b"short"])
        dealer.send_multipart([b"", b"a", b"b"])
        dealer.send_multipart([b"", (0).to_bytes(8, "big")])  # served in order, after them
        replies: list[list[bytes]] = []
        while not replies or replies[-1][2] != END_SEQ:
            assert dealer.poll(5000), "replay timed out"
            replies.append(dealer.recv_multipart())
        dealer.close(linger=0)
        assert [int.from_bytes(f[2], "big") for f in replies] == [0, 2**64 - 1]
        assert pub.stats.replay_bad_requests == 2 and pub.stats.replay_requests == 3


def test_connect_mode_reaches_a_binding_subscriber(
    ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    sub = ctx.socket(zmq.SUB)
    port = sub.bind_to_random_port("tcp://127.0.0.1")
    sub.subscribe(b"")
    with ZmqEventPublisher(f"tcp://127.0.0.1:{port}", event_format="array") as pub:
        assert not pub.bound  # vLLM's rule: a concrete host is connected to
        deadline = time.monotonic() + 10
        while not sub.poll(50):
            assert time.monotonic() < deadline
            pub.publish([STORED])
        _, _, payload = sub.recv_multipart()
        event = msgpack.unpackb(payload, raw=False)[1][0]
        assert event[0] == "BlockStored" and len(event) == 12
    sub.close(linger=0)


def test_publishing_after_close_is_an_error() -> None:
    pub = ZmqEventPublisher("tcp://127.0.0.1:*")
    pub.close()
    pub.close()  # idempotent
    with pytest.raises(RuntimeError):
        pub.publish([STORED])


def test_binding_a_taken_port_fails_fast(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    holder = ctx.socket(zmq.PUB)
    port = holder.bind_to_random_port("tcp://127.0.0.1")
    with pytest.raises(zmq.ZMQError):
        ZmqEventPublisher(f"tcp://127.0.0.1:{port}", mode="bind")
    holder.close(linger=0)
