"""Drives an ``EngineModel`` in (scaled) real time on an asyncio loop.

One task runs the step loop: step at virtual ``now``, publish the step's KV events at once (vLLM
publishes them when it schedules), sleep the step's duration divided by ``speedup``, then hand
each request's outputs to its queue.

Virtual time is wall time times ``speedup``, except that the loop's own latency is not counted:
a step starts at the later of the previous step's end and the last time anyone read the clock
(typically the arrival that woke an idle engine), and a late wake-up from sleeping is absorbed.
So while the engine is busy its clock advances by exactly the profile's step durations, and high
speedups do not inflate latencies. An injected stall (``pause``) does count.
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
        while True:
            await self._wake.wait()
            if self._pause_until > loop.time():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._resumed.wait(), self._pause_until - loop.time())
                self.now()  # a stall is engine time: count it
                continue
            try:
                result = self.engine.step(self._hold(self._last_now))
            except Exception:
                # A model bug must not hang every client: fail what is in flight, keep serving.
                log.exception("engine step failed; aborting %d requests", len(self._queues))
                self._fail_all("error")
                if not self.engine.has_work():
                    self._wake.clear()
                await asyncio.sleep(0.01)
                continue
            self._publish(result.events, result.digests)
            if result.duration > 0:
                await asyncio.sleep(result.duration / self.speedup)
                self._hold(result.end)
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
            elif result.duration == 0:
                await asyncio.sleep(0.001)  # nothing schedulable yet; let handlers run

    def _publish(self, events: Sequence[KVEvent], digests: Mapping[int, bytes]) -> None:
        if not events or self.publisher is None:
            return
        try:
            self.publisher.publish(events, digests=digests)
        except Exception:
            self.publish_errors += 1
            log.exception("publishing %d KV events failed", len(events))
