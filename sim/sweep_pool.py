"""Pooling the runs of several seeds into one p90 ratio, and how much one such figure moves.

A p90 over one short window rests on a few dozen tail requests; where the mesh's p90 sits
inside the population of forwarded requests (an overloaded home region), it is steep in the
share forwarded, which the routers' near-tie draws alone move by 15% or more. Pooling the
requests of several seeds (the p90 of all of them, not the mean of per-seed p90s) is how the
region sweep compares the emulation with the simulator at that point.

The simulator's side is pooled over seeds and, per seed, over twin runs (the same seed and
window, only the routers' near-tie stream changed). The twins also say how far one pooled
figure moves on decisions alone: an emulated run draws one trajectory per seed, like picking
one twin of each seed, and ``pick_one_per_seed`` spreads the pooled ratio over those picks.
Sans I/O: lists of TTFTs in, figures out.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sim.metrics import percentile

MAX_PICKS = 4096
"""Above this many ways to pick one twin per seed, a seeded sample of that size."""


@dataclass(frozen=True, slots=True)
class PooledRatio:
    """``p90(mesh) / p90(alone)`` over the requests of several runs pooled."""

    mesh_p90: float
    alone_p90: float
    requests: tuple[int, int]

    @property
    def ratio(self) -> float:
        if not (math.isfinite(self.mesh_p90) and math.isfinite(self.alone_p90)) \
                or self.alone_p90 <= 0:
            return math.nan
        return self.mesh_p90 / self.alone_p90


def pooled_ratio(mesh: Sequence[Sequence[float]], alone: Sequence[Sequence[float]],
                 q: float = 90.0) -> PooledRatio:
    """The ``q``-th percentile of every run's mesh TTFTs over that of the runs alone."""
    m = [x for run in mesh for x in run]
    a = [x for run in alone for x in run]
    return PooledRatio(percentile(m, q), percentile(a, q), (len(m), len(a)))


@dataclass(frozen=True, slots=True)
class PickSpread:
    """The pooled ratio over the ways of taking one twin per seed: what one pooled run
    (one trajectory per seed) would show from decisions alone."""

    picks: int
    """How many ways were pooled (all of them, or a seeded sample of ``MAX_PICKS``)."""
    mean: float
    sd: float
    within: float
    """Share of the picks within ``tolerance`` of ``reference``."""
    reference: float
    tolerance: float

    @property
    def rel_sd(self) -> float:
        return self.sd / self.mean if self.mean else math.nan


def pick_one_per_seed(twins: Mapping[int, Sequence[tuple[Sequence[float], Sequence[float]]]],
                      reference: float, tolerance: float = 0.10) -> PickSpread | None:
    """``twins``: per seed, its twins' (mesh TTFTs, alone TTFTs). None without two ways to
    pick (one seed with one twin says nothing about the spread)."""
    seeds = sorted(twins)
    if not seeds or any(not twins[s] for s in seeds):
        return None
    total = math.prod(len(twins[s]) for s in seeds)
    if total < 2:
        return None
    if total <= MAX_PICKS:
        picks: list[tuple[int, ...]] = list(itertools.product(
            *(range(len(twins[s])) for s in seeds)))
    else:
        rng = random.Random(0)
        picks = [tuple(rng.randrange(len(twins[s])) for s in seeds) for _ in range(MAX_PICKS)]
    ratios = []
    for pick in picks:
        chosen = [twins[s][k] for s, k in zip(seeds, pick, strict=True)]
        ratios.append(pooled_ratio([m for m, _ in chosen], [a for _, a in chosen]).ratio)
    ratios = [r for r in ratios if math.isfinite(r)]
    if len(ratios) < 2:
        return None
    inside = sum(1 for r in ratios if abs(r / reference - 1.0) <= tolerance) \
        if reference and math.isfinite(reference) else 0
    return PickSpread(len(ratios), statistics.fmean(ratios), statistics.stdev(ratios),
                      inside / len(ratios), reference, tolerance)


def relative(a: float | None, b: float | None) -> float | None:
    """``a / b - 1`` (None when either is missing or ``b`` is 0)."""
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return None
    return a / b - 1.0


__all__ = ["MAX_PICKS", "PickSpread", "PooledRatio", "pick_one_per_seed", "pooled_ratio",
           "relative"]
