"""The sans-I/O decision core: filters, pins, the FCFS queue, target choice, the ledger."""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import replace

from mesh.dispatch import Ask, Dispatcher, Placement, Waiter
from mesh.policies import Decision, Request, make_policy
from mesh.policies.base import LengthGuess, View
from mesh.view import Dispatches, RegionRecord, ReplicaRecord, ViewBuilder, region_key

OWN = ("a0", "a1")


class Sources:
    def __init__(self) -> None:
        self.waiting: dict[str, float] = {}
        self.models: dict[str, tuple[str, ...]] = {}
        self.regions_: dict[str, RegionRecord] = {"eu": RegionRecord("eu", 0.05, ("r1", "r2"))}

    def records(self, now: float) -> Iterable[ReplicaRecord]:
        for r in (*OWN, "e0"):
            yield ReplicaRecord(r, "eu" if r == "e0" else "us", True, self.waiting.get(r, 0.0),
                                1.0, 0.1, 0.0, 0, None, self.models.get(r, ()),
                                "eu-router" if r == "e0" else None)

    def regions(self, now: float) -> Mapping[str, RegionRecord]:
        return self.regions_


class Scripted:
    """A policy answering from a script, recording the views it was shown."""

    name = "scripted"

    def __init__(self, answers: list[Decision]) -> None:
        self.answers = answers
        self.views: list[View] = []

    def decide(self, request: Request, view: View, now: float, rng: random.Random) -> Decision:
        self.views.append(view)
        return self.answers.pop(0)


def core(policy: object, src: Sources | None = None, **kw: object) -> Dispatcher:
    src = src or Sources()
    views = ViewBuilder("us", Dispatches(), src.records, src.regions)
    return Dispatcher(region="us", policy=policy, views=views,  # type: ignore[arg-type]
                      local=OWN.__contains__, rng=random.Random(1), **kw)  # type: ignore[arg-type]


def req(i: int = 1, model: str | None = None, tokens: int = 64) -> Request:
    return Request(str(i), list(range(tokens)), [1, 2, 3, 4], 16, None, 8, 0.0, model)


def go(replica: str | None, region: str | None = "us", **kw: object) -> Decision:
    return Decision(replica, region, "r", "scripted", **kw)  # type: ignore[arg-type]


WAIT = Decision(None, None, "busy", "scripted", wait=True, retry_after=0.5)


def test_local_and_forwarded_targets() -> None:
    d = core(Scripted([go("a1"), go("e0", "eu"), go(None, "eu")]))
    local = d.submit(Ask(req()), 0.0)
    assert isinstance(local, Placement) and local.outcome == "local"
    assert local.target is not None and local.target.url == "a1" and local.target.local
    remote = d.submit(Ask(req()), 0.0)
    assert isinstance(remote, Placement) and remote.outcome == "remote"
    assert remote.target is not None and remote.target.url == "eu-router"  # the owner
    region = d.submit(Ask(req()), 0.0)
    assert isinstance(region, Placement) and region.outcome == "region"
    assert region.target is not None and region.target.url in {"r1", "r2"}
    assert region.target.ledger_key == region_key("eu")


def test_forwarded_requests_see_only_own_engines_and_never_hop_again() -> None:
    pol = Scripted([go("e0", "eu")])
    d = core(pol)
    p = d.submit(Ask(req(), forwarded=True), 0.0)
    assert isinstance(p, Placement) and p.target is None and p.outcome == "none"
    assert {r.replica for r in pol.views[0].healthy()} == set(OWN)


def test_pinned_skips_the_policy_only_when_ours_and_healthy() -> None:
    pol = Scripted([go("a0")])
    d = core(pol, healthy=lambda r: r != "a1")
    p = d.submit(Ask(req(), forwarded=True, pinned="a0", origin="eu-lb0"), 0.0)
    assert isinstance(p, Placement) and p.outcome == "pinned" and "eu-lb0" in p.decision.reason
    assert pol.views == []
    p = d.submit(Ask(req(), forwarded=True, pinned="a1"), 0.0)  # down: the policy picks
    assert isinstance(p, Placement) and p.outcome == "local" and len(pol.views) == 1


class Rechecking(Scripted):
    """A scripted policy that asks to re-decide pinned forwards (as the kvmesh one does)."""

    rechecks_pins = True


def test_a_rechecking_policy_redecides_a_pin_among_own_engines() -> None:
    pol = Rechecking([go("a1")])
    d = core(pol)
    p = d.submit(Ask(req(), forwarded=True, pinned="a0", origin="eu-lb0"), 0.0)
    assert isinstance(p, Placement) and p.outcome == "local"
    assert p.target is not None and p.target.replica == "a1" and p.target.local
    assert "named a0" in p.decision.reason
    # It decided on this router's own engines only (a forward never travels again).
    assert {r.replica for r in pol.views[0].healthy()} == set(OWN)
    assert d.dispatches.total() == 0  # the shell starts the ticket, as for any placement


