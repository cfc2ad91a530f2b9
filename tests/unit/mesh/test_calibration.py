"""Calibration: robust, rate-limited estimates of the cost model's inputs from outcomes."""

from __future__ import annotations

import random
import statistics

import pytest

from mesh.calibration import (
    EVERY,
    MAX_STEP,
    MIN_SAMPLES,
    RTT_FRESH_S,
    RTT_HALF_LIFE_S,
    BoundedMedian,
    Calibrated,
    Calibrator,
    hinge_fit,
    theil_sen_slope,
)
from mesh.ttft_error import Prediction


def local(uncached: int, *, rate: float = 8000.0, waiting: float = 0.0, kv: float = 0.0,
          replica: str = "e0") -> Prediction:
    """What the policy would have predicted at ``rate`` with no calibration."""
    prefill = uncached / rate
    parts = (("rtt", 0.0), ("queue", 0.0 if waiting < 0.5 else waiting * 0.03),
             ("prefill", prefill), ("decode", kv), ("calib", 0.0), ("waiting", waiting),
             ("kv", kv))
    return Prediction(replica, "us", "us", prefill + kv, parts)


def test_a_bounded_median_keeps_its_prior_until_enough_samples() -> None:
    est = BoundedMedian(prior=100.0, lo=0.0)
    for _ in range(MIN_SAMPLES - 1):
        assert not est.add(10.0)
    assert est.value is None and est.current == 100.0


def test_a_bounded_median_moves_at_most_a_bounded_step() -> None:
    est = BoundedMedian(prior=100.0, lo=0.0)
    for _ in range(MIN_SAMPLES):
        est.add(10.0)
    assert est.value == pytest.approx(100.0 * (1 - MAX_STEP))
    for _ in range(10 * EVERY):
        est.add(10.0)
    assert est.value == pytest.approx(10.0)


def test_one_outlier_in_a_window_moves_nothing() -> None:
    est = BoundedMedian(prior=None)
    for x in [1.0] * 20:
        est.add(x)
    assert est.value == 1.0
    for x in [1000.0, 1.0, 1.0, 1.0]:
        est.add(x)
    assert est.value == 1.0


def test_theil_sen_recovers_a_slope_through_outliers() -> None:
    rng = random.Random(1)
    points = [(float(x), 0.01 + x / 5000 + rng.uniform(-1e-3, 1e-3)) for x in range(50, 1000, 40)]
    points[3] = (points[3][0], 5.0)  # a request stuck behind something the model never saw
    points[7] = (points[7][0], 0.0)
    slope = theil_sen_slope(points, 64)
    assert slope is not None and 1 / slope == pytest.approx(5000, rel=0.05)
    assert theil_sen_slope([(10.0, 1.0), (20.0, 2.0)], 64) is None


def engine_with_a_floor(u: int, rng: random.Random, rate: float = 2600.0) -> float:
    """An engine step never shorter than 47 ms (prefills under ~120 tokens cost the same),
    25 ms of HTTP, up to one running step of wait, and one request in 20 stuck behind
    something the model never saw."""
    t = 0.025 + max(0.047, u / rate) + rng.uniform(0.0, 0.047)
    return t + rng.uniform(0.1, 0.7) if rng.random() < 0.05 else t


def chat_sizes(rng: random.Random, n: int) -> list[int]:
    """Uncached tokens of chat turns: most short (on the floor), a tail of long ones."""
    return [max(1, int(rng.lognormvariate(4.1, 0.9))) for _ in range(n)]


def test_the_hinge_fit_finds_the_rate_past_the_step_time_floor() -> None:
    rng = random.Random(7)
    fits, lines, knees = [], [], []
    for _ in range(40):
        points = [(float(u), engine_with_a_floor(u, rng)) for u in chat_sizes(rng, 48)]
        fit = hinge_fit(points, 64)
        if fit is not None:
            fits.append(1 / fit[0])
            knees.append(fit[1])
        line = theil_sen_slope(points, 64)
        assert line is not None
        lines.append(1 / line)
    assert len(fits) >= 10  # windows with a visible rise
    assert statistics.median(fits) == pytest.approx(2600, rel=0.1)
    assert sum(abs(f / 2600 - 1) < 0.4 for f in fits) >= 0.75 * len(fits)
    # The floor (47 ms) ends where 2600 tokens/s reaches it: about 122 tokens.
    assert statistics.median(knees) == pytest.approx(0.047 * 2600, rel=0.25)
    # The defect this replaced: one line through every point is pulled flat by the floor.
    assert statistics.median(lines) > 2600 * 1.5


