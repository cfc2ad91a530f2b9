"""GORGO: network round trip + queued work + prefill of the uncached prompt.

The centralised GORGO-proxy cost, for every healthy replica (seconds)::

    cost = rtt + t * f * running_tokens + t * queued_tokens + t * (prompt - cached tokens)

with ``t`` seconds per prefill token (``ms_per_token / 1000``; unset: the replica profile's
``1 / prefill_rate``), ``f`` the running-work factor, and running/queued tokens estimated as
requests times the recent mean prompt size. Replicas whose KV cache is fuller than
``kv_full`` are skipped unless all are. The minimum wins; exact ties are broken at random.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

from mesh.policies.base import (
    Decision,
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
class GorgoParams:
    ms_per_token: float | None = None
    prefill_rate: float = 8000.0
    running_factor: float = 1.0
    kv_full: float = 0.95
    load_half_life: float = 2.0


class Gorgo:
    name = "gorgo"

    def __init__(self, params: Mapping[str, object] | None = None) -> None:
        self.params = parse_params(GorgoParams, params or {}, self.name)

    def decide(self, request: Request, view: View, now: float, rng: random.Random) -> Decision:
        p = self.params
        reps = view.healthy("mesh")
        if not reps:
            return no_replica(self.name)
        roomy = [r for r in reps if r.kv_usage < p.kv_full]
        reps = roomy or reps
        matches = view.prefix.match(request.keys) if request.keys else {}
        mean = view.mean_prompt_tokens
        scored = []
        for r in reps:
            rate = r.prefill_rate or p.prefill_rate
            t = p.ms_per_token / 1000.0 if p.ms_per_token else 1.0 / rate
            load = estimate_load(r, p.load_half_life)
            matched = matches.get(r.replica, 0)
            rtt = view.rtt(r.region)
            running = t * p.running_factor * load.running * mean
            queued = t * load.waiting * mean
            prefill = t * (request.num_tokens - cached_tokens(request, matched))
            scored.append(
                Scored(r.replica, r.region, rtt + running + queued + prefill,
                       (("rtt", rtt), ("running", running), ("queued", queued),
                        ("prefill", prefill), ("matched", float(matched))))
            )
        best = min(s.cost for s in scored)
        s = rng.choice([s for s in scored if s.cost <= best + 1e-12])
        matched = matches.get(s.replica, 0)
        return Decision(
            s.replica, s.region,
            f"gorgo cost={s.cost * 1000:.1f}ms prefix={matched}/{len(request.keys)}", self.name,
            matched_blocks=matched, total_blocks=len(request.keys), candidates=top(scored),
        )
