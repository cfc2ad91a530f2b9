"""The discrete-event loop: a virtual clock and a heap of timed callbacks.

Everything in a simulation (client sends, network deliveries, engine steps, gossip rounds,
load probes) is a callback scheduled at a virtual time. Events at the same time run in the
order they were scheduled, so a run is a pure function of its seed: no wall clock, no
thread, no dict-order surprise.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from typing import Any

Callback = Callable[..., None]


class Timer:
    """A scheduled callback; ``cancel()`` makes it a no-op (it stays in the heap, lazily)."""

    __slots__ = ("args", "fn", "when")

    def __init__(self, when: float, fn: Callback | None, args: tuple[Any, ...]) -> None:
        self.when = when
        self.fn = fn
        self.args = args

    def cancel(self) -> None:
        self.fn = None
        self.args = ()

    @property
    def cancelled(self) -> bool:
        return self.fn is None


class EventLoop:
    """Virtual-time event loop.

    ``at``/``after`` schedule; ``run`` pops events in ``(time, insertion order)`` and calls
    them with the clock set to their time. Scheduling in the past is an error: it would let
    an effect precede its cause.
    """

    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self.events_run = 0
        self._stopped = False

    def at(self, when: float, fn: Callback, *args: Any) -> Timer:
        if when < self.now or math.isnan(when):
            raise ValueError(f"cannot schedule at {when!r}: the clock is already at {self.now!r}")
        timer = Timer(when, fn, args)
        heapq.heappush(self._heap, (when, next(self._seq), timer))
        return timer

    def after(self, delay: float, fn: Callback, *args: Any) -> Timer:
        if delay < 0 or math.isnan(delay):
            raise ValueError(f"delay must be >= 0, got {delay!r}")
        return self.at(self.now + delay, fn, *args)

    def every(
        self, period: float, fn: Callable[[], None], *, first: float | None = None
    ) -> Callable[[], None]:
        """Call ``fn`` every ``period`` seconds from ``first`` (default: one period from now).

        Returns a function that stops the repetition.
        """
        if period <= 0:
            raise ValueError(f"period must be > 0, got {period!r}")
        state: dict[str, Timer | None] = {"timer": None}

        def tick() -> None:
            fn()
            state["timer"] = self.after(period, tick)

        state["timer"] = self.at(self.now + period if first is None else first, tick)

        def stop() -> None:
            timer = state["timer"]
            if timer is not None:
                timer.cancel()

        return stop

    def pending(self) -> int:
        """Scheduled events not yet run (cancelled ones included until they surface)."""
        return len(self._heap)

    def next_time(self) -> float | None:
        while self._heap and self._heap[0][2].fn is None:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def stop(self) -> None:
        """Make ``run`` return after the current event."""
        self._stopped = True

    def run(
        self,
        until: float = math.inf,
        *,
        max_events: int | None = None,
        on_progress: Callable[[float], None] | None = None,
        progress_every: int = 20_000,
    ) -> int:
        """Run events with time <= ``until``; leave the clock at ``until`` if it is finite.

        Returns the number of events run. ``on_progress(now)`` is called every
        ``progress_every`` events (progress bars, nothing that changes the simulation).
        """
        heap = self._heap
        pop = heapq.heappop
        ran = 0
        self._stopped = False
        limit = math.inf if max_events is None else max_events
        while heap and not self._stopped and ran < limit:
            when, _, timer = heap[0]
            if when > until:
                break
            pop(heap)
            fn = timer.fn
            if fn is None:
                continue
            self.now = when
            timer.fn = None
            fn(*timer.args)
            ran += 1
            if on_progress is not None and ran % progress_every == 0:
                on_progress(self.now)
        self.events_run += ran
        if not self._stopped and until != math.inf and (not heap or heap[0][0] > until):
            self.now = max(self.now, until)
        return ran
