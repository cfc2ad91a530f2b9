"""Service-tier figures of one router: Prometheus series and the ``tiers`` part of /mesh/status.

Labels are bounded: ``tier`` is one of the three tier names, ``slo`` is ``met`` or
``missed``. A request is judged once: a TTFT tier at its first byte (an error before it is a
miss), batch when its answer ends (complete and within the deadline, or not). Shed requests
are counted apart and not judged.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import Counter, Histogram

from mesh.metrics import Children, RouterMetrics, gauge
from mesh.tiers import TIERS, TierConfig, TierQueue, TierStats, measures_completion

_QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                  300.0, 1800.0, 3600.0, 21600.0, 86400.0)


class TierMetrics:
    def __init__(self, metrics: RouterMetrics, config: TierConfig, queue: TierQueue) -> None:
        r = metrics.registry
        self.config = config
        self.queue = queue
        self.stats = TierStats()
        self.slo = Counter("kvmesh_tier_requests", "Requests judged against their tier's SLO "
                           "(TTFT for interactive/standard, completion deadline for batch)",
                           ["tier", "slo"], registry=r)
        self.shed = Counter("kvmesh_tier_shed", "Requests shed with 429 (a higher tier's SLO "
                            "was at risk, or a gateway's sheddable request would have waited)",
                            ["tier"], registry=r)
        self.queue_seconds = Histogram("kvmesh_tier_queue_seconds", "Time requests waited in "
                                       "this router's queue, by tier", ["tier"],
                                       buckets=_QUEUE_BUCKETS, registry=r)
        self._slo = Children(self.slo)
        for t in TIERS:  # every series exists from the start
            self.slo.labels(t, "met")
            self.slo.labels(t, "missed")
            self.shed.labels(t)
            self.queue_seconds.labels(t)
        metrics.add_provider(self._gauges)

    def judged(self, tier: str, met: bool) -> None:
        self.stats.outcome(tier, met)
        self._slo(tier, "met" if met else "missed").inc()

    def first_byte(self, tier: str, at: float, deadline: float) -> None:
        if not measures_completion(tier):
            self.judged(tier, at <= deadline)

    def ended(self, tier: str, at: float, deadline: float, complete: bool,
              first_byte: bool) -> None:
        """The answer ended (or never started): judge batch, and TTFT tiers without a first
        byte."""
        if measures_completion(tier):
            self.judged(tier, complete and at <= deadline)
        elif not first_byte:
            self.judged(tier, False)

    def was_shed(self, tier: str) -> None:
        self.stats.shed[tier] += 1
        self.shed.labels(tier).inc()

    def waited(self, tier: str, seconds: float) -> None:
        self.stats.queued(tier, seconds)
        self.queue_seconds.labels(tier).observe(seconds)

    def status(self) -> dict[str, Any]:
        return self.stats.status(self.config, self.queue.by_tier())

    def _gauges(self) -> Iterable[Any]:
        rows = []
        for t in TIERS:
            att = self.stats.attainment(t)
            if att is not None:
                rows.append(([t], att))
        yield gauge("kvmesh_tier_slo_attainment", "Share of judged requests that met their "
                    "tier's SLO since start", ["tier"], rows)
        waiting = self.queue.by_tier()
        yield gauge("kvmesh_tier_queue_length", "Requests waiting in this router's queue, "
                    "by tier", ["tier"], [([t], float(waiting[t])) for t in TIERS])
