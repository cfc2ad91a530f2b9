"""Redis transport end to end: publisher -> kvmesh bridge -> real redis-server -> reader.

Each test starts its own ``redis-server`` on a free loopback port (and stops it), a
wire-identical publisher, a ``RedisBridge`` and one or more ``RedisStreamReader``s writing into
a ``PrefixIndex``.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest
import redis

from crdt.prefix_index import PrefixIndex
from kvevents.events import BlockRemoved, BlockStored, KVEvent
from kvevents.keys import request_keys
from kvevents.publisher import ZmqEventPublisher
from kvevents.redis_bridge import RedisBridge
from kvevents.redis_reader import RedisStreamReader
from kvevents.tracker import epoch_of

pytestmark = [pytest.mark.integration, pytest.mark.redis]

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
BS = 4
STREAM = "kvmesh:kv:engine-a"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """A redis-server process on a fixed port that can be stopped and started again."""

    def __init__(self, workdir: Path, appendonly: bool) -> None:
        self.port = free_port()
        self.dir = workdir
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            REDIS,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--dir", str(self.dir),
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",
            "--stream-node-max-entries", "4",  # so MAXLEN ~ trims at test sizes
            "--daemonize", "no",
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 5
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.exceptions.ConnectionError:
                    pass
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: a clean shutdown (AOF flushed when enabled)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)


@contextmanager
def redis_server(tmp_path: Path, appendonly: bool = False) -> Iterator[RedisServer]:
    if not os.path.exists(REDIS):
        pytest.skip("redis-server binary not installed")
    server = RedisServer(tmp_path, appendonly)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class Workload:
    """Each batch caches a 2-block chain; every third batch evicts the previous batch's."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.i = 0
        self.held: dict[int, int] = {}
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

    def truth(self) -> set[int]:
        return set(self.held.values())


class RecordingWriter:
    """Forwards to a PrefixIndex and remembers every call (to prove nothing is applied twice)."""

    def __init__(self, inner: PrefixIndex) -> None:
        self.inner = inner
        self.calls: list[tuple[str, object]] = []

    def reset(self, replica: str, epoch: int, partial: bool = False) -> None:
        self.calls.append(("reset", (epoch, partial)))
        self.inner.reset(replica, epoch, partial)

    def store(self, replica: str, version: tuple[int, int], keys: Sequence[int]) -> None:
        self.calls.append(("store", version))
        self.inner.store(replica, version, keys)

    def remove(self, replica: str, version: tuple[int, int], keys: Sequence[int]) -> None:
        self.calls.append(("remove", version))
        self.inner.remove(replica, version, keys)

    def clear(self, replica: str, version: tuple[int, int]) -> None:
        self.calls.append(("clear", version))
        self.inner.clear(replica, version)


