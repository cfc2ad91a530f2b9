"""Loops that sleep on an event with a deadline stop when cancelled, even when the event is
set just as the cancellation comes (Python 3.11's ``asyncio.wait_for`` swallows that
cancellation: a router or mesh node that used it could hang on shutdown)."""

from __future__ import annotations

import asyncio

import pytest

from crdt.prefix_index import PrefixIndex
from mesh.config import build
from mesh.node import MeshConfig, MeshNode
from mesh.router import Router

KEY = "loop cancel test key of 32 bytes"


async def stops_when_woken_and_cancelled(task: asyncio.Task[None], wake: asyncio.Event,
                                         turns: int) -> bool:
    """Set ``wake``, let ``turns`` loop turns pass, cancel: did the task end?"""
    await asyncio.sleep(0.01)  # the loop is asleep on its event
    wake.set()
    for _ in range(turns):
        await asyncio.sleep(0)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=2.0)
    if task not in done:
        task.cancel()  # a second cancellation gets it out, for the cleanup
        await asyncio.wait({task}, timeout=2.0)
    return task in done and task.cancelled()


@pytest.mark.parametrize("turns", range(6))
async def test_a_mesh_node_closes_when_woken_as_it_is_cancelled(turns: int) -> None:
    node = MeshNode(MeshConfig.from_options(
        node_id="a", region="us", advertise="http://127.0.0.1:9", keys=[KEY],
        options={"profile": "local"}), {"prefix": PrefixIndex()})
    await node.start()
    try:
        assert await stops_when_woken_and_cancelled(node._tasks[0], node._wake, turns)
    finally:
        await node.aclose()


@pytest.mark.parametrize("turns", range(6))
async def test_the_routers_queue_loop_stops_when_kicked_as_it_is_cancelled(turns: int) -> None:
    router = Router(build({"region": "us", "engines": [{"url": "http://127.0.0.1:9"}]}))
    router.dispatcher.retry_at = router.clock() + 60.0  # a waiting head: a deadline
    task = asyncio.create_task(router._queue_loop())
    assert await stops_when_woken_and_cancelled(task, router._wake, turns)
