"""The Intelligent Router's mixed five-task workload: open-loop arrivals of one-shot prompts.

Jain et al. (arXiv 2408.13510, §4.1) mix five datasets answered by Llama-2-7B; their table
gives each task's share and its mean prompt and decode tokens (overall 89 / 176, 35.54% heavy
decodes). Here each task draws prompt and reply lengths from a lognormal with the table's
mean (sigma 0.6 for prompts, capped at the paper's 1,000 prompt tokens; sigma 0.8 for
replies, capped at the client's ``max_tokens``), which puts 35% of replies at 160 tokens or
more: the paper's heavy decodes (>= 5 s) at 31 ms a token. Every prompt starts with its
task's fixed instruction (``INSTRUCTION_TOKENS``) and carries the task name as the
application tag (the paper's "This is a <task> task" hint, and its production trace's
application name). Arrivals are Poisson at ``rate_per_s``, from one region.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from sim.workloads.base import (
    ASSISTANT,
    USER,
    LogNormal,
    OpenLoop,
    RidSpace,
    SimRequest,
    Workload,
    content_tokens,
    frame,
    rng_for,
)

INSTRUCTION_TOKENS = 8
PROMPT_SIGMA = 0.6
DECODE_SIGMA = 0.8
MAX_PROMPT = 1000
MAX_TOKENS = 2048


@dataclass(frozen=True, slots=True)
class Task:
    name: str
    prompts: int
    """Prompts of the task in the paper's mix (its share of arrivals)."""
    prompt_mean: float
    decode_mean: float

    def prompt_dist(self) -> LogNormal:
        return _with_mean(self.prompt_mean, PROMPT_SIGMA, 4, MAX_PROMPT)

    def decode_dist(self) -> LogNormal:
        return _with_mean(self.decode_mean, DECODE_SIGMA, 1, MAX_TOKENS)


def _with_mean(mean: float, sigma: float, lo: int, hi: int) -> LogNormal:
    return LogNormal(median=mean / math.exp(sigma * sigma / 2), sigma=sigma, lo=lo, hi=hi)


FIVE_TASKS: tuple[Task, ...] = (
    Task("translation", 7351, 29, 62),
    Task("qna", 6988, 30, 334),
    Task("sentiment", 6564, 212, 143),
    Task("in-context-qna", 7122, 125, 220),
    Task("entity-recognition", 3304, 26, 64),
)
"""OPUS Books, ELI5, IMDb, SQuAD, WNUT-17 (the paper's table, §4.1)."""
HEAVY_DECODE_TOKENS = 160


class TaskMixSource(OpenLoop):
    """One region's open-loop stream of one-shot task prompts."""

    def __init__(self, region: str, index: int, tasks: Sequence[Task], rate_per_s: float,
                 seed: int) -> None:
        if rate_per_s <= 0 or not tasks:
            raise ValueError("need a positive rate and at least one task")
        self.cid = f"{region}/tasks"
        self.region = region
        self.tasks = tuple(tasks)
        self.rate = rate_per_s
        self._seed = seed
        self._rids = RidSpace(index)
        self._arrivals = rng_for(seed, self.cid, "arrivals")
        self._weights = [t.prompts for t in self.tasks]
        self._instructions = {t.name: content_tokens(rng_for(seed, "task", t.name),
                                                     INSTRUCTION_TOKENS) for t in self.tasks}
        self._n = 0

    def _next(self, now: float) -> SimRequest:
        t = now + self._arrivals.expovariate(self.rate)
        k = self._n
        self._n += 1
        rng = rng_for(self._seed, self.cid, "request", k)
        task = rng.choices(self.tasks, weights=self._weights)[0]
        n_prompt = task.prompt_dist().sample(rng)
        body = content_tokens(rng, max(1, n_prompt - INSTRUCTION_TOKENS - 3))
        prompt = [*self._instructions[task.name], *frame(USER, body), ASSISTANT]
        output = tuple(content_tokens(rng, task.decode_dist().sample(rng)))
        return SimRequest(
            rid=self._rids.next(),
            client=self.cid,
            region=self.region,
            user=f"{self.cid}/u{k % 64}",
            session=f"{self.cid}/r{k}",
            prompt=tuple(prompt),
            output=output,
            sent_at=t,
            kind=task.name,
            max_tokens=MAX_TOKENS,
            app=task.name,
        )


def task_mix_workload(region: str, rate_per_s: float, *, seed: int, horizon_s: float,
                      tasks: Sequence[Task] = FIVE_TASKS) -> Workload:
    return Workload(
        name="five-task-mix",
        clients=[TaskMixSource(region, 0, tasks, rate_per_s, seed)],
        horizon_s=horizon_s,
        description=f"{len(tasks)}-task mix (Intelligent Router §4.1), Poisson "
                    f"{rate_per_s:g} req/s from {region}",
        params={"rate_per_s": rate_per_s, "tasks": [t.name for t in tasks]},
    )