def test_a_recheck_that_agrees_would_wait_or_leave_keeps_the_pin() -> None:
    for answer in (go("a0"), WAIT, go(None, None), go("e0", "eu")):
        pol = Rechecking([answer])
        d = core(pol)
        p = d.submit(Ask(req(), forwarded=True, pinned="a0", origin="eu-lb0"), 0.0)
        assert isinstance(p, Placement) and p.outcome == "pinned", answer
        assert p.target is not None and p.target.replica == "a0"
        assert p.decision.reason == "pinned by eu-lb0"
        assert len(pol.views) == 1 and d.queued() == 0


def test_a_recheck_is_only_for_first_attempts_at_a_healthy_own_engine() -> None:
    pol = Rechecking([go("a0")])
    d = core(pol, healthy=lambda r: r != "a1")
    # Down: the policy picks as for any forward (one decision, no pin to fall back to).
    p = d.submit(Ask(req(), forwarded=True, pinned="a1"), 0.0)
    assert isinstance(p, Placement) and p.outcome == "local" and len(pol.views) == 1
    assert "named" not in p.decision.reason


def test_exclusions_and_model_filter_reach_the_policy() -> None:
    src = Sources()
    src.models = {"a0": ("m1",), "a1": ("m2",)}
    pol = Scripted([go("a1")])
    d = core(pol, src)
    d.submit(Ask(req(model="m2"), excluded_regions=frozenset({"eu"}), attempt=2), 0.0)
    view = pol.views[0]
    assert {r.replica for r in view.replicas} == {"a1", "e0"}
    assert [r.replica for r in view.healthy()] == ["a1"]
    assert d.mean_prompt_tokens == 256.0  # a retry does not move the prompt average


def test_fcfs_queue_waits_then_releases_in_order() -> None:
    pol = Scripted([WAIT, WAIT, go("a0"), go("a1")])
    d = core(pol)
    first = d.submit(Ask(req(1)), 0.0)
    assert isinstance(first, Waiter) and first.first is WAIT and d.retry_at == 0.5
    second = d.submit(Ask(req(2)), 0.1)
    assert isinstance(second, Waiter) and second.first is None  # behind: not decided
    assert d.pump(0.2) == [] and d.retry_at == 0.7
    out = d.pump(0.7)
    assert [w for w, _ in out] == [first, second] and d.retry_at is None
    assert [p.target.url for _, p in out if p.target] == ["a0", "a1"]
    assert d.decisions == 4 and d.waits == 2


def test_requests_released_together_see_each_other_in_the_ledger() -> None:
    """The shells start a pump's placements after it returns: until then the core holds
    them in the ledger, so the second decision of one pump sees the first."""
    pol = Scripted([WAIT, go("a0"), go("a0"), go("a1")])
    pol.sees_released = True  # type: ignore[attr-defined]
    d = core(pol)
    guess = LengthGuess(300.0, 2)
    for i in (1, 2, 3):
        d.submit(Ask(replace(req(i), predicted=guess)), 0.0)
    out = d.pump(1.0)
    assert len(out) == 3
    a0 = [next(r for r in v.replicas if r.replica == "a0") for v in pol.views[1:]]
    assert [(r.inflight, r.work) for r in a0] == [(0, 0.0), (1, 300.0), (2, 600.0)]
    # Nothing is left behind: the shell's own start is the only one that counts.
    assert d.dispatches.total() == 0 and d.dispatches.work == {}
    # Other policies decide a pass on one view.
    plain = Scripted([WAIT, go("a0"), go("a0")])
    d = core(plain)
    for i in (1, 2):
        d.submit(Ask(req(i)), 0.0)
    assert len(d.pump(1.0)) == 2
    assert [next(r for r in v.replicas if r.replica == "a0").inflight
            for v in plain.views[1:]] == [0, 0]


def test_queue_full_and_cancelled_waiters() -> None:
    d = core(Scripted([WAIT, go("a0")]), max_queue=1)
    w = d.submit(Ask(req(1)), 0.0)
    assert isinstance(w, Waiter)
    full = d.submit(Ask(req(2)), 0.0)
    assert isinstance(full, Placement) and full.target is None
    assert full.decision.reason == "router queue full"
    d.cancel(w)
    assert d.pump(1.0) == [] and d.queued() == 0


