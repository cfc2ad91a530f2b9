"""Routing policies by name: pure functions of ``(request, view, now, rng)``.

``make_policy(name, params)`` builds one from configuration; unknown names and bad
parameters raise ``PolicyError`` naming the offending key.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from mesh.policies.base import (
    Decision,
    Policy,
    PolicyError,
    RegionView,
    ReplicaView,
    Request,
    Scored,
    View,
)
from mesh.policies.cache_aware import CacheAwareApprox
from mesh.policies.consistent_hash import ConsistentHash
from mesh.policies.gorgo import Gorgo
from mesh.policies.precise_prefix import PrecisePrefix
from mesh.policies.simple import LeastLoad, PowerOfTwo, RandomChoice, RoundRobin
from mesh.policies.skylb import SkyLB
from mesh.policies.ttft import ExpectedTtft

PolicyFactory = Callable[[Mapping[str, object]], Policy]

POLICIES: dict[str, PolicyFactory] = {
    "round_robin": RoundRobin,
    "random": RandomChoice,
    "least_load": LeastLoad,
    "power_of_two": PowerOfTwo,
    "consistent_hash": ConsistentHash,
    "cache_aware_approx": CacheAwareApprox,
    "precise_prefix": PrecisePrefix,
    "skylb": SkyLB,
    "gorgo": Gorgo,
    "kvmesh": ExpectedTtft,
}

DEFAULT_POLICY = "kvmesh"


def make_policy(name: str, params: Mapping[str, object] | None = None) -> Policy:
    factory = POLICIES.get(name)
    if factory is None:
        raise PolicyError(f"policy: unknown policy {name!r} (known: {', '.join(sorted(POLICIES))})")
    return factory(params or {})


__all__ = [
    "DEFAULT_POLICY",
    "POLICIES",
    "Decision",
    "Policy",
    "PolicyError",
    "RegionView",
    "ReplicaView",
    "Request",
    "Scored",
    "View",
    "make_policy",
]
