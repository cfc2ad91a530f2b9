"""The router process's garbage collector: what it started with is set aside once.

CPython's cyclic collector walks every tracked container of the oldest generation on a full
collection. A started router holds some 70 thousand of them (modules, classes, functions,
aiohttp's and prometheus_client's tables, the configuration) that live until it exits, and
a full collection then took 25-60 ms on the 2-core benchmark host: under load it came every
few seconds and was every request's worst latency at that moment. :func:`settle` collects
once and freezes what survives (``gc.freeze``: kept out of every later collection, never
freed), so later full collections walk only what was made since: state built from engines
and peers, and request garbage. Timed with ``gc.callbacks`` in one router process under ``wrk`` at
concurrency 32 with the overhead benchmark's chat request (8 s, the shared 2-core machine):
two full collections of 35 and 44 ms without it, one of 0.5 ms with it.

It also makes young collections rarer. CPython collects the youngest generation after every
700 net container allocations; with 32 requests in flight, their objects (futures, tasks,
coroutines, dicts, the request's records) crossed that about 70 times a second, and every
tenth of those collections also walked the middle generation: 11 µs of collector per request
(``gc.callbacks`` over 5 s of ``wrk`` at concurrency 32 against one router, the overhead
benchmark's request: 364 young and 34 middle collections, 0.11 s, for 9,091 requests). Nearly
all of a request's objects are freed by reference counting when it ends, so a larger
threshold (:data:`YOUNG`) finds the same garbage, only later: 2 young collections in 5 s
(7 ms) for 10,626 requests in the same test. Cyclic garbage waits a little longer to be
freed (at most ``YOUNG`` objects of it).

Only the process entry points call it (``kvmesh router`` and its worker processes), after
startup; a router built inside another program (tests, the simulator) leaves that program's
collector alone.
"""

from __future__ import annotations

import gc

YOUNG = 10_000
"""Net container allocations between collections of the youngest generation (CPython's
default is 700)."""


def settle() -> int:
    """Collect, then freeze the survivors; young collections every :data:`YOUNG` net
    allocations from now on. The number of objects frozen."""
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    if young:  # 0: the collector is off; leave it so
        gc.set_threshold(max(young, YOUNG), middle, old)
    return gc.get_freeze_count()
