"""KV usage now, from a load record and the in-flight counts: what ended since the record.

A load record's KV usage is as old as the record (0.1 s for a router's own engines, up to a
gossip round more for the others'). Near a full cache, the cost model's KV barrier
``k / (1 - k)`` and its decode-bound queue turn a few points of usage into seconds, so an
old figure decides: when a sequence finishes, its blocks are free at once, but the view
keeps showing them in use until the next record, and the replica holding a request's prefix
looks seconds dearer than it is.

The in-flight counts tell that a sequence ended before the next record does: every request
the mesh sent to the replica is counted in flight (this router's at once, the others' as
they publish them) until its answer ends. A record showing ``waiting + running`` requests
while only ``inflight - fresh`` of the requests sent before it are still in flight means
the difference has ended since (a request ends only once it runs). Each running sequence
holds its share of the blocks in use, on average ``kv_usage / running``, so::

    ended = waiting + running - (inflight - fresh)        (record's requests gone since)
    k     = kv_usage * (1 - min(ended, running) / running)    when ended > 0

The estimate assumes the mesh's routers send all of the engine's traffic: a replica with
nothing counted in flight (``inflight`` 0) is left at its reported usage, and an engine
that also serves clients outside the mesh needs the policy's ``kv_release`` off.

Why not the KV the router has dispatched since the record (``usage + prompt tokens sent
since / capacity``)? At the decisions it loses on WildChat, the view's usage is too high,
not too low (docs/evaluation.md): adding dispatched prompts moves it the wrong way.
"""

from __future__ import annotations

from mesh.policies.base import ReplicaView


def kv_in_use(r: ReplicaView) -> float:
    """``r``'s KV usage less the share of the sequences that ended since its load record
    (see the module docstring); the reported usage when nothing has ended or nothing is
    counted in flight."""
    k = r.kv_usage
    run = r.running
    if run <= 0.0 or r.inflight <= 0 or k <= 0.0:
        return k
    ended = r.waiting + run - (r.inflight - r.fresh)
    if ended <= 0.0:
        return k
    return k * (1.0 - (ended if ended < run else run) / run)
