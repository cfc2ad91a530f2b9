"""Service tiers: parsing, the per-tier queue (EDF, strict priority, promotion), shedding,
batch held for spare capacity, and the dispatcher driving them."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.dispatch import Ask, Dispatcher, Placement, Waiter
from mesh.policies import Request, make_policy
from mesh.tier_config import TierConfigError
from mesh.tier_config import parse as parse_config
from mesh.tiers import (
    BATCH,
    INTERACTIVE,
    RANK,
    STANDARD,
    TIERS,
    TierConfig,
    TierError,
    TierQueue,
    TierRules,
    forward_value,
    parse_forwarded,
    picker_priority,
    requested_tier,
)
from mesh.view import Dispatches, RegionRecord, ReplicaRecord, ViewBuilder


# -- parsing ----------------------------------------------------------------------------------
def test_each_source_names_a_tier() -> None:
    assert requested_tier({}, {"x-kvmesh-priority": " Batch "}) == BATCH
    assert requested_tier({"service_tier": "priority"}, {}) == INTERACTIVE
    assert requested_tier({"service_tier": "flex"}, {}) == BATCH
    assert requested_tier({"service_tier": "default"}, {}) == STANDARD
    assert requested_tier({"priority": -3}, {}) == INTERACTIVE
    assert requested_tier({"priority": 0}, {}) == STANDARD
    assert requested_tier({"priority": 7}, {}) == BATCH
    assert requested_tier({}, {}) is None
    # "auto" is no preference: the next source decides
    assert requested_tier({"service_tier": "auto", "priority": 5}, {}) == BATCH
    assert requested_tier({"service_tier": "auto"}, {}) is None
    # the header wins over the body
    assert requested_tier({"service_tier": "flex"}, {"x-kvmesh-priority": "interactive"}) \
        == INTERACTIVE


@pytest.mark.parametrize(("body", "headers", "param"), [
    ({"service_tier": "gold"}, {}, "service_tier"),
    ({"service_tier": 3}, {}, "service_tier"),
    ({"priority": "high"}, {}, "priority"),
    ({"priority": True}, {}, "priority"),
    ({"priority": 1.5}, {}, "priority"),
    ({}, {"x-kvmesh-priority": "urgent"}, "x-kvmesh-priority"),
    ({}, {"x-kvmesh-priority": ""}, "x-kvmesh-priority"),
])
def test_invalid_values_name_their_source(body: dict[str, object], headers: dict[str, str],
                                          param: str) -> None:
    with pytest.raises(TierError) as err:
        requested_tier(body, headers)
    assert err.value.param == param
    assert param.split("-")[-1] in err.value.message


def test_picker_priority_integers_and_names() -> None:
    assert picker_priority("5") == (5, INTERACTIVE)
    assert picker_priority("0") == (0, STANDARD)
    assert picker_priority("-2") == (-2, BATCH)
    assert picker_priority("batch") == (-1, BATCH)
    assert picker_priority("interactive") == (1, INTERACTIVE)
    with pytest.raises(TierError):
        picker_priority("soon")


def test_forward_value_round_trip() -> None:
    assert parse_forwarded(forward_value(BATCH, 130.5, 100.0), 10.0) == (BATCH, 40.5)
    assert parse_forwarded(forward_value(STANDARD, math.inf, 0.0), 5.0) == (STANDARD, math.inf)
    assert parse_forwarded("gold;1", 0.0) is None
    assert parse_forwarded("batch;soon", 0.0) is None
    assert parse_forwarded("batch;inf", 0.0) is None


def test_resolve_order_and_deadlines() -> None:
    c = TierConfig(default=BATCH, keys={"web": INTERACTIVE}, batch_deadline=100.0)
    assert c.resolve(STANDARD, "web") == STANDARD
    assert c.resolve(None, "web") == INTERACTIVE
    assert c.resolve(None, "other") == BATCH
    assert c.resolve(None) == BATCH
    assert c.deadline(BATCH, 5.0) == 105.0
    assert c.deadline(INTERACTIVE, 5.0) == 6.0
    assert c.promote_margin == 10.0


def test_config_section() -> None:
    c = parse_config({"default": "batch", "interactive": {"ttft": 0.5},
                      "standard": {"sheddable": True},
                      "batch": {"deadline": 600, "running_below": 8, "promote_before": 30},
                      "keys": {"jobs": "batch"}}, {"web": "interactive"})
    assert (c.default, c.interactive_ttft, c.batch_deadline) == (BATCH, 0.5, 600.0)
    assert c.sheddable == {STANDARD, BATCH}
    assert c.batch_running_below == 8 and c.promote_margin == 30
    assert c.keys == {"jobs": BATCH, "web": INTERACTIVE}
    assert parse_config(False).enabled is False
    for bad, key in [({"gold": {}}, "tiers.gold"), ({"default": "gold"}, "tiers.default"),
                     ({"batch": {"deadline": 0}}, "tiers.batch.deadline"),
                     ({"interactive": {"sheddable": True}}, "tiers.interactive.sheddable"),
                     ({"batch": {"kv_below": "x"}}, "tiers.batch.kv_below"),
                     ({"keys": {"k": "gold"}}, "tiers.keys.k")]:
        with pytest.raises(TierConfigError) as err:
            parse_config(bad)
        assert err.value.key == key


# -- the queue --------------------------------------------------------------------------------
@dataclass(eq=False)
class W:
    tier: str
    deadline: float
    name: str = ""
    cancelled: bool = False
    promoted: bool = False


def drain(q: TierQueue) -> list[W]:
    out = []
    while q.head() is not None:
        out.append(q.pop_head())
    return out


def test_strict_priority_then_earliest_deadline() -> None:
    q = TierQueue(promote_before=10.0)
    for w in [W(BATCH, 50, "b50"), W(STANDARD, 30, "s30"), W(INTERACTIVE, 40, "i40"),
              W(STANDARD, 20, "s20"), W(INTERACTIVE, 35, "i35"), W(BATCH, 45, "b45")]:
        q.push(w)
    assert [w.name for w in drain(q)] == ["i35", "i40", "s20", "s30", "b45", "b50"]
    assert len(q) == 0


def test_batch_near_its_deadline_is_promoted() -> None:
    q = TierQueue(promote_before=10.0)
    q.push(W(STANDARD, 100, "s100"))
    q.push(W(BATCH, 50, "b50"))
    q.push(W(BATCH, 80, "b80"))
    assert q.next_promotion() == 40
    assert q.promote(39.9) == 0
    assert q.promote(40.0) == 1
    assert [w.name for w in drain(q)] == ["b50", "s100", "b80"]


def test_cancelled_waiters_are_skipped() -> None:
    q = TierQueue()
    a, b = W(STANDARD, 1, "a"), W(STANDARD, 2, "b")
    q.push(a)
    q.push(b)
    a.cancelled = True
    assert [w.name for w in q] == ["b"]
    assert q.pop_head() is b
    assert len(q) == 0 and not q


def test_fcfs_ignores_tiers_and_deadlines() -> None:
    q = TierQueue(fcfs=True)
    for i, w in enumerate([W(BATCH, 5), W(INTERACTIVE, 1), W(STANDARD, 3)]):
        w.name = str(i)
        q.push(w)
    assert q.ahead_of(RANK[INTERACTIVE])
    assert [w.name for w in drain(q)] == ["0", "1", "2"]


waiter = st.builds(W, st.sampled_from(TIERS), st.floats(0, 1000, allow_nan=False))


@settings(max_examples=200, deadline=None)
@given(st.lists(waiter, max_size=40), st.floats(0, 1000, allow_nan=False),
       st.floats(0, 200, allow_nan=False), st.lists(st.booleans(), max_size=40))
def test_queue_order_property(ws: list[W], now: float, margin: float,
                              cancel: list[bool]) -> None:
    """Whatever goes in leaves once, live ones only, in (effective rank, deadline) order, and a
    batch waiter within ``margin`` of its deadline at ``now`` ranks with standard work."""
    q = TierQueue(promote_before=margin)
    for w in ws:
        q.push(w)
    for w, c in zip(ws, cancel, strict=False):
        w.cancelled = c
    q.promote(now)
    out = drain(q)
    live = [w for w in ws if not w.cancelled]
    assert sorted(map(id, out)) == sorted(map(id, live))

    def rank(w: W) -> int:
        if w.tier == BATCH and w.deadline - margin <= now:
            return RANK[STANDARD]
        return RANK[w.tier]

    keys = [(rank(w), w.deadline) for w in out]
    assert keys == sorted(keys)
    assert all(w.promoted == (w.tier == BATCH and w.deadline - margin <= now) for w in out)


# -- rules ------------------------------------------------------------------------------------
def test_risk_from_a_missed_ttft_and_from_a_long_queue() -> None:
    rules = TierRules(TierConfig(interactive_ttft=1.0, shed_window=2.0, queue_risk=0.5))
    q = TierQueue(promote_before=60.0)
    assert rules.at_risk(RANK[BATCH], 10.0, q) is None
    rules.observe_first_token(INTERACTIVE, 0.8, 10.0)  # met: no risk
    assert rules.at_risk(RANK[BATCH], 10.0, q) is None
    rules.observe_first_token(INTERACTIVE, 1.5, 10.0)  # missed
    assert rules.at_risk(RANK[BATCH], 11.0, q) == pytest.approx(1.0)
    assert rules.at_risk(RANK[INTERACTIVE], 11.0, q) is None  # nothing above interactive
    assert rules.at_risk(RANK[BATCH], 12.5, q) is None
    q.push(W(INTERACTIVE, 21.0))  # arrived at 20 with a 1 s target
    assert rules.at_risk(RANK[BATCH], 20.2, q) is None
    assert rules.at_risk(RANK[BATCH], 20.6, q) == 2.0
    rules.observe_first_token(BATCH, 1e6, 30.0)  # batch is judged on completion, not here
    assert rules.risk_until[RANK[BATCH]] == -math.inf


def test_spare_capacity() -> None:
    rules = TierRules(TierConfig(batch_kv_below=0.5, batch_running_below=4))
    assert rules.spare(0.0, 3.0, 0.4)
    assert not rules.spare(1.0, 0.0, 0.0)
    assert not rules.spare(0.0, 4.0, 0.1)
    assert not rules.spare(0.0, 0.0, 0.5)


# -- the dispatcher with tiers ----------------------------------------------------------------
@dataclass
class Load:
    """Two replicas here (us) and one in eu; their load set by the test."""

    running: dict[str, float] = field(default_factory=dict)
    kv: dict[str, float] = field(default_factory=dict)

    def records(self, now: float) -> Iterable[ReplicaRecord]:
        for r, region in (("a0", "us"), ("a1", "us"), ("e0", "eu")):
            yield ReplicaRecord(r, region, True, 0.0, self.running.get(r, 0.0),
                                self.kv.get(r, 0.0), 0.0, 0, None, (),
                                "eu-router" if region == "eu" else None)

    def regions(self, now: float) -> Mapping[str, RegionRecord]:
        return {"eu": RegionRecord("eu", 0.1, ("eu-router",))}


def tiered(load: Load, **cfg: object) -> Dispatcher:
    views = ViewBuilder("us", Dispatches(), load.records, load.regions)
    config = TierConfig(**{"batch_deadline": 100.0, "promote_before": 10.0,
                           "batch_running_below": 2, **cfg})  # type: ignore[arg-type]
    return Dispatcher(region="us", policy=make_policy("kvmesh", {}), views=views,
                      local={"a0", "a1"}.__contains__, rng=random.Random(1),
                      tiers=TierRules(config))


def request(i: int, tier: str, now: float, c: TierConfig | None = None) -> Request:
    c = c or TierConfig(batch_deadline=100.0)
    return Request(str(i), list(range(64)), [1, 2, 3, 4], 16, None, 8, now, None, tier=tier,
                   deadline=c.deadline(tier, now))


def test_batch_goes_to_spare_capacity_anywhere_and_waits_when_there_is_none() -> None:
    load = Load(running={"a0": 5, "a1": 5})
    core = tiered(load)
    got = core.submit(Ask(request(1, BATCH, 0.0)), 0.0)
    # the home region is busy: the batch request crosses to eu, where an interactive one
    # (the lowest expected TTFT is at home: 100 ms RTT away) would not go
    assert isinstance(got, Placement) and got.decision.replica == "e0"
    assert isinstance(core.submit(Ask(request(2, INTERACTIVE, 0.0)), 0.0), Placement)
    load.running["e0"] = 5
    held = core.submit(Ask(request(3, BATCH, 0.0)), 0.0)
    assert isinstance(held, Waiter) and held.first is not None and "held" in held.first.reason
    # an interactive request is not queued behind held batch work: it goes at once
    now_i = core.submit(Ask(request(4, INTERACTIVE, 1.0)), 1.0)
    assert isinstance(now_i, Placement) and now_i.target is not None
    assert core.pump(2.0) == []  # still no spare capacity
    load.running["a1"] = 0
    out = core.pump(3.0)
    assert [(w.ask.request.request_id, p.decision.replica) for w, p in out] == [("3", "a1")]


def test_held_batch_is_promoted_before_its_deadline() -> None:
    load = Load(running={"a0": 5, "a1": 5, "e0": 5})
    core = tiered(load)
    held = core.submit(Ask(request(1, BATCH, 0.0)), 0.0)
    assert isinstance(held, Waiter)
    assert core.pump(80.0) == []
    assert core.retry_at is not None and core.retry_at <= 90.0
    out = core.pump(90.0)  # deadline 100, promoted 10 s before: placed on a busy replica
    assert len(out) == 1 and out[0][1].target is not None and out[0][0].promoted


def test_sheddable_tier_is_shed_while_a_higher_tier_misses() -> None:
    core = tiered(Load())
    core.observe_first_token(request(1, INTERACTIVE, 0.0), 3.0)  # 3 s TTFT: a miss
    shed = core.submit(Ask(request(2, BATCH, 3.5)), 3.5)
    assert isinstance(shed, Placement) and shed.outcome == "shed" and shed.target is None
    assert shed.decision.retry_after == pytest.approx(1.5)
    # standard is not sheddable by default; a forwarded batch request is never shed here
    assert isinstance(core.submit(Ask(request(3, STANDARD, 3.5)), 3.5), Placement)
    fwd = core.submit(Ask(request(4, BATCH, 3.5), forwarded=True), 3.5)
    assert isinstance(fwd, Placement) and fwd.outcome != "shed"
    # a batch request already near its deadline is served, not shed
    late = request(5, BATCH, -95.0)
    assert core.submit(Ask(late), 3.5).outcome != "shed"  # type: ignore[union-attr]
    assert core.shed == 1
    ok = core.submit(Ask(request(6, BATCH, 5.5)), 5.5)
    assert isinstance(ok, Placement) and ok.outcome != "shed"


def test_offer_sheds_instead_of_queueing() -> None:
    load = Load(running={"a0": 5, "a1": 5, "e0": 5})
    core = tiered(load)
    p = core.offer(Ask(request(1, BATCH, 0.0)), 0.0)
    assert p.outcome == "shed" and "held" in p.decision.reason
    assert core.queued() == 0
    assert core.offer(Ask(request(2, INTERACTIVE, 0.0)), 0.0).target is not None


def test_tiers_off_is_one_fcfs_queue() -> None:
    load = Load(running={"a0": 5, "a1": 5, "e0": 5})
    views = ViewBuilder("us", Dispatches(), load.records, load.regions)
    core = Dispatcher(region="us", policy=make_policy("kvmesh", {}), views=views,
                      local={"a0", "a1"}.__contains__, rng=random.Random(1))
    p = core.submit(Ask(request(1, BATCH, 0.0)), 0.0)
    assert isinstance(p, Placement) and p.target is not None  # not held: tiers are off
    assert core.shed_check(Ask(request(2, BATCH, 0.0)), 0.0) is None


# -- the endpoint picker's side ---------------------------------------------------------------
def test_picker_reads_tier_names_and_integers_and_sheds_with_retry_after() -> None:
    from mesh.picker import Body, Headers, ImmediateReply, NeedPick, PickerStream, Refusal

    chat = {":path": "/v1/chat/completions", ":method": "POST"}

    def ask(value: str) -> NeedPick:
        s = PickerStream()
        s.feed(Headers("request", {**chat, "x-kvmesh-priority": value}, False, {}))
        [need] = s.feed(Body("request", b"{}", True))
        assert isinstance(need, NeedPick)
        return need

    assert (ask("batch").ask.tier, ask("batch").ask.sheddable) == (BATCH, True)
    assert (ask("interactive").ask.priority, ask("interactive").ask.sheddable) == (1, False)
    assert (ask("3").ask.tier, ask("0").ask.tier, ask("-1").ask.tier) == \
        (INTERACTIVE, STANDARD, BATCH)
    s = PickerStream()
    s.feed(Headers("request", chat, False, {}))
    s.feed(Body("request", b"{}", True))
    reply, _ = s.decided(Refusal(429, "shed", "shed", 2.2))
    assert isinstance(reply, ImmediateReply) and reply.status == 429
    assert ("retry-after", "3") in reply.headers