def test_points_all_on_the_floor_leave_the_rate_at_its_prior() -> None:
    rng = random.Random(8)
    for _ in range(50):
        points = [(float(rng.randint(1, 115)), engine_with_a_floor(0, rng)) for _ in range(48)]
        assert hinge_fit(points, 64) is None
    cal = Calibrator(default_rate=8000.0)
    for _ in range(300):
        u = rng.randint(1, 115)
        cal.observe_local(local(u), u, engine_with_a_floor(u, rng))
    assert cal.published("e0").prefill_rate is None
    assert cal.replicas["e0"].prefill_rate.current == 8000.0
    assert cal.published("e0").overhead is not None  # the floor is learned, as an overhead


def test_the_calibrator_learns_the_rate_of_an_engine_with_a_floor() -> None:
    rng = random.Random(9)
    cal = Calibrator(default_rate=8000.0)
    for u in chat_sizes(rng, 600):
        cal.observe_local(local(u), u, engine_with_a_floor(u, rng))
    got = cal.published("e0")
    assert got.prefill_rate is not None and got.prefill_rate == pytest.approx(2600, rel=0.2)
    assert got.prefill_knee is not None and got.prefill_knee == pytest.approx(122, rel=0.4)
    # The floor is priced in the overhead: HTTP (25 ms), the floor (47 ms) and about half
    # of a running step's wait, less what the knee leaves of a median turn's prefill.
    assert got.overhead is not None and 0.06 < got.overhead < 0.11


def test_a_hinge_fit_needs_a_rising_trend() -> None:
    assert hinge_fit([(float(x), 0.1) for x in range(0, 2000, 50)], 64) is None
    assert hinge_fit([(float(x), 0.1 - x / 1e5) for x in range(0, 2000, 50)], 64) is None
    assert hinge_fit([(float(x), 0.05 + x / 4000) for x in (10, 500, 900, 1400)], 64) is None
    fit = hinge_fit([(float(x), 0.05 + x / 4000) for x in range(0, 2000, 50)], 64)
    assert fit is not None and 1 / fit[0] == pytest.approx(4000) and fit[1] == 0.0
    floor_then_line = [(float(x), max(0.05, x / 4000)) for x in range(0, 2000, 25)]
    fit = hinge_fit(floor_then_line, 64)
    assert fit is not None and 1 / fit[0] == pytest.approx(4000)
    assert fit[1] == pytest.approx(200, abs=25)


def test_the_prefill_rate_and_overhead_are_learned_from_idle_requests() -> None:
    cal = Calibrator(default_rate=8000.0)
    rng = random.Random(2)
    for _ in range(200):
        u = rng.randint(32, 1500)
        cal.observe_local(local(u), u, 0.012 + u / 3000)  # the engine: 3000 tokens/s + 12 ms
    got = cal.published("e0")
    assert got.prefill_rate == pytest.approx(3000, rel=0.05)
    assert got.overhead == pytest.approx(0.012, abs=0.003)
    assert cal.version > 0


def test_the_queue_delay_per_waiting_request_is_learned_from_waits() -> None:
    cal = Calibrator(default_rate=5000.0)
    rng = random.Random(3)
    for i in range(300):
        u = rng.randint(32, 800)
        if i % 2:
            cal.observe_local(local(u, rate=5000), u, u / 5000)
        else:
            w = rng.choice([1.0, 2.0, 4.0])
            cal.observe_local(local(u, rate=5000, waiting=w), u, u / 5000 + w * 0.08)
    got = cal.published("e0")
    assert got.queue_delay == pytest.approx(0.08, rel=0.15)


def test_a_barrier_the_engine_does_not_show_is_scaled_away() -> None:
    cal = Calibrator(default_rate=5000.0)
    rng = random.Random(4)
    for _ in range(200):
        u = rng.randint(32, 800)
        kv = rng.uniform(0.0, 0.5)  # the model's KV-barrier seconds; the engine shows none
        cal.observe_local(local(u, rate=5000, kv=kv), u, 0.005 + u / 5000)
    got = cal.published("e0")
    assert got.kv_scale is not None and got.kv_scale < 0.1


def test_configured_rates_are_the_prior() -> None:
    cal = Calibrator(default_rate=8000.0)
    cal.observe_local(local(100), 100, 0.05, configured_rate=1234.0)
    assert cal.replicas["e0"].prefill_rate.current == 1234.0
    assert cal.published("e0").prefill_rate is None  # not learned yet