async def wait_until(cond: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await asyncio.sleep(0.01)


@contextmanager
def publisher(clock_start: float = 1_900_000_000.0) -> Iterator[ZmqEventPublisher]:
    t = [clock_start]

    def clock() -> float:
        t[0] += 0.01
        return t[0]

    pub = ZmqEventPublisher(
        "tcp://127.0.0.1:0", mode="bind", replay_endpoint="tcp://127.0.0.1:0", clock=clock
    )
    try:
        yield pub
    finally:
        pub.close()


@asynccontextmanager
async def bridge(
    pub: ZmqEventPublisher, server: RedisServer, **kw: object
) -> AsyncIterator[RedisBridge]:
    b = RedisBridge(
        pub.endpoint,
        server.url,
        STREAM,
        replay_endpoint=pub.replay_endpoint,
        replay_idle_timeout=0.5,
        retry_delay=0.05,
        max_retry_delay=0.2,
        **kw,  # type: ignore[arg-type]
    )
    await b.start()
    try:
        await asyncio.wait_for(b.ready.wait(), 5)
        yield b
    finally:
        await b.aclose()


def reader(server: RedisServer, writer: object, **kw: object) -> RedisStreamReader:
    return RedisStreamReader(
        "engine-a",
        server.url,
        writer,  # type: ignore[arg-type]
        stream=STREAM,
        block=0.1,
        retry_delay=0.05,
        max_retry_delay=0.2,
        replay_idle_timeout=0.5,
        **kw,  # type: ignore[arg-type]
    )


async def publish_until_in_stream(
    pub: ZmqEventPublisher, work: Workload, server: RedisServer, n: int
) -> None:
    """Publish ``n`` batches (more if the bridge, a slow joiner, has not seen any yet)."""
    client = server.client()
    try:
        deadline = time.monotonic() + 5
        while client.xlen(STREAM) == 0:
            assert time.monotonic() < deadline, "bridge never wrote"
            pub.publish(work.next_events())
            await asyncio.sleep(0.05)
        for _ in range(n):
            pub.publish(work.next_events())
        assert pub.flush()
        target = pub.last_seq
        await wait_until(lambda: _last_seq(client) == target, what=f"stream reaching seq {target}")
    finally:
        client.close()


def _last_seq(client: redis.Redis) -> int | None:
    last = client.xrevrange(STREAM, count=1)
    return int(last[0][1][b"seq"]) if last else None


async def caught_up(rd: RedisStreamReader, seq: int | None) -> None:
    await wait_until(
        lambda: rd.ingest.version is not None and rd.ingest.version[1] == seq,
        what=f"reader at seq {seq} (now {rd.ingest.version})",
    )


async def test_bridge_and_reader_carry_the_engine_stream(tmp_path: Path) -> None:
    work = Workload(1)
    index = PrefixIndex()
    with redis_server(tmp_path) as server, publisher() as pub:
        async with bridge(pub, server):
            await publish_until_in_stream(pub, work, server, 20)
            rd = reader(server, index)
            await rd.start()
            try:
                await caught_up(rd, pub.last_seq)
                info = index.slice_info("engine-a")
                assert info is not None and not info.partial
                assert info.version[0] == epoch_of(1_900_000_000.01)  # ts of seq 0 (via replay)
                assert index.keys("engine-a") == work.truth()
                fields = server.client().xrange(STREAM, count=1)[0][1]
                assert set(fields) == {b"topic", b"seq", b"payload"} and fields[b"seq"] == b"0"
            finally:
                await rd.aclose()


async def test_reader_restart_resumes_exactly(tmp_path: Path) -> None:
    work = Workload(2)
    index = PrefixIndex()
    with redis_server(tmp_path) as server, publisher() as pub:
        async with bridge(pub, server):
            await publish_until_in_stream(pub, work, server, 15)
            first = reader(server, index)
            await first.start()
            await caught_up(first, pub.last_seq)
            await first.aclose()
            position = index.version("engine-a")
            assert position is not None

            await publish_until_in_stream(pub, work, server, 12)  # while no reader runs
            rec = RecordingWriter(index)
            second = reader(server, rec, resume_from=position)
            await second.start()
            try:
                await caught_up(second, pub.last_seq)
                assert index.keys("engine-a") == work.truth()
                assert not any(kind == "reset" for kind, _ in rec.calls)
                versions = [v for kind, v in rec.calls]
                assert versions and all(v > position for v in versions)  # type: ignore[operator]
                assert second.stats().resets == 1  # its own run start, not written again
            finally:
                await second.aclose()


async def test_redis_restart_with_appendonly_resumes(tmp_path: Path) -> None:
    work = Workload(3)
    index = RecordingWriter(PrefixIndex())
    with redis_server(tmp_path, appendonly=True) as server, publisher() as pub:
        async with bridge(pub, server) as b:
            await publish_until_in_stream(pub, work, server, 10)
            rd = reader(server, index)
            await rd.start()
            try:
                await caught_up(rd, pub.last_seq)
                server.stop()
                for _ in range(6):  # the bridge holds these until Redis is back
                    pub.publish(work.next_events())
                assert pub.flush()
                await wait_until(lambda: b.pending == 6, what="bridge queueing")
                await wait_until(lambda: rd.redis_errors > 0, what="reader noticing")
                server.start()
                await caught_up(rd, pub.last_seq)
                stats = rd.stats()
                assert not stats.partial and stats.gaps == 0 and stats.resets == 1
                assert index.inner.keys("engine-a") == work.truth()
                written = [v for kind, v in index.calls if kind != "reset"]
                assert written == sorted(written)  # in order, never back
            finally:
                await rd.aclose()


@pytest.mark.parametrize("with_replay", [False, True])
async def test_redis_restart_without_data_is_lost_history(
    tmp_path: Path, with_replay: bool
) -> None:
    work = Workload(4)
    index = PrefixIndex()
    with redis_server(tmp_path) as server, publisher() as pub:
        async with bridge(pub, server):
            await publish_until_in_stream(pub, work, server, 10)
            first = reader(server, index)
            await first.start()
            await caught_up(first, pub.last_seq)
            await first.aclose()
            position = index.version("engine-a")
            assert position is not None

            await publish_until_in_stream(pub, work, server, 5)  # only in Redis...
            server.stop()
            server.start()  # ...which comes back empty
            await publish_until_in_stream(pub, work, server, 5)
            second = reader(
                server,
                index,
                resume_from=position,
                replay_endpoint=pub.replay_endpoint if with_replay else None,
            )
            await second.start()
            try:
                await caught_up(second, pub.last_seq)
                info = index.slice_info("engine-a")
                assert info is not None
                stats = second.stats()
                if with_replay:
                    # Resynced from the engine's own history: exact, and in the same epoch.
                    assert not info.partial and info.version[0] == position[0]
                    assert index.keys("engine-a") == work.truth()
                    assert stats.replays >= 1 and stats.history_lost == 0
                else:
                    assert info.partial and stats.history_lost == 1
                    keys = index.keys("engine-a")
                    assert keys and keys <= work.truth()
            finally:
                await second.aclose()


async def test_trimmed_stream_is_detected(tmp_path: Path) -> None:
    work = Workload(5)
    index = PrefixIndex()
    with redis_server(tmp_path) as server, publisher() as pub:
        async with bridge(pub, server, maxlen=8):
            await publish_until_in_stream(pub, work, server, 40)
            client = server.client()
            first = client.xrange(STREAM, count=1)[0][1]
            assert int(first[b"seq"]) > 0 and client.xlen(STREAM) < 40
            rd = reader(server, index)  # a router starting now: the run's start is gone
            await rd.start()
            try:
                await caught_up(rd, pub.last_seq)
                info = index.slice_info("engine-a")
                assert info is not None and info.partial
                assert index.keys("engine-a") <= work.truth()
            finally:
                await rd.aclose()
                client.close()


async def test_reader_drops_malformed_entries_and_goes_on(tmp_path: Path) -> None:
    work = Workload(6)
    index = PrefixIndex()
    with redis_server(tmp_path) as server, publisher() as pub:
        async with bridge(pub, server):
            await publish_until_in_stream(pub, work, server, 3)
            client = server.client()
            client.xadd(STREAM, {"seq": "not-a-number", "payload": b"x"})
            client.xadd(STREAM, {"topic": b"t"})
            client.xadd(STREAM, {"seq": "99999999999999999999999", "payload": b"x"})
            client.xadd(STREAM, {"seq": str(10**6), "payload": b"\xc1\xc1"})
            client.close()
            await publish_until_in_stream(pub, work, server, 3)
            rd = reader(server, index)
            await rd.start()
            try:
                await caught_up(rd, pub.last_seq)
                stats = rd.stats()
                assert stats.malformed_messages == 4 and not stats.partial
                assert index.keys("engine-a") == work.truth()
            finally:
                await rd.aclose()


async def test_kvmesh_bridge_command_relays_and_stops_cleanly(tmp_path: Path) -> None:
    import signal
    import sys

    work = Workload(7)
    with redis_server(tmp_path) as server, publisher() as pub:
        assert pub.replay_endpoint is not None
        cmd = [
            sys.executable, "-m", "cli", "bridge",
            "--zmq", pub.endpoint, "--replay", pub.replay_endpoint,
            "--redis", server.url, "--engine", "http://engine-a:8000", "--maxlen", "1000",
            "--stats-interval", "0", "--log-level", "warning",
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        client = server.client()
        stream = "kvmesh:kv:http://engine-a:8000"
        try:
            deadline = time.monotonic() + 10
            while client.xlen(stream) < 5:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the bridge wrote nothing"
                pub.publish(work.next_events())
                await asyncio.sleep(0.05)
            seqs = [int(f[b"seq"]) for _, f in client.xrange(stream)]
            assert seqs == list(range(len(seqs)))  # from seq 0 (replayed), no gap, no dup
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                _out, err = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                _out, err = proc.communicate()
            client.close()
        assert proc.returncode == 0, err.decode()


def test_kvmesh_bridge_rejects_bad_arguments() -> None:
    import sys

    bad = subprocess.run(
        [sys.executable, "-m", "cli", "bridge", "--zmq", "http://x", "--redis", "redis://h"],
        capture_output=True,
        timeout=30,
    )
    assert bad.returncode == 2 and b"--zmq" in bad.stderr
