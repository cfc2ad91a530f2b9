"""Bookkeeping that must happen soon, but not while a client waits on this process.

When an answer has been relayed, the router still has things to record: how its cache
prediction fared, what the response length teaches the predictor, SLO and request counters.
None of it changes a decision made in the next millisecond, yet on one event loop it runs
before the next request is even read: a client that sends its next request at once (any
closed-loop client, or a busy router) waits for the previous request's accounting.

:class:`Deferred` holds such jobs and runs them right after the next request has been
written to its engine (the upstream pool calls :meth:`Deferred.run` after each write), that
is while the router would otherwise wait on the engine, or ``max_delay`` seconds after the
first job came in when no request follows. Jobs run in order; one that raises is logged
and does not stop the others. The ledger (what is in flight where) is never deferred: it
decides the next request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger("kvmesh.router")

MAX_DELAY = 0.002
"""Seconds a job waits at most when no request follows it (an idle router)."""


class Deferred:
    __slots__ = ("_jobs", "_loop", "_timer", "max_delay", "ran")

    def __init__(self, max_delay: float = MAX_DELAY) -> None:
        self.max_delay = max_delay
        self._jobs: list[Callable[[], None]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        """The loop of the last timer, kept while it runs (``asyncio.get_running_loop()`` is
        a ``getpid`` system call)."""
        self.ran = 0
        """Jobs run so far (for tests and status)."""

    def add(self, job: Callable[[], None]) -> None:
        self._jobs.append(job)
        if self._timer is None:
            loop = self._loop
            if loop is None or loop.is_closed():
                loop = self._loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.max_delay, self._fire)

    def __len__(self) -> int:
        return len(self._jobs)

    def _fire(self) -> None:
        self._timer = None
        self.run()

    def run(self) -> None:
        """Run every pending job now (cheap when there is none)."""
        if not self._jobs:
            return
        jobs, self._jobs = self._jobs, []
        for job in jobs:
            try:
                job()
            except Exception:
                log.exception("deferred bookkeeping failed")
        self.ran += len(jobs)

    def close(self) -> None:
        """Run what is pending and disarm the timer (shutdown: nothing is lost)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.run()
