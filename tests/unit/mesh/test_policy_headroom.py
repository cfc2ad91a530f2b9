"""KV headroom in the kvmesh policy: fit, prefer the most headroom, hold, bounded hold."""

from __future__ import annotations

import random

import pytest

from mesh.policies import ReplicaView, Request, View, make_policy
from mesh.policies.base import LengthGuess, PolicyError
from mesh.policies.headroom import (
    fitting,
    headroom,
    kv_demand,
    occupancy,
    reported,
    request_footprint,
    slack,
)

KV = {"kv_tokens": 1000.0, "kv_fill": 1.0, "max_hold": 10.0, "hold_retry": 0.2}


def rep(name: str, inflight: int = 0, work: float = 0.0, running: float = 0.0,
        kv_usage: float = 0.0, waiting: float = 0.0, fresh: int = 0) -> ReplicaView:
    return ReplicaView(replica=name, region="us", inflight=inflight, work=work,
                       running=running, kv_usage=kv_usage, waiting=waiting, fresh=fresh)


def view(*reps: ReplicaView) -> View:
    return View("us", reps, mean_prompt_tokens=50.0, mean_output_tokens=200.0)


def ask(tokens: int = 100, out: float | None = 100.0, arrival: float = 0.0) -> Request:
    guess = None if out is None else LengthGuess(out, 1)
    return Request("r", list(range(tokens)), [], 16, arrival=arrival, predicted=guess)


def test_demand_is_predicted_outputs_plus_prompts_in_flight() -> None:
    v = view()
    assert kv_demand(rep("a", inflight=3, work=500.0), v) == 500.0 + 3 * 50.0
    # Long replies in flight count at most the mean output each.
    assert kv_demand(rep("a", inflight=3, work=900.0), v) == 3 * 200.0 + 3 * 50.0
    # No prediction in the ledger: the mean output per request in flight.
    assert kv_demand(rep("a", inflight=2), v) == 2 * 200.0 + 2 * 50.0
    assert request_footprint(ask(100, 150.0), v) == 250.0
    # Growth past the mean output (200) is not counted against what is in flight now.
    assert request_footprint(ask(100, 900.0), v) == 300.0
    assert request_footprint(ask(100, None), v) == 300.0
    assert headroom(ask(100, 100.0), rep("a", 1, 150.0), v, 1000.0) == 1000 - 200 - 200


def test_only_replicas_with_room_fit() -> None:
    v = view(rep("a", 4, 700.0), rep("b", 1, 100.0))
    # a: 700 + 200 + 200 > 1000; b: 100 + 50 + 200 fits.
    assert fitting(ask(), list(v.replicas), v, 1000.0, 1.0) == [1]
    assert fitting(ask(), list(v.replicas), v, 1000.0, 1.2) == [0, 1]


def test_the_replica_with_the_most_predicted_headroom_wins() -> None:
    pol = make_policy("kvmesh", {**KV, "objective": "e2e"})
    v = view(rep("a", 2, 300.0), rep("b", 3, 90.0), rep("c", 1, 150.0))
    # Headroom after the request: a 1000-400-200, b 1000-240-200, c 1000-200-200; c's
    # one running request makes it no slower than b's three (the e2e cost prefers it too).
    d = pol.decide(ask(), v, 0.0, random.Random(0))
    assert d.replica == "c" and not d.wait and "kv_fit=3/3" in d.reason
    v = view(rep("a", 2, 300.0), rep("b", 1, 150.0), rep("c", 3, 90.0))
    assert pol.decide(ask(), v, 0.0, random.Random(0)).replica == "b"


def test_held_at_the_router_when_nothing_fits_then_released_when_the_hold_is_up() -> None:
    pol = make_policy("kvmesh", KV)
    v = view(rep("a", 5, 800.0), rep("b", 6, 900.0))
    d = pol.decide(ask(arrival=1.0), v, 3.0, random.Random(0))
    assert d.wait and d.replica is None and "hold" in d.reason
    assert d.retry_after == 0.2
    # Near the bound the retry comes no later than the bound.
    assert pol.decide(ask(arrival=1.0), v, 10.9, random.Random(0)).retry_after \
        <= 0.1 + 1e-9
    late = pol.decide(ask(arrival=1.0), v, 11.0, random.Random(0))
    assert not late.wait and late.replica in {"a", "b"} and "kv_fit=0/2" in late.reason


def test_an_idle_replica_takes_a_request_larger_than_the_fill() -> None:
    pol = make_policy("kvmesh", KV)
    v = view(rep("a"), rep("b", 1, 100.0))
    # 1,500 tokens fit nowhere, but "a" has nothing in flight: it goes there, unheld.
    d = pol.decide(ask(900, 600.0), v, 0.0, random.Random(0))
    assert not d.wait and d.replica == "a"
    busy = view(rep("a", running=1.0), rep("b", 1, 100.0))
    assert pol.decide(ask(900, 600.0), busy, 0.0, random.Random(0)).wait


def test_without_kv_tokens_the_decisions_are_unchanged() -> None:
    v = view(rep("a", 5, 800.0), rep("b", 6, 900.0), rep("c", 1, 50.0))
    off = make_policy("kvmesh", {"objective": "e2e"})
    plain = make_policy("kvmesh", {"objective": "e2e", "kv_tokens": 0.0})
    for seed in range(20):
        a = off.decide(ask(), v, 0.0, random.Random(seed))
        b = plain.decide(ask(), v, 0.0, random.Random(seed))
        assert (a.replica, a.reason) == (b.replica, b.reason) and not a.wait


