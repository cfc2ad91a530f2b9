"""Service tiers, sans-I/O: what a request's tier is, its SLO, and the per-tier queue.

Three tiers, most important first::

    interactive   TTFT target (default 1 s)        never shed, never held
    standard      TTFT target (default 10 s)       never shed (configurable), never held
    batch         completion deadline (24 h)       held for spare capacity, sheddable

A request's tier comes from (first that is set): the ``x-kvmesh-priority`` header, the body's
``service_tier`` (OpenAI: ``priority``/``scale`` -> interactive, ``default`` -> standard,
``flex`` -> batch, ``auto`` -> no preference), the body's ``priority`` (vLLM's integer, lower
is more urgent: < 0 interactive, 0 standard, > 0 batch), the caller's API key default, the
configured default. An invalid value in any of them is a :class:`TierError` (a 400).

The :class:`TierQueue` orders waiting requests by strict priority across tiers and earliest
deadline first within one; a batch request whose deadline is near (``promote_before``) is
promoted: it ranks with standard work and is no longer held for spare capacity, so batch is
never starved past its deadline. :class:`TierRules` holds the decisions the dispatcher asks
of tiers: which replicas have spare capacity for batch work (anywhere in the mesh), whether a
higher tier's SLO is at risk (a recent miss, or a higher-tier request queued for a good part
of its target) so that sheddable tiers are shed, and for how long (``Retry-After``).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

TIERS = ("interactive", "standard", "batch")
RANK = {t: i for i, t in enumerate(TIERS)}
INTERACTIVE, STANDARD, BATCH = TIERS
PRIORITY_HEADER = "x-kvmesh-priority"
H_TIER = "x-kvmesh-tier"
"""On answers: the tier the request was served in. On forwards: the signed tier and budget."""

SERVICE_TIER = {"priority": INTERACTIVE, "scale": INTERACTIVE, "default": STANDARD,
                "flex": BATCH, "auto": None}
"""OpenAI's ``service_tier`` values and the tier each means (``auto``: no preference)."""