def test_a_failing_policy_does_not_stop_the_queue() -> None:
    class Flaky(Scripted):
        def decide(self, request: Request, view: View, now: float,
                   rng: random.Random) -> Decision:
            if request.request_id == "1" and now > 0:
                raise RuntimeError("boom")
            return super().decide(request, view, now, rng)

    d = core(Flaky([WAIT, go("a0")]))
    w1 = d.submit(Ask(req(1)), 0.0)
    w2 = d.submit(Ask(req(2)), 0.0)
    out = d.pump(1.0)
    assert [w for w, _ in out] == [w1, w2]
    assert out[0][1].target is None and "RuntimeError" in out[0][1].decision.reason
    assert out[1][1].target is not None


def test_prompt_average_and_ledger() -> None:
    d = core(Scripted([go("a0", matched_blocks=2), go("e0", "eu")]))
    p = d.submit(Ask(req(tokens=64)), 0.0)
    assert isinstance(p, Placement) and p.target is not None
    assert d.mean_prompt_tokens == 256.0 + 0.05 * ((64 - 32) - 256.0)
    t = d.start(p.target, 64, 0.0)
    f = d.submit(Ask(req()), 0.0)
    assert isinstance(f, Placement) and f.target is not None
    ft = d.start(f.target, 64, 0.0)
    assert t.publish and not ft.publish  # the remote router publishes its forwards
    assert d.dispatches.counts(published_only=True) == {"a0": 1}
    d.done(t)
    d.done(ft)
    assert d.dispatches.total() == 0


def test_real_policies_run_on_the_core() -> None:
    for name in ("kvmesh", "skylb", "round_robin"):
        d = core(make_policy(name, {}))
        p = d.submit(Ask(req()), 0.0)
        assert isinstance(p, Placement) and p.target is not None, name


def test_predicted_lengths_are_learned_from_completions_and_reach_the_view() -> None:
    policy = Scripted([go("a0"), go("a0")])
    c = core(policy)
    first = c.annotate(Request("1", list(range(64)), [], 16, "u1", 0, 0.0, None, app="chat"))
    assert first.predicted is not None and first.predicted.tokens == 256.0  # the prior
    assert c.annotate(first) is first  # an existing guess is kept
    got = c.submit(Ask(first), 0.0)
    assert isinstance(got, Placement) and got.target is not None
    ticket = c.start(got.target, first.num_tokens, 0.0, first.predicted.tokens)
    view = c.view(0.1)
    assert next(r for r in view.replicas if r.replica == "a0").work == 256.0
    c.done(ticket)
    c.completed(first, 40)
    assert next(r for r in c.view(0.2).replicas if r.replica == "a0").work == 0.0
    assert c.mean_output_tokens < 256.0 and c.view(0.2).mean_output_tokens == c.mean_output_tokens
    for i in range(30):
        c.completed(c.annotate(Request(str(i), list(range(64)), [], 16, "u1", 0, 0.0, None,
                                       app="chat")), 40)
    again = c.annotate(Request("x", list(range(64)), [], 16, "u2", 0, 0.0, None, app="chat"))
    assert again.predicted is not None and again.predicted.bucket == 0
    assert abs(again.predicted.tokens - 40) < 20
    stats = c.lengths.stats()
    assert stats["observed"] == 31


def test_with_predicted_is_replace_for_every_field() -> None:
    """The hand-written copy keeps every field of ``Request`` (a new field fails here)."""
    from dataclasses import fields

    from mesh.dispatch import with_predicted

    req = Request("r9", [1, 2, 3], [7, 8], 32, "sess", 99, 12.5, "m", "app", None, "e2e",
                  "batch", 40.0)
    assert all(getattr(req, f.name) != f.default for f in fields(Request)
               if f.name != "predicted"), "every field set away from its default"
    guess = LengthGuess(12.0, 3, 2, 10.0)
    assert with_predicted(req, guess) == replace(req, predicted=guess)


def test_an_arrival_is_the_annotated_request_built_once() -> None:
    d = core(Scripted([]))
    for i in range(40):  # a predictor that has learned something, in several keys
        d.completed(d.annotate(Request(str(i), list(range(10 + i)), [], 16,
                                       "s1" if i % 2 else None, 64, 0.0, "m",
                                       app="chat" if i % 3 else None)), 20 + i)
    for session, app, model, max_tokens in [("s1", None, "m", 64), (None, "chat", "m", 0),
                                            (None, None, None, 8), ("s2", "x", "m", 5)]:
        made = d.arrival("r", list(range(33)), [7, 8], 16, session, max_tokens, 1.5, model,
                         app, "batch", 9.0)
        assert made == d.annotate(Request("r", list(range(33)), [7, 8], 16, session,
                                          max_tokens, 1.5, model, app=app, tier="batch",
                                          deadline=9.0))
        assert made.predicted is not None
