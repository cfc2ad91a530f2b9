"""The primary's side of a worker's requests, on a real Router (no sockets): a placement is
counted in flight once, released by ``done``, cancelled when the worker gives up on it while
it waits in the queue (or before it is answered), and released when the worker dies."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest

from kvevents.block_sizes import sized_request_keys
from mesh.config import build
from mesh.dispatch import Ask
from mesh.policies.base import Decision, Request, View
from mesh.router import Router
from mesh.workers import ENDED, WorkerKeys, WorkerPool, ask_wire, placement_of

ENGINE = "http://127.0.0.1:9"


@dataclass
class Gate:
    """Waits while closed, then routes to the engine."""

    name: str = "gate"
    open: bool = True

    def decide(self, request: Request, view: View, now: float, rng: random.Random) -> Decision:
        if not self.open:
            return Decision(None, None, "closed", self.name, wait=True, retry_after=60.0)
        return Decision(ENGINE, "us", "open", self.name)


@pytest.fixture
async def pool() -> AsyncIterator[tuple[WorkerPool, Gate, Any]]:
    gate = Gate()
    router = Router(build({"region": "us", "engines": [{"url": ENGINE}], "workers": 2}),
                    policy=gate)
    p = WorkerPool(router)
    link = SimpleNamespace(info={"index": 1})
    p.slots[0].link = link  # type: ignore[assignment]
    yield p, gate, link
    await p.stop()


def place_body(pid: int, rid: str = "r", model: str = "m") -> list[Any]:
    ids = list(range(40))
    keys = WorkerKeys(sized_request_keys(ids, (16,)), (16,), None, None, None)
    return [pid, ask_wire(Ask(Request(rid, ids, keys, 16, None, 1, 0.0, model)))]


async def test_a_placement_is_held_once_and_released_by_done(pool: Any) -> None:
    p, _, link = pool
    placement, _, ticket, _ = placement_of(await p._place(link, place_body(7)))
    assert placement.target is not None and placement.target.url == ENGINE and ticket == 7
    assert p.router.dispatches.inflight(ENGINE) == 1
    assert p.status()["workers"][0]["inflight"] == 1
    p._note(link, "done", [7])
    assert p.router.dispatches.inflight(ENGINE) == 0
    p._note(link, "done", [7])  # a repeated note changes nothing
    assert p.router.dispatches.inflight(ENGINE) == 0


async def test_giving_up_while_queued_cancels_the_wait_and_holds_nothing(pool: Any) -> None:
    p, gate, link = pool
    gate.open = False
    call = asyncio.create_task(p._place(link, place_body(1)))
    for _ in range(100):
        await asyncio.sleep(0)
        if p.router.dispatcher.queued():
            break
    assert p.router.dispatcher.queued() == 1 and 1 in p.slots[0].placing
    p._note(link, "done", [1])
    with pytest.raises(asyncio.CancelledError):
        await call
    gate.open = True
    assert p.router.dispatcher.pump(0.0) == []  # the cancelled waiter leaves, unplaced
    assert p.router.dispatches.total() == 0 and not p.slots[0].tickets


async def test_giving_up_before_the_call_is_answered_holds_nothing(pool: Any) -> None:
    p, _, link = pool
    p._note(link, "done", [3])  # arrives before its call is being answered
    with pytest.raises(ValueError, match="abandoned"):
        await p._place(link, place_body(3))
    assert p.router.dispatches.total() == 0 and not p.slots[0].abandoned


async def test_a_dead_workers_dispatches_are_released(pool: Any) -> None:
    p, _, link = pool
    for pid in range(5):
        await p._place(link, place_body(pid, f"r{pid}"))
    assert p.router.dispatches.inflight(ENGINE) == 5
    p._closed(link)
    assert p.router.dispatches.inflight(ENGINE) == 0
    assert p.slots[0].link is None and not p.slots[0].tickets


async def test_the_engines_answer_scores_the_dispatch_it_belongs_to(pool: Any) -> None:
    # A worker's bookkeeping runs after its next dispatch (mesh.deferred): the answers come
    # after their ``done`` notes, maybe after other dispatches have ended too.
    p, _, link = pool
    await p._place(link, place_body(9, "r9", model="m-short"))
    await p._place(link, place_body(10, "r10", model="m-long"))
    p._note(link, "done", [9])
    p._note(link, "done", [10])
    assert p.router.dispatches.inflight(ENGINE) == 0

    def usage(cached: int, output: int) -> dict[str, Any]:
        return {"prompt_tokens": 40, "completion_tokens": output,
                "prompt_tokens_details": {"cached_tokens": cached}}

    # Answers ride on a later dispatch's ``done`` note, or come on a note of their own.
    await p._place(link, place_body(11, "r11", model="m-other"))
    p._note(link, "done", [11, [[10, [ENGINE, 32, 0, False, True, 200, True,
                                      usage(32, 900)]]]])
    p._note(link, "observed", [[[9, [ENGINE, 32, 0, False, True, 200, True, usage(16, 3)]]]])
    rec = p.router.precision.check.engines[ENGINE]
    assert sum(rec.outcomes.values()) == 2 and rec.outcomes["exact"] == 1
    assert rec.reported_tokens == 48
    # Each answer's length is learned for its own request.
    tables = p.router.dispatcher.lengths.tables
    assert tables[("m", "m-short")][:2] == [1.0, 3.0]
    assert tables[("m", "m-long")][:2] == [1.0, 900.0]
    assert list(p.slots[0].ended) == [11] and not p.slots[0].requests


async def test_an_answer_that_never_comes_is_not_kept_forever(pool: Any) -> None:
    p, _, link = pool
    for pid in range(ENDED + 5):  # each failed before its first byte: no ``observed``
        await p._place(link, place_body(pid, f"r{pid}"))
        p._note(link, "done", [pid])
    assert len(p.slots[0].ended) == ENDED and 0 not in p.slots[0].ended
    assert p.router.dispatches.total() == 0
