"""Drives an ``EngineModel`` in (scaled) real time on an asyncio loop.

One task runs the step loop: step at virtual ``now``, publish the step's KV events at once (vLLM
publishes them when it schedules), sleep until the step's end, then hand each request's outputs
to its queue.

Virtual time is wall time times ``speedup``. A busy engine's steps are paced against absolute
deadlines: each starts at the previous one's end (or at an arrival the loop saw after that end)
and its outputs are handed over when the wall clock reaches its end. Work the loop does between
steps (the model's own arithmetic, publishing, the HTTP handlers sharing the loop, a timer that
fires late) is taken out of the next sleep, not added to the engine's time. Sleeping each step's
duration after that work instead made a busy engine run slower than its profile by the loop's
cost per step (a few ms of a ~20 ms step on a busy machine): the emulated engines fell behind
the simulator's as soon as they queued.

Loop latency is not engine time either: an arrival that wakes an idle engine starts its step at
the arrival (the wake-up latency is absorbed), and so is lateness beyond ``MAX_LAG_S`` (a loop
that cannot keep up); both are counted (``pace``). An injected stall (``pause``) does count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from kvevents.events import KVEvent
from kvevents.publisher import ZmqEventPublisher
from sim.engine_model import EngineModel, RequestOutput

log = logging.getLogger(__name__)

MAX_LAG_S = 0.1
"""Real seconds a busy engine may run behind its schedule and still catch up (steps back to
back, the loop yielding between them); beyond it the lag is absorbed (not engine time)."""


@dataclass(slots=True)
class Pace:
    """How closely the engine kept to its profile in real time."""

    steps: int = 0
    late_steps: int = 0
    """Steps whose end the loop reached only after its deadline (caught up by the next)."""
    late_s: float = 0.0
    """Real seconds past the deadlines of late steps (each taken out of the next sleep)."""
    absorbed_s: float = 0.0
    """Real seconds not counted as engine time while the engine had work: lateness beyond
    ``MAX_LAG_S``, and arrivals the loop saw after the step's due start."""
    idle_wake_s: float = 0.0
    """Real seconds between an arrival that woke an idle engine and its first step."""


@dataclass(frozen=True, slots=True)
class Finished:
    """Put on a request's queue when the engine dropped it: "abort" (the runner stopped) or
    "error" (a step failed)."""

    reason: str


