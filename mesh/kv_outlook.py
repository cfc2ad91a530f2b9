"""A replica's KV outlook: how full its cache got lately, and where it is heading.

The cost model prices a replica's KV usage ``k`` as a barrier, ``kv_weight * k / (1 - k)``:
the price of filling a cache whose next admissions wait on decodes and whose newest
sequences get preempted. That price is paid by a cache that reaches its knee while a request
sent now is still running, and never by one that holds steady below it. There, a forward
priced against the home cache's barrier only adds a round trip: at twice the light load of
the region sweep, the home caches hold at 55-85% and the mesh forwarded 8-13% of requests
for a p90 8% worse than the same routers without peers (docs/evaluation.md). On WildChat,
the caches climb to the knee, and the same forwards spread long decodes before they get
there, and pay.

A snapshot cannot tell a cache holding at 80% from one passing 80% on its way up; its own
recent history can. The owner of an engine sees every scrape of it, and keeps::

    peak  = the highest usage reported over the last ``memory`` seconds
    trend = the least-squares slope of usage over the last ``window`` seconds (per second)

and the view gives them to the policy with the engine's load. They are not gossiped: they
are a summary of the load records, which are replicated already, and a few more bytes in
every meta record were enough to push more of the mesh's deltas past the eager size
(``mesh.gossip``), costing load freshness everywhere. A router knows the outlook of its own
engines; other replicas have none, and the policy ranks them as before. The policy reads
them as one question, whether the cache will reach its knee within a request's life
(``mesh.policies.ttft``)::

    reach = max(peak, k + max(trend, 0) * life)

Sans-I/O: samples come in with the time they were measured.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

MEMORY_S = 300.0
"""How long a cache that reached a usage is remembered to be able to reach it again."""
WINDOW_S = 20.0
"""Span of the trend fit: several scrapes, shorter than a decode's life at the knee."""
MIN_POINTS = 5
"""Samples before a trend is published."""


@dataclass(slots=True)
class KvHistory:
    """One engine's reported KV usage over time, as its owner scraped it."""

    memory: float = MEMORY_S
    window: float = WINDOW_S
    peaks: deque[tuple[float, float]] = field(default_factory=deque)
    """(time, usage) with usage strictly falling: the front is the peak of the memory."""
    recent: deque[tuple[float, float]] = field(default_factory=deque)
    """(time, usage) of the last ``window`` seconds."""
    trend: float | None = None
    """Least-squares slope of ``recent``, per second (None: too few samples)."""

    def observe(self, usage: float, at: float) -> None:
        """A scrape measured at ``at`` reported ``usage``; an older or repeated one is
        ignored (a probe may be read twice, samples never go back in time)."""
        recent = self.recent
        if recent and at <= recent[-1][0]:
            return
        peaks = self.peaks
        while peaks and peaks[-1][1] <= usage:
            peaks.pop()
        peaks.append((at, usage))
        while peaks[0][0] < at - self.memory:
            peaks.popleft()
        recent.append((at, usage))
        while recent[0][0] < at - self.window:
            recent.popleft()
        self.trend = slope(recent) if len(recent) >= MIN_POINTS else None

    @property
    def peak(self) -> float | None:
        return self.peaks[0][1] if self.peaks else None


@dataclass(slots=True)
class Outlooks:
    """The KV history of each engine a router scrapes."""

    engines: dict[str, KvHistory] = field(default_factory=dict)

    def observe(self, replica: str, usage: float, at: float) -> None:
        """A scrape of ``replica`` measured at ``at`` reported ``usage``; a malformed one
        (not a share of the cache, or no time) teaches nothing."""
        if not (0.0 <= usage <= 1.0 and math.isfinite(at)):
            return
        h = self.engines.get(replica)
        if h is None:
            h = self.engines[replica] = KvHistory()
        h.observe(usage, at)

    def get(self, replica: str) -> KvHistory | None:
        return self.engines.get(replica)


def slope(points: deque[tuple[float, float]]) -> float | None:
    """Least-squares slope of ``(x, y)`` points (None: every x equal)."""
    n = len(points)
    x0 = points[0][0]
    mx = sum(x - x0 for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sxy = 0.0
    for x, y in points:
        dx = x - x0 - mx
        sxx += dx * dx
        sxy += dx * (y - my)
    return sxy / sxx if sxx > 0.0 else None


def reach(kv_usage: float, peak: float, trend: float | None, life: float) -> float:
    """The highest usage the cache is expected to see within ``life`` seconds: the peak it
    reached lately, or where its trend takes it from ``kv_usage``."""
    ahead = kv_usage + trend * life if trend is not None and trend > 0.0 else kv_usage
    return ahead if ahead > peak else peak
