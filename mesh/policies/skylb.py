"""SkyLB / SkyWalker selective pushing: serve locally when possible, push only spare work.

- A replica is *available* iff its estimated waiting queue is empty (below
  ``busy_waiting + 0.5``): the engine would schedule the request into its batch at once.
- Local first: among available local replicas, the one holding the longest cached prefix
  wins if it covers more than ``cache_threshold`` of the prompt, else the least loaded.
- Otherwise a remote region is *available* iff it has more available replicas than this
  router has pushed there since its freshest load record, its routers' queue is at most
  ``tau``, and (``require_shorter_queue``) no longer than this router's own.
  Among those, the region holding the longest prefix wins (ties: nearer), and its router
  places the request.
- Otherwise the request waits in this router's FCFS queue: the decision says ``wait`` and
  the router asks again after ``recheck`` seconds. After ``max_wait`` seconds it goes to the
  least loaded local replica anyway, so nothing waits for ever.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

from mesh.policies.base import (
    Decision,
    ReplicaView,
    Request,
    Scored,
    View,
    cached_tokens,
    estimate_load,
    no_replica,
    top,
)
from mesh.policies.params import parse_params


@dataclass(frozen=True, slots=True)
class SkyParams:
    tau: int = 10
    require_shorter_queue: bool = True
    cache_threshold: float = 0.5
    busy_waiting: float = 0.0
    recheck: float = 0.01
    max_wait: float = 30.0
    load_half_life: float = 2.0


class SkyLB:
    name = "skylb"

    def __init__(self, params: Mapping[str, object] | None = None) -> None:
        self.params = parse_params(SkyParams, params or {}, self.name)

    def _available(self, r: ReplicaView) -> bool:
        waiting = estimate_load(r, self.params.load_half_life).waiting
        return waiting < self.params.busy_waiting + 0.5

    def decide(self, request: Request, view: View, now: float, rng: random.Random) -> Decision:
        p = self.params
        healthy = view.healthy("mesh")
        if not healthy:
            return no_replica(self.name)
        matches = view.prefix.match(request.keys) if request.keys else {}
        total = len(request.keys)
        local = [r for r in healthy if r.region == view.region]
        avail_local = [r for r in local if self._available(r)]
        if avail_local:
            return self._pick_local(request, avail_local, matches, rng, "local available")

        by_region: dict[str, list[ReplicaView]] = {}
        for r in healthy:
            if r.region != view.region and self._available(r):
                by_region.setdefault(r.region, []).append(r)
        regions = []
        for region, reps in by_region.items():
            info = view.region_info(region)
            if info.queue > p.tau or (p.require_shorter_queue and info.queue > view.queue):
                continue
            if len(reps) <= info.pushed:
                continue  # our own recent pushes already fill its available replicas
            best = max(matches.get(r.replica, 0) for r in reps)
            regions.append(
                Scored(region, region, -float(best),
                       (("matched", float(best)), ("rtt", view.rtt(region)),
                        ("queue", float(info.queue))))
            )
        if regions:
            regions.sort(key=lambda s: (s.cost, view.rtt(s.region), rng.random()))
            chosen = regions[0]
            matched = int(-chosen.cost)
            return Decision(
                None, chosen.region,
                f"skylb push to {chosen.region} prefix={matched}/{total}", self.name,
                matched_blocks=matched, total_blocks=total, candidates=tuple(regions[:4]),
            )

        waited = now - request.arrival
        if waited >= p.max_wait:
            pool = local or healthy
            return self._pick_local(request, pool, matches, rng, f"waited {waited:.1f}s")
        return Decision(
            None, None, "skylb wait: no available replica", self.name,
            wait=True, retry_after=p.recheck,
        )

    def _pick_local(
        self, request: Request, reps: list[ReplicaView], matches: Mapping[str, int],
        rng: random.Random, why: str,
    ) -> Decision:
        total = len(request.keys)
        scored = [
            Scored(r.replica, r.region, estimate_load(r, self.params.load_half_life).outstanding,
                   (("matched", float(matches.get(r.replica, 0))),))
            for r in reps
        ]
        best_match = max(matches.get(r.replica, 0) for r in reps)
        ratio = cached_tokens(request, best_match) / max(request.num_tokens, 1)
        if best_match > 0 and ratio > self.params.cache_threshold:
            pool = [s for s in scored if matches.get(s.replica, 0) == best_match]
            mode = f"prefix {ratio:.0%}"
        else:
            pool, mode = scored, "least_load"
        least = min(s.cost for s in pool)
        s = rng.choice([s for s in pool if s.cost <= least + 1e-9])
        matched = matches.get(s.replica, 0)
        return Decision(
            s.replica, s.region, f"skylb {why}: {mode} prefix={matched}/{total}", self.name,
            matched_blocks=matched, total_blocks=total, candidates=top(scored),
        )
