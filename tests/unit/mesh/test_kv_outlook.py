"""A replica's KV outlook: peak, trend, and the policy's reading of them (``mesh.kv_outlook``)."""

from __future__ import annotations

import random

import pytest

from mesh.engines import EngineLoad, EngineState
from mesh.kv_outlook import MEMORY_S, KvHistory, Outlooks, reach
from mesh.outcomes import Outcomes
from mesh.policies import RegionView, ReplicaView, Request, View, make_policy
from mesh.state import LocalOnly, view_records

# -- the history --------------------------------------------------------------------------------


def test_the_peak_is_the_highest_usage_within_the_memory() -> None:
    h = KvHistory(memory=10.0, window=2.0)
    assert h.peak is None and h.trend is None
    for t, k in [(0.0, 0.2), (1.0, 0.8), (2.0, 0.5), (3.0, 0.6)]:
        h.observe(k, t)
    assert h.peak == 0.8
    h.observe(0.4, 11.5)  # 0.8 (t = 1) has left the 10 s memory; 0.6 (t = 3) has not
    assert h.peak == 0.6
    h.observe(0.3, 30.0)
    assert h.peak == 0.3


def test_the_trend_is_the_least_squares_slope_of_the_window() -> None:
    h = KvHistory(memory=100.0, window=1.0)
    for i in range(4):
        h.observe(0.3 + 0.01 * i, 0.125 * i)
    assert h.trend is None  # fewer than MIN_POINTS samples
    for i in range(4, 30):
        h.observe(0.3 + 0.01 * i, 0.125 * i)
    assert h.trend == pytest.approx(0.08)
    assert [t for t, _ in h.recent] == [0.125 * i for i in range(21, 30)]  # the last second
    for i in range(30, 60):
        h.observe(0.9, 0.125 * i)  # holding steady
    assert h.trend == pytest.approx(0.0, abs=1e-12)


def test_a_sample_back_in_time_or_repeated_is_ignored() -> None:
    h = KvHistory(memory=100.0, window=10.0)
    for i in range(6):
        h.observe(0.1 * i, float(i))
    before = (h.peak, h.trend, len(h.recent))
    h.observe(0.99, 5.0)
    h.observe(0.99, 2.0)
    assert (h.peak, h.trend, len(h.recent)) == before


@pytest.mark.parametrize(("usage", "peak", "trend", "life", "expected"), [
    (0.6, 0.7, None, 5.0, 0.7),     # no trend yet: the peak
    (0.6, 0.7, -0.05, 5.0, 0.7),    # falling: the peak
    (0.6, 0.7, 0.01, 5.0, 0.7),     # rising to 0.65 in a life: still the peak
    (0.6, 0.7, 0.1, 5.0, 1.1),      # rising past it
])
def test_reach_is_the_peak_or_where_the_trend_leads(
        usage: float, peak: float, trend: float | None, life: float, expected: float) -> None:
    assert reach(usage, peak, trend, life) == pytest.approx(expected)


# -- kept by the router that scrapes the engine, read by its view -------------------------------


def test_the_router_learns_it_from_its_scrapes_and_its_view_reads_it() -> None:
    o = Outcomes("us", 8000.0)
    for i in range(50):
        o.scraped("http://a", 0.25 + 0.0125 * i, 0.125 * i)
    h = o.kv.get("http://a")
    assert h is not None and h.peak == pytest.approx(0.8625)
    assert h.trend == pytest.approx(0.1)
    st = EngineState("http://a", True, EngineLoad(0, 20, 0.8625), 6.125, 0, "ok")
    own = [("http://a", "us", st, None), ("http://b", "us", None, None)]
    recs = {r.replica: r for r in view_records(own, {"http://a", "http://b"}, LocalOnly(), 6.2,
                                               o.published, o.kv.get)}
    assert recs["http://a"].kv_peak == pytest.approx(0.8625)
    assert recs["http://a"].kv_trend == pytest.approx(0.1)
    assert recs["http://b"].kv_peak is None and recs["http://b"].kv_trend is None


def test_the_outlook_is_not_gossiped() -> None:
    o = Outcomes("us", 8000.0)
    for i in range(10):
        o.scraped("http://a", 0.5, float(i))
    assert not {"kv_peak", "kv_trend"} & set(o.published("http://a").as_dict())


@pytest.mark.parametrize(("usage", "at"), [(float("nan"), 1.0), (-0.1, 1.0), (1.5, 1.0),
                                           (float("inf"), 1.0), (0.5, float("nan"))])
def test_a_malformed_scrape_teaches_nothing(usage: float, at: float) -> None:
    o = Outlooks()
    o.observe("http://a", usage, at)
    assert o.get("http://a") is None


# -- the policy ----------------------------------------------------------------------------------

REGIONS = {"us": RegionView("us"), "eu": RegionView("eu", rtt=0.08)}
REQ = Request("r", token_ids=list(range(256)), keys=list(range(16)), block_size=16)


def view(peak: float | None, trend: float | None = None, kv: float = 0.8) -> View:
    """Home at ``kv`` KV usage (a barrier of 0.2 s), an idle replica 80 ms away."""
    home = ReplicaView("http://a", "us", running=20.0, kv_usage=kv, load_age=0.0, inflight=20,
                       kv_peak=peak, kv_trend=trend)
    away = ReplicaView("http://e", "eu", kv_usage=0.05, load_age=0.0)
    return View("us", (home, away), REGIONS, mean_output_tokens=200.0)


def pick(v: View, **params: object) -> str | None:
    p = make_policy("kvmesh", {"prefill_rate": 8000.0, **params})
    return p.decide(REQ, v, 0.0, random.Random(0)).replica


def test_a_home_cache_holding_below_its_knee_does_not_pay_a_forward() -> None:
    # Priced on the barrier alone, eu is 0.2 - 0.08 s cheaper; the cache has held at 0.8.
    assert pick(view(None)) == "http://e"          # outlook unknown: as before
    assert pick(view(0.82, 0.0)) == "http://a"     # steady below the knee: stay home
    assert pick(view(0.82, 0.0), kv_outlook=False) == "http://e"


def test_a_home_cache_that_reached_or_is_heading_for_its_knee_still_does() -> None:
    assert pick(view(0.95, 0.0)) == "http://e"     # it was at the knee lately
    # 200 tokens x 0.03 s = a 6 s life; +0.02/s takes 0.8 to 0.92 within it.
    assert pick(view(0.82, 0.02)) == "http://e"
    assert pick(view(0.82, 0.01)) == "http://a"    # 0.86: below the knee


def test_the_outlook_leaves_a_forward_that_saves_more_than_the_barrier() -> None:
    # A cold 8,000-token prompt at home against a cached one in eu: the prefill pays.
    long = Request("l", token_ids=list(range(8000)), keys=list(range(500)), block_size=16)

    class Held:
        def match(self, keys: object) -> dict[str, int]:
            return {"http://e": 500}

    v = view(0.82, 0.0)
    v = View(v.region, v.replicas, v.regions, prefix=Held(), mean_output_tokens=200.0)
    d = make_policy("kvmesh", {"prefill_rate": 8000.0}).decide(long, v, 0.0, random.Random(0))
    assert d.replica == "http://e"


def test_the_memory_default_spans_minutes() -> None:
    assert MEMORY_S >= 60.0
