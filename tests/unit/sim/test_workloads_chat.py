"""Chat workloads: seeded, shaped as specified, sharing prefixes within a user."""

from __future__ import annotations

import itertools
import statistics

from sim.workloads import ARENA, WILDCHAT, chat_workload
from sim.workloads.base import SimRequest, Workload


def _drive(w: Workload, turns_per_client: int, reply_delay: float = 1.0) -> list[SimRequest]:
    """Complete every request ``reply_delay`` after it is sent; collect what the clients send."""
    out: list[SimRequest] = []
    for client in w.clients:
        pending = client.start(0.0)
        while pending and len(out) < turns_per_client * len(w.clients):
            req = pending.pop(0)
            out.append(req)
            pending += client.on_sent(req, req.sent_at)
            pending += client.on_complete(req, req.sent_at + reply_delay)
            if sum(1 for r in out if r.client == client.cid) >= turns_per_client:
                break
    return out


def _key(reqs: list[SimRequest]) -> list[tuple[object, ...]]:
    return [(r.rid, r.client, r.user, r.session, r.prompt, r.output, r.turn) for r in reqs]


def test_same_seed_same_requests_other_seed_other_requests() -> None:
    a = _drive(chat_workload(ARENA, {"us": 3, "eu": 2}, seed=5, horizon_s=60), 6)
    b = _drive(chat_workload(ARENA, {"us": 3, "eu": 2}, seed=5, horizon_s=60), 6)
    c = _drive(chat_workload(ARENA, {"us": 3, "eu": 2}, seed=6, horizon_s=60), 6)
    assert _key(a) == _key(b)
    assert [r.sent_at for r in a] == [r.sent_at for r in b]
    assert [r.prompt for r in a] != [r.prompt for r in c]


def test_content_does_not_depend_on_response_timing() -> None:
    """A policy changes when replies arrive, never what the clients ask."""
    fast = _drive(chat_workload(WILDCHAT, {"us": 4}, seed=1, horizon_s=60), 8, reply_delay=0.1)
    slow = _drive(chat_workload(WILDCHAT, {"us": 4}, seed=1, horizon_s=60), 8, reply_delay=9.0)
    assert _key(fast) == _key(slow)
    assert [r.sent_at for r in fast] != [r.sent_at for r in slow]


def test_follow_up_turns_extend_the_previous_prompt_and_reply() -> None:
    reqs = _drive(chat_workload(ARENA, {"us": 5}, seed=3, horizon_s=60), 12)
    checked = 0
    for prev, nxt in itertools.pairwise(reqs):
        if prev.session == nxt.session:
            head = prev.prompt + prev.output
            assert nxt.prompt[: len(head)] == head
            assert nxt.turn == prev.turn + 1
            checked += 1
    assert checked > 20


def test_conversations_of_one_user_share_the_system_prompt() -> None:
    w = chat_workload(WILDCHAT, {"us": 3}, seed=9, horizon_s=60)
    reqs = _drive(w, 60)
    firsts: dict[str, list[SimRequest]] = {}
    for r in reqs:
        if r.turn == 0:
            firsts.setdefault(r.user, []).append(r)
    shared = [v for v in firsts.values() if len(v) >= 2]
    assert shared, "some user should have opened several conversations"
    for convs in shared:
        a, b = convs[0].prompt, convs[1].prompt
        common = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), 0)
        assert common >= WILDCHAT.system_tokens.lo


def _similarity(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    """SkyWalker's prefix similarity: common prefix / shorter length."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n / min(len(a), len(b))


def test_within_user_similarity_exceeds_cross_user_similarity() -> None:
    reqs = _drive(chat_workload(ARENA, {"us": 12}, seed=2, horizon_s=60), 10)
    firsts = [r for r in reqs if r.turn == 0]
    within: list[float] = []
    across: list[float] = []
    for i, a in enumerate(firsts):
        for b in firsts[i + 1 :]:
            (within if a.user == b.user else across).append(_similarity(a.prompt, b.prompt))
    assert within and across
    assert statistics.fmean(within) > 2 * statistics.fmean(across)


def test_length_distributions_roughly_as_specified() -> None:
    reqs = _drive(chat_workload(ARENA, {"us": 40, "eu": 40}, seed=4, horizon_s=60), 25)
    outputs = [r.output_len for r in reqs]
    assert max(outputs) <= 512
    assert 150 <= statistics.fmean(outputs) <= 300  # median 170, capped at 512
    # New user-message tokens per turn: prompt growth minus the reply and 3 markers.
    msgs = []
    for prev, nxt in itertools.pairwise(reqs):
        if prev.session == nxt.session:
            msgs.append(nxt.prompt_len - prev.prompt_len - prev.output_len - 1 - 3)
    assert 45 <= statistics.fmean(msgs) <= 110  # lognormal median 35, sigma 1.2: mean ~72
    turns: dict[str, int] = {}
    for r in reqs:
        turns[r.session] = max(turns.get(r.session, 0), r.turn + 1)
    done = [n for s, n in turns.items() if any(q.session == s for q in reqs)]
    assert min(done) >= 1
    assert 2.0 <= statistics.fmean(done) <= 4.0


def test_every_client_has_a_region_and_counts_match() -> None:
    w = chat_workload(WILDCHAT, {"us": 40, "eu": 30, "asia": 30}, seed=1, horizon_s=60)
    regions = [c.region for c in w.clients]
    assert (regions.count("us"), regions.count("eu"), regions.count("asia")) == (40, 30, 30)
    reqs = _drive(w, 2)
    assert all(r.region == r.client.split("/")[0] for r in reqs)
    assert len({r.rid for r in reqs}) == len(reqs)
