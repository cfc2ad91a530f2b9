"""Outcomes: the one path both shells report placements through; learned figures replicated."""

from __future__ import annotations

import random
from typing import Any

import pytest

from mesh.calibration import MIN_SAMPLES, Calibrated
from mesh.config import EngineConfig, RouterConfig
from mesh.engines import EngineLoad, EngineState
from mesh.outcomes import OPEN_STALE_S, TRACE, Outcomes, policy_rate
from mesh.policies import RegionView, ReplicaView, Request, View, make_policy
from mesh.state import MeshState

REQ = Request("r", token_ids=list(range(400)), keys=list(range(25)), block_size=16)


def test_a_local_outcome_feeds_the_errors_and_the_calibration() -> None:
    policy = make_policy("kvmesh", {"prefill_rate": 4000.0})
    out = Outcomes("us", policy_rate(policy))
    v = View("us", (ReplicaView("http://a", "us"),), {"us": RegionView("us")})
    for i in range(20):
        req = Request(f"r{i}", token_ids=list(range(100 + 50 * i)), keys=[], block_size=16)
        d = policy.decide(req, v, 0.0, random.Random(0))
        pending = out.begin(d, req, True, 10.0)
        assert pending is not None and pending.uncached == req.num_tokens
        out.first_byte(pending, 10.0 + 0.005 + req.num_tokens / 2000)
    assert out.errors.kinds["local"].count == 20
    assert out.published("http://a").prefill_rate is not None
    names = {m.name for m in out.metrics()}
    assert {"kvmesh_ttft_predictions", "kvmesh_ttft_prediction_error_ratio",
            "kvmesh_calibrated", "kvmesh_forward_band_seconds"} <= names


def test_recent_outcomes_keep_the_predicted_parts_beside_the_observed_ttft() -> None:
    policy = make_policy("kvmesh", {"prefill_rate": 4000.0, "calibrated": True})
    out = Outcomes("us", policy_rate(policy))
    v = View("us", (ReplicaView("http://a", "us", waiting=2),), {"us": RegionView("us")},
             mean_prompt_tokens=400.0)
    for i in range(TRACE + 5):
        d = policy.decide(REQ, v, 0.0, random.Random(0))
        pending = out.begin(d, REQ, True, float(i))
        assert pending is not None
        out.first_byte(pending, i + 0.25)
    rows = out.recent()
    assert len(rows) == TRACE and rows[-1]["at"] == TRACE + 4 and rows[0]["at"] == 5
    last = out.recent(2)
    assert [r["at"] for r in last] == [TRACE + 3, TRACE + 4]
    row = last[-1]
    assert row["kind"] == "local" and row["pair"] == "us->us" and row["uncached"] == 400
    assert row["observed_s"] == 0.25
    assert row["parts"]["prefill"] == pytest.approx(400 / 4000)
    assert row["parts"]["waiting"] == 2 and "queue" in row["parts"]
    assert out.recent(0) == []


def test_forward_outcomes_update_the_views_band_and_round_trip_in_place() -> None:
    policy = make_policy("kvmesh", {"prefill_rate": 4000.0})
    out = Outcomes("us", policy_rate(policy))
    margins, rtt = out.margins, out.rtt
    v = View("us", (ReplicaView("http://a", "us", waiting=10), ReplicaView("http://e", "eu")),
             {"us": RegionView("us"), "eu": RegionView("eu", rtt=0.08, margin=0.0)},
             mean_prompt_tokens=400.0)
    for _ in range(30):
        d = policy.decide(REQ, v, 0.0, random.Random(0))
        assert d.replica == "http://e"
        pending = out.begin(d, REQ, False, 0.0)
        assert pending is not None
        out.first_byte(pending, 0.3)
    assert margins is out.margins and margins["eu"] > 0
    assert rtt is out.rtt and rtt["eu"] == pytest.approx(0.3 - 0.1, abs=0.01)


