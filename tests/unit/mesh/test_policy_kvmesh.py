"""The default policy: expected TTFT, stale-load discount, own dispatches, near-tie spread."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.policies import PolicyError, RegionView, ReplicaView, Request, View, make_policy
from mesh.policies.base import LengthGuess
from mesh.policies.ttft import ExpectedTtft, TtftParams, _costs, expected_ttft


class Index:
    def __init__(self, held: Mapping[str, int]) -> None:
        self.held = held

    def match(self, keys: Sequence[int]) -> Mapping[str, int]:
        return {r: min(n, len(keys)) for r, n in self.held.items()}


REGIONS = {"us": RegionView("us"), "eu": RegionView("eu", rtt=0.09),
           "asia": RegionView("asia", rtt=0.2)}
REQ = Request("r", token_ids=list(range(2048)), keys=list(range(128)), block_size=16)
PARAMS = {"prefill_rate": 4000.0}


def rep(name: str, region: str = "us", **kw: object) -> ReplicaView:
    return ReplicaView(replica=f"http://{name}", region=region, **kw)  # type: ignore[arg-type]


def test_cached_prefix_wins_and_the_cost_parts_add_up() -> None:
    v = View("us", (rep("a"), rep("b")), REGIONS, prefix=Index({"http://b": 120}))
    d = make_policy("kvmesh", PARAMS).decide(REQ, v, 0.0, random.Random(0))
    assert d.replica == "http://b" and d.matched_blocks == 120
    best = d.candidates[0]
    parts = dict(best.parts)
    assert abs(parts["prefill"] - (2048 - 120 * 16) / 4000.0) < 1e-12
    assert abs(best.cost - (parts["rtt"] + parts["queue"] + parts["prefill"] + parts["decode"])) \
        < 1e-12
    assert d.reason.startswith("kvmesh ttft=") and "prefix=120/128" in d.reason


def test_remote_cache_is_used_when_it_beats_the_round_trip() -> None:
    reps = (rep("a"), rep("e", "eu"), rep("s", "asia"))
    v = View("us", reps, REGIONS, prefix=Index({"http://e": 128, "http://s": 128}))
    # Local cold prefill: 0.51 s; eu: 0.09 s + 1 token -> eu (asia is farther).
    assert make_policy("kvmesh", PARAMS).decide(REQ, v, 0.0, random.Random(0)).replica == "http://e"
    short = Request("s", token_ids=list(range(200)), keys=list(range(12)), block_size=16)
    # 200 cold tokens at home (0.05 s) beat a 0.09 s round trip.
    assert make_policy("kvmesh", PARAMS).decide(short, v, 0.0, random.Random(0)).replica == \
        "http://a"


def test_saturated_home_region_pushes_work_abroad() -> None:
    reps = (rep("a", waiting=30, running=40), rep("b", waiting=25, running=40), rep("e", "eu"))
    v = View("us", reps, REGIONS, mean_prompt_tokens=500)
    d = make_policy("kvmesh", PARAMS).decide(REQ, v, 0.0, random.Random(0))
    assert d.replica == "http://e"
    assert dict(d.candidates[0].parts)["rtt"] == 0.09


def test_own_dispatches_count_at_once() -> None:
    policy = ExpectedTtft(PARAMS)
    reps = [rep(n) for n in "abcd"]
    rng = random.Random(7)
    picks = []
    for _ in range(8):
        d = policy.decide(REQ, View("us", tuple(reps), REGIONS), 0.0, rng)
        picks.append(d.replica)
        reps = [r._replace(fresh=r.fresh + 1) if r.replica == d.replica else r for r in reps]
    assert Counter(picks) == {f"http://{n}": 2 for n in "abcd"}


def test_herd_many_routers_sharing_one_stale_view_spread_their_choices() -> None:
    # One replica looked idle 10 s ago, the others had a short queue. Thirty-two routers
    # share that view and decide at the same moment.
    reps = tuple(
        rep(f"r{i}", waiting=0.0 if i == 0 else 2.0, load_age=10.0) for i in range(8)
    )
    stale = View("us", reps, REGIONS)
    picks = Counter(
        ExpectedTtft(PARAMS).decide(REQ, stale, 0.0, random.Random(seed)).replica
        for seed in range(32)
    )
    assert len(picks) >= 4
    assert max(picks.values()) <= 16
    # The same figures measured just now are trusted: everybody takes the idle replica.
    fresh = View("us", tuple(r._replace(load_age=0.0) for r in reps), REGIONS)
    fresh_picks = Counter(
        ExpectedTtft(PARAMS).decide(REQ, fresh, 0.0, random.Random(seed)).replica
        for seed in range(32)
    )
    assert fresh_picks == {"http://r0": 32}


def test_gossiped_inflight_from_other_routers_counts_as_queue() -> None:
    reps = (rep("a", inflight=6), rep("b"))
    d = make_policy("kvmesh", PARAMS).decide(REQ, View("us", reps, REGIONS), 0.0,
                                             random.Random(0))
    assert d.replica == "http://b"


_finite = st.floats(min_value=0.0, max_value=1e4, allow_nan=False)


@given(
    st.lists(st.tuples(st.sampled_from(["us", "eu", "asia"]), _finite, _finite,
                       st.floats(min_value=0.0, max_value=1.0), st.one_of(_finite, st.just(
                           math.inf)), st.integers(0, 50), st.integers(0, 5),
                       st.one_of(st.none(), st.floats(min_value=1.0, max_value=1e5)),
                       st.integers(0, 200), st.one_of(st.just(0.0), _finite),
                       st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=4000.0))),
             min_size=1, max_size=12),
    st.integers(0, 3000), st.floats(min_value=1.0, max_value=5000.0),
    st.sampled_from([0.0, 2.0]),
    st.sampled_from([None, "ttft", "e2e", "bogus"]),
    st.one_of(st.none(), st.floats(min_value=0.0, max_value=8192.0)),
    st.floats(min_value=1.0, max_value=4096.0),
    st.sampled_from([(0.9, 0.99), (0.5, 0.95), (0.99, 0.99), (1.0, 0.99)]),
)
def test_batch_costs_are_exactly_the_explained_costs(
    rows: list[tuple[str, float, float, float, float, int, int, float | None, int, float,
                     float]],
    n_tokens: int, mean_prompt: float, half_life: float, objective: str | None,
    predicted: float | None, mean_output: float, knee_cap: tuple[float, float],
) -> None:
    """The decision's one-pass cost loop and ``expected_ttft`` give the same floats, so the
    fast path changes no decision (either objective, with or without a prediction)."""
    reps = tuple(
        rep(f"r{i}", region, waiting=w, running=run, kv_usage=kv, load_age=age, inflight=inf,
            fresh=fresh, prefill_rate=rate, work=work, prefill_knee=knee)
        for i, (region, w, run, kv, age, inf, fresh, rate, _, work, knee) in enumerate(rows))
    held = {f"http://r{i}": row[8] for i, row in enumerate(rows)}
    view = View("us", reps, REGIONS, prefix=Index(held), mean_prompt_tokens=mean_prompt,
                mean_output_tokens=mean_output)
    guess = None if predicted is None else LengthGuess(predicted, 0)
    req = Request("q", token_ids=list(range(n_tokens)), keys=list(range(n_tokens // 16)),
                  block_size=16, objective=objective, predicted=guess)
    p = TtftParams(load_half_life=half_life, kv_knee=knee_cap[0], kv_cap=knee_cap[1],
                   decode_step=0.07, batch_weight=0.004)
    matches = view.prefix.match(req.keys)
    fast = _costs(req, reps, view, matches, p)
    slow = [expected_ttft(req, r, view, matches.get(r.replica, 0), p).cost for r in reps]
    assert fast == slow


P_L4 = {"prefill_rate": 1700.0, "decode_step": 0.07, "batch_weight": 0.004}


def test_a_kv_full_engine_queues_at_decode_speed() -> None:
    # Both engines show two waiting requests; one has a full KV cache, so they wait for its
    # decodes to finish (400 tokens * 70 ms / 20 running per completion), not for prefills.
    full = rep("full", waiting=2, running=20, kv_usage=0.99)
    free = rep("free", waiting=2, running=20, kv_usage=0.5)
    view = View("us", (full, free), REGIONS, mean_prompt_tokens=300, mean_output_tokens=400)
    short = Request("s", token_ids=list(range(100)), keys=[], block_size=16)
    p = TtftParams(**P_L4)  # type: ignore[arg-type]
    costs = {s.replica: dict(s.parts)
             for s in (expected_ttft(short, r, view, 0, p) for r in (full, free))}
    step = 0.07 * (1 + 0.004 * 20)
    assert costs["http://full"]["queue"] == 3 * 400 * step / 20
    assert costs["http://free"]["queue"] == 2 * 300 / 1700.0
    d = make_policy("kvmesh", P_L4).decide(short, view, 0.0, random.Random(0))
    assert d.replica == "http://free"


def test_below_the_knee_the_queue_is_priced_at_prefill_speed() -> None:
    r = rep("a", waiting=2, running=20, kv_usage=0.85)
    view = View("us", (r,), REGIONS, mean_prompt_tokens=300, mean_output_tokens=400)
    s = expected_ttft(REQ, r, view, 0, TtftParams(**P_L4))  # type: ignore[arg-type]
    assert dict(s.parts)["queue"] == 2 * 300 / 1700.0


def test_end_to_end_objective_adds_the_predicted_decode_and_the_mixing_penalty() -> None:
    busy = rep("busy", running=30, work=30 * 700.0)
    calm = rep("calm", running=30, work=30 * 20.0)
    view = View("us", (busy, calm), REGIONS, mean_output_tokens=200)
    long = Request("l", token_ids=list(range(400)), keys=[], block_size=16,
                   predicted=LengthGuess(600.0, 3), objective="e2e")
    p = TtftParams(**P_L4)  # type: ignore[arg-type]
    b = dict(expected_ttft(long, busy, view, 0, p).parts)
    c = dict(expected_ttft(long, calm, view, 0, p).parts)
    # Overlap: min(30 * 600, work); each shared step is 0.07 * 0.004 s slower for both sides.
    assert abs(b["gen"] - (600 * 0.07 + 30 * 600 * 0.07 * 0.004)) < 1e-9
    assert abs(c["gen"] - (600 * 0.07 + 600 * 0.07 * 0.004)) < 1e-9
    assert abs(c["mixing"] - 0.5 * (30 * 400 / 1700.0 + 600 * 0.07 * 0.004)) < 1e-9
    d = make_policy("kvmesh", P_L4).decide(long, view, 0.0, random.Random(0))
    assert d.replica == "http://calm" and d.reason.startswith("kvmesh e2e=")
    # The TTFT objective does not see decode work: the two replicas tie.
    ttft = replace(long, objective="ttft")
    assert {make_policy("kvmesh", P_L4).decide(ttft, view, 0.0, random.Random(s)).replica
            for s in range(16)} == {"http://busy", "http://calm"}
    # The policy's default objective applies when the request names none.
    none = replace(long, objective=None)
    e2e_policy = make_policy("kvmesh", {**P_L4, "objective": "e2e"})
    assert e2e_policy.decide(none, view, 0.0, random.Random(0)).reason.startswith("kvmesh e2e=")


def test_an_unknown_objective_parameter_is_an_error_naming_the_key() -> None:
    try:
        make_policy("kvmesh", {"objective": "fastest"})
    except PolicyError as exc:
        assert "policy.objective" in str(exc)
    else:
        raise AssertionError("accepted an unknown objective")


def test_a_learned_knee_prices_a_short_prefill_at_the_floor() -> None:
    """Below the knee a prefill costs the engine's minimum step (in the overhead), not
    tokens / rate; past it, only the tokens beyond the knee are priced."""
    short = Request("s", token_ids=list(range(100)), keys=[], block_size=16)
    long = Request("l", token_ids=list(range(1100)), keys=[], block_size=16)
    v = View("us", (rep("a", prefill_rate=2500.0, prefill_knee=120.0),), REGIONS)
    p = TtftParams()
    assert expected_ttft(short, v.replicas[0], v, 0, p).cost == 0.0
    assert expected_ttft(long, v.replicas[0], v, 0, p).cost == pytest.approx(980 / 2500)


def test_a_prefill_below_the_knee_is_predicted_at_the_overhead_not_zero() -> None:
    """The ranking prices a short prefill at 0 (the floor is in the overhead); the TTFT the
    decision predicts, which its answer reports and the error metrics judge, adds the
    replica's learned overhead. The choice itself is unchanged."""
    from mesh.ttft_error import prediction_of

    short = Request("s", token_ids=list(range(100)), keys=[], block_size=16)
    v = View("us", (rep("a", prefill_rate=2500.0, prefill_knee=120.0, overhead=0.031),),
             REGIONS)
    d = ExpectedTtft({}).decide(short, v, 0.0, random.Random(0))
    assert d.reason.startswith("kvmesh ttft=0.0ms")
    predicted = prediction_of(d, "us")
    assert predicted is not None
    assert predicted.cost == pytest.approx(0.031) and predicted.part("overhead") == 0.031


