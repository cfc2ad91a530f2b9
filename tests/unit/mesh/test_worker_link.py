"""The primary <-> worker link: frame codec, call bookkeeping, and both ends on a real
Unix socket (calls both ways, notes in order, failure when one end goes away)."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped,unused-ignore]
import pytest

from mesh.worker_link import (
    MAX_FRAME,
    Calls,
    FrameReader,
    Link,
    LinkError,
    LinkServer,
    connect,
    encode_frame,
)


def test_frames_survive_any_split_of_the_byte_stream() -> None:
    data = b"".join(encode_frame("place", i, {"keys": list(range(i))}) for i in range(20))
    for step in (1, 3, 7, 64, len(data)):
        reader = FrameReader()
        got = []
        for at in range(0, len(data), step):
            got += reader.feed(data[at : at + step])
        assert [(op, cid, body["keys"]) for op, cid, body in got] == [
            ("place", i, list(range(i))) for i in range(20)]


@pytest.mark.parametrize("raw, why", [
    (struct.pack(">I", MAX_FRAME + 1), "over the"),
    (struct.pack(">I", 2) + b"\xc1\xc1", "undecodable"),
    (struct.pack(">I", 2) + msgpack.packb([1]), "not \\[op, call_id, body\\]"),
])
def test_malformed_streams_are_refused_with_a_reason(raw: bytes, why: str) -> None:
    if len(raw) > 4:
        raw = struct.pack(">I", len(raw) - 4) + raw[4:]
    with pytest.raises(LinkError, match=why):
        FrameReader().feed(raw)


async def test_calls_settle_ok_error_and_malformed_replies() -> None:
    loop = asyncio.get_running_loop()
    calls = Calls()
    ok, err, bad = (loop.create_future() for _ in range(3))
    ids = [calls.open(f) for f in (ok, err, bad)]
    calls.settle(ids[0], ["ok", 5])
    calls.settle(ids[1], ["error", "no replica"])
    calls.settle(ids[2], "junk")
    calls.settle(99, ["ok", 1])  # unknown id: ignored
    assert ok.result() == 5
    with pytest.raises(ValueError, match="no replica"):
        err.result()
    with pytest.raises(LinkError):
        bad.result()
    assert len(calls) == 0


async def _until(cond: Any) -> None:
    while not cond():
        await asyncio.sleep(0.005)


async def test_calls_both_ways_out_of_order_replies_and_ordered_notes(tmp_path: Path) -> None:
    notes: list[Any] = []
    closed: list[Link] = []

    async def primary(link: Link, op: str, body: Any) -> Any:
        if op == "fail":
            raise ValueError("refused")
        if op == "ask-back":  # the primary calls the worker while answering it
            return await link.call("worker-op", body)
        await asyncio.sleep(0.001 * (body % 3))  # replies come back out of order
        return body * 2

    async def worker(link: Link, op: str, body: Any) -> Any:
        return ["worker", body]

    server = LinkServer(str(tmp_path / "link.sock"), primary,
                        lambda link, op, body: notes.append((op, body)), closed.append)
    await server.start()
    client = await connect(server.path, worker)
    try:
        assert await asyncio.gather(*(client.call("double", i) for i in range(50))) == [
            2 * i for i in range(50)]
        with pytest.raises(ValueError, match="refused"):
            await client.call("fail", 0)
        assert await client.call("ask-back", 3) == ["worker", 3]
        for i in range(100):
            client.notify("start" if i % 2 == 0 else "done", i)
        await asyncio.wait_for(_until(lambda: len(notes) == 100), 5)
        assert [b for _, b in notes] == list(range(100))
    finally:
        await client.close()
    await asyncio.wait_for(_until(lambda: len(closed) == 1), 5)
    await server.stop()


async def test_pending_calls_fail_when_the_primary_goes_away(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def handler(link: Link, op: str, body: Any) -> Any:
        await release.wait()
        return body

    server = LinkServer(str(tmp_path / "link.sock"), handler)
    await server.start()
    client = await connect(server.path)
    call = asyncio.create_task(client.call("slow", 1))
    await asyncio.wait_for(_until(lambda: len(server.links) == 1), 5)
    await server.stop()
    with pytest.raises(LinkError):
        await asyncio.wait_for(call, 5)
    await asyncio.wait_for(client.closed.wait(), 5)
    with pytest.raises(LinkError):
        await client.call("slow", 2)
    with pytest.raises(LinkError):
        client.notify("done", 1)
    await client.close()


async def test_a_malformed_stream_closes_only_that_link(tmp_path: Path) -> None:
    async def handler(link: Link, op: str, body: Any) -> Any:
        return body

    server = LinkServer(str(tmp_path / "link.sock"), handler)
    await server.start()
    good = await connect(server.path)
    reader, writer = await asyncio.open_unix_connection(server.path)
    writer.write(struct.pack(">I", 2) + b"\xc1\xc1")
    assert await asyncio.wait_for(reader.read(), 5) == b""  # the primary closed it
    writer.close()
    assert await good.call("echo", 7) == 7
    await good.close()
    await server.stop()
