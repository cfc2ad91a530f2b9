"""The real-time driver: virtual clock without loop latency, stalls, and step failures."""

from __future__ import annotations

import asyncio
from itertools import pairwise

import pytest

from sim.engine_model import EngineModel, RequestOutput, StepResult
from sim.engine_runner import EngineRunner, Finished
from sim.profiles import L4_LLAMA_3_1_8B


async def run_to_end(queue: asyncio.Queue[RequestOutput | Finished]) -> list[RequestOutput]:
    outs: list[RequestOutput] = []
    while True:
        item = await asyncio.wait_for(queue.get(), timeout=30)
        assert isinstance(item, RequestOutput), item
        outs.append(item)
        if item.finished:
            return outs


async def test_an_idle_engine_starts_the_step_at_the_arrival() -> None:
    runner = EngineRunner(EngineModel(L4_LLAMA_3_1_8B, seed=1), speedup=1000.0)
    await runner.start()
    try:
        outs = await run_to_end(runner.submit("a", list(range(512)), 3))
        # loop latency, multiplied by the speedup, would otherwise show up here
        assert outs[0].ttft == pytest.approx(L4_LLAMA_3_1_8B.prefill_time(512))
        outs = await run_to_end(runner.submit("b", list(range(512)), 1))
        assert outs[0].ttft == pytest.approx(L4_LLAMA_3_1_8B.prefill_time(16, 496))
    finally:
        await runner.stop()


async def test_a_stall_counts_as_engine_time() -> None:
    runner = EngineRunner(EngineModel(L4_LLAMA_3_1_8B, seed=1), speedup=10.0)
    await runner.start()
    try:
        runner.pause(0.2)
        outs = await run_to_end(runner.submit("a", list(range(64)), 1))
        assert outs[0].ttft is not None and outs[0].ttft >= 0.2 * 10
    finally:
        await runner.stop()


async def test_a_failing_step_fails_in_flight_requests_and_the_loop_keeps_serving(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = EngineModel(L4_LLAMA_3_1_8B, seed=1)
    real_step = engine.step
    calls = {"n": 0}

    def flaky_step(now: float) -> StepResult:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected model bug")
        return real_step(now)

    monkeypatch.setattr(engine, "step", flaky_step)
    runner = EngineRunner(engine, speedup=1000.0)
    await runner.start()
    try:
        queue = runner.submit("a", list(range(40)), 2)
        assert await asyncio.wait_for(queue.get(), timeout=10) == Finished("error")
        assert not engine.has_work()
        outs = await run_to_end(runner.submit("b", list(range(40)), 2))
        assert outs[-1].num_output_tokens == 2
    finally:
        await runner.stop()


async def test_stop_ends_every_open_request() -> None:
    runner = EngineRunner(EngineModel(L4_LLAMA_3_1_8B, seed=1), speedup=1.0)
    await runner.start()
    queue = runner.submit("a", list(range(40)), 1000)
    await runner.stop()
    item = await asyncio.wait_for(queue.get(), timeout=10)
    while isinstance(item, RequestOutput):
        item = await asyncio.wait_for(queue.get(), timeout=10)
    assert item == Finished("abort")
    assert not runner.engine.has_work()


def virtual_clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Make the running loop's clock virtual: it moves only when the loop would block (by
    the time it would have waited) or when the test moves it (work that costs time)."""
    loop = asyncio.get_running_loop()
    clock = [loop.time()]
    selector = loop._selector  # type: ignore[attr-defined]
    select = selector.select

    def select_now(timeout: float | None = None) -> list[object]:
        events: list[object] = select(0)
        if not events and timeout is not None and timeout > 0:
            clock[0] += timeout
        return events

    monkeypatch.setattr(loop, "time", lambda: clock[0])
    monkeypatch.setattr(selector, "select", select_now)
    return clock


async def test_a_busy_engine_keeps_its_profiles_pace_whatever_the_loop_costs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each step costs the loop 4 ms of work (the model's arithmetic, publishing, handlers):
    # the engine's steps must still end on the wall clock at their profile's pace, the work
    # taken out of the sleeps (a step loop that slept each step's duration after its work
    # ran slower than its profile by that work, 4 ms a step).
    clock = virtual_clock(monkeypatch)
    engine = EngineModel(L4_LLAMA_3_1_8B, seed=1)
    real_step = engine.step
    steps: list[StepResult] = []

    def costly_step(now: float) -> StepResult:
        clock[0] += 0.004
        result = real_step(now)
        steps.append(result)
        return result

    monkeypatch.setattr(engine, "step", costly_step)
    runner = EngineRunner(engine, speedup=2.0)
    await runner.start()
    try:
        queue: asyncio.Queue[RequestOutput | Finished] = asyncio.Queue()
        t0 = clock[0]
        for i in range(8):
            runner.submit(f"r{i}", list(range(i * 1000, i * 1000 + 300)), 40, queue=queue)
        done = 0
        while done < 8:
            item = await asyncio.wait_for(queue.get(), timeout=30)
            assert isinstance(item, RequestOutput)
            done += item.finished
        elapsed = clock[0] - t0
    finally:
        await runner.stop()
    busy = [s for s in steps if s.duration > 0]
    assert len(busy) >= 40
    assert all(b.now == a.end for a, b in pairwise(busy))  # back to back
    profile_time = sum(s.duration for s in busy) / 2.0
    assert elapsed == pytest.approx(profile_time, abs=0.006)  # not + 4 ms x steps
    assert runner.pace.steps == len(busy) and runner.pace.absorbed_s == 0
