"""The kvmesh policy's step after the costs: learned corrections, then the forwarding band."""

from __future__ import annotations

import random

import pytest

from mesh.policies import RegionView, ReplicaView, Request, View, make_policy
from mesh.ttft_error import prediction_of

REQ = Request("r", token_ids=list(range(400)), keys=list(range(25)), block_size=16)
PARAMS = {"prefill_rate": 4000.0, "calibrated": True}


def rep(name: str, region: str = "us", **kw: object) -> ReplicaView:
    return ReplicaView(replica=f"http://{name}", region=region, **kw)  # type: ignore[arg-type]


def view(home_waiting: float, margin: float | None, **home: object) -> View:
    regions = {"us": RegionView("us"), "eu": RegionView("eu", rtt=0.08, margin=margin)}
    return View("us", (rep("a", waiting=home_waiting, **home), rep("e", "eu")), regions,
                mean_prompt_tokens=400.0)


def decide(v: View, **params: object) -> str | None:
    policy = make_policy("kvmesh", {**PARAMS, **params})
    return policy.decide(REQ, v, 0.0, random.Random(0)).replica


def test_a_forward_must_save_more_than_the_measured_band() -> None:
    # Home: 2 waiting * 0.1 s + 0.1 s prefill = 0.3 s; eu: 0.08 + 0.1 = 0.18 s (saving 0.12).
    assert decide(view(2, margin=0.05)) == "http://e"
    assert decide(view(2, margin=0.2)) == "http://a"
    assert decide(view(2, margin=0.2), calibrated=False) == "http://e"


def test_before_any_forward_was_measured_the_prior_band_applies() -> None:
    assert decide(view(2, margin=None), prior_band=0.25) == "http://e"   # premium 0.045 s
    assert decide(view(2, margin=None), prior_band=1.0) == "http://a"    # premium 0.18 s


def test_the_prediction_recorded_has_no_premium_and_names_the_home_alternative() -> None:
    d = make_policy("kvmesh", PARAMS).decide(REQ, view(4, margin=0.05), 0.0, random.Random(0))
    p = prediction_of(d, "us")
    assert p is not None and p.kind == "forwarded"
    assert p.cost == pytest.approx(0.08 + 400 / 4000)
    assert p.home_best == pytest.approx(4 * 0.1 + 0.1)
    assert dict(d.candidates[0].parts)["premium"] == pytest.approx(0.05)


def test_learned_figures_correct_the_prediction() -> None:
    plain = make_policy("kvmesh", PARAMS).decide(REQ, view(2, 1.0), 0.0, random.Random(0))
    learned = view(2, 1.0, overhead=0.01, queue_delay=0.03, prefill_rate=8000.0)
    d = make_policy("kvmesh", PARAMS).decide(REQ, learned, 0.0, random.Random(0))
    assert plain.replica == d.replica == "http://a"
    assert prediction_of(plain, "us").cost == pytest.approx(0.3)  # type: ignore[union-attr]
    # 2 waiting at 30 ms each (not 400 tokens / rate), 400 tokens at 8000/s, 10 ms overhead.
    assert prediction_of(d, "us").cost == pytest.approx(0.06 + 0.05 + 0.01)  # type: ignore[union-attr]


def test_a_learned_barrier_scale_rescales_the_kv_term() -> None:
    full = view(0, 1.0, kv_usage=0.9)
    scaled = view(0, 1.0, kv_usage=0.9, kv_scale=0.0)
    a = make_policy("kvmesh", PARAMS).decide(REQ, full, 0.0, random.Random(0))
    b = make_policy("kvmesh", PARAMS).decide(REQ, scaled, 0.0, random.Random(0))
    pa, pb = prediction_of(a, "us"), prediction_of(b, "us")
    assert pa is not None and pb is not None
    assert pa.cost - pb.cost == pytest.approx(0.05 * 0.9 / 0.1)


def test_the_policy_stays_a_pure_function() -> None:
    v = view(3, margin=0.1)
    a = make_policy("kvmesh", PARAMS).decide(REQ, v, 1.0, random.Random(7))
    b = make_policy("kvmesh", PARAMS).decide(REQ, v, 1.0, random.Random(7))
    assert a == b


