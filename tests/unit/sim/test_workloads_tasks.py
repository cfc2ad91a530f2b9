"""The Intelligent Router's five-task mix: shares, length means, heavy decodes, tags."""

from __future__ import annotations

import statistics
from collections import Counter

from sim.workloads.base import SimRequest
from sim.workloads.tasks import FIVE_TASKS, HEAVY_DECODE_TOKENS, MAX_TOKENS, task_mix_workload


def _requests(horizon: float = 400.0, seed: int = 1) -> list[SimRequest]:
    w = task_mix_workload("us", 20.0, seed=seed, horizon_s=horizon)
    src = w.clients[0]
    out = []
    r = src.start(0.0)[0]
    while r.sent_at < horizon:
        out.append(r)
        r = src.on_sent(r, r.sent_at)[0]
    return out


def test_the_mix_has_the_papers_shares_means_and_heavy_decodes() -> None:
    reqs = _requests()
    n = len(reqs)
    assert abs(n / 400.0 - 20.0) < 1.0  # Poisson at 20 req/s
    total = sum(t.prompts for t in FIVE_TASKS)
    by = Counter(r.app for r in reqs)
    for t in FIVE_TASKS:
        share = by[t.name] / n
        assert abs(share - t.prompts / total) < 0.03, t.name
        mine = [r for r in reqs if r.app == t.name]
        assert abs(statistics.fmean(r.output_len for r in mine) / t.decode_mean - 1) < 0.15
        assert abs(statistics.fmean(r.prompt_len for r in mine) / t.prompt_mean - 1) < 0.2
    heavy = sum(r.output_len >= HEAVY_DECODE_TOKENS for r in reqs) / n
    assert 0.30 <= heavy <= 0.40
    assert all(r.max_tokens == MAX_TOKENS and r.output_len <= MAX_TOKENS for r in reqs)
    assert max(r.prompt_len for r in reqs) <= 1000


def test_the_same_seed_gives_the_same_requests() -> None:
    a, b = _requests(30.0), _requests(30.0)
    assert [(r.prompt, r.output, r.sent_at) for r in a] == \
        [(r.prompt, r.output, r.sent_at) for r in b]
    assert [r.prompt for r in _requests(30.0, seed=2)] != [r.prompt for r in a]
