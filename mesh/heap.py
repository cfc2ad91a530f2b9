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

Only the process entry points call it (``kvmesh router`` and its worker processes), after
startup; a router built inside another program (tests, the simulator) leaves that program's
collector alone.
"""

from __future__ import annotations

import gc


def settle() -> int:
    """Collect, then freeze the survivors; the number of objects frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