def test_the_refits_price_the_prefill_as_configured_now() -> None:
    # A reload that sets an engine's rate: the overhead is refitted with the prefill at
    # that rate, not at the one the engine's model was created with.
    cal = Calibrator(default_rate=8000.0)
    cal.observe_local(local(100), 100, 0.05)
    assert cal.replicas["e0"].pricing(8000.0) == (8000.0, 0.0)
    cal.observe_local(local(100), 100, 0.05, configured_rate=1000.0)
    assert cal.replicas["e0"].pricing(8000.0) == (1000.0, 0.0)
    cal.observe_local(local(100), 100, 0.05)  # and cleared again
    assert cal.replicas["e0"].pricing(8000.0)[0] == 8000.0


def test_the_forward_round_trip_is_learned_from_forwards() -> None:
    cal = Calibrator()
    for _ in range(40):
        p = Prediction("r", "us", "eu", 0.1 + 0.02, (("rtt", 0.1), ("prefill", 0.02)))
        cal.observe_forward(p, 0.17, now=0.0)  # the round trip is 150 ms, not 100
    assert cal.learned_rtt(now=0.0)["eu"] == pytest.approx(0.15, abs=0.005)


def test_a_round_trip_priced_out_by_lost_forwards_ages_back_to_its_prior() -> None:
    # A burst of forwards that lost (the remote side's queue was missed) is absorbed into
    # the round trip; once no forward goes there, only aging can bring it back.
    cal = Calibrator()
    p = Prediction("r", "us", "eu", 0.08 + 0.02, (("rtt", 0.08), ("prefill", 0.02)))
    for i in range(10):
        cal.observe_forward(p, 0.8, now=1.0 + 0.1 * i)  # the last at 1.9 s
    high = cal.learned_rtt(now=2.0)["eu"]
    assert high > 0.5
    assert cal.learned_rtt(now=1.9 + RTT_FRESH_S)["eu"] == high  # fresh: untouched
    later = cal.learned_rtt(now=1.9 + RTT_FRESH_S + 4 * RTT_HALF_LIFE_S)["eu"]
    assert later == pytest.approx(0.08 + (high - 0.08) / 16)
    assert cal.learned_rtt(now=1e4)["eu"] == pytest.approx(0.08)
    # The next forward restarts from the aged value, not from the old burst's samples.
    cal.observe_forward(p, 0.1, now=1e4)
    assert cal.learned_rtt(now=1e4)["eu"] == pytest.approx(0.08)
    assert len(cal.rtt["eu"].samples) == 1


def test_bad_observations_are_ignored() -> None:
    cal = Calibrator()
    cal.observe_local(local(100), 100, float("nan"))
    cal.observe_local(local(100), 100, -1.0)
    cal.observe_forward(Prediction("r", "us", "eu", 0.1, ()), float("inf"), now=0.0)
    assert cal.replicas == {} and cal.rtt == {}


@pytest.mark.parametrize("value", [None, [], {"prefill_rate": "fast"}, {"prefill_rate": -5},
                                   {"overhead": 1e9}, {"kv_scale": True}])
def test_malformed_replicated_figures_are_not_learned(value: object) -> None:
    got = Calibrated.from_dict(value)
    assert got == Calibrated() or all(
        v is None for v in (got.prefill_rate, got.overhead, got.kv_scale))


def test_replicated_figures_round_trip() -> None:
    c = Calibrated(4321.0, 0.02, 0.01, 0.5, 120.0)
    assert Calibrated.from_dict(c.as_dict()) == c


def _hinge_reference(points: list[tuple[float, float]], min_dx: float
                     ) -> tuple[float, float] | None:
    """hinge_fit written out plainly (max(0, x - knee) evaluated at every point): the
    production code reuses pair slopes and splits at the knee, and must give the same
    floats."""
    import math
    import statistics

    from mesh.calibration import MIN_RISE, RISE_NOISE, RISE_Z, kendall_z, theil_sen_slope

    pts = sorted(points)
    n = len(pts)
    sizes: list[int] = []
    k = float(n)
    while k >= MIN_RISE:
        if int(k) not in sizes:
            sizes.append(int(k))
        k /= 1.25
    best = None
    for m in sizes:
        i = n - m
        knee = pts[i][0]
        slope = theil_sen_slope(pts[i:], min_dx)
        if slope is None or slope <= 0:
            continue
        floor = statistics.median(y - slope * max(0.0, x - knee) for x, y in pts)
        off = [abs(y - floor - slope * max(0.0, x - knee)) for x, y in pts]
        if best is None or sum(off) < best[0]:
            best = (sum(off), slope, i, off)
    if best is None:
        return None
    _, slope, i, off = best
    if (kendall_z(pts[i:], min_dx) < RISE_Z
            or slope * (pts[-1][0] - pts[i][0]) < RISE_NOISE * statistics.median(off)):
        return None
    knee, least = 0.0, math.inf
    for j in range(n - MIN_RISE + 1):
        kk = pts[j][0] if j else 0.0
        floor = statistics.median(y - slope * max(0.0, x - kk) for x, y in pts)
        cost = sum(abs(y - floor - slope * max(0.0, x - kk)) for x, y in pts)
        if cost < least:
            knee, least = kk, cost
    return slope, knee