def test_the_home_kv_risk_below_the_knee_does_not_buy_a_round_trip() -> None:
    # The engine shows none of the barrier in its TTFT (kv_scale 0): at 80% KV the barrier
    # (0.05 * 0.8 / 0.2 = 0.2 s) is a risk price only. Home predicts 0.1 s, eu 0.18 s: a
    # forward would lose 80 ms of TTFT to dodge a price that is not time.
    v = view(0, margin=0.01, kv_usage=0.8, kv_scale=0.0)
    assert decide(v) == "http://a"
    # Without the gate (the ranking's risk counted against home alone) it would forward:
    # the eu candidate is ranked by its predicted TTFT plus the band, home's with the risk.
    d = make_policy("kvmesh", PARAMS).decide(REQ, v, 0.0, random.Random(0))
    costs = {c.replica: c.cost for c in d.candidates}
    assert costs["http://e"] - 0.2 < costs["http://a"] < costs["http://e"]


def test_past_the_knee_the_home_risk_counts_towards_a_forward() -> None:
    # At 96% KV the cache bounds admission: the same engine is a place to leave.
    v = view(0, margin=0.01, kv_usage=0.96, kv_scale=0.0)
    assert decide(v) == "http://e"


def test_near_ties_do_not_cross_the_border() -> None:
    # Home predicts 0.18 s (0.8 waiting at 0.1 s + 0.1 s prefill), eu 0.18 s + a 5 ms band:
    # within the 10% near-tie band of each other, but a forward is never a coin toss.
    v = view(0.8, margin=0.005)
    picks = {make_policy("kvmesh", PARAMS).decide(REQ, v, 0.0, random.Random(s)).replica
             for s in range(40)}
    assert picks == {"http://a"}
    loose = {make_policy("kvmesh", {**PARAMS, "calibrated": False}).decide(
        REQ, v, 0.0, random.Random(s)).replica for s in range(40)}
    assert loose == {"http://a", "http://e"}


def test_without_calibrated_the_prediction_is_still_the_calibrated_one() -> None:
    """The learned figures rank only with ``calibrated``; the TTFT a decision predicts (its
    header, the error metrics) is the corrected one either way, and with a KV barrier the
    engine does not show, learned at share 0, the plain cost's barrier is not in it."""
    learned = view(1, 1.0, overhead=0.01, queue_delay=0.03, prefill_rate=8000.0,
                   kv_usage=0.5, kv_scale=0.0)
    on = make_policy("kvmesh", PARAMS).decide(REQ, learned, 0.0, random.Random(0))
    off = make_policy("kvmesh", {**PARAMS, "calibrated": False}).decide(
        REQ, learned, 0.0, random.Random(0))
    assert on.replica == off.replica == "http://a"
    p_on, p_off = prediction_of(on, "us"), prediction_of(off, "us")
    assert p_on is not None and p_off is not None
    assert p_off.cost == pytest.approx(p_on.cost) == pytest.approx(0.03 + 0.05 + 0.01)
    # The plain cost the uncalibrated ranking used: 400 tokens queued at 8000/s, the
    # prefill, and the whole barrier (0.05 x 0.5 / 0.5).
    assert off.candidates[0].cost == pytest.approx(0.05 + 0.05 + 0.05)


def test_the_uncalibrated_explanation_prices_only_what_it_reads() -> None:
    """Without ``calibrated`` the explanation prices the calibrated prediction of its
    shortlist (and of the home replicas when a forward is on it) only, with the same
    values as pricing every replica."""
    from mesh.policies import ttft

    regions = {"us": RegionView("us"), "eu": RegionView("eu", rtt=0.08, margin=0.05)}
    reps = (*(rep(f"u{i}", waiting=i, overhead=0.01 * i, queue_delay=0.02, kv_usage=0.5,
                  kv_scale=0.5) for i in range(6)), rep("e", "eu"))
    v = View("us", reps, regions, mean_prompt_tokens=400.0)
    p = make_policy("kvmesh", {**PARAMS, "calibrated": False}).params  # type: ignore[attr-defined]
    costs = ttft._costs(REQ, reps, v, {}, p)
    full, _ = ttft.risk.corrected(ttft._costs(REQ, reps, v, {}, p, release=False), reps, v,
                                  p.prefill_rate, p.load_half_life, p.prior_band,
                                  p.kv_weight, p.kv_cap, p.kv_knee, 1.0)
    for shortlist in ([0, 1, 2, 3], [6, 0, 1, 2]):
        got = ttft._predicted(REQ, reps, v, {}, p, costs, shortlist, 1.0)
        read = set(shortlist) | ({0, 1, 2, 3, 4, 5} if 6 in shortlist else set())
        assert all(got[i] == full[i] for i in read)
        assert all(got[i] == float("inf") for i in range(7) if i not in read)
