"""Regions and the round-trip times between them: the simulated network's delay model.

A link is a range of round-trip times ``[lo, hi]`` in milliseconds (the papers report
ranges: GORGO's 26-40 / 90-130 / 260-466 ms). Each message samples its own RTT uniformly in
the range and travels for half of it, so jitter and reordering come for free and a run is
still a pure function of its seed. The same matrix serves client->router, router->router
and router->engine hops.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Link:
    lo_ms: float
    hi_ms: float

    def __post_init__(self) -> None:
        if not 0 <= self.lo_ms <= self.hi_ms:
            raise ValueError(f"a link needs 0 <= lo <= hi, got [{self.lo_ms}, {self.hi_ms}] ms")

    @property
    def mean_ms(self) -> float:
        return (self.lo_ms + self.hi_ms) / 2


def link(spec: float | tuple[float, float] | Link) -> Link:
    """``12`` -> a fixed 12 ms RTT, ``(90, 130)`` -> a range, a ``Link`` as is."""
    if isinstance(spec, Link):
        return spec
    if isinstance(spec, tuple):
        return Link(float(spec[0]), float(spec[1]))
    return Link(float(spec), float(spec))


@dataclass(frozen=True, slots=True)
class Topology:
    """Regions and the symmetric RTT between every pair (and within each region)."""

    regions: tuple[str, ...]
    links: Mapping[tuple[str, str], Link] = field(default_factory=dict)
    intra: Link = Link(1.0, 2.0)
    """Within one region (client to its router, router to its engines)."""

    def __post_init__(self) -> None:
        if len(set(self.regions)) != len(self.regions) or not self.regions:
            raise ValueError(f"regions must be distinct and non-empty: {self.regions}")
        for a in self.regions:
            for b in self.regions:
                if a < b and (a, b) not in self.links and (b, a) not in self.links:
                    raise ValueError(f"no RTT given between {a!r} and {b!r}")

    @classmethod
    def build(
        cls,
        regions: Iterable[str],
        rtt_ms: Mapping[tuple[str, str], float | tuple[float, float]],
        intra_ms: float | tuple[float, float] = (1.0, 2.0),
    ) -> Topology:
        return cls(
            regions=tuple(regions),
            links={pair: link(spec) for pair, spec in rtt_ms.items()},
            intra=link(intra_ms),
        )

    def rtt(self, a: str, b: str) -> Link:
        if a == b:
            return self.intra
        found = self.links.get((a, b)) or self.links.get((b, a))
        if found is None:
            raise KeyError(f"no link between {a!r} and {b!r}")
        return found

    def mean_rtt_s(self, a: str, b: str) -> float:
        return self.rtt(a, b).mean_ms / 1000.0

    def one_way_s(self, a: str, b: str, rng: random.Random) -> float:
        """One message's travel time: half of an RTT drawn uniformly from the link's range."""
        lnk = self.rtt(a, b)
        ms = lnk.lo_ms if lnk.lo_ms == lnk.hi_ms else rng.uniform(lnk.lo_ms, lnk.hi_ms)
        return ms / 2000.0

    def nearest(self, region: str, among: Iterable[str]) -> str:
        """The region in ``among`` with the lowest mean RTT from ``region`` (ties: by name)."""
        return min(among, key=lambda r: (self.rtt(region, r).mean_ms, r))


def mesh_topology(
    n_regions: int, *, base_ms: float = 20.0, per_hop_ms: float = 25.0, jitter: float = 0.2
) -> Topology:
    """``n_regions`` on a ring, RTT growing with ring distance: a planet for scale runs."""
    names = tuple(f"r{i:02d}" for i in range(n_regions))
    rtt: dict[tuple[str, str], tuple[float, float]] = {}
    for i in range(n_regions):
        for j in range(i + 1, n_regions):
            hops = min(j - i, n_regions - (j - i))
            mean = base_ms + per_hop_ms * hops
            rtt[(names[i], names[j])] = (mean * (1 - jitter), mean * (1 + jitter))
    return Topology.build(names, rtt)
