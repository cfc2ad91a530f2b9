"""Engines joining and leaving a running fleet: autoscalers in virtual time, and their bill.

A fleet is built with the most engines each region may ever run; an :class:`Autoscaler`
keeps the ones it has not started in ``Fleet.offline`` (routers never see them). Starting an
engine bills it for ``startup_s`` before it takes requests (model load: SageServe's 155 s);
stopping one drains it (no new requests, billed until its last request is answered) and drops
its prefix cache, as a fresh instance would have none. What decides how many engines a region
wants is a :class:`Controller`; two are here:

``ScheduledTargets``
    a capacity plan's per-slot targets, started ``startup_s`` ahead of the slot that needs
    them, plus SageServe's LT-UA override: one more engine while utilisation stays above
    ``override`` (reset at the next slot).
``Reactive``
    scale on observed utilisation only: above ``up`` add engines to bring it to ``target``,
    below ``down`` remove down to ``target`` (SageServe's reactive baseline; 0.7/0.3 is its
    production setting).

Utilisation is the prompt + output tokens/s dispatched to the region's engines over the last
``window_s``, over ``serving engines x tokens_per_s`` (the throughput the plan assumed).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from sim.fleet import Fleet, SimEngine

OFF, STARTING, ON, DRAINING = "off", "starting", "on", "draining"
BILLED = (STARTING, ON, DRAINING)


@dataclass(frozen=True, slots=True)
class RegionState:
    region: str
    on: int
    starting: int
    utilization: float
    """Dispatched tokens/s over the window / (serving engines x tokens_per_s); inf if none serve."""


class Controller(Protocol):
    def desired(self, state: RegionState, now: float) -> int: ...


@dataclass(slots=True)
class ScheduledTargets:
    targets: Mapping[str, Sequence[int]]
    """Region -> engines per slot of the day."""
    slot_s: float
    lead_s: float
    override: float = 0.9
    extra: dict[str, int] = field(default_factory=dict)
    _slot_of_extra: dict[str, int] = field(default_factory=dict)

    def _target(self, region: str, t: float) -> int:
        v = self.targets.get(region, ())
        return int(v[int(t // self.slot_s) % len(v)]) if v else 0

    def desired(self, state: RegionState, now: float) -> int:
        r = state.region
        slot = int(now // self.slot_s)
        if self._slot_of_extra.get(r) != slot:
            self._slot_of_extra[r] = slot
            self.extra[r] = 0
        if state.on > 0 and state.utilization > self.override and state.starting == 0:
            self.extra[r] = self.extra.get(r, 0) + 1
        base = max(self._target(r, now), self._target(r, now + self.lead_s))
        return base + self.extra.get(r, 0)


@dataclass(slots=True)
class Reactive:
    up: float = 0.7
    down: float = 0.3
    target: float = 0.5
    minimum: int = 1

    def desired(self, state: RegionState, now: float) -> int:
        n = state.on + state.starting
        if state.on == 0:
            return max(self.minimum, n)
        u = state.utilization
        if u > self.up and state.starting == 0:
            return max(n, math.ceil(state.on * u / self.target))
        if u < self.down:
            return max(self.minimum, math.ceil(state.on * u / self.target))
        return n


@dataclass(slots=True)
class Bill:
    """Instance-seconds billed inside ``[start, end)``, per region, and the starts made."""

    start: float
    end: float
    seconds: dict[str, float] = field(default_factory=dict)
    starts: int = 0
    timeline: list[tuple[float, str, int, int]] = field(default_factory=list)
    """(time, region, engines on, engines billed) after every change."""

    def add(self, region: str, t0: float, t1: float) -> None:
        a, b = max(t0, self.start), min(t1, self.end)
        if b > a:
            self.seconds[region] = self.seconds.get(region, 0.0) + (b - a)

    @property
    def total_s(self) -> float:
        return sum(self.seconds.values())


class Autoscaler:
    def __init__(
        self,
        fleet: Fleet,
        controller: Controller,
        *,
        initial: Mapping[str, int],
        tokens_per_s: float,
        startup_s: float,
        bill: Bill,
        interval_s: float = 1.0,
        window_s: float = 5.0,
    ) -> None:
        self.fleet = fleet
        self.controller = controller
        self.tps = tokens_per_s
        self.startup_s = startup_s
        self.bill = bill
        self.interval_s = interval_s
        self.window_s = window_s
        self.state: dict[str, str] = {}
        self.since: dict[str, float] = {}
        self.ready_at: dict[str, float] = {}
        self._served: dict[str, deque[tuple[float, int]]] = {}
        self._pending: list[int] = []
        self._scanned = 0
        for region, engines in fleet.by_region.items():
            n = initial.get(region, 0)
            if n > len(engines):
                raise ValueError(f"{region}: {n} initial engines, the fleet has {len(engines)}")
            self._served[region] = deque()
            for i, e in enumerate(engines):
                self._set(e, ON if i < n else OFF, 0.0)

    def install(self) -> None:
        for region, engines in self.fleet.by_region.items():
            on = sum(1 for e in engines if self.state[e.replica] == ON)
            self.bill.timeline.append((0.0, region, on, on))
        self.fleet.loop.every(self.interval_s, self.tick, first=self.interval_s)

    def finish(self, now: float) -> None:
        """Close the bill at ``now`` (engines still billed are counted up to it)."""
        for replica, st in self.state.items():
            if st in BILLED:
                self.bill.add(self.fleet.engines[replica].region, self.since[replica], now)
                self.since[replica] = now

    # -- state -------------------------------------------------------------------------------
    def _set(self, e: SimEngine, st: str, now: float) -> None:
        old = self.state.get(e.replica)
        if old in BILLED:
            self.bill.add(e.region, self.since[e.replica], now)
        self.state[e.replica] = st
        self.since[e.replica] = now
        if st == ON:
            self.fleet.offline.discard(e.replica)
        else:
            self.fleet.offline.add(e.replica)
        if st == OFF and old is not None:
            e.model.reset_prefix_cache()
        if old is not None and old != st:
            on = sum(1 for x in self.fleet.by_region[e.region] if self.state.get(x.replica) == ON)
            billed = sum(
                1 for x in self.fleet.by_region[e.region] if self.state.get(x.replica) in BILLED
            )
            self.bill.timeline.append((now, e.region, on, billed))

    def _observe(self, now: float) -> None:
        recs = self.fleet.records
        self._pending.extend(range(self._scanned, len(recs)))
        self._scanned = len(recs)
        keep = []
        for i in self._pending:
            rec = recs[i]
            if rec.decided is not None and rec.replica_region:
                self._served[rec.replica_region].append(
                    (rec.decided, rec.prompt_tokens + rec.output_tokens)
                )
            elif now - rec.sent < 120.0 and rec.done is None:
                keep.append(i)
        self._pending = keep
        for q in self._served.values():
            while q and q[0][0] < now - self.window_s:
                q.popleft()

    def region_state(self, region: str, now: float) -> RegionState:
        engines = self.fleet.by_region[region]
        on = sum(1 for e in engines if self.state[e.replica] == ON)
        starting = sum(1 for e in engines if self.state[e.replica] == STARTING)
        tokens = sum(n for _, n in self._served[region])
        window = min(self.window_s, max(now, 1e-9))
        util = tokens / window / (on * self.tps) if on else math.inf
        return RegionState(region, on, starting, util)

    def tick(self) -> None:
        now = self.fleet.loop.now
        self._observe(now)
        for region, engines in self.fleet.by_region.items():
            for e in engines:
                st = self.state[e.replica]
                if st == STARTING and now >= self.ready_at[e.replica]:
                    self._set(e, ON, now)
                elif st == DRAINING and not e.flights and not self.fleet.bound.get(e.replica):
                    self._set(e, OFF, now)
            want = max(0, self.controller.desired(self.region_state(region, now), now))
            self._apply(region, engines, want, now)

    def _apply(self, region: str, engines: list[SimEngine], want: int, now: float) -> None:
        live = [e for e in engines if self.state[e.replica] in (ON, STARTING)]
        if want > len(live):
            need = want - len(live)
            for e in engines:  # a draining engine still has its model loaded: reuse it
                if need and self.state[e.replica] == DRAINING:
                    self._set(e, ON, now)
                    need -= 1
            for e in engines:
                if need and self.state[e.replica] == OFF:
                    self._set(e, STARTING, now)
                    self.ready_at[e.replica] = now + self.startup_s
                    self.bill.starts += 1
                    need -= 1
        elif want < len(live):
            drop = len(live) - want
            for e in reversed(engines):
                if drop and self.state[e.replica] == STARTING:
                    self._set(e, OFF, now)
                    drop -= 1
            for e in reversed(engines):
                if drop and self.state[e.replica] == ON:
                    self._set(e, DRAINING, now)
                    drop -= 1
