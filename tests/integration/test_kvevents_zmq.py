"""ZmqSubscriber against the wire-identical publisher over real loopback sockets."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

import pytest
import zmq

from crdt.prefix_index import PrefixIndex, SliceInfo
from kvevents.events import BlockRemoved, BlockStored, KVEvent
from kvevents.keys import request_keys
from kvevents.publisher import ZmqEventPublisher
from kvevents.tracker import epoch_of
from kvevents.zmq_subscriber import ZmqSubscriber

pytestmark = pytest.mark.integration

BS = 4


class Workload:
    """Each batch caches a 2-block chain; every third batch evicts the previous batch's."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.i = 0
        self.held: dict[int, int] = {}  # engine hash -> expected router key
        self.last_chain: list[int] = []

    def next_events(self) -> list[KVEvent]:
        self.i += 1
        tokens = [self.rng.randrange(100_000) for _ in range(2 * BS)]
        hashes = [self.rng.getrandbits(64), self.rng.getrandbits(64)]
        events: list[KVEvent] = [BlockStored(hashes, None, tokens, BS, medium="GPU")]
        if self.i % 3 == 0 and self.last_chain:
            events.append(BlockRemoved(self.last_chain, "GPU"))
            for h in self.last_chain:
                self.held.pop(h, None)
        self.held.update(zip(hashes, request_keys(tokens, BS), strict=True))
        self.last_chain = hashes
        return events

    def restart(self) -> None:
        self.held.clear()
        self.last_chain = []

    def truth(self) -> set[int]:
        return set(self.held.values())


def info(index: PrefixIndex, replica: str = "engine-a") -> SliceInfo:
    got = index.slice_info(replica)
    assert got is not None, f"no slice for {replica}"
    return got


