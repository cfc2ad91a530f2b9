"""Decision regret (``sim.regret``): a decision priced again on the live state."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mesh.policies import Request, View
from mesh.policies.base import ReplicaView
from mesh.policies.ttft import ExpectedTtft, expected_ttft
from sim import regret
from sim.fleet import Fleet, FleetSpec
from sim.profiles import L4_LLAMA_3_1_8B
from sim.topology import Topology
from sim.workloads import ARENA, chat_workload

TOPO = Topology.build(["us", "eu"], {("us", "eu"): 80.0}, intra_ms=2.0)


def _request() -> Request:
    return Request("r1", list(range(600)), [], block_size=16)


def test_regret_is_the_live_cost_above_the_best_and_its_tie_band() -> None:
    policy = ExpectedTtft()
    stale = View("us", (ReplicaView("a", "us"), ReplicaView("b", "us", waiting=4.0)))
    live = View("us", (ReplicaView("a", "us", waiting=6.0), ReplicaView("b", "us")))
    req = _request()
    cost = {r.replica: expected_ttft(req, r, live, 0, policy.params).cost
            for r in live.replicas}
    band = max(policy.params.tie_abs, policy.params.tie_rel * cost["b"])
    got = regret.regret_of(policy, req, stale, live, "a")
    assert got == pytest.approx(cost["a"] - cost["b"] - band)
    assert got is not None and got > 0.1
    assert regret.regret_of(policy, req, stale, live, "b") == 0.0


def test_only_the_views_candidates_compete() -> None:
    """A forwarded request's view holds its own engines only: a better replica elsewhere
    in the live view is no regret."""
    policy = ExpectedTtft()
    view = View("us", (ReplicaView("a", "us", waiting=3.0), ReplicaView("z", "eu", False)))
    live = View("us", (ReplicaView("a", "us", waiting=3.0), ReplicaView("z", "eu")))
    assert regret.regret_of(policy, _request(), view, live, "a") == 0.0
    assert regret.regret_of(policy, _request(), view, live, "gone") is None


def _fleet(**mesh: object) -> Fleet:
    spec = FleetSpec(TOPO, {"us": 2, "eu": 1}, L4_LLAMA_3_1_8B, "kvmesh", plane="mesh",
                     seed=3, mesh_options=dict(mesh))
    return Fleet(spec)


def _run(fleet: Fleet) -> list[tuple[int, str]]:
    fleet.run(chat_workload(ARENA, {"us": 30, "eu": 10}, seed=3, horizon_s=60.0), drain_s=30.0)
    return sorted((r.rid, r.replica) for r in fleet.records)


def test_scoring_leaves_the_runs_decisions_alone() -> None:
    plain = _run(_fleet())
    fleet = _fleet()
    log = regret.attach(fleet, after=5.0)
    assert log is not None
    assert _run(fleet) == plain
    st = log.summary()
    assert st["decisions"] > 50
    assert all(r >= 0.0 for r in log.regrets)
    assert 0.0 <= st["share_over_200ms"] <= st["share_over_50ms"] <= st["share_any"] <= 1.0


def test_routers_that_see_the_live_state_have_no_regret() -> None:
    fleet = _fleet(live_load="all")
    log = regret.attach(fleet, after=5.0)
    assert log is not None
    _run(fleet)
    assert log.summary()["decisions"] > 50
    assert max(log.regrets) == 0.0


def test_nothing_is_scored_off_the_mesh_plane_or_with_the_kv_hold() -> None:
    spec = FleetSpec(TOPO, {"us": 1}, L4_LLAMA_3_1_8B, "kvmesh", plane="oracle")
    assert regret.attach(Fleet(spec), 0.0) is None
    held = replace(spec, plane="mesh", policy_params={"kv_tokens": 30000.0})
    assert regret.attach(Fleet(held), 0.0) is None
    assert regret.attach(Fleet(replace(spec, plane="mesh", policy="least_load")), 0.0) is None