def test_hinge_fit_gives_the_plain_definitions_floats() -> None:
    import random

    from mesh.calibration import MIN_SPREAD_TOKENS, hinge_fit

    rng = random.Random(3)
    seen_fit = seen_none = 0
    for case in range(150):
        n = rng.choice([8, 13, 24, 48])
        if case % 3 == 0:  # floor, then a line, with noise and ties
            pts = [(float(rng.choice([40, 90, 300, 700, 1500, 3000])), 0.0)
                   for _ in range(n)]
            pts = [(x, 0.028 + max(0.0, x - 300) / 2500 + rng.gauss(0, 0.002))
                   for x, _ in pts]
        elif case % 3 == 1:  # only the floor
            pts = [(float(rng.randint(5, 200)), 0.028 + rng.gauss(0, 0.001))
                   for _ in range(n)]
        else:  # anything
            pts = [(float(rng.randint(0, 4000)), rng.random()) for _ in range(n)]
        got = hinge_fit(pts, MIN_SPREAD_TOKENS)
        assert got == _hinge_reference(pts, MIN_SPREAD_TOKENS)
        seen_fit += got is not None
        seen_none += got is None
    assert seen_fit > 20 and seen_none > 20  # both outcomes were compared


def fast_engine(u: int, rng: random.Random) -> float:
    """A fast engine (12,000 tokens/s past a 12 ms step floor, 3 ms of HTTP): long prompts
    cost less than the default rate of 8,000 tokens/s prices them at."""
    return 0.003 + max(0.012, u / 12000) + rng.uniform(0.0, 0.002)


def test_the_overhead_is_fitted_with_the_prefill_priced_now() -> None:
    # Residuals taken with the default rate (before the rate was learned) were below 0 for
    # long prompts: the overhead fitted to 0 and, with a knee above a short prompt, its
    # first token was predicted at 0 s.
    rng = random.Random(5)
    cal = Calibrator(default_rate=8000.0)
    priced = []
    for n in range(40):
        u = 60 + 130 * (n % 10)
        cal.observe_local(local(u), u, fast_engine(u, rng))
        got = cal.published("e0")
        if got.prefill_rate is not None and got.overhead is not None:
            knee = got.prefill_knee or 0.0
            priced.append(got.overhead + max(0.0, 60 - knee) / got.prefill_rate)
    assert len(priced) >= 30
    # A 60-token prompt's first token: 3 ms + the 12 ms floor + about 1 ms.
    assert all(0.012 < t < 0.025 for t in priced)


def test_the_overhead_is_never_below_the_fastest_first_token_priced_no_prefill() -> None:
    # A configured rate far too slow prices every prefill too high: the median residual is
    # below 0, but a fully cached prompt (no prefill priced) comes back no sooner than the
    # fastest one seen.
    rng = random.Random(6)
    cal = Calibrator(default_rate=8000.0)
    cached = []
    for n in range(40):
        u = 0 if n % 5 == 0 else 60 + 130 * (n % 10)
        t = fast_engine(u, rng)
        if u == 0:
            cached.append(t)
        cal.observe_local(local(u, rate=2000.0), u, t, configured_rate=2000.0)
    got = cal.published("e0")
    assert got.overhead is not None and got.overhead >= min(cached) > 0


def test_an_overhead_learned_in_a_burst_follows_the_requests_that_come_back_fast() -> None:
    # A startup burst the model priced as no queue fills the window with 0.7 s residuals;
    # the replica, priced out, then gets a request now and then, each back in 80 ms. The
    # window's median would stay at 0.7 s until half the window turned over.
    cal = Calibrator(default_rate=8000.0)
    for _ in range(28):
        cal.observe_local(local(40), 40, 0.7)
    assert cal.published("e0").overhead == pytest.approx(0.7, abs=0.01)
    for _ in range(4 * EVERY):
        cal.observe_local(local(40), 40, 0.08)
    got = cal.published("e0").overhead
    assert got is not None and got < 0.1


