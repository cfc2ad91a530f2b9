"""Precise prefix routing from engine KV events, load-balanced the way llm-d scores pods.

Each healthy replica gets a weighted sum of three scores in [0, 1], and the highest wins
(ties broken at random):

- prefix: the share of the prompt's blocks the replica holds as a consecutive prefix,
  from the merged ``PrefixIndex`` (what the engines said they cached, not a guess);
- kv: ``1 - kv_usage``;
- queue: ``(max_q - q) / (max_q - min_q)`` over the candidates (1 when all are equal),
  where ``q`` is the estimated waiting queue, own dispatches counted at once.

Weights default to llm-d's precise-prefix sample configuration: prefix 2, kv 1, queue 1.
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
    estimate_load,
    no_replica,
    pick_scope,
    top,
)
from mesh.policies.params import parse_params


@dataclass(frozen=True, slots=True)
class PreciseParams:
    scope: str = "mesh"
    prefix_weight: float = 2.0
    kv_weight: float = 1.0
    queue_weight: float = 1.0
    load_half_life: float = 2.0


class PrecisePrefix:
    name = "precise_prefix"

    def __init__(self, params: Mapping[str, object] | None = None) -> None:
        self.params = parse_params(PreciseParams, params or {}, self.name)
        pick_scope(self.params.scope)

    def decide(self, request: Request, view: View, now: float, rng: random.Random) -> Decision:
        p = self.params
        reps = view.healthy(p.scope)
        if not reps:
            return no_replica(self.name)
        matches = view.prefix.match(request.keys) if request.keys else {}
        total = len(request.keys)
        queues = {r.replica: estimate_load(r, p.load_half_life).waiting for r in reps}
        qmax, qmin = max(queues.values()), min(queues.values())
        scored = []
        for r in reps:
            prefix = matches.get(r.replica, 0) / total if total else 0.0
            kv = 1.0 - min(max(r.kv_usage, 0.0), 1.0)
            q = 1.0 if qmax == qmin else (qmax - queues[r.replica]) / (qmax - qmin)
            score = p.prefix_weight * prefix + p.kv_weight * kv + p.queue_weight * q
            # Scored.cost is minimised everywhere, so store the negated score.
            scored.append(
                Scored(r.replica, r.region, -score,
                       (("prefix", prefix), ("kv", kv), ("queue", q)))
            )
        best = min(s.cost for s in scored)
        s = rng.choice([s for s in scored if s.cost <= best + 1e-9])
        matched = matches.get(s.replica, 0)
        return Decision(
            s.replica, s.region,
            f"precise_prefix prefix={matched}/{total} score={-s.cost:.3f}", self.name,
            matched_blocks=matched, total_blocks=total, candidates=top(scored),
        )
