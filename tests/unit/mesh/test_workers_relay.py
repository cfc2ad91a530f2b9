"""The worker's side of its dispatches, on a real WorkerRouter (no sockets): the ``done``
note that releases a dispatch at the primary goes at once, the engine's answer follows from
the deferred bookkeeping under the dispatch's own ticket (on the next ``done`` note, or alone
when none comes soon), and a metrics read runs that bookkeeping first."""

from __future__ import annotations

import asyncio
import json
from functools import partial
from typing import Any

from kvevents.block_sizes import sized_request_keys
from mesh.api import Inference
from mesh.config import build
from mesh.dispatch import Target
from mesh.policies.base import Request
from mesh.workers import (
    OBSERVED_DELAY,
    KeyConfig,
    RelayDispatcher,
    WorkerKeys,
    WorkerRouter,
    requests_served,
)

ENGINE = "http://127.0.0.1:9"
ROUTE = "/v1/chat/completions"


class Notes:
    """A link that records what the worker tells the primary."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []

    def notify(self, op: str, body: Any) -> None:
        self.sent.append((op, body))


def worker() -> tuple[WorkerRouter, Notes]:
    notes = Notes()
    config = build({"region": "us", "engines": [{"url": ENGINE}], "workers": 2})
    return WorkerRouter(config, notes, "/nonexistent", KeyConfig()), notes  # type: ignore[arg-type]


def inference(text: str) -> tuple[Inference, Request]:
    ids = list(range(40))
    body = {"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": 8}
    inf = Inference("chat", ROUTE, body, json.dumps(body).encode(), "m", False, ids, None, 8)
    keys = WorkerKeys(sized_request_keys(ids, (16,)), (16,), None, None, None)
    return inf, Request(text, ids, keys, 16, None, 8, 0.0, "m")


async def test_each_answer_reaches_the_primary_under_its_own_ticket() -> None:
    w, notes = worker()
    d = w.dispatcher
    assert isinstance(d, RelayDispatcher)
    target = Target(ENGINE, ENGINE, "us", True)
    answers = {7: (16, 3), 8: (32, 900)}  # the primary's ticket -> (cached, output tokens)
    checks = {}
    tickets = {}
    for tid in answers:  # two dispatches in flight at once, as Router._attempt makes them
        inf, req = inference(f"request {tid}")
        assert isinstance(req.keys, WorkerKeys)
        req.keys.hint = (ENGINE, 32, 0, False, tid)  # what the primary answered ``place``
        d.held = (target, tid)
        tickets[tid] = d.start(target, req.num_tokens, 0.0)
        checks[tid] = (req, w.precision.prepare(inf, ENGINE, req.keys, 16))
    for tid, (cached, output) in answers.items():
        req, check = checks[tid]
        usage = {"prompt_tokens": 40, "completion_tokens": output,
                 "prompt_tokens_details": {"cached_tokens": cached}}
        check.tap.usage = usage
        # As Router._attempt: the bookkeeping is deferred, the ledger is not.
        w.deferred.add(partial(w._relayed, req, check, 200, True, False, ROUTE, 1.0))
        d.done(tickets[tid])
    assert notes.sent == [("done", [7, None]), ("done", [8, None])]
    w.deferred.run()
    assert len(notes.sent) == 2  # the answers wait for a frame to ride on
    await asyncio.sleep(OBSERVED_DELAY * 5)  # none comes: they go on a note of their own
    assert [op for op, _ in notes.sent] == ["done", "done", "observed"]
    observed = dict(notes.sent[2][1][0])
    assert set(observed) == {7, 8}
    for tid, (cached, output) in answers.items():
        replica, predicted, _, _, _, status, completed, usage = observed[tid]
        assert (replica, predicted, status, completed) == (ENGINE, 32, 200, True)
        assert usage["prompt_tokens_details"]["cached_tokens"] == cached
        assert usage["completion_tokens"] == output
    w.deferred.close()


async def test_an_answer_rides_on_the_next_done_note() -> None:
    w, notes = worker()
    d = w.dispatcher
    assert isinstance(d, RelayDispatcher)
    target = Target(ENGINE, ENGINE, "us", True)
    tickets = {}
    for tid in (1, 2):
        inf, req = inference(f"request {tid}")
        assert isinstance(req.keys, WorkerKeys)
        req.keys.hint = (ENGINE, 0, 2, False, tid)
        d.held = (target, tid)
        tickets[tid] = d.start(target, req.num_tokens, 0.0)
        check = w.precision.prepare(inf, ENGINE, req.keys, 16)
        if tid == 1:
            w.deferred.add(partial(w._relayed, req, check, 200, True, False, ROUTE, 1.0))
            d.done(tickets[1])
            w.deferred.run()  # (what the next dispatch's upstream write does)
    d.done(tickets[2])
    assert [op for op, _ in notes.sent] == ["done", "done"]
    assert notes.sent[0][1] == [1, None]
    tid, observed = notes.sent[1][1]
    assert tid == 2 and [t for t, _ in observed] == [1]
    await asyncio.sleep(OBSERVED_DELAY * 5)
    assert len(notes.sent) == 2  # sent once
    w.deferred.close()


async def test_a_metrics_read_sees_every_answer_relayed_before_it() -> None:
    w, notes = worker()
    inf, req = inference("one")
    assert isinstance(req.keys, WorkerKeys)
    req.keys.hint = (ENGINE, 0, 2, False, 5)
    check = w.precision.prepare(inf, ENGINE, req.keys, 16)
    w.deferred.add(partial(w._relayed, req, check, 200, True, False, ROUTE, 1.0))
    wire = await w.samples(w.link, "samples", None)
    assert requests_served(wire) == 1.0
    # The engine's answer went to the primary before this reply (same link, in order).
    assert [(op, [t for t, _ in body[0]]) for op, body in notes.sent] == [("observed", [5])]
    w.deferred.close()
