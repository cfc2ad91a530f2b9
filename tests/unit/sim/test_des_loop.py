"""The virtual-time event loop: ordering, cancellation, clocks, determinism."""

from __future__ import annotations

import random

import pytest

from sim.des import EventLoop


def test_events_run_in_time_order_and_fifo_at_equal_times() -> None:
    loop = EventLoop()
    seen: list[tuple[float, str]] = []
    for when, tag in [(3.0, "c"), (1.0, "a1"), (2.0, "b"), (1.0, "a2"), (1.0, "a3")]:
        loop.at(when, lambda t=tag: seen.append((loop.now, t)))
    assert loop.run() == 5
    assert seen == [(1.0, "a1"), (1.0, "a2"), (1.0, "a3"), (2.0, "b"), (3.0, "c")]


def test_callbacks_scheduled_from_callbacks_keep_causal_order() -> None:
    loop = EventLoop()
    seen: list[str] = []

    def first() -> None:
        seen.append("first")
        loop.after(0.0, lambda: seen.append("zero-delay child"))
        loop.at(loop.now, lambda: seen.append("same-time child"))

    loop.at(1.0, first)
    loop.at(1.0, lambda: seen.append("sibling"))
    loop.run()
    # Children scheduled at the current time run after everything already queued for it.
    assert seen == ["first", "sibling", "zero-delay child", "same-time child"]


def test_cancelled_timer_never_fires() -> None:
    loop = EventLoop()
    seen: list[int] = []
    t = loop.at(1.0, seen.append, 1)
    loop.at(2.0, seen.append, 2)
    t.cancel()
    assert t.cancelled
    assert loop.run() == 1
    assert seen == [2]


def test_scheduling_in_the_past_is_refused() -> None:
    loop = EventLoop(start=5.0)
    with pytest.raises(ValueError, match=r"already at 5\.0"):
        loop.at(4.0, lambda: None)
    with pytest.raises(ValueError, match="delay"):
        loop.after(-0.1, lambda: None)


def test_run_until_stops_at_the_bound_and_leaves_the_clock_there() -> None:
    loop = EventLoop()
    seen: list[float] = []
    for t in (1.0, 2.0, 3.0):
        loop.at(t, lambda: seen.append(loop.now))
    assert loop.run(until=2.5) == 2
    assert loop.now == 2.5
    assert loop.next_time() == 3.0
    loop.run()
    assert seen == [1.0, 2.0, 3.0]


def test_every_repeats_until_stopped() -> None:
    loop = EventLoop()
    ticks: list[float] = []
    stop = loop.every(0.25, lambda: ticks.append(loop.now))
    loop.run(until=1.0)
    stop()
    loop.run(until=5.0)
    assert ticks == [0.25, 0.5, 0.75, 1.0]


def test_stop_returns_after_the_current_event() -> None:
    loop = EventLoop()
    seen: list[int] = []

    def first() -> None:
        seen.append(1)
        loop.stop()

    loop.at(1.0, first)
    loop.at(2.0, seen.append, 2)
    loop.run()
    assert seen == [1]
    loop.run()
    assert seen == [1, 2]


def _mm1_trace(seed: int, n: int = 300) -> list[tuple[float, int]]:
    """A single-server queue driven by one seeded RNG: its departures as (time, customer)."""
    loop = EventLoop()
    rng = random.Random(seed)
    queue: list[int] = []
    out: list[tuple[float, int]] = []
    busy = [False]

    def serve() -> None:
        if queue and not busy[0]:
            busy[0] = True
            loop.after(rng.expovariate(1.2), depart, queue.pop(0))

    def depart(c: int) -> None:
        out.append((loop.now, c))
        busy[0] = False
        serve()

    def arrive(c: int) -> None:
        queue.append(c)
        serve()
        if c + 1 < n:
            loop.after(rng.expovariate(1.0), arrive, c + 1)

    loop.at(0.0, arrive, 0)
    loop.run()
    return out


def test_same_seed_same_history_other_seed_other_history() -> None:
    a, b, c = _mm1_trace(7), _mm1_trace(7), _mm1_trace(8)
    assert a == b
    assert a != c
    assert [cust for _, cust in a] == list(range(300))  # FIFO single server


def test_hand_computed_queue() -> None:
    """Three jobs of 2 s each arriving at 0, 1 and 10 on one server: departures 2, 4 and 12."""
    loop = EventLoop()
    done: list[tuple[str, float]] = []
    free_at = [0.0]

    def arrive(name: str) -> None:
        start = max(loop.now, free_at[0])
        free_at[0] = start + 2.0
        loop.at(free_at[0], lambda: done.append((name, loop.now)))

    for t, name in [(0.0, "a"), (1.0, "b"), (10.0, "c")]:
        loop.at(t, arrive, name)
    loop.run()
    assert done == [("a", 2.0), ("b", 4.0), ("c", 12.0)]
