"""Predicted vs observed TTFT: windows per route kind and region pair, the forwarding band."""

from __future__ import annotations

import pytest

from mesh.policies.base import Decision, Scored
from mesh.ttft_error import MAX_PAIRS, MIN_BAND_SAMPLES, Prediction, TtftErrors, prediction_of


def test_the_prediction_is_the_chosen_candidates_cost_without_its_premium() -> None:
    d = Decision("eu-e0", "eu", "x", "kvmesh", candidates=(
        Scored("us-e0", "us", 0.30, (("rtt", 0.0),)),
        Scored("eu-e0", "eu", 0.25, (("rtt", 0.08), ("premium", 0.05), ("home", 0.30))),
    ))
    p = prediction_of(d, "us")
    assert p is not None
    assert p.cost == pytest.approx(0.20) and p.kind == "forwarded" and p.pair == "us->eu"
    assert p.home_best == 0.30 and p.part("rtt") == 0.08


def test_no_prediction_without_a_chosen_candidate() -> None:
    assert prediction_of(Decision(None, "eu", "region push"), "us") is None
    assert prediction_of(Decision("a", "us", "pinned"), "us") is None


def test_errors_by_kind_and_pair() -> None:
    e = TtftErrors()
    e.observe(Prediction("a", "us", "us", 0.1, ()), 0.125)
    e.observe(Prediction("b", "us", "eu", 0.2, (), home_best=0.15), 0.25)
    s = e.status()
    assert s["kinds"]["local"]["median_abs_rel_error"] == pytest.approx(0.2)  # type: ignore[index]
    fwd = s["pairs"]["us->eu"]  # type: ignore[index]
    assert fwd["count"] == 1 and fwd["lost"] == 1
    e.observe(Prediction("a", "us", "us", 0.1, ()), float("nan"))
    assert e.kinds["local"].count == 1


def test_pair_labels_are_bounded() -> None:
    e = TtftErrors()
    for i in range(MAX_PAIRS + 5):
        e.observe(Prediction("a", "us", f"r{i}", 0.1, ()), 0.1)
    assert len(e.pairs) == MAX_PAIRS + 1 and "other" in e.pairs


def test_the_band_is_measured_once_enough_forwards_were_seen() -> None:
    e = TtftErrors(band_quantile=0.75)
    for _ in range(MIN_BAND_SAMPLES - 1):
        e.observe(Prediction("b", "us", "eu", 0.2, (), home_best=1.0), 0.3)
    assert e.band("eu") is None
    e.observe(Prediction("b", "us", "eu", 0.2, (), home_best=1.0), 0.3)
    assert e.band("eu") == pytest.approx(0.1)  # overshoot 100 ms, no local error, no loss
    # Forwards that lost to home widen it.
    for _ in range(MIN_BAND_SAMPLES):
        e.observe(Prediction("b", "us", "eu", 0.2, (), home_best=0.25), 0.3)
    band = e.band("eu")
    assert band is not None and band == pytest.approx(0.1 * 1.5)


def test_parts_that_are_not_time_to_first_token_are_left_out() -> None:
    d = Decision("a", "us", "x", "kvmesh", candidates=(
        Scored("a", "us", 1.0, (("rtt", 0.0), ("prefill", 0.2), ("gen", 0.7), ("mixing", 0.1))),
    ))
    p = prediction_of(d, "us")
    assert p is not None and p.cost == pytest.approx(0.2)


def test_the_band_reads_local_decisions_that_came_in_under_their_prediction() -> None:
    # A forward's saving is false when home would have been faster than predicted: local
    # over-predictions widen the band, local under-predictions (home slower) do not.
    slow, fast = TtftErrors(band_quantile=0.75), TtftErrors(band_quantile=0.75)
    for e in (slow, fast):
        for _ in range(MIN_BAND_SAMPLES):
            e.observe(Prediction("b", "us", "eu", 0.2, (), home_best=1.0), 0.2)
    for _ in range(16):
        slow.observe(Prediction("a", "us", "us", 0.1, ()), 0.2)   # home 100 ms slower
        fast.observe(Prediction("a", "us", "us", 0.2, ()), 0.1)   # home 100 ms faster
    assert slow.band("eu") == pytest.approx(0.0)
    assert fast.band("eu") == pytest.approx(0.1)


def test_before_any_forward_is_measured_the_band_is_the_local_error() -> None:
    # A region no forward went to yet: the saving of a forward there is a difference of two
    # predictions by the same model, so it is at least as wrong as the local decisions.
    e = TtftErrors(band_quantile=0.5)
    for _ in range(MIN_BAND_SAMPLES - 1):
        e.observe(Prediction("a", "us", "us", 0.03, ()), 0.1)
    assert e.prior() is None  # too few local decisions: the policy's prior_band decides
    e.observe(Prediction("a", "us", "us", 0.03, ()), 0.1)
    assert e.prior() == pytest.approx(0.07)  # every one came in 70 ms over its prediction
    for _ in range(2 * MIN_BAND_SAMPLES):
        e.observe(Prediction("a", "us", "us", 0.13, ()), 0.1)
    assert e.prior() == pytest.approx(0.03)  # now mostly 30 ms under: the median side
    assert e.band("eu") is None  # a measured band still needs forwards into the region