class EngineRunner:
    def __init__(
        self,
        engine: EngineModel,
        publisher: ZmqEventPublisher | None = None,
        speedup: float = 1.0,
        on_output: Callable[[RequestOutput, float], None] | None = None,
    ) -> None:
        if speedup <= 0:
            raise ValueError(f"speedup must be > 0, got {speedup}")
        self.engine = engine
        self.publisher = publisher
        self.speedup = speedup
        self._on_output = on_output
        self._queues: dict[str, asyncio.Queue[RequestOutput | Finished]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._origin = 0.0
        self._last_now = 0.0
        self._pause_until = 0.0
        self._resumed = asyncio.Event()
        self.publish_errors = 0
        self.pace = Pace()
        self._due: float | None = None
        """Virtual end of the previous step while the engine stays busy (the next step's
        start); None when idle, after a stall or an empty step."""

    # -- clock -------------------------------------------------------------------------------

    def now(self) -> float:
        """Virtual seconds since start (monotonic)."""
        self._last_now = max(self._last_now, self._raw())
        return self._last_now

    def _raw(self) -> float:
        return (asyncio.get_running_loop().time() - self._origin) * self.speedup

    def _hold(self, at: float) -> float:
        """Make the clock read ``at`` (>= the last reading) now: elapsed real time since then
        was the loop's own latency, not engine time."""
        self._last_now = max(self._last_now, at)
        raw = self._raw()
        if raw > self._last_now:
            self._origin += (raw - self._last_now) / self.speedup
        return self._last_now

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._origin = asyncio.get_running_loop().time()
        self._task = asyncio.create_task(self._run(), name="engine-loop")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._fail_all("abort")

    def abort_all(self) -> None:
        """Abort every request in flight; their queues get ``Finished("abort")``."""
        self._fail_all("abort")

    def _fail_all(self, reason: str) -> None:
        for req_id, queue in list(self._queues.items()):
            self.engine.abort(req_id)
            queue.put_nowait(Finished(reason))
        self._queues.clear()

    # -- requests ----------------------------------------------------------------------------

    def submit(
        self,
        req_id: str,
        prompt_token_ids: Sequence[int],
        max_tokens: int | None,
        cache_salt: str | None = None,
        queue: asyncio.Queue[RequestOutput | Finished] | None = None,
    ) -> asyncio.Queue[RequestOutput | Finished]:
        """Add a request; its outputs go to ``queue`` (a new one unless given; several
        requests may share one). Raises ValueError if the engine rejects the request."""
        self.engine.add_request(req_id, prompt_token_ids, max_tokens, self.now(), cache_salt)
        if queue is None:
            queue = asyncio.Queue()
        self._queues[req_id] = queue
        self._wake.set()
        return queue

    def abort(self, req_id: str) -> bool:
        self._queues.pop(req_id, None)
        return self.engine.abort(req_id)

    def pause(self, seconds: float) -> None:
        """Stall the engine (no steps) for ``seconds`` of real time: a hung GPU."""
        loop = asyncio.get_running_loop()
        self._pause_until = max(self._pause_until, loop.time() + seconds)
        self._resumed.clear()
        self._wake.set()

    def resume(self) -> None:
        """End a stall early."""
        self._pause_until = 0.0
        self._resumed.set()
        self._wake.set()

    def reset_prefix_cache(self, reset_running_requests: bool = False) -> bool:
        ok = self.engine.reset_prefix_cache(reset_running_requests)
        pending = self.engine.take_events()
        self._publish(pending.events, pending.digests)
        if reset_running_requests:
            self._wake.set()
        return ok

    # -- loop --------------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        pace = self.pace
        while True:
            await self._wake.wait()
            if self._pause_until > loop.time():
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a
                # cancellation that comes as the event is set, and close would wait forever.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._pause_until - loop.time()):
                        await self._resumed.wait()
                self.now()  # a stall is engine time: count it
                self._due = None
                continue
            start = self._start()
            try:
                result = self.engine.step(start)
            except Exception:
                # A model bug must not hang every client: fail what is in flight, keep serving.
                log.exception("engine step failed; aborting %d requests", len(self._queues))
                self._fail_all("error")
                self._due = None
                if not self.engine.has_work():
                    self._wake.clear()
                await asyncio.sleep(0.01)
                continue
            self._publish(result.events, result.digests)
            if result.duration > 0:
                pace.steps += 1
                late = loop.time() - (self._origin + result.end / self.speedup)
                if late < 0:
                    await asyncio.sleep(-late)
                    late = loop.time() - (self._origin + result.end / self.speedup)
                else:
                    await asyncio.sleep(0)  # behind schedule: let the handlers run
                if late > 0:
                    pace.late_steps += 1
                    pace.late_s += late
                self._last_now = max(self._last_now, result.end)
                self._due = result.end
            else:
                self._due = None
            for out in result.outputs:
                queue = self._queues.get(out.req_id)
                if queue is None:
                    continue  # aborted while the step ran
                if self._on_output is not None:
                    self._on_output(out, result.end)
                queue.put_nowait(out)
                if out.finished:
                    del self._queues[out.req_id]
            if not self.engine.has_work():
                self._wake.clear()
                self._due = None
            elif result.duration == 0:
                await asyncio.sleep(0.001)  # nothing schedulable yet; let handlers run

    def _start(self) -> float:
        """The virtual start of the next step (see the module docstring)."""
        pace = self.pace
        if self._due is None:
            # Woken from idle (or after a stall): start at the arrival, the wake-up latency
            # absorbed.
            before = self._raw()
            at = self._hold(self._last_now)
            pace.idle_wake_s += max(0.0, before - at) / self.speedup
            return at
        at = max(self._due, self._last_now)
        pace.absorbed_s += (at - self._due) / self.speedup
        behind = self._raw() - at
        if behind > MAX_LAG_S * self.speedup:
            pace.absorbed_s += behind / self.speedup
            return self._hold(at)
        self._last_now = at
        return at

    def _publish(self, events: Sequence[KVEvent], digests: Mapping[int, bytes]) -> None:
        if not events or self.publisher is None:
            return
        try:
            self.publisher.publish(events, digests=digests)
        except Exception:
            self.publish_errors += 1
            log.exception("publishing %d KV events failed", len(events))