def test_a_region_priced_out_by_lost_forwards_reopens_once_they_are_old() -> None:
    policy = make_policy("kvmesh", {"prefill_rate": 4000.0})
    out = Outcomes("us", policy_rate(policy))
    home = ReplicaView("http://a", "us", waiting=10)
    v = View("us", (home, ReplicaView("http://e", "eu")),
             {"us": RegionView("us"), "eu": RegionView("eu", rtt=0.08, margin=0.0)},
             mean_prompt_tokens=400.0)
    for i in range(10):  # a burst of forwards that lost by most of a second
        d = policy.decide(REQ, v, 0.0, random.Random(0))
        assert d.replica == "http://e"
        pending = out.begin(d, REQ, False, 1.0 + 0.1 * i)
        assert pending is not None
        out.first_byte(pending, 1.0 + 0.1 * i + 1.0)
    assert out.rtt["eu"] > 0.5 and out.margins["eu"] > 0.5
    # Only local outcomes from now on: the region's figures age.
    local = View("us", (home,), {"us": RegionView("us")}, mean_prompt_tokens=400.0)
    d = policy.decide(REQ, local, 0.0, random.Random(0))
    pending = out.begin(d, REQ, True, 5.0)
    assert pending is not None
    out.first_byte(pending, 5.2)  # fresh: nothing moved
    assert out.rtt["eu"] > 0.5 and out.margins["eu"] > 0.5
    pending = out.begin(d, REQ, True, 300.0)
    assert pending is not None
    out.first_byte(pending, 300.2)
    assert out.rtt["eu"] == pytest.approx(0.08, abs=0.001)
    assert "eu" not in out.margins and "eu" not in out.errors.into  # the prior band again


def test_a_pinned_placement_has_no_prediction() -> None:
    from mesh.policies import Decision
    assert Outcomes("us").begin(Decision("a", "us", "pinned"), REQ, True, 0.0) is None


def _state(region: str, engine: str, rate: float | None = None) -> MeshState:
    config = RouterConfig(region=region, node_id=f"{region}-lb0",
                          advertise=f"http://{region}:8080",
                          engines=(EngineConfig(url=engine, prefill_rate=rate),))
    return MeshState(config, clock=lambda: 100.0)


def _learned_at_eu(us: MeshState, eu: MeshState) -> Any:
    """us learns figures for its engine and publishes them; eu merges us's state: eu's
    record of that engine."""
    us.learned = {"http://us-e0": Calibrated(5000.0, 0.02, 0.01, 0.5, 110.0)}.get  # type: ignore[assignment]
    us.publish_engine(EngineState("http://us-e0", True, EngineLoad(1, 2, 0.3), 100.0, 0, "ok"),
                      "us", 100.0)
    us._write_meta(100.0)
    eu.meta.merge(us.meta.delta_since(eu.meta.digest(), 100.0), 100.0)
    eu.loads.merge(us.loads.delta_since(eu.loads.digest(), 100.0), 100.0)
    return {r.replica: r for r in eu.remote_records(100.0)}["http://us-e0"]


def test_the_owners_figures_reach_another_routers_view() -> None:
    got = _learned_at_eu(_state("us", "http://us-e0"), _state("eu", "http://eu-e0"))
    assert (got.prefill_rate, got.queue_delay, got.overhead, got.kv_scale,
            got.prefill_knee) == (5000.0, 0.02, 0.01, 0.5, 110.0)


def test_an_overhead_not_learned_yet_reaches_another_router_as_unknown() -> None:
    us, eu = _state("us", "http://us-e0"), _state("eu", "http://eu-e0")
    us.learned = {"http://us-e0": Calibrated(5000.0, 0.02, None, 0.5, 110.0)}.get  # type: ignore[assignment]
    us.publish_engine(EngineState("http://us-e0", True, EngineLoad(1, 2, 0.3), 100.0, 0, "ok"),
                      "us", 100.0)
    us._write_meta(100.0)
    eu.meta.merge(us.meta.delta_since(eu.meta.digest(), 100.0), 100.0)
    eu.loads.merge(us.loads.delta_since(eu.loads.digest(), 100.0), 100.0)
    got = {r.replica: r for r in eu.remote_records(100.0)}["http://us-e0"]
    # None, not 0: the reader's view prices it like its peers (mesh.view.overhead_prior).
    assert got.overhead is None and got.queue_delay == 0.02


def test_a_learned_knee_goes_with_the_learned_rate_only() -> None:
    got = _learned_at_eu(_state("us", "http://us-e0", 3000.0), _state("eu", "http://eu-e0"))
    assert (got.prefill_rate, got.prefill_knee) == (3000.0, 0.0)  # configured: as given