async def wait_until(cond: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await asyncio.sleep(0.01)


@contextmanager
def publisher(**kw: object) -> Iterator[ZmqEventPublisher]:
    pub = ZmqEventPublisher(
        "tcp://127.0.0.1:0",
        mode="bind",
        replay_endpoint=kw.pop("replay_endpoint", "tcp://127.0.0.1:0"),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )
    try:
        yield pub
    finally:
        pub.close()


@asynccontextmanager
async def subscriber(
    pub: ZmqEventPublisher, index: PrefixIndex, replay: bool = True, **kw: object
) -> AsyncIterator[ZmqSubscriber]:
    sub = ZmqSubscriber(
        "engine-a",
        pub.endpoint,
        index,
        replay_endpoint=pub.replay_endpoint if replay else None,
        replay_idle_timeout=0.5,
        **kw,  # type: ignore[arg-type]
    )
    await sub.start()
    try:
        yield sub
    finally:
        await sub.aclose()


def publish(pub: ZmqEventPublisher, work: Workload, n: int) -> None:
    for _ in range(n):
        pub.publish(work.next_events())
    assert pub.flush()


async def settle(pub: ZmqEventPublisher, sub: ZmqSubscriber, work: Workload) -> None:
    """Publish until the subscriber has applied the latest batch (slow joiners miss some)."""
    deadline = time.monotonic() + 5.0
    while True:
        publish(pub, work, 1)
        target = pub.last_seq
        try:
            await wait_until(
                lambda target=target: (  # type: ignore[misc]
                    sub.ingest.version is not None
                    and sub.ingest.version[1] == target
                    and not sub.ingest.tracker.replaying
                ),
                timeout=0.5,
            )
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise


@pytest.mark.parametrize(("with_topic", "fmt"), [(True, "map"), (False, "array")])
async def test_late_subscriber_recovers_the_whole_cache_through_replay(
    with_topic: bool, fmt: str
) -> None:
    work = Workload(1)
    index = PrefixIndex()
    with publisher(replay_with_topic=with_topic, event_format=fmt, topic="kv@a") as pub:
        publish(pub, work, 30)  # before any router listens
        first_ts = None
        async with subscriber(pub, index) as sub:
            await settle(pub, sub, work)
            stats = sub.stats()
            assert not info(index).partial
            assert index.keys("engine-a") == work.truth()
            assert stats.replays >= 1 and stats.history_lost == 0
            first_ts = pub.stats.replayed_batches
        assert first_ts and first_ts >= 30


async def test_epoch_is_the_ts_of_seq_zero_for_every_router() -> None:
    work = Workload(2)
    t = [1_800_000_000.0]

    def clock() -> float:
        t[0] += 0.25
        return t[0]

    with publisher(clock=clock) as pub:
        publish(pub, work, 5)
        a, b = PrefixIndex(), PrefixIndex()
        async with subscriber(pub, a) as sa:
            await settle(pub, sa, work)
            async with subscriber(pub, b) as sb:
                await settle(pub, sb, work)
                await wait_until(lambda: sa.ingest.version == sb.ingest.version)
        assert info(a).version == info(b).version
        assert info(a).version[0] == epoch_of(1_800_000_000.25)
        assert a.keys("engine-a") == b.keys("engine-a") == work.truth()


async def test_gap_is_recovered_by_replay() -> None:
    work = Workload(3)
    index = PrefixIndex()
    with publisher() as pub:
        async with subscriber(pub, index) as sub:
            await settle(pub, sub, work)
            pub.drop_next(4)  # lost on the live stream, still replayable (an HWM drop)
            publish(pub, work, 6)
            await wait_until(
                lambda: sub.ingest.version is not None and sub.ingest.version[1] == pub.last_seq
            )
            await wait_until(lambda: not sub.ingest.tracker.replaying)
            stats = sub.stats()
            assert stats.gaps == 1 and stats.missed_batches == 4
            assert not stats.partial and stats.history_lost == 0
            assert index.keys("engine-a") == work.truth()


async def test_engine_restart_bumps_the_epoch_and_clears_the_slice() -> None:
    work = Workload(4)
    index = PrefixIndex()
    with publisher() as pub:
        async with subscriber(pub, index) as sub:
            await settle(pub, sub, work)
            old_epoch = info(index).version[0]
            old_keys = index.keys("engine-a")
            assert old_keys
            pub.restart()
            work.restart()
            publish(pub, work, 3)
            await wait_until(lambda: sub.stats().restarts == 1, what="restart seen")
            await wait_until(lambda: sub.ingest.version is not None and sub.ingest.version[1] == 2)
            state = info(index)
            assert state.version[0] > old_epoch and not state.partial
            assert sub.stats().epoch == state.version[0]
            keys = index.keys("engine-a")
            assert keys == work.truth() and keys.isdisjoint(old_keys)


async def test_lost_history_marks_partial_then_rebuilds_from_live_traffic() -> None:
    work = Workload(5)
    index = PrefixIndex()
    with publisher(buffer_steps=2) as pub:
        async with subscriber(pub, index) as sub:
            await settle(pub, sub, work)
            full = info(index)
            assert not full.partial
            pub.drop_next(6)  # more than the engine retains
            publish(pub, work, 7)
            await wait_until(lambda: info(index).partial, what="slice marked partial")
            await wait_until(
                lambda: sub.ingest.version is not None and sub.ingest.version[1] == pub.last_seq
            )
            state = info(index)
            assert state.version[0] == full.version[0]  # same run, same epoch: a partial slice
            keys = index.keys("engine-a")
            assert keys <= work.truth() and keys  # rebuilt from what came after
            stats = sub.stats()
            assert stats.history_lost == 1 and stats.partial
            rebuilt = len(keys)
            publish(pub, work, 3)
            await wait_until(
                lambda: sub.ingest.version is not None and sub.ingest.version[1] == pub.last_seq
            )
            assert index.keys("engine-a") <= work.truth()
            assert len(index.keys("engine-a")) > rebuilt


async def test_late_subscriber_without_replay_builds_a_partial_slice() -> None:
    work = Workload(6)
    index = PrefixIndex()
    with publisher() as pub:
        publish(pub, work, 10)
        async with subscriber(pub, index, replay=False) as sub:
            await settle(pub, sub, work)
            keys = index.keys("engine-a")
            assert info(index).partial and keys and keys <= work.truth()
            assert sub.stats().replays == 0


async def test_silent_replay_endpoint_marks_partial() -> None:
    work = Workload(7)
    index = PrefixIndex()
    ctx = zmq.Context()
    dead = ctx.socket(zmq.ROUTER)  # accepts requests, never answers
    port = dead.bind_to_random_port("tcp://127.0.0.1")
    try:
        with publisher(replay_endpoint=None) as pub:
            publish(pub, work, 5)
            sub = ZmqSubscriber(
                "engine-a",
                pub.endpoint,
                index,
                replay_endpoint=f"tcp://127.0.0.1:{port}",
                replay_idle_timeout=0.2,
                replay_attempts=2,
            )
            await sub.start()
            try:
                deadline = time.monotonic() + 5
                while index.slice_info("engine-a") is None:  # slow joiner: publish until one lands
                    assert time.monotonic() < deadline, "slice never created"
                    publish(pub, work, 1)
                    await asyncio.sleep(0.05)
                await wait_until(lambda: not sub.ingest.tracker.replaying)
                stats = sub.stats()
                assert stats.partial and stats.replay_failures == 1
            finally:
                await sub.aclose()
    finally:
        dead.close(linger=0)
        ctx.term()


async def test_bound_subscriber_survives_garbage_frames() -> None:
    """Engines connect to the router; one of the peers sends garbage of every shape."""
    work = Workload(8)
    index = PrefixIndex()
    sub = ZmqSubscriber("engine-a", "tcp://127.0.0.1:0", index, bind=True)
    await sub.start()
    ctx = zmq.Context()
    rogue = ctx.socket(zmq.PUB)
    try:
        assert sub.bound_endpoint is not None
        rogue.connect(sub.bound_endpoint)
        rng = random.Random(9)
        garbage: list[list[bytes]] = [
            [b"only-one-frame"],
            [b"t", b"short", b"payload"],
            [b"t", (0).to_bytes(8, "big"), b"\xc1\xc1"],
            [b"t", (0).to_bytes(8, "big"), b"\x93\xa1x\x90\x00"],  # ts is a string
            [b"t", (1).to_bytes(8, "big"), b"p", b"extra"],
        ]
        garbage += [[rng.randbytes(rng.randrange(0, 12)) for _ in range(3)] for _ in range(40)]
        deadline = time.monotonic() + 5
        while sub.stats().malformed_messages < 20:  # slow joiner: resend until seen
            assert time.monotonic() < deadline, "garbage never arrived"
            for frames in garbage:
                rogue.send_multipart(frames)
            await asyncio.sleep(0.05)
        pub = ZmqEventPublisher(sub.bound_endpoint, mode="connect")
        try:
            deadline = time.monotonic() + 5
            while not index.keys("engine-a"):
                assert time.monotonic() < deadline, "real batches never applied"
                pub.publish(work.next_events())
                await asyncio.sleep(0.02)
        finally:
            pub.close()
        assert sub._task is not None and not sub._task.done()  # still ingesting
        assert index.keys("engine-a") <= work.truth()
    finally:
        rogue.close(linger=0)
        ctx.term()
        await sub.aclose()


async def test_real_high_water_mark_drops_are_gaps_repaired_by_replay() -> None:
    """Small HWMs on both ends and a subscriber that stalls: ZMQ drops, the tracker replays."""
    work = Workload(9)
    index = PrefixIndex()
    with publisher(hwm=4) as pub:
        async with subscriber(pub, index, rcvhwm=4) as sub:
            await settle(pub, sub, work)
            deadline = time.monotonic() + 5
            while sub.stats().gaps == 0:
                assert time.monotonic() < deadline, "ZMQ never dropped"
                # Synchronous: the subscriber's loop cannot read while 300 batches go out.
                publish(pub, work, 300)
                await asyncio.sleep(0.05)
            await wait_until(
                lambda: sub.ingest.version is not None and sub.ingest.version[1] == pub.last_seq,
                what="caught up after the drops",
            )
            await wait_until(lambda: not sub.ingest.tracker.replaying)
            stats = sub.stats()
            assert stats.gaps >= 1 and stats.missed_batches > 0  # ZMQ really dropped
            assert not stats.partial and stats.history_lost == 0
            assert index.keys("engine-a") == work.truth()
