"""The fleet in virtual time: outcomes computable by hand, determinism, routing paths."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kvevents.keys import request_keys
from sim.fleet import Fleet, FleetSpec, RouterLayout
from sim.profiles import L4_LLAMA_3_1_8B, BatchShape
from sim.topology import Topology
from sim.workloads import ARENA, chat_workload
from sim.workloads.base import FIRST_CONTENT_ID, SimRequest, Workload

ONE_REGION = Topology.build(["us"], {}, intra_ms=2.0)
TWO_REGIONS = Topology.build(["us", "eu"], {("us", "eu"): 100.0}, intra_ms=2.0)


class Script:
    """A client that sends fixed requests, each ``gap`` seconds after the previous reply."""

    def __init__(self, region: str, prompts: list[tuple[int, ...]], gap: float = 1.0,
                 output: tuple[int, ...] = (FIRST_CONTENT_ID,)) -> None:
        self.cid = f"{region}/script"
        self.region = region
        self.gap = gap
        self._left = [
            SimRequest(i + 1, self.cid, region, "u", "s", p, output, 0.0, "t", i)
            for i, p in enumerate(prompts)
        ]

    def _next(self, at: float) -> list[SimRequest]:
        if not self._left:
            return []
        req = self._left.pop(0)
        return [
            SimRequest(
                req.rid,
                req.client,
                req.region,
                req.user,
                req.session,
                req.prompt,
                req.output,
                at,
                req.kind,
                req.turn,
            )
        ]

    def start(self, now: float) -> list[SimRequest]:
        return self._next(now)

    def on_sent(self, req: SimRequest, now: float) -> list[SimRequest]:
        return []

    def on_complete(self, req: SimRequest, now: float) -> list[SimRequest]:
        return self._next(now + self.gap)


PROMPT = tuple(range(FIRST_CONTENT_ID, FIRST_CONTENT_ID + 512))


def _run(spec: FleetSpec, client: Script) -> Fleet:
    fleet = Fleet(spec)
    fleet.run(Workload("script", [client], horizon_s=100.0), drain_s=10.0)
    return fleet


def test_one_request_on_one_engine_matches_the_hand_computation() -> None:
    spec = FleetSpec(
        ONE_REGION, {"us": 1}, L4_LLAMA_3_1_8B, "round_robin", plane="probe", prefix="none"
    )
    fleet = _run(spec, Script("us", [PROMPT, PROMPT]))
    first, second = fleet.records
    hops = 4 * 0.001  # client->router->engine and back, 2 ms RTT each
    prefill = L4_LLAMA_3_1_8B.step_time(BatchShape.of([(0, 512)], []))
    assert first.ttft == pytest.approx(hops + prefill)
    assert first.e2e == pytest.approx(first.ttft)  # one output token: done with the prefill
    assert first.cached_tokens == 0
    # The same prompt again: 31 full blocks cached (the last token is always recomputed).
    assert second.cached_tokens == 31 * 16
    assert first.done is not None and second.sent == pytest.approx(first.done + 1.0)
    rest = L4_LLAMA_3_1_8B.step_time(BatchShape.of([(496, 16)], []))
    assert second.ttft == pytest.approx(hops + rest)


def test_global_balancer_pays_two_round_trips_for_a_remote_engine() -> None:
    spec = FleetSpec(
        TWO_REGIONS,
        {"eu": 1},
        L4_LLAMA_3_1_8B,
        "round_robin",
        plane="probe",
        prefix="none",
        layout=RouterLayout(global_region="us"),
    )
    fleet = _run(spec, Script("eu", [PROMPT]))
    (rec,) = fleet.records
    prefill = L4_LLAMA_3_1_8B.step_time(BatchShape.of([(0, 512)], []))
    # eu client -> us balancer -> eu engine, and the first token back the same way.
    assert rec.ttft == pytest.approx(2 * 0.100 + prefill)
    assert (rec.router_region, rec.replica_region, rec.forwards) == ("us", "eu", 0)


def test_regional_router_forwards_one_hop_when_home_has_no_engine() -> None:
    spec = FleetSpec(TWO_REGIONS, {"eu": 1}, L4_LLAMA_3_1_8B, "kvmesh", plane="oracle")
    fleet = _run(spec, Script("us", [PROMPT]))
    (rec,) = fleet.records
    prefill = L4_LLAMA_3_1_8B.step_time(BatchShape.of([(0, 512)], []))
    # us client -> us router -> eu router -> eu engine; back the same way.
    assert rec.ttft == pytest.approx(4 * 0.001 + 2 * 0.050 + prefill)
    assert (rec.router_region, rec.replica_region, rec.forwards) == ("us", "eu", 1)
    assert all(not r.dispatches.total() for r in fleet.routers)  # tickets all released


def test_oracle_sends_a_follow_up_to_the_replica_holding_its_prefix() -> None:
    spec = FleetSpec(ONE_REGION, {"us": 4}, L4_LLAMA_3_1_8B, "kvmesh", plane="oracle", seed=3)
    fleet = _run(spec, Script("us", [PROMPT, PROMPT + (7777,) * 40, PROMPT]))
    a, b, c = fleet.records
    assert a.replica == b.replica == c.replica
    assert b.cached_tokens == 512 and c.cached_tokens == 496


def _signature(fleet: Fleet) -> list[tuple[object, ...]]:
    return [
        (r.rid, r.sent, r.replica, r.first_token, r.done, r.cached_tokens) for r in fleet.records
    ]


def test_runs_are_deterministic_from_the_seed() -> None:
    topo = Topology.build(["us", "eu"], {("us", "eu"): (90, 110)}, intra_ms=(1, 2))

    def once(seed: int, policy: str = "skylb") -> Fleet:
        spec = FleetSpec(
            topo,
            {"us": 2, "eu": 1},
            L4_LLAMA_3_1_8B,
            policy,
            plane="probe",
            prefix="approx" if policy == "skylb" else "none",
            seed=seed,
        )
        fleet = Fleet(spec)
        fleet.run(chat_workload(ARENA, {"us": 6, "eu": 4}, seed=seed, horizon_s=20.0), drain_s=30.0)
        return fleet

    a, b, c = once(1), once(1), once(2)
    assert _signature(a) == _signature(b)
    assert _signature(a) != _signature(c)
    assert len(a.records) > 10
    # Another policy, same seed: the same first requests (content), other timing and placement.
    d = once(1, "round_robin")
    first = {r.rid: r.prompt_tokens for r in a.records if r.sent < 5.0}
    assert first == {r.rid: r.prompt_tokens for r in d.records if r.sent < 5.0}


def test_mesh_plane_gossips_remote_prefixes_and_load() -> None:
    """A US router learns from gossip alone what the EU engine cached and how busy it is."""
    from sim.mesh_plane import MeshPlane

    topo = Topology.build(["us", "eu"], {("us", "eu"): 80.0}, intra_ms=2.0)
    spec = FleetSpec(topo, {"us": 1, "eu": 1}, L4_LLAMA_3_1_8B, "kvmesh", plane="mesh", seed=5)
    fleet = Fleet(spec)
    plane = fleet.plane
    assert isinstance(plane, MeshPlane)
    fleet.run(Workload("script", [Script("eu", [PROMPT, PROMPT])], horizon_s=30.0), drain_s=10.0)
    us = plane.state_of("us-lb0")
    eu = plane.state_of("eu-lb0")
    first = fleet.records[0]
    assert first.replica == "eu-e0"
    matched = fleet.router_by_id["us-lb0"].views.prefix.match(request_keys(PROMPT, 16))
    assert matched.get("eu-e0") == 32  # the whole prompt, learned through gossip
    assert us.index.keys("eu-e0") == eu.index.keys("eu-e0")
    remote = {r.replica: r for r in us.remote_records(fleet.loop.now)}
    assert "eu-e0" in remote and remote["eu-e0"].age < 5.0
    assert fleet.counters.gossip_bytes > 0
    assert fleet.records[1].cached_tokens == 496


def test_a_forward_redecided_at_the_serving_router_is_bound_where_it_went(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The kvmesh policy with ``recheck_pins`` re-decides a pinned forward among the
    serving router's engines; the fleet's per-replica count of requests bound for it (the
    oracle's in-flight truth) must follow the engine the request went to, not the one the
    origin named."""
    from sim.fleet import SimEngine

    seen: list[tuple[str | None, str, str | None]] = []
    submit = SimEngine.submit

    def checked(self: SimEngine, flight: object) -> None:
        seen.append((flight.target, self.replica, flight.pinned))  # type: ignore[attr-defined]
        submit(self, flight)  # type: ignore[arg-type]

    monkeypatch.setattr(SimEngine, "submit", checked)
    spec = FleetSpec(TWO_REGIONS, {"eu": 2}, L4_LLAMA_3_1_8B, "kvmesh", plane="oracle", seed=5,
                     policy_params={"recheck_pins": True})
    fleet = Fleet(spec)
    prompts = [tuple(range(FIRST_CONTENT_ID + 1000 * i, FIRST_CONTENT_ID + 1000 * i + 300))
               for i in range(12)]
    fleet.run(Workload("script", [Script("us", prompts, gap=0.0)], horizon_s=100.0),
              drain_s=10.0)
    assert len(seen) == 12
    assert all(target == replica for target, replica, _ in seen)
    # Idle twins are near-ties, drawn at random on each side: some forwards were re-decided.
    assert any(pinned is not None and pinned != replica for _, replica, pinned in seen)
    assert not any(fleet.bound.values())


