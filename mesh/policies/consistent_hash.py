"""Consistent hashing on a session key, skipping busy replicas (SkyWalker-CH).

A ring holds ``vnodes`` virtual nodes per replica (at least ``min_ring`` entries in all,
as Envoy's ring hash does), hashed with xxh64. A request's session key lands on the ring
and walks clockwise to the first replica that is healthy and not busy; a replica is busy
when its estimated queue exceeds ``busy_waiting`` (0: any queued request makes it busy, the
SkyWalker availability rule). When every replica is busy the first healthy one on the walk
wins, so a session keeps its home under uniform overload. Requests without a key go to the
least loaded replica.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass

import xxhash

from mesh.policies.base import (
    Decision,
    PolicyError,
    ReplicaView,
    Request,
    Scored,
    View,
    estimate_load,
    no_replica,
    pick_scope,
)
from mesh.policies.params import parse_params


@dataclass(frozen=True, slots=True)
class HashParams:
    scope: str = "mesh"
    vnodes: int = 160
    min_ring: int = 1024
    busy_waiting: float = 0.0
    load_half_life: float = 2.0


def _h(data: str) -> int:
    return xxhash.xxh64_intdigest(data.encode(), seed=0)


class ConsistentHash:
    name = "consistent_hash"

    def __init__(self, params: Mapping[str, object] | None = None) -> None:
        self.params = parse_params(HashParams, params or {}, self.name)
        pick_scope(self.params.scope)
        if self.params.vnodes < 1:
            raise PolicyError("policy.vnodes: must be at least 1")
        self._members: tuple[str, ...] = ()
        self._points: list[int] = []
        self._owners: list[str] = []

    def _ring(self, members: tuple[str, ...]) -> None:
        if members == self._members:
            return
        per = max(self.params.vnodes, math.ceil(self.params.min_ring / max(len(members), 1)))
        ring = sorted((_h(f"{m}#{i}"), m) for m in members for i in range(per))
        self._members = members
        self._points = [p for p, _ in ring]
        self._owners = [m for _, m in ring]

    def decide(self, request: Request, view: View, now: float, rng: random.Random) -> Decision:
        # The ring spans every known replica, healthy or not, so a replica's absence never
        # moves the other sessions; unhealthy ones are skipped on the walk.
        members = tuple(sorted(r.replica for r in view.replicas
                               if self.params.scope == "mesh" or r.region == view.region))
        by_id = {r.replica: r for r in view.healthy(self.params.scope)}
        if not by_id:
            return no_replica(self.name)
        if request.session is None:
            return self._least_load(list(by_id.values()), rng)
        self._ring(members)
        start = bisect.bisect(self._points, _h(request.session)) % len(self._points)
        first_healthy: ReplicaView | None = None
        seen: set[str] = set()
        steps = 0
        for i in range(len(self._points)):
            owner = self._owners[(start + i) % len(self._points)]
            if owner in seen:
                continue
            seen.add(owner)
            steps += 1
            r = by_id.get(owner)
            if r is None:
                continue
            if first_healthy is None:
                first_healthy = r
            if estimate_load(r, self.params.load_half_life).waiting <= self.params.busy_waiting:
                return Decision(r.replica, r.region, f"consistent_hash hop={steps - 1}", self.name)
            if len(seen) == len(members):
                break
        assert first_healthy is not None
        return Decision(
            first_healthy.replica, first_healthy.region, "consistent_hash all busy", self.name
        )

    def _least_load(self, reps: list[ReplicaView], rng: random.Random) -> Decision:
        scored = [
            Scored(r.replica, r.region, estimate_load(r, self.params.load_half_life).outstanding)
            for r in reps
        ]
        best = min(s.cost for s in scored)
        s = rng.choice([s for s in scored if s.cost <= best + 1e-9])
        return Decision(s.replica, s.region, "consistent_hash no key: least_load", self.name)
