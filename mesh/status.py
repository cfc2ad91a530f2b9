"""The ``/mesh/status`` document: this node, its peers, and every replica it knows of.

Pure functions from snapshots to JSON-ready dicts, so the router, the CLI and tests build
the same document. Replica rows are assembled from two sources that are written by
different owners: the prefix index's per-replica slices (blocks, version) and the load
records (region, reporting router, queue, KV usage, age). Either may know a replica the
other does not yet; a row is shown for the union.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from crdt.base import Version
from mesh.membership import PeerView


@dataclass(frozen=True, slots=True)
class ReplicaLoad:
    """One replica's load record as the status page needs it."""

    region: str
    owner: str
    """The router that reports it (its node id)."""
    waiting: float
    running: float
    kv_usage: float
    age_s: float


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    url: str
    region: str | None
    owner: str | None
    blocks: int
    waiting: float | None
    running: float | None
    kv_usage: float | None
    version: Version | None
    age_s: float | None
    flags: tuple[str, ...] = ()
    """``partial`` (history lost), ``catching_up`` (snapshot still arriving)."""


class SliceLike(Protocol):
    """What the status page reads from a prefix-index slice (``crdt.prefix_index.SliceInfo``)."""

    @property
    def replica(self) -> str: ...

    @property
    def version(self) -> Version: ...

    @property
    def partial(self) -> bool: ...

    @property
    def catching_up(self) -> bool: ...

    @property
    def blocks(self) -> int: ...


def replica_rows(
    slices: Iterable[SliceLike], loads: Mapping[str, ReplicaLoad] | None = None
) -> list[ReplicaStatus]:
    """Rows for the union of replicas with a slice and replicas with a load record."""
    loads = loads or {}
    rows: dict[str, ReplicaStatus] = {}
    for s in slices:
        load = loads.get(s.replica)
        flags = tuple(f for f, on in (("partial", s.partial), ("catching_up", s.catching_up)) if on)
        rows[s.replica] = ReplicaStatus(
            url=s.replica,
            region=load.region if load else None,
            owner=load.owner if load else None,
            blocks=s.blocks,
            waiting=load.waiting if load else None,
            running=load.running if load else None,
            kv_usage=load.kv_usage if load else None,
            version=s.version,
            age_s=load.age_s if load else None,
            flags=flags,
        )
    for url, load in loads.items():
        if url not in rows:
            rows[url] = ReplicaStatus(
                url,
                load.region,
                load.owner,
                0,
                load.waiting,
                load.running,
                load.kv_usage,
                None,
                load.age_s,
            )
    return [rows[k] for k in sorted(rows)]


def _round(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


def peer_json(p: PeerView, now: float) -> dict[str, Any]:
    return {
        "id": p.node_id,
        "region": p.region,
        "address": p.addr,
        "state": p.status.name.lower(),
        "generation": p.generation,
        "incarnation": p.incarnation,
        "rtt_ms": _round(p.rtt_ms),
        "last_seen_s": _round(None if p.last_seen is None else now - p.last_seen),
        "state_for_s": _round(now - p.since),
    }


def replica_json(r: ReplicaStatus) -> dict[str, Any]:
    return {
        "url": r.url,
        "region": r.region,
        "owner": r.owner,
        "blocks": r.blocks,
        "waiting": r.waiting,
        "running": r.running,
        "kv_usage": _round(r.kv_usage, 4),
        "version": list(r.version) if r.version is not None else None,
        "age_s": _round(r.age_s),
        "flags": list(r.flags),
    }


def build_status(
    *,
    node_id: str,
    region: str,
    address: str,
    generation: int,
    incarnation: int,
    peers: Iterable[PeerView],
    replicas: Iterable[ReplicaStatus],
    now: float,
    region_rtt_ms: Mapping[str, float] | None = None,
    counters: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    peer_list = [peer_json(p, now) for p in peers]
    states: dict[str, int] = {}
    for p in peer_list:
        states[p["state"]] = states.get(p["state"], 0) + 1
    doc: dict[str, Any] = {
        "node": {
            "id": node_id,
            "region": region,
            "address": address,
            "generation": generation,
            "incarnation": incarnation,
        },
        "peers": peer_list,
        "peer_states": states,
        "region_rtt_ms": {k: _round(v) for k, v in sorted((region_rtt_ms or {}).items())},
        "replicas": [replica_json(r) for r in replicas],
    }
    if counters is not None:
        doc["counters"] = dict(sorted(counters.items()))
    return doc