def test_tie_stream_changes_only_the_routers_near_tie_choices() -> None:
    """Another tie-break stream: the same workload and network, other placements; stream 0
    is the stream every run without the option uses."""
    topo = Topology.build(["us"], {}, intra_ms=(1, 2))

    def once(stream: int | None) -> Fleet:
        spec = FleetSpec(topo, {"us": 3}, L4_LLAMA_3_1_8B, "kvmesh", plane="oracle", seed=4)
        if stream is not None:
            spec = replace(spec, tie_stream=stream)
        fleet = Fleet(spec)
        fleet.run(chat_workload(ARENA, {"us": 8}, seed=4, horizon_s=20.0), drain_s=30.0)
        return fleet

    default, zero, other = once(None), once(0), once(1)
    assert _signature(default) == _signature(zero)
    assert [r.replica for r in other.records] != [r.replica for r in default.records]
    # The clients' first requests are the same ones, sent at the same times.
    first = {(r.rid, r.sent, r.prompt_tokens) for r in default.records if r.sent < 2.0}
    assert first and first == {(r.rid, r.sent, r.prompt_tokens)
                               for r in other.records if r.sent < 2.0}


@pytest.mark.parametrize("live", ["own", "all"])
def test_mesh_plane_live_load_reads_engines_at_decision_time(live: str) -> None:
    """The ``live_load`` analysis option: own (or every) engine's record is its live state."""
    from sim.mesh_plane import MeshPlane

    topo = Topology.build(["us", "eu"], {("us", "eu"): 80.0}, intra_ms=2.0)
    spec = FleetSpec(topo, {"us": 1, "eu": 1}, L4_LLAMA_3_1_8B, "kvmesh", plane="mesh", seed=5,
                     mesh_options={"live_load": live})
    fleet = Fleet(spec)
    plane = fleet.plane
    assert isinstance(plane, MeshPlane)
    seen: list[tuple[str, float, tuple[float, float, float], tuple[int, int, float]]] = []

    def look() -> None:
        for rec in plane.records(fleet.router_by_id["us-lb0"], fleet.loop.now):
            truth = fleet.engines[rec.replica].load()
            seen.append((rec.replica, rec.age, (rec.waiting, rec.running, rec.kv_usage), truth))

    for i in range(200):
        fleet.loop.at(0.5 + i * 0.005, look)
    reply = tuple(range(FIRST_CONTENT_ID, FIRST_CONTENT_ID + 32))
    fleet.run(Workload("script", [Script("us", [PROMPT] * 3, 0.0, reply),
                                  Script("eu", [PROMPT] * 3, 0.0, reply)], horizon_s=30.0),
              drain_s=10.0)
    own = [s for s in seen if s[0] == "us-e0"]
    remote = [s for s in seen if s[0] == "eu-e0"]
    assert len(own) == len(remote) == 200
    assert all(age == 0.0 and got == truth for _, age, got, truth in own)
    assert any(truth != (0, 0, 0.0) for *_, truth in own)  # it saw the engine busy
    if live == "all":
        assert all(age == 0.0 and got == truth for _, age, got, truth in remote)
    else:
        assert all(age > 0.0 for _, age, _, _ in remote)


def test_mesh_plane_rejects_an_unknown_live_load() -> None:
    spec = FleetSpec(TWO_REGIONS, {"us": 1}, L4_LLAMA_3_1_8B, "kvmesh", plane="mesh",
                     mesh_options={"live_load": "everything"})
    with pytest.raises(ValueError, match="live_load"):
        Fleet(spec)
