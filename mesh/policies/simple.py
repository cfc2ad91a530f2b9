"""Load-only baselines: round robin, random, least load and power of two choices.

They ignore caches and distance on purpose; they are what the cache- and network-aware
policies are measured against. ``scope`` "mesh" (the default) treats every healthy
replica anywhere as a candidate, like a single global balancer; "local" keeps the own
region.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

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
    top,
)
from mesh.policies.params import parse_params


@dataclass(frozen=True, slots=True)
class ScopeParams:
    scope: str = "mesh"
    load_half_life: float = 2.0
    """Seconds over which a scraped load figure loses half its weight."""


@dataclass(frozen=True, slots=True)
class LeastLoadParams:
    scope: str = "mesh"
    load_half_life: float = 2.0
    by: str = "requests"
    """``requests``: fewest outstanding requests; ``tokens``: fewest outstanding tokens (queued
    prompts at the mean prompt size plus the predicted output of this router's requests in
    flight), join-shortest-queue on work."""

    def __post_init__(self) -> None:
        if self.by not in {"requests", "tokens"}:
            raise PolicyError(f"policy.by: expected 'requests' or 'tokens', got {self.by!r}")


def _scored(view: View, reps: list[ReplicaView], half_life: float) -> list[Scored]:
    out = []
    for r in reps:
        load = estimate_load(r, half_life)
        out.append(
            Scored(
                r.replica,
                r.region,
                load.outstanding,
                (("waiting", load.waiting), ("running", load.running)),
            )
        )
    return out


def _scored_tokens(view: View, reps: list[ReplicaView], half_life: float) -> list[Scored]:
    out = []
    for r in reps:
        load = estimate_load(r, half_life)
        queued = load.waiting * view.mean_prompt_tokens
        out.append(Scored(r.replica, r.region, queued + r.work,
                          (("queued_tokens", queued), ("decode_tokens", r.work))))
    return out


class RoundRobin:
    """Cycles through the healthy replicas in a stable order."""

    name = "round_robin"

    def __init__(self, params: Mapping[str, object] | None = None) -> None:
        self.params = parse_params(ScopeParams, params or {}, self.name)
        pick_scope(self.params.scope)
        self._next = 0

    def decide(self, request: Request, view: View, now: float, rng: random.Random) -> Decision:
        reps = sorted(view.healthy(self.params.scope), key=lambda r: r.replica)
        if not reps:
            return no_replica(self.name)
        r = reps[self._next % len(reps)]
        self._next += 1
        return Decision(r.replica, r.region, f"round_robin {reps.index(r)}/{len(reps)}", self.name)


class RandomChoice:
    """Uniformly random healthy replica."""

    name = "random"

    def __init__(self, params: Mapping[str, object] | None = None) -> None:
        self.params = parse_params(ScopeParams, params or {}, self.name)
        pick_scope(self.params.scope)

    def decide(self, request: Request, view: View, now: float, rng: random.Random) -> Decision:
        reps = view.healthy(self.params.scope)
        if not reps:
            return no_replica(self.name)
        r = rng.choice(reps)
        return Decision(r.replica, r.region, f"random of {len(reps)}", self.name)


class LeastLoad:
    """Fewest outstanding requests (age-discounted record + in-flight), or with ``by: tokens``
    fewest outstanding tokens; ties broken randomly."""

    name = "least_load"

    def __init__(self, params: Mapping[str, object] | None = None) -> None:
        self.params = parse_params(LeastLoadParams, params or {}, self.name)
        pick_scope(self.params.scope)

    def decide(self, request: Request, view: View, now: float, rng: random.Random) -> Decision:
        score = _scored_tokens if self.params.by == "tokens" else _scored
        scored = score(view, view.healthy(self.params.scope), self.params.load_half_life)
        if not scored:
            return no_replica(self.name)
        best = min(s.cost for s in scored)
        s = rng.choice([s for s in scored if s.cost <= best + 1e-9])
        return Decision(
            s.replica, s.region, f"least_load outstanding={s.cost:.1f}", self.name,
            candidates=top(scored),
        )


class PowerOfTwo:
    """Two random healthy replicas; the less loaded one wins."""

    name = "power_of_two"

    def __init__(self, params: Mapping[str, object] | None = None) -> None:
        self.params = parse_params(ScopeParams, params or {}, self.name)
        pick_scope(self.params.scope)

    def decide(self, request: Request, view: View, now: float, rng: random.Random) -> Decision:
        reps = view.healthy(self.params.scope)
        if not reps:
            return no_replica(self.name)
        pair = rng.sample(reps, 2) if len(reps) >= 2 else reps
        scored = _scored(view, pair, self.params.load_half_life)
        s = min(scored, key=lambda s: s.cost)
        return Decision(
            s.replica, s.region, f"power_of_two outstanding={s.cost:.1f}", self.name,
            candidates=top(scored),
        )
