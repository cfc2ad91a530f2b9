"""The default policy, ``kvmesh``: the replica anywhere with the lowest expected TTFT.

For every healthy replica ``r`` in a reachable region::

    load      = estimate_load(r)             # age-discounted record + in-flight + own fresh
    uncached  = prompt tokens - cached tokens (consecutive prefix blocks r holds, from events)
    rate      = r.prefill_rate or prefill_rate            (tokens/s of the replica's profile)
    rtt       = round trip to r's region's router (0 at home)
    queue     = load.waiting * mean_prompt_tokens / rate
    prefill   = uncached / rate
    decode    = (queue + prefill) * decode_weight * load.running
                + kv_weight * k / (1 - k)                  (k = KV usage, capped at kv_cap)
    ttft      = rtt + queue + prefill + decode

Running sequences share every engine step with the prefill (``decode_weight`` per sequence),
and a nearly full KV cache means preemption and recomputation (the barrier term). The winner
is drawn at random among the near-ties, candidates within ``max(tie_abs, tie_rel * best)``
of the best, so routers that share one stale view spread their requests instead of all
sending them to the replica that looked idle.
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
class TtftParams:
    prefill_rate: float = 8000.0
    load_half_life: float = 2.0
    decode_weight: float = 0.01
    kv_weight: float = 0.05
    kv_cap: float = 0.99
    tie_rel: float = 0.1
    tie_abs: float = 0.005
    rtt_weight: float = 1.0


def expected_ttft(
    request: Request, r: ReplicaView, view: View, matched: int, p: TtftParams
) -> Scored:
    load = estimate_load(r, p.load_half_life)
    rate = r.prefill_rate or p.prefill_rate
    uncached = request.num_tokens - cached_tokens(request, matched)
    rtt = p.rtt_weight * view.rtt(r.region)
    queue = load.waiting * view.mean_prompt_tokens / rate
    prefill = uncached / rate
    k = min(max(r.kv_usage, 0.0), p.kv_cap)
    decode = (queue + prefill) * p.decode_weight * load.running + p.kv_weight * k / (1.0 - k)
    cost = rtt + queue + prefill + decode
    return Scored(
        r.replica, r.region, cost,
        (("rtt", rtt), ("queue", queue), ("prefill", prefill), ("decode", decode),
         ("matched", float(matched))),
    )


class ExpectedTtft:
    name = "kvmesh"

    def __init__(self, params: Mapping[str, object] | None = None) -> None:
        self.params = parse_params(TtftParams, params or {}, self.name)

    def decide(self, request: Request, view: View, now: float, rng: random.Random) -> Decision:
        reps = view.healthy("mesh")
        if not reps:
            return no_replica(self.name)
        matches = view.prefix.match(request.keys) if request.keys else {}
        scored = [expected_ttft(request, r, view, matches.get(r.replica, 0), self.params)
                  for r in reps]
        best = min(s.cost for s in scored)
        band = max(self.params.tie_abs, self.params.tie_rel * best)
        ties = [s for s in scored if s.cost <= best + band]
        s = rng.choice(ties)
        matched = matches.get(s.replica, 0)
        return Decision(
            s.replica, s.region,
            f"kvmesh ttft={s.cost * 1000:.1f}ms prefix={matched}/{len(request.keys)} "
            f"ties={len(ties)}",
            self.name, matched_blocks=matched, total_blocks=len(request.keys),
            candidates=top(scored),
        )