def test_the_burst_does_not_pull_the_overhead_back_up() -> None:
    # Once a refit's worth of requests showed the burst over, slower requests after it are
    # weighed against the requests since, not against the burst.
    cal = Calibrator(default_rate=8000.0)
    for _ in range(28):
        cal.observe_local(local(40), 40, 0.7)
    for _ in range(EVERY):
        cal.observe_local(local(40), 40, 0.08)
    stepped = cal.published("e0").overhead
    assert stepped is not None and stepped < 0.7 * (1 - MAX_STEP) + 0.01
    for _ in range(EVERY):
        cal.observe_local(local(40), 40, 0.4)
    got = cal.published("e0").overhead
    assert got is not None and got <= stepped


def test_noisy_residuals_around_a_steady_overhead_keep_it() -> None:
    # The local decisions' error (15% median) never looks like a new regime: the overhead
    # (a 70 ms first token less the 5 ms its 40-token prefill is priced) stays near 65 ms.
    cal = Calibrator(default_rate=8000.0)
    rng = random.Random(7)
    seen = []
    for _ in range(400):
        cal.observe_local(local(40), 40, 0.07 * rng.uniform(0.7, 1.3))
        if (o := cal.published("e0").overhead) is not None:
            seen.append(o)
    assert len(seen) > 300
    assert min(seen) > 0.065 * 0.8 and max(seen) < 0.065 * 1.2


def test_a_first_overhead_is_a_bounded_step_from_its_peers() -> None:
    # e1's overhead is learned at about 65 ms; e0 then starts inside a burst the model
    # priced as no queue (0.7 s first tokens). Its first published figure is one step from
    # e1's, not the burst's median, and it climbs from there only a step per refit.
    cal = Calibrator(default_rate=8000.0)
    for _ in range(3 * MIN_SAMPLES):
        cal.observe_local(local(40, replica="e1"), 40, 0.07)
    peer = cal.published("e1").overhead
    assert peer is not None and peer == pytest.approx(0.065, abs=0.003)
    for _ in range(MIN_SAMPLES):
        cal.observe_local(local(40), 40, 0.7)
    got = cal.published("e0").overhead
    assert got is not None and got <= peer * (1 + MAX_STEP) + 1e-9


def test_a_first_overhead_with_no_peer_is_the_samples_own() -> None:
    cal = Calibrator(default_rate=8000.0)
    for _ in range(MIN_SAMPLES):
        cal.observe_local(local(40), 40, 0.7)
    assert cal.published("e0").overhead == pytest.approx(0.695, abs=0.003)


def test_requests_sent_behind_the_routers_own_leave_the_overhead_alone() -> None:
    # e1's overhead is learned at about 65 ms. e0 starts inside a burst: each request was
    # sent while the router's earlier ones to e0 had no first token yet, and the engine
    # showed them as running, not waiting (estimate 0), so every first token took 0.6-1 s.
    # Those residuals hold the prefills ahead, not what one first token costs: before, the
    # overhead climbed a bounded step per refit to 0.6 s in as many samples as a 2 s burst
    # gives, and the engine, priced out, took 85 s to unlearn it.
    cal = Calibrator(default_rate=8000.0)
    for _ in range(3 * MIN_SAMPLES):
        cal.observe_local(local(40, replica="e1"), 40, 0.07)
    peer = cal.published("e1").overhead
    assert peer is not None
    rng = random.Random(3)
    for _ in range(30):
        cal.observe_local(local(300, replica="e0"), 300, rng.uniform(0.6, 1.0), behind=True)
    assert cal.published("e0").overhead is None  # unknown: the view prices it as its peers
    assert cal.published("e0").prefill_rate is None
    assert len(cal.replicas["e0"].idle) == 0  # and no point of the rate fit
    for _ in range(2 * EVERY):
        cal.observe_local(local(40, replica="e0"), 40, 0.07)
    got = cal.published("e0").overhead
    assert got is not None and got == pytest.approx(peer, abs=0.01)


def test_the_overhead_is_the_median_of_the_requests_that_queued_behind_none() -> None:
    # A window with a few requests that found the engine free and many sent behind the
    # router's own: the overhead is what the free ones paid.
    cal = Calibrator(default_rate=8000.0)
    for _ in range(MIN_SAMPLES):
        cal.observe_local(local(40), 40, 0.07)
    first = cal.published("e0").overhead
    assert first == pytest.approx(0.065, abs=0.003)
    for _ in range(5 * EVERY):
        cal.observe_local(local(40), 40, 0.7, behind=True)
    assert cal.published("e0").overhead == pytest.approx(first, abs=1e-9)
    for _ in range(2 * MIN_SAMPLES):
        cal.observe_local(local(40), 40, 0.09)
    # The free ones alone move it (a 90 ms first token less its 5 ms of prefill).
    assert cal.published("e0").overhead == pytest.approx(0.085, abs=0.003)
