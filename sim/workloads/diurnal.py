"""Diurnal per-region load: each region's conversation arrivals peak in its own daytime.

New conversations arrive in each region as a non-homogeneous Poisson process (thinning
against the peak rate) whose rate follows a raised cosine over a (compressed) day,
peaking at ``peak_hour`` local time. A conversation then runs its turns closed-loop with
think time. Regions in different time zones peak at different times, so the sum over
regions is much flatter than any one region: the case for sharing reserved capacity
(SkyWalker reports per-region peak/trough 2.88-32.64x, 1.29x aggregated).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sim.workloads.base import RidSpace, SimRequest, Workload, exp_delay, rng_for
from sim.workloads.chat import ChatProfile, Conversation, UserPrefixes

UTC_OFFSET_H: dict[str, float] = {"us": -5.0, "eu": 1.0, "asia": 9.0}
"""Local time offsets for the project's region names; others are spread around the globe."""


@dataclass(frozen=True, slots=True)
class DiurnalShape:
    day_s: float = 600.0
    """Length of one simulated day in virtual seconds (compressed so a run sees a full cycle)."""
    peak_hour: float = 14.0
    peak_to_trough: float = 8.0

    def __post_init__(self) -> None:
        if self.day_s <= 0 or self.peak_to_trough < 1:
            raise ValueError("need day_s > 0 and peak_to_trough >= 1")

    def factor(self, t: float, utc_offset_h: float) -> float:
        """Rate at virtual time ``t`` relative to the peak, in ``[1/peak_to_trough, 1]``."""
        local_h = (t / self.day_s * 24.0 + utc_offset_h) % 24.0
        wave = (1.0 + math.cos(2 * math.pi * (local_h - self.peak_hour) / 24.0)) / 2.0
        trough = 1.0 / self.peak_to_trough
        return trough + (1.0 - trough) * wave


def utc_offsets(regions: Sequence[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    unknown = [r for r in regions if r not in UTC_OFFSET_H]
    for r in regions:
        if r in UTC_OFFSET_H:
            out[r] = UTC_OFFSET_H[r]
    for i, r in enumerate(sorted(unknown)):
        out[r] = -12.0 + 24.0 * i / max(1, len(unknown))
    return out


class DiurnalChatSource:
    """All conversations of one region: open-loop arrivals, closed-loop turns."""

    def __init__(
        self,
        region: str,
        index: int,
        profile: ChatProfile,
        prefixes: UserPrefixes,
        shape: DiurnalShape,
        utc_offset_h: float,
        peak_conversations_per_s: float,
        users: int,
        seed: int,
    ) -> None:
        if peak_conversations_per_s <= 0 or users <= 0:
            raise ValueError("need a positive peak rate and at least one user")
        self.cid = f"{region}/diurnal"
        self.region = region
        self.profile = profile
        self.shape = shape
        self.utc_offset_h = utc_offset_h
        self.peak_rate = peak_conversations_per_s
        self._prefixes = prefixes
        self._users = users
        self._seed = seed
        self._rids = RidSpace(index)
        self._arrivals = rng_for(seed, self.cid, "arrivals")
        self._n_conv = 0
        self._convs: dict[str, Conversation] = {}

    def rate(self, t: float) -> float:
        return self.peak_rate * self.shape.factor(t, self.utc_offset_h)

    def start(self, now: float) -> list[SimRequest]:
        return self._next_arrival(now)

    def on_sent(self, req: SimRequest, now: float) -> list[SimRequest]:
        return self._next_arrival(now) if req.turn == 0 else []

    def on_complete(self, req: SimRequest, now: float) -> list[SimRequest]:
        conv = self._convs.get(req.session)
        if conv is None:
            return []
        conv.record_reply(req.output)
        if conv.turn < conv.turns:
            nxt = self._turn(conv, now + exp_delay(conv.rng, self.profile.think_time_s))
            if nxt is not None:
                return [nxt]
        del self._convs[conv.sid]
        return []

    def _next_arrival(self, now: float) -> list[SimRequest]:
        """The next conversation start after ``now``: thinning against the peak rate."""
        rng = self._arrivals
        t = now
        while True:
            t += rng.expovariate(self.peak_rate)
            if rng.random() * self.peak_rate <= self.rate(t):
                break
        for _ in range(8):
            k = self._n_conv
            self._n_conv += 1
            crng = rng_for(self._seed, self.profile.name, self.cid, "conv", k)
            user = f"{self.region}/user{crng.randrange(self._users)}"
            system = self._prefixes.system_prompt(user, self.region)
            conv = Conversation(
                f"{self.cid}/c{k}", user, system, self.profile.turns.sample(crng), crng
            )
            req = self._turn(conv, t)
            if req is not None:
                self._convs[conv.sid] = conv
                return [req]
        return []

    def _turn(self, conv: Conversation, at: float) -> SimRequest | None:
        nxt = conv.next_prompt(self.profile)
        if nxt is None:
            return None
        prompt, reply = nxt
        return SimRequest(
            rid=self._rids.next(),
            client=self.cid,
            region=self.region,
            user=conv.user,
            session=conv.sid,
            prompt=prompt,
            output=reply,
            sent_at=at,
            kind=f"{self.profile.name}-diurnal",
            turn=conv.turn,
        )


def diurnal_workload(
    profile: ChatProfile,
    peak_conversations_per_s: Mapping[str, float],
    *,
    seed: int,
    horizon_s: float,
    shape: DiurnalShape = DiurnalShape(),
    users_per_region: int = 200,
    first_index: int = 0,
) -> Workload:
    regions = sorted(peak_conversations_per_s)
    offsets = utc_offsets(regions)
    prefixes = UserPrefixes(profile, seed)
    sources = [
        DiurnalChatSource(
            region,
            first_index + i,
            profile,
            prefixes,
            shape,
            offsets[region],
            peak_conversations_per_s[region],
            users_per_region,
            seed,
        )
        for i, region in enumerate(regions)
    ]
    return Workload(
        name=f"{profile.name}-diurnal",
        clients=list(sources),
        horizon_s=horizon_s,
        description=f"diurnal {profile.name}-like conversations, one day = {shape.day_s:g} s",
        params={
            "peak_conversations_per_s": dict(peak_conversations_per_s),
            "day_s": shape.day_s,
            "peak_to_trough": shape.peak_to_trough,
            "utc_offsets_h": offsets,
            "seed": seed,
        },
    )


def aggregate_peak_to_trough(
    shape: DiurnalShape, peaks: Mapping[str, float], samples: int = 2400
) -> tuple[dict[str, float], float]:
    """Per-region and aggregated peak/trough ratios of the arrival rate over one day."""
    offsets = utc_offsets(sorted(peaks))
    per_region: dict[str, float] = {}
    total = [0.0] * samples
    for region, peak in peaks.items():
        rates = [
            peak * shape.factor(i * shape.day_s / samples, offsets[region]) for i in range(samples)
        ]
        per_region[region] = max(rates) / min(rates)
        total = [a + b for a, b in zip(total, rates, strict=True)]
    return per_region, max(total) / min(total)