def test_rechecking_pinned_forwards_is_opt_in() -> None:
    assert ExpectedTtft(PARAMS).rechecks_pins is False
    assert ExpectedTtft({**PARAMS, "recheck_pins": True}).rechecks_pins is True


def test_candidates_are_explained_when_first_read_and_equal_an_eager_decision(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The kvmesh decision explains its candidates lazily (``Explained``), once, with the
    values an eager explanation gives; it compares, hashes and pickles as a ``Decision``."""
    import dataclasses
    import pickle

    from mesh.policies import ttft
    from mesh.policies.base import Decision, Explained

    calls = []
    real = ttft.expected_ttft

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ttft, "expected_ttft", counted)
    pol = make_policy("kvmesh")
    assert isinstance(pol, ExpectedTtft)
    v = View("us", tuple(ReplicaView(f"r{i}", "us", True, float(i), 1.0, 0.2, 0.1)
                         for i in range(6)))
    d = pol.decide(Request("q", list(range(64)), []), v, 0.0, random.Random(1))
    assert isinstance(d, Explained) and calls == []
    first = d.candidates
    assert len(first) == 4 and len(calls) == 4 and d.candidates is first
    assert first[0].replica == d.replica
    eager = [real(Request("q", list(range(64)), []), r, v, 0, pol.params) for r in v.replicas]
    best = sorted(eager, key=lambda s: s.cost)[:4]
    assert {c.replica: c.cost for c in first} == {s.replica: s.cost for s in best}
    # Each candidate: the cost taken apart, then the learned step's parts after it.
    for c in first:
        e = next(s for s in best if s.replica == c.replica)
        assert c.parts[:len(e.parts)] == e.parts
    plain = Decision(**{f.name: getattr(d, f.name) for f in dataclasses.fields(Decision)})
    assert d == plain and plain == d and hash(d) == hash(plain)
    assert pickle.loads(pickle.dumps(d)) == plain
