"""Events published by a simulated engine, decoded with plain msgpack from a real ZMQ SUB (and
the replay socket for anything the live stream lost), rebuild exactly the cache contents that
``/debug/kv_cache`` reports, under eviction pressure too."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgpack  # type: ignore[import-untyped,unused-ignore]
import pytest
import zmq
import zmq.asyncio

from kvevents.publisher import ZmqEventPublisher
from sim.engine_model import EngineConfig, EngineModel
from sim.profiles import L4_LLAMA_3_1_8B
from sim.server import SimEngineServer

pytestmark = pytest.mark.integration

END_SEQ = 2**64 - 1


def as_u64(h: int | bytes) -> int:
    return int.from_bytes(h[-8:], "big") if isinstance(h, bytes) else h & (2**64 - 1)


def event_fields(ev: Any) -> tuple[str, dict[str, Any]]:
    """Map or positional-array event -> (tag, fields by name)."""
    if isinstance(ev, dict):
        return ev["type"], ev
    tag = ev[0]
    if tag == "BlockStored":
        return tag, {"block_hashes": ev[1], "parent_block_hash": ev[2], "token_ids": ev[3]}
    if tag == "BlockRemoved":
        return tag, {"block_hashes": ev[1]}
    return tag, {}


@dataclass
class EventLog:
    topic: bytes
    payloads: dict[int, bytes] = field(default_factory=dict)
    live: int = 0

    def add(self, topic: bytes, seq: bytes, payload: bytes) -> None:
        assert topic == self.topic and len(seq) == 8
        self.payloads[int.from_bytes(seq, "big")] = payload

    def missing(self, upto: int) -> list[int]:
        return [s for s in range(upto + 1) if s not in self.payloads]

    def rebuild(self, upto: int) -> Counter[int]:
        held: Counter[int] = Counter()
        for seq in range(upto + 1):
            batch = msgpack.unpackb(self.payloads[seq], raw=False, strict_map_key=False)
            assert isinstance(batch, list) and len(batch) == 3 and batch[2] == 0
            for ev in batch[1]:
                tag, f = event_fields(ev)
                if tag == "BlockStored":
                    held.update(as_u64(h) for h in f["block_hashes"])
                elif tag == "BlockRemoved":
                    for h in f["block_hashes"]:
                        held[as_u64(h)] -= 1
                        assert held[as_u64(h)] >= 0
                elif tag == "AllBlocksCleared":
                    held.clear()
        return +held


@dataclass
class Rig:
    server: SimEngineServer
    publisher: ZmqEventPublisher
    base: str
    http: aiohttp.ClientSession
    sub: zmq.asyncio.Socket
    ctx: zmq.asyncio.Context
    log: EventLog

    async def complete(self, prompt: list[int], max_tokens: int) -> None:
        body = {"prompt": prompt, "max_tokens": max_tokens}
        async with self.http.post(self.base + "/v1/completions", json=body) as r:
            assert r.status == 200, await r.text()

    async def cache(self) -> Any:
        async with self.http.get(self.base + "/debug/kv_cache") as r:
            return await r.json()

    async def drain_live(self, upto: int, timeout: float = 10.0) -> None:
        """Receive live frames until seq ``upto`` has arrived (or the deadline passes)."""
        deadline = time.monotonic() + timeout
        while upto not in self.log.payloads and time.monotonic() < deadline:
            if await self.sub.poll(100):
                self.log.add(*await self.sub.recv_multipart())
                self.log.live += 1

    async def replay_missing(self, upto: int) -> int:
        """Fetch every missing seq <= upto through the replay socket; returns how many."""
        missing = self.log.missing(upto)
        if not missing:
            return 0
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.connect(self.publisher.replay_endpoint or "")
        try:
            await dealer.send_multipart([b"", missing[0].to_bytes(8, "big")])
            while True:
                assert await dealer.poll(5000), "replay timed out"
                frames = await dealer.recv_multipart()
                assert frames[0] == b""
                _, topic, seq, payload = frames
                if int.from_bytes(seq, "big") == END_SEQ:
                    assert payload == b"" and topic == b""
                    break
                self.log.add(topic, seq, payload)
        finally:
            dealer.close(linger=0)
        return len(missing)


def make_rig_fixture(event_format: str, hash_bytes: bool) -> Any:
    @pytest.fixture
    async def rig() -> AsyncIterator[Rig]:
        cfg = EngineConfig(num_gpu_blocks=48, max_model_len=400, max_num_batched_tokens=256)
        engine = EngineModel(L4_LLAMA_3_1_8B, cfg, seed=4)
        publisher = ZmqEventPublisher(
            "tcp://127.0.0.1:*",
            replay_endpoint="tcp://127.0.0.1:*",
            topic="kv@sim@m",
            event_format="map" if event_format == "map" else "array",
            hash_bytes=hash_bytes,
        )
        server = SimEngineServer(engine, "m", publisher, speedup=200.0)
        port = await server.start("127.0.0.1", 0)
        ctx = zmq.asyncio.Context()
        sub = ctx.socket(zmq.SUB)
        sub.connect(publisher.endpoint)
        sub.subscribe(b"kv@")
        async with aiohttp.ClientSession() as http:
            yield Rig(server, publisher, f"http://127.0.0.1:{port}", http, sub, ctx,
                      EventLog(b"kv@sim@m"))  # fmt: skip
        sub.close(linger=0)
        await server.stop()
        ctx.term()

    return rig


rig_map = make_rig_fixture("map", hash_bytes=False)
rig_array_bytes = make_rig_fixture("array", hash_bytes=True)


async def run_workload(rig: Rig, seed: int, n: int) -> None:
    """Concurrent requests sharing a few prefixes, on a cache of 48 blocks: lots of eviction."""
    rng = random.Random(seed)
    roots = [list(range(1000 * k, 1000 * k + rng.randint(20, 120))) for k in range(1, 5)]

    async def one(i: int) -> None:
        tail = list(range(50_000 + 300 * i, 50_000 + 300 * i + rng.randint(0, 80)))
        await rig.complete(rng.choice(roots) + tail, rng.randint(1, 40))

    for start in range(0, n, 6):
        await asyncio.gather(*(one(i) for i in range(start, min(n, start + 6))))


async def check_reconstruction(rig: Rig) -> dict[str, Any]:
    cache = await rig.cache()
    last = cache["last_seq"]
    assert last is not None
    await rig.drain_live(last)
    await rig.replay_missing(last)
    assert rig.log.missing(last) == []
    truth = Counter({h: 1 for h in cache["block_hashes"]})
    for h, n in cache["duplicate_hashes"]:
        truth[h] = n
    assert rig.log.rebuild(last) == truth
    assert sum(truth.values()) == cache["num_cached_blocks"]
    return dict(cache)


async def test_map_events_rebuild_the_cache_under_eviction(rig_map: Rig) -> None:
    await run_workload(rig_map, seed=1, n=30)
    cache = await check_reconstruction(rig_map)
    removed = sum(
        1
        for p in rig_map.log.payloads.values()
        for ev in msgpack.unpackb(p, raw=False)[1]
        if event_fields(ev)[0] == "BlockRemoved"
    )
    assert removed > 0, "the workload must evict"
    assert cache["num_cached_blocks"] <= 48
    assert rig_map.log.live > 0


async def test_array_events_with_bytes_hashes_rebuild_the_cache(rig_array_bytes: Rig) -> None:
    await run_workload(rig_array_bytes, seed=2, n=24)
    await check_reconstruction(rig_array_bytes)
    first = msgpack.unpackb(rig_array_bytes.log.payloads[0], raw=False)[1][0]
    assert isinstance(first, list) and isinstance(first[1][0], bytes) and len(first[1][0]) == 32


async def test_live_loss_is_repaired_by_replay_and_reset_is_published(rig_map: Rig) -> None:
    await run_workload(rig_map, seed=3, n=12)
    await check_reconstruction(rig_map)
    rig_map.publisher.drop_next(3)
    await run_workload(rig_map, seed=4, n=12)
    last = (await rig_map.cache())["last_seq"]
    await rig_map.drain_live(last)
    gaps = rig_map.log.missing(last)
    assert len(gaps) == 3  # dropped on the live stream only
    assert await rig_map.replay_missing(last) == 3
    await check_reconstruction(rig_map)
    async with rig_map.http.post(rig_map.base + "/reset_prefix_cache") as r:
        assert r.status == 200
    cache = await check_reconstruction(rig_map)
    assert cache["block_hashes"] == []
    last_batch = msgpack.unpackb(rig_map.log.payloads[cache["last_seq"]], raw=False)
    assert last_batch[1] == [{"type": "AllBlocksCleared"}]


async def test_http_knobs_lose_batches_and_restart_the_engine(rig_map: Rig) -> None:
    await run_workload(rig_map, seed=5, n=6)
    await check_reconstruction(rig_map)
    async with rig_map.http.post(rig_map.base + "/debug/fault", json={"drop_events": 2}) as r:
        assert r.status == 200
    await run_workload(rig_map, seed=6, n=6)
    last = (await rig_map.cache())["last_seq"]
    await rig_map.drain_live(last)
    assert len(rig_map.log.missing(last)) == 2

    # an in-flight stream sees an error event when the engine "crashes"
    body = {"prompt": list(range(100)), "max_tokens": 250, "stream": True}
    async with rig_map.http.post(rig_map.base + "/v1/completions", json=body) as stream:
        assert stream.status == 200
        await stream.content.readline()
        async with rig_map.http.post(rig_map.base + "/debug/fault", json={"pause_s": 60}) as r:
            assert r.status == 200  # hold the request mid-stream; restarting ends the stall
        restart = {"restart_engine": True}
        async with rig_map.http.post(rig_map.base + "/debug/fault", json=restart) as r:
            assert r.status == 200
        rest = (await stream.read()).decode()
    assert '"code":500' in rest and rest.endswith("data: [DONE]\n\n")

    cache = await rig_map.cache()
    assert cache["block_hashes"] == [] and cache["last_seq"] is None
    assert cache["num_free_blocks"] == cache["num_gpu_blocks"]
    await rig_map.complete(list(range(70)), 1)
    rig_map.log = EventLog(rig_map.log.topic)  # a subscriber resets when seq goes back
    cache = await check_reconstruction(rig_map)
    assert cache["last_seq"] == 0 and cache["num_cached_blocks"] == 4
