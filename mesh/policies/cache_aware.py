"""Approximate cache-aware routing (SGLang style) for engines that publish no KV events.

The policy guesses what each replica has cached from its own past decisions: a tree of
the block-key paths it has sent to each replica (chained keys make a path a flat set of
keys, so the tree is a map ``key -> replicas`` plus an LRU for eviction). Per decision:

1. *Imbalanced* pool (``max - min > balance_abs_threshold`` and
   ``max > balance_rel_threshold * min``, load = estimated outstanding requests): the least
   loaded replica wins, whatever the cache says.
2. Otherwise, if the best matched share of the prompt exceeds ``cache_threshold``, the best
   matching replica wins (ties: less loaded).
3. Otherwise the least loaded replica wins (not the smallest tree: an overloaded small
   tree would attract every miss).

The chosen replica's path is inserted; the least recently used ``(key, replica)`` entries
go once there are more than ``max_tree_size``. Defaults are SGLang's command-line ones.
The tree is this policy object's state: it sees only this router's decisions.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mesh.policies.base import (
    Decision,
    Request,
    Scored,
    View,
    cached_tokens,
    estimate_load,
    no_replica,
    pick_scope,
    top,
)
from mesh.policies.params import parse_params


@dataclass(frozen=True, slots=True)
class CacheAwareParams:
    scope: str = "mesh"
    cache_threshold: float = 0.3
    balance_abs_threshold: float = 64.0
    balance_rel_threshold: float = 1.5
    max_tree_size: int = 1 << 19
    """Entries ``(block key, replica)`` kept; about 16 tokens each."""
    load_half_life: float = 2.0


class ApproxTree:
    """Which replica was sent which block-key paths, LRU-bounded."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._tenants: dict[int, set[str]] = {}
        self._lru: OrderedDict[tuple[int, str], None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._lru)

    def match(self, keys: Sequence[int]) -> dict[str, int]:
        """Replica -> leading keys it was sent consecutively."""
        out: dict[str, int] = {}
        if not keys:
            return out
        alive = set(self._tenants.get(keys[0], ()))
        depth = 0
        while alive:
            depth += 1
            if depth == len(keys):
                for t in alive:
                    out[t] = depth
                break
            nxt = self._tenants.get(keys[depth], set())
            for t in alive - nxt:
                out[t] = depth
            alive &= nxt
        return out

    def insert(self, keys: Sequence[int], tenant: str) -> None:
        for k in keys:
            entry = (k, tenant)
            if entry in self._lru:
                self._lru.move_to_end(entry)
            else:
                self._lru[entry] = None
                self._tenants.setdefault(k, set()).add(tenant)
        # Leaves were touched last, so parents outlive children and paths stay prefix-closed.
        while len(self._lru) > self.max_size:
            (k, t), _ = self._lru.popitem(last=False)
            ts = self._tenants.get(k)
            if ts is not None:
                ts.discard(t)
                if not ts:
                    del self._tenants[k]

    def remove_tenant(self, tenant: str) -> None:
        for entry in [e for e in self._lru if e[1] == tenant]:
            del self._lru[entry]
            ts = self._tenants[entry[0]]
            ts.discard(tenant)
            if not ts:
                del self._tenants[entry[0]]


class CacheAwareApprox:
    name = "cache_aware_approx"

    def __init__(self, params: Mapping[str, object] | None = None) -> None:
        self.params = parse_params(CacheAwareParams, params or {}, self.name)
        pick_scope(self.params.scope)
        self.tree = ApproxTree(self.params.max_tree_size)

    def decide(self, request: Request, view: View, now: float, rng: random.Random) -> Decision:
        p = self.params
        reps = view.healthy(p.scope)
        if not reps:
            return no_replica(self.name)
        loads = {r.replica: estimate_load(r, p.load_half_life).outstanding for r in reps}
        matches = self.tree.match(request.keys)
        scored = [
            Scored(
                r.replica, r.region, loads[r.replica],
                (("matched", float(matches.get(r.replica, 0))),),
            )
            for r in reps
        ]
        hi, lo = max(loads.values()), min(loads.values())
        imbalanced = hi - lo > p.balance_abs_threshold and hi > p.balance_rel_threshold * lo
        best_match = max((matches.get(r.replica, 0) for r in reps), default=0)
        ratio = cached_tokens(request, best_match) / max(request.num_tokens, 1)
        if imbalanced:
            pool, why = scored, "imbalanced: least_load"
        elif best_match > 0 and ratio > p.cache_threshold:
            pool = [s for s in scored if matches.get(s.replica, 0) == best_match]
            why = f"prefix {ratio:.0%}"
        else:
            pool, why = scored, f"miss {ratio:.0%}: least_load"
        least = min(s.cost for s in pool)
        s = rng.choice([s for s in pool if s.cost <= least + 1e-9])
        self.tree.insert(request.keys, s.replica)
        matched = matches.get(s.replica, 0)
        return Decision(
            s.replica, s.region, f"cache_aware_approx {why}", self.name,
            matched_blocks=matched, total_blocks=len(request.keys), candidates=top(scored),
        )