class TierError(ValueError):
    """A tier value a client sent that is not one; ``param`` names where it came from."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


def parse_header(value: str) -> str:
    """``x-kvmesh-priority``: a tier name (any case, surrounding spaces ignored)."""
    name = value.strip().lower()
    if name not in RANK:
        raise TierError(PRIORITY_HEADER, f"{PRIORITY_HEADER} must be one of "
                        f"{', '.join(TIERS)}, got {value[:40]!r}")
    return name


def parse_body(body: Mapping[str, Any]) -> str | None:
    """The tier the body asks for (``service_tier``, then ``priority``), or None."""
    st = body.get("service_tier")
    if st is not None:
        if not isinstance(st, str) or st not in SERVICE_TIER:
            raise TierError("service_tier", "'service_tier' must be one of "
                            f"{', '.join(SERVICE_TIER)}, got {str(st)[:40]!r}")
        tier = SERVICE_TIER[st]
        if tier is not None:
            return tier
    prio = body.get("priority")
    if prio is not None:
        if isinstance(prio, bool) or not isinstance(prio, int) or abs(prio) > 2**31:
            raise TierError("priority", "'priority' must be an integer (lower is more "
                            f"urgent: < 0 interactive, 0 standard, > 0 batch), got {prio!r}")
        return INTERACTIVE if prio < 0 else STANDARD if prio == 0 else BATCH
    return None


def requested_tier(body: Mapping[str, Any], headers: Mapping[str, str]) -> str | None:
    """The tier a request asks for itself (header, then body), or None; ``TierError``."""
    raw = headers.get(PRIORITY_HEADER)
    if raw is not None:
        return parse_header(raw)
    return parse_body(body)


def picker_priority(raw: str) -> tuple[int, str]:
    """The gateway's priority header: an integer (Gateway API: higher is more important,
    negative is sheddable) or a tier name; returns (priority, tier)."""
    text = raw.strip()
    try:
        p = int(text)
    except ValueError:
        tier = parse_header(text)
        return {INTERACTIVE: 1, STANDARD: 0, BATCH: -1}[tier], tier
    return p, INTERACTIVE if p > 0 else STANDARD if p == 0 else BATCH


def forward_value(tier: str, deadline: float, now: float) -> str:
    """The ``x-kvmesh-tier`` value of a forward: the tier and the seconds left to its SLO
    (clocks differ between routers; a budget does not)."""
    left = deadline - now
    return f"{tier};{left:.3f}" if math.isfinite(left) else tier


def parse_forwarded(value: str, now: float) -> tuple[str, float] | None:
    """(tier, deadline on this router's clock) from a signed ``x-kvmesh-tier``; None if
    it is not one (the request then gets this router's default)."""
    tier, _, left = value.partition(";")
    if tier not in RANK:
        return None
    if not left:
        return tier, math.inf
    try:
        seconds = float(left)
    except ValueError:
        return None
    return (tier, now + seconds) if math.isfinite(seconds) else None


@dataclass(frozen=True, slots=True)
class TierConfig:
    """The ``tiers`` section of a router's configuration (see docs/router.md)."""

    enabled: bool = True
    """False: every request is served first come, first served, as one class."""
    default: str = STANDARD
    interactive_ttft: float = 1.0
    standard_ttft: float = 10.0
    batch_deadline: float = 86_400.0
    """Seconds from arrival within which a batch request must complete."""
    sheddable: frozenset[str] = frozenset({BATCH})
    promote_before: float | None = None
    """A batch request this close to its deadline is promoted (no longer held, ranks with
    standard work); None: a tenth of ``batch_deadline``."""
    batch_kv_below: float = 0.5
    """Spare capacity for batch work: a replica using less KV cache than this ..."""
    batch_running_below: float = math.inf
    """... with fewer running sequences than this, and nothing waiting."""
    batch_recheck: float = 0.25
    """How often held batch work looks for spare capacity again, seconds."""
    shed_window: float = 2.0
    """A missed higher-tier SLO keeps sheddable tiers shed this long (the Retry-After)."""
    queue_risk: float = 0.5
    """A higher-tier request queued this fraction of its TTFT target puts its SLO at risk."""
    keys: Mapping[str, str] = field(default_factory=dict)
    """API key name -> that key's default tier."""

    @property
    def promote_margin(self) -> float:
        if self.promote_before is not None:
            return self.promote_before
        return 0.1 * self.batch_deadline

    def slo(self, tier: str) -> float:
        """Seconds from arrival: the TTFT target, or the batch completion deadline."""
        if tier == INTERACTIVE:
            return self.interactive_ttft
        if tier == STANDARD:
            return self.standard_ttft
        return self.batch_deadline

    def deadline(self, tier: str, arrival: float) -> float:
        return arrival + self.slo(tier)

    def resolve(self, requested: str | None, key_name: str | None = None) -> str:
        """The request's own choice, else its API key's default, else the default."""
        if requested is not None:
            return requested
        if key_name is not None and key_name in self.keys:
            return self.keys[key_name]
        return self.default


def measures_completion(tier: str) -> bool:
    """Batch is judged by when it completes; the others by their first token."""
    return tier == BATCH


# -- the queue -------------------------------------------------------------------------------
class Queued:
    """What the queue needs of a waiter (``mesh.dispatch.Waiter``)."""

    cancelled: bool
    promoted: bool
    tier: str
    deadline: float


class TierQueue:
    """Waiters by rank (interactive, standard incl. promoted batch, batch), EDF within one.

    Cancelled waiters stay until they reach a head (lazy removal) and count in ``len`` until
    then, as in a plain FIFO with lazy removal.
    With ``fcfs`` every waiter has one rank and the queue is first come, first served.
    """

    def __init__(self, promote_before: float = math.inf, fcfs: bool = False) -> None:
        self.promote_before = promote_before
        self.fcfs = fcfs
        self._heaps: list[list[tuple[float, int, Any]]] = [[], [], []]
        self._seq = itertools.count()
        self._live = 0
        self._count = [0, 0, 0]

    def rank(self, w: Queued) -> int:
        if self.fcfs:
            return 0
        if w.tier == BATCH and w.promoted:
            return RANK[STANDARD]
        return RANK.get(w.tier, RANK[STANDARD])

    def _key(self, w: Queued) -> float:
        return math.inf if self.fcfs else w.deadline

    def push(self, w: Any) -> None:
        r = self.rank(w)
        heapq.heappush(self._heaps[r], (self._key(w), next(self._seq), w))
        self._live += 1
        self._count[r] += 1

    def promote(self, now: float) -> int:
        """Move batch waiters within ``promote_before`` of their deadline up; how many."""
        if self.fcfs:
            return 0
        heap, n = self._heaps[RANK[BATCH]], 0
        while heap and heap[0][0] - self.promote_before <= now:
            _, _, w = heapq.heappop(heap)
            self._count[RANK[BATCH]] -= 1
            if w.cancelled:
                self._live -= 1
                continue
            w.promoted = True
            self._live -= 1
            self.push(w)
            n += 1
        return n

    def next_promotion(self) -> float | None:
        """When the earliest batch waiter is promoted (None: no batch waiter)."""
        heap = self._heaps[RANK[BATCH]]
        return heap[0][0] - self.promote_before if heap and not self.fcfs else None

    def head(self) -> Any | None:
        """The first live waiter in rank, then deadline order (drops cancelled ones)."""
        for r, heap in enumerate(self._heaps):
            while heap:
                w = heap[0][2]
                if not w.cancelled:
                    return w
                heapq.heappop(heap)
                self._live -= 1
                self._count[r] -= 1
        return None

    def pop_head(self) -> Any:
        """Remove and return :meth:`head` (which must exist)."""
        w = self.head()
        assert w is not None
        r = self.rank(w)
        heapq.heappop(self._heaps[r])
        self._live -= 1
        self._count[r] -= 1
        return w

    def first_at(self, rank: int) -> Any | None:
        """The head of one rank (cancelled heads dropped), or None."""
        heap = self._heaps[rank]
        while heap and heap[0][2].cancelled:
            heapq.heappop(heap)
            self._live -= 1
            self._count[rank] -= 1
        return heap[0][2] if heap else None

    def ahead_of(self, rank: int) -> bool:
        """Is anyone queued at ``rank`` or better (an arrival at ``rank`` joins behind)?"""
        if self.fcfs:
            rank = 0
        return any(self._count[r] > 0 for r in range(0, rank + 1))

    def by_tier(self) -> dict[str, int]:
        """Live waiters per tier (promoted batch counted as batch)."""
        out = dict.fromkeys(TIERS, 0)
        for w in self:
            out[w.tier if w.tier in out else STANDARD] += 1
        return out

    def clear(self) -> list[Any]:
        gone = [w for w in self]
        for h in self._heaps:
            h.clear()
        self._live = 0
        self._count = [0, 0, 0]
        return gone

    def __iter__(self) -> Iterator[Any]:
        for heap in self._heaps:
            for _, _, w in sorted(heap, key=lambda e: (e[0], e[1])):
                if not w.cancelled:
                    yield w

    def __len__(self) -> int:
        return self._live

    def __bool__(self) -> bool:
        return self._live > 0


# -- the rules the dispatcher asks -----------------------------------------------------------
@dataclass(slots=True)
class TierRules:
    """Spare capacity, SLO risk and shedding; fed with observed first tokens (``now`` in)."""

    config: TierConfig
    risk_until: list[float] = field(default_factory=lambda: [-math.inf] * len(TIERS))
    """Per rank: until when a recent SLO miss of that tier counts as a risk."""

    def spare(self, waiting: float, running: float, kv_usage: float) -> bool:
        """Can a replica with this (estimated) load take batch work without hurting others?"""
        c = self.config
        return waiting < 0.5 and running < c.batch_running_below and kv_usage < c.batch_kv_below

    def observe_first_token(self, tier: str, ttft: float, now: float) -> None:
        """A first token was seen ``ttft`` after arrival: a miss of a TTFT tier is a risk."""
        if measures_completion(tier) or tier not in RANK:
            return
        if ttft > self.config.slo(tier):
            r = RANK[tier]
            self.risk_until[r] = max(self.risk_until[r], now + self.config.shed_window)

    def at_risk(self, rank: int, now: float, queue: TierQueue) -> float | None:
        """Seconds the risk to a tier above ``rank`` lasts (for ``Retry-After``), or None."""
        c = self.config
        longest: float | None = None
        for r in range(rank):
            tier = TIERS[r]
            if tier in c.sheddable:
                continue
            if self.risk_until[r] > now:
                left = self.risk_until[r] - now
                longest = left if longest is None else max(longest, left)
        if longest is None and not queue.fcfs:
            # The head of a rank has its earliest deadline: the longest-waiting unpromoted one.
            for r in range(rank):
                w = queue.first_at(r)
                if w is None or TIERS[r] in c.sheddable or w.tier != TIERS[r]:
                    continue
                slo = c.slo(w.tier)
                if now - (w.deadline - slo) >= c.queue_risk * slo:
                    return c.shed_window
        return longest

    def sheddable(self, tier: str) -> bool:
        return tier in self.config.sheddable


# -- what a router reports -------------------------------------------------------------------
@dataclass(slots=True)
class TierStats:
    """Per tier: SLO met / missed, shed, queue time (for /mesh/status; Prometheus mirrors)."""

    met: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    missed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    shed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    queued_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TIERS, 0.0))
    queued_n: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))

    def outcome(self, tier: str, met: bool) -> None:
        (self.met if met else self.missed)[tier] += 1

    def queued(self, tier: str, seconds: float) -> None:
        self.queued_s[tier] += seconds
        self.queued_n[tier] += 1

    def attainment(self, tier: str) -> float | None:
        n = self.met[tier] + self.missed[tier]
        return self.met[tier] / n if n else None

    def status(self, config: TierConfig, waiting: Mapping[str, int]) -> dict[str, Any]:
        out: dict[str, Any] = {"enabled": config.enabled, "default": config.default}
        for t in TIERS:
            att = self.attainment(t)
            n = self.queued_n[t]
            out[t] = {
                "slo_s": config.slo(t),
                "slo_kind": "completion" if measures_completion(t) else "ttft",
                "sheddable": t in config.sheddable,
                "met": self.met[t], "missed": self.missed[t],
                "attainment": None if att is None else round(att, 4),
                "shed": self.shed[t], "queued_now": waiting.get(t, 0),
                "queue_mean_s": round(self.queued_s[t] / n, 4) if n else None,
            }
        return out
