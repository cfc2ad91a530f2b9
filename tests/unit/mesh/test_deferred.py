"""mesh.deferred: jobs run in order after the next upstream write, or by the timer."""

from __future__ import annotations

import asyncio
import logging

import pytest

from mesh.deferred import Deferred


@pytest.mark.asyncio
async def test_run_executes_pending_jobs_in_order_once() -> None:
    d = Deferred(max_delay=60.0)
    seen: list[int] = []
    for i in range(3):
        d.add(lambda i=i: seen.append(i))
    assert len(d) == 3 and seen == []
    d.run()
    assert seen == [0, 1, 2] and len(d) == 0 and d.ran == 3
    d.run()  # nothing pending: nothing runs twice
    assert seen == [0, 1, 2]
    d.close()


@pytest.mark.asyncio
async def test_timer_runs_jobs_when_no_request_follows() -> None:
    d = Deferred(max_delay=0.001)
    done = asyncio.Event()
    d.add(done.set)
    await asyncio.wait_for(done.wait(), 5.0)
    assert d.ran == 1


@pytest.mark.asyncio
async def test_a_failing_job_is_logged_and_the_rest_still_run(
        caplog: pytest.LogCaptureFixture) -> None:
    d = Deferred(max_delay=60.0)
    seen: list[str] = []

    def boom() -> None:
        raise RuntimeError("bad record")

    d.add(boom)
    d.add(lambda: seen.append("after"))
    with caplog.at_level(logging.ERROR, logger="kvmesh.router"):
        d.run()
    assert seen == ["after"]
    assert "deferred bookkeeping failed" in caplog.text
    d.close()


@pytest.mark.asyncio
async def test_close_runs_what_is_pending() -> None:
    d = Deferred(max_delay=60.0)
    seen: list[int] = []
    d.add(lambda: seen.append(1))
    d.close()
    assert seen == [1]
