"""The request path's counters and histograms: the library's values by a shorter path."""

from __future__ import annotations

import math
import random

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from mesh.metrics import FastCounter, FastHistogram

BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


def _page(registry: CollectorRegistry) -> list[str]:
    return [line for line in generate_latest(registry).decode().splitlines()
            if "_created" not in line]


def test_a_fast_histogram_counts_what_the_library_counts() -> None:
    rng = random.Random(3)
    values = [rng.choice(BUCKETS) for _ in range(50)]  # on the bounds: <= puts them in
    values += [rng.uniform(0, 0.2) for _ in range(500)]
    values += [0.0, -1.0, math.inf, -math.inf, math.nan, 1e-9, 0.1, 0.1000001]
    a, b = CollectorRegistry(), CollectorRegistry()
    plain = Histogram("t_seconds", "t", buckets=BUCKETS, registry=a)
    fast = FastHistogram("t_seconds", "t", buckets=BUCKETS, registry=b)
    for v in values:
        plain.observe(v)
        fast.observe(v)
    assert _page(a) == _page(b)


def test_a_fast_counter_counts_and_refuses_what_the_library_does() -> None:
    a, b = CollectorRegistry(), CollectorRegistry()
    plain = Counter("t", "t", ["route"], registry=a)
    fast = FastCounter("t", "t", ["route"], registry=b)
    for m in (plain, fast):
        m.labels("/x").inc()
        m.labels("/x").inc(2.5)
        m.labels("/y").inc(0)
        with pytest.raises(ValueError):
            m.labels("/x").inc(-1)
        with pytest.raises(ValueError):
            m.inc()  # a labelled counter's parent
    assert _page(a) == _page(b)
    unlabelled = FastCounter("u", "u", registry=CollectorRegistry())
    unlabelled.inc(3)
    assert unlabelled._value.get() == 3
