"""Membership as Prometheus gauges: peers by region and state, measured RTT per region.

Alerts need a series that exists while a region is gone: a region whose routers all died
drops out of the routing view, but its members stay in the membership table (suspect, dead)
until they are forgotten, so ``kvmesh_mesh_peers`` keeps a zero ``alive`` row for it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from mesh.messages import Status
from mesh.metrics import gauge

STATES = tuple(s.name.lower() for s in Status)


def mesh_metrics(backend: object) -> Iterable[Any]:
    """Gauges from the backend's mesh node (``node``), none without a mesh."""
    node: Any = getattr(backend, "node", None)
    if node is None:
        return
    counts: Counter[tuple[str, str]] = Counter()
    regions: set[str] = set()
    for p in node.peers():
        regions.add(p.region)
        counts[(p.region, p.status.name.lower())] += 1
    yield gauge("kvmesh_mesh_peers", "Peer routers this router knows, by region and state",
                ["region", "state"],
                [([r, s], float(counts[(r, s)])) for r in sorted(regions) for s in STATES])
    yield gauge("kvmesh_region_rtt_seconds", "Measured round trip to each other region",
                ["region"], [([r], ms / 1000.0) for r, ms in sorted(node.region_rtt_ms().items())])
