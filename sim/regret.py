"""Decision regret: each kvmesh decision priced again on the engines' live state.

An analysis of the mesh plane, never part of a decision. A run's p90 TTFT against the
oracle's moves 5-20% with the routers' tie-break stream alone, so a 1-point change in what
the routers know cannot be told from a path's luck without hundreds of runs. This asks the
question one decision at a time instead: had the router seen every engine's live load and
the true in-flight counts (the oracle plane's load, the ``live_load: all`` option's
records), how much more would the replica it chose cost than the best one, by the policy's
own cost model?

``regret = max(0, live cost of the choice - (live best + the policy's near-tie band))``

over the replicas the decision could choose from (the view's healthy ones, so a forwarded
request's own-engine scope is kept), with everything else of the view unchanged (prefix
index, regions, round trips, averages): only load information differs. A router seeing the
live state itself has no regret by construction; what is left is what stale records cost
the decisions, in the model's seconds. Decisions before ``after`` (warm-up) are not scored.

Attached to every router of a run with the kvmesh policy on the mesh plane (the policy's
cost without the KV-headroom rule or the learned corrections, so not with ``kv_tokens`` or
``calibrated`` set); it calls the router's policy first, with the router's own random
stream, and draws nothing itself, so the run's decisions are those of a run without it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any

from mesh.policies import Decision, Request, View
from mesh.policies.ttft import ExpectedTtft, expected_ttft
from mesh.view import ReplicaRecord, ViewBuilder

if TYPE_CHECKING:  # the fleet attaches this; annotations only
    from sim.fleet import Fleet, SimRouter

BIG_S = (0.05, 0.2)
"""Regret thresholds reported as shares of the decisions, seconds."""


@dataclass(slots=True)
class Regret:
    """Every scored decision's regret, seconds (and whether it left the router's region)."""

    after: float = 0.0
    regrets: list[float] = field(default_factory=list)
    forwards: list[float] = field(default_factory=list)

    def note(self, regret: float, forward: bool) -> None:
        self.regrets.append(regret)
        if forward:
            self.forwards.append(regret)

    def summary(self) -> dict[str, Any]:
        n = len(self.regrets)
        if not n:
            return {"decisions": 0}
        out: dict[str, Any] = {
            "decisions": n,
            "mean_ms": round(1000 * sum(self.regrets) / n, 3),
            "share_any": round(sum(1 for r in self.regrets if r > 0.0) / n, 5),
            "forwards": len(self.forwards),
            "forward_mean_ms": round(1000 * sum(self.forwards) / len(self.forwards), 3)
            if self.forwards else 0.0,
        }
        for t in BIG_S:
            out[f"share_over_{int(t * 1000)}ms"] = round(
                sum(1 for r in self.regrets if r > t) / n, 5)
        return out


class _Probe:
    """A router's policy, with each decision it makes priced on the live state afterwards."""

    def __init__(self, inner: ExpectedTtft, live: Callable[[float, View], View],
                 log: Regret) -> None:
        self.inner = inner
        self.name = inner.name
        self._live = live
        self._log = log

    def __getattr__(self, attr: str) -> Any:  # the dispatcher reads the policy's flags
        return getattr(self.inner, attr)

    def decide(self, request: Request, view: View, now: float, rng: random.Random) -> Decision:
        d = self.inner.decide(request, view, now, rng)
        if d.replica is not None and now >= self._log.after:
            r = regret_of(self.inner, request, view, self._live(now, view), d.replica)
            if r is not None:
                self._log.note(r, d.region != view.region)
        return d


def regret_of(policy: ExpectedTtft, request: Request, view: View, live: View,
              chosen: str) -> float | None:
    """How much more ``chosen`` costs than the best candidate of ``view``, on ``live``'s
    load (beyond the policy's near-tie band); None if ``chosen`` is not a candidate there."""
    p = policy.params
    names = {r.replica for r in view.healthy("mesh")}
    cands = [r for r in live.replicas if r.replica in names and r.healthy]
    matches = view.prefix.match(request.keys) if request.keys else {}
    costs = {r.replica: expected_ttft(request, r, live, matches.get(r.replica, 0), p).cost
             for r in cands}
    mine = costs.get(chosen)
    if mine is None:
        return None
    best = min(costs.values())
    return max(0.0, mine - (best + max(p.tie_abs, p.tie_rel * best)))


def attach(fleet: Fleet, after: float) -> Regret | None:
    """Score every kvmesh decision of ``fleet`` from ``after`` on (None: nothing to score,
    not the kvmesh policy's plain cost on the mesh plane)."""
    from sim.mesh_plane import MeshPlane

    plane = fleet.plane
    if not isinstance(plane, MeshPlane):
        return None
    policies = [r.policy for r in fleet.routers]
    if not all(isinstance(p, ExpectedTtft) and p.params.kv_tokens == 0.0
               and not p.params.calibrated for p in policies):
        return None
    log = Regret(after)
    for router in fleet.routers:
        policy = router.policy
        assert isinstance(policy, ExpectedTtft)
        builder = _live_builder(router, partial(plane.live_records, router))
        router.core.policy = _Probe(policy, _live_view(builder), log)
    return log


def _live_builder(router: SimRouter,
                  records: Callable[[float], Iterable[ReplicaRecord]]) -> ViewBuilder:
    """The router's own view builder, reading ``records`` instead of the replicated state."""
    views = router.views
    return ViewBuilder(region=views.region, dispatches=views.dispatches, records=records,
                       regions=views.regions, prefix=views.prefix, static_rtt=views.static_rtt,
                       learned_rtt=views.learned_rtt, margins=views.margins,
                       prior_margin=views.prior_margin)


def _live_view(builder: ViewBuilder) -> Callable[[float, View], View]:
    """The decision's view with its replicas' load taken from ``builder``."""

    def live(now: float, view: View) -> View:
        fresh = builder.build(now, view.queue, view.mean_prompt_tokens, None,
                              view.mean_output_tokens)
        return replace(view, replicas=fresh.replicas)

    return live


__all__ = ["Regret", "attach", "regret_of"]