def test_the_local_error_is_the_band_of_regions_no_forward_measured_yet() -> None:
    policy = make_policy("kvmesh", {"prefill_rate": 4000.0})
    out = Outcomes("us", policy_rate(policy))
    v = View("us", (ReplicaView("http://a", "us"),), {"us": RegionView("us")})
    assert out.prior_margin() is None
    for _ in range(40):
        pending = out.begin(policy.decide(REQ, v, 0.0, random.Random(0)), REQ, True, 0.0)
        assert pending is not None
        out.first_byte(pending, pending.prediction.cost + 0.07)  # the overhead not learned
    prior = out.prior_margin()
    assert prior is not None and prior == pytest.approx(0.07, abs=1e-9)
    assert "eu" not in out.margins
    assert out.status()["errors"]["prior_band_s"] == 0.07
    (g,) = [m for m in out.metrics() if m.name == "kvmesh_forward_band_prior_seconds"]
    assert g.samples[0].value == pytest.approx(0.07)


def _decided(out: Outcomes, engine: str = "http://a") -> Any:
    policy = make_policy("kvmesh", {"prefill_rate": 4000.0, "calibrated": True})
    v = View("us", (ReplicaView(engine, "us"),), {"us": RegionView("us")})
    return policy.decide(REQ, v, 0.0, random.Random(0))


def test_a_placement_sent_while_the_routers_own_awaits_its_first_byte_is_behind() -> None:
    out = Outcomes("us", 4000.0)
    d, other = _decided(out), _decided(out, "http://b")
    a = out.begin(d, REQ, True, 0.0)
    b = out.begin(d, REQ, True, 0.1)
    assert a is not None and b is not None and not a.behind and b.behind
    elsewhere = out.begin(other, REQ, True, 0.15)  # another engine: its own queue
    assert elsewhere is not None and not elsewhere.behind
    out.first_byte(a, 0.2)
    c = out.begin(d, REQ, True, 0.3)  # b still has no first byte
    assert c is not None and c.behind
    out.first_byte(b, 0.4)
    out.first_byte(c, 0.5)
    e = out.begin(d, REQ, True, 0.6)
    assert e is not None and not e.behind
    # A placement that never got a first byte (failed) stops counting after a minute.
    late = out.begin(d, REQ, True, 0.6 + OPEN_STALE_S + 1.0)
    assert late is not None and not late.behind


def test_a_placement_that_ended_without_a_first_byte_holds_nothing_up() -> None:
    """A failed attempt, an error answer or a client gone: the router ends the placement, and
    the next request to that engine is not counted as behind it (it teaches the overhead)."""
    out = Outcomes("us", 4000.0)
    d = _decided(out)
    failed = out.begin(d, REQ, True, 0.0)
    assert failed is not None
    out.ended(failed)
    nxt = out.begin(d, REQ, True, 0.1)
    assert nxt is not None and not nxt.behind
    out.ended(nxt)
    out.first_byte(nxt, 0.2)  # ended twice (at the first byte, then at the end): no harm
    assert not out.begin(d, REQ, True, 0.3).behind  # type: ignore[union-attr]


def test_a_burst_of_the_routers_own_requests_does_not_become_the_overhead() -> None:
    # Ten requests sent 30 ms apart to one engine come back 0.6-0.9 s later (each behind
    # the prefills sent before it, the engine counting them running): no overhead is
    # published from them; the quiet requests after the burst set it.
    out = Outcomes("us", 4000.0)
    d = _decided(out)
    for burst in range(3):
        t0 = 10.0 * burst
        sent = [out.begin(d, REQ, True, t0 + 0.03 * i) for i in range(10)]
        for i, p in enumerate(sent):
            assert p is not None
            out.first_byte(p, t0 + 0.6 + 0.03 * i)
    assert out.published("http://a").overhead is None
    for i in range(2 * MIN_SAMPLES):
        p = out.begin(d, REQ, True, 40.0 + i)
        assert p is not None and not p.behind
        out.first_byte(p, 40.0 + i + 0.1 + 400 / 4000)
    got = out.published("http://a").overhead
    assert got is not None and got == pytest.approx(0.1, abs=0.01)
