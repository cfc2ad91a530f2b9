"""Steady batch work with deadlines, and tier labels for any other workload's requests.

:class:`BatchSource` is one region's open-loop stream of independent single-turn requests
(Poisson arrivals, lognormal prompt and output lengths, each prompt its own content after the
chat template's preamble), every one of tier ``batch`` with a completion deadline: the
non-interactive (NIW) class of SageServe's traces. :class:`Tiered` relabels another client's
requests with a tier (the diurnal conversations as ``interactive``).
"""

from __future__ import annotations

import dataclasses

from sim.workloads.base import (
    ASSISTANT,
    USER,
    Client,
    LogNormal,
    OpenLoop,
    RidSpace,
    SimRequest,
    content_tokens,
    frame,
    rng_for,
    template_header,
)


class BatchSource(OpenLoop):
    def __init__(self, region: str, index: int, rate_per_s: float, prompt: LogNormal,
                 output: LogNormal, deadline_s: float, seed: int) -> None:
        if rate_per_s <= 0 or deadline_s <= 0:
            raise ValueError("need a positive rate and deadline")
        self.cid = f"{region}/batch"
        self.region = region
        self.rate = rate_per_s
        self.prompt = prompt
        self.output = output
        self.deadline_s = deadline_s
        self._seed = seed
        self._rids = RidSpace(index)
        self._arrivals = rng_for(seed, self.cid, "arrivals")
        self._header = template_header(seed)
        self._n = 0

    def _next(self, now: float) -> SimRequest:
        at = now + self._arrivals.expovariate(self.rate)
        k = self._n
        self._n += 1
        rng = rng_for(self._seed, self.cid, "job", k)
        body = content_tokens(rng, self.prompt.sample(rng))
        prompt = (*self._header, *frame(USER, body), ASSISTANT)
        output = tuple(content_tokens(rng, self.output.sample(rng)))
        return SimRequest(
            rid=self._rids.next(), client=self.cid, region=self.region,
            user=f"{self.cid}/job{k}", session=f"{self.cid}/job{k}", prompt=prompt,
            output=output, sent_at=at, kind="batch", tier="batch",
            deadline_s=self.deadline_s,
        )


class Tiered:
    """Another client's requests, each labelled with ``tier``."""

    def __init__(self, inner: Client, tier: str) -> None:
        self.inner = inner
        self.tier = tier
        self.cid = inner.cid
        self.region = inner.region

    def _label(self, reqs: list[SimRequest]) -> list[SimRequest]:
        return [dataclasses.replace(r, tier=self.tier) for r in reqs]

    def start(self, now: float) -> list[SimRequest]:
        return self._label(self.inner.start(now))

    def on_sent(self, req: SimRequest, now: float) -> list[SimRequest]:
        return self._label(self.inner.on_sent(req, now))

    def on_complete(self, req: SimRequest, now: float) -> list[SimRequest]:
        return self._label(self.inner.on_complete(req, now))