def test_each_sequence_holds_half_a_block_of_empty_slots_on_average() -> None:
    # A sequence of n tokens holds ceil(n / 16) blocks: over n mod 16 = 0..15 the empty
    # slots of its last block are 0, 15, 14, ..., 1, which average 7.5.
    waste = [-(-n // 16) * 16 - n for n in range(1000, 1016)]
    assert slack(16) == sum(waste) / len(waste) == 7.5
    assert slack(1) == 0.0
    v = view()
    assert kv_demand(rep("a", inflight=3, work=500.0), v, 16) == 500.0 + 3 * (50.0 + 7.5)
    assert request_footprint(ask(100, 150.0), v, 16) == 250.0 + 7.5
    assert headroom(ask(100, 100.0), rep("a", 1, 150.0), v, 1000.0, 16) \
        == 1000 - (200 + 7.5) - (200 + 7.5)
    # Without the engines' block size (1: token-granular) the model is as before.
    assert kv_demand(rep("a", inflight=3, work=500.0), v) == 500.0 + 3 * 50.0


def test_a_request_that_fits_only_token_by_token_is_held_for_its_blocks() -> None:
    # a: 600 predicted output + 4 x 50 prompt = 800; the request: 100 + 100 = 200. Exactly
    # the 1,000 tokens of KV counted token by token, 837.5 + 207.5 in 16-token blocks.
    v = view(rep("a", 4, 600.0))
    assert fitting(ask(), list(v.replicas), v, 1000.0, 1.0) == [0]
    assert fitting(ask(), list(v.replicas), v, 1000.0, 1.0, 16) == []
    tokenwise = make_policy("kvmesh", {**KV, "kv_block": 1})
    assert tokenwise.decide(ask(), v, 0.0, random.Random(0)).replica == "a"
    blocks = make_policy("kvmesh", KV)  # vLLM's default 16-token blocks
    assert blocks.decide(ask(), v, 0.0, random.Random(0)).wait


def test_a_block_size_below_one_token_is_refused() -> None:
    with pytest.raises(PolicyError, match="kv_block"):
        make_policy("kvmesh", {**KV, "kv_block": 0})


def test_the_engines_report_is_a_floor_under_the_ledgers_prediction() -> None:
    v = view()
    # 3 in flight: the ledger predicts 300 + 3 x 50 = 450 tokens.
    quiet = rep("a", 3, 300.0, running=3.0, kv_usage=0.2)
    assert reported(quiet, v, 1000.0) == 200.0
    assert occupancy(quiet, v, 1000.0) == kv_demand(quiet, v) == 450.0
    # Its sequences outgrew their predictions (or other routers' requests run there): the
    # engine holds 700 tokens, and 2 more requests queued there claim a prompt each.
    grown = rep("a", 3, 300.0, running=3.0, kv_usage=0.7, waiting=1.0, fresh=1)
    assert reported(grown, v, 1000.0) == 700.0 + 2 * 50.0
    assert reported(grown, v, 1000.0, 16) == 700.0 + 2 * (50.0 + 7.5)
    assert occupancy(grown, v, 1000.0) == 800.0
    assert headroom(ask(), grown, v, 1000.0) == 1000.0 - 800.0 - 200.0
    assert fitting(ask(), [quiet, grown], v, 1000.0, 1.0) == [0, 1]
    assert fitting(ask(101), [quiet, grown], v, 1000.0, 1.0) == [0]


def test_a_replica_that_just_preempted_does_not_look_empty() -> None:
    # b preempted: its blocks are free (usage 0.3) but its 6 requests wait to recompute,
    # each claiming a prompt before anything sent now. The ledger sees no difference
    # between a and b (same predictions in flight); the engines' reports do.
    v = view(rep("a", 6, 600.0, running=6.0, kv_usage=0.7),
             rep("b", 6, 600.0, running=0.0, kv_usage=0.3, waiting=6.0))
    assert occupancy(v.replicas[0], v, 1000.0) == 900.0
    assert occupancy(v.replicas[1], v, 1000.0) == 900.0
    pol = make_policy("kvmesh", {**KV, "kv_tokens": 2000.0, "kv_block": 1})
    d = pol.decide(ask(), v, 0.0, random.Random(0))
    # Headroom: a 2000 - 1400 - 200 = 400, b 2000 - (600 + 300) - 200 = 900.
    assert d.replica == "b"
    full = view(rep("a", 6, 600.0, running=6.0, kv_usage=0.95),
                rep("b", 6, 600.0, running=2.0, kv_usage=0.6, waiting=10.0))
    # a: 1900 + 200 > 2000; b: 1200 + 10 x 50 + 200 = 1900 fits.
    assert pol.decide(ask(), full, 0.0, random.Random(0)).replica == "b"
    # On 1,500 tokens: a 1425 + 200, b 900 + 500 + 200: held, though the ledger's 900 + 200
    # would fit on both.
    assert make_policy("kvmesh", {**KV, "kv_tokens": 1500.0, "kv_block": 1}).decide(
        ask(), full, 0.0, random.Random(0)).wait
