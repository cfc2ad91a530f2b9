"""What a routing policy sees and what it returns.

A policy is a function of ``(request, view, now, rng)``: no sockets, no clocks, no
router internals. The router builds a :class:`View` from the replicated state; the
discrete-event simulator builds one from its own model. Both call the same policy
objects, so every figure the simulator produces is a figure of the production code.

Load figures in a view are *estimates*: a scraped record has an age, other routers'
in-flight counts arrive by gossip, and this router's own dispatches are counted at
once (``fresh``). :func:`estimate_load` folds them into one waiting/running estimate
that every load-aware policy shares.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, NamedTuple, Protocol


class PolicyError(ValueError):
    """A policy parameter is unknown or has the wrong type or range; names the key."""


@dataclass(frozen=True, slots=True)
class LengthGuess:
    """A predicted response length: expected output tokens and the most likely bucket."""

    tokens: float
    bucket: int
    baseline_bucket: int = -1
    """The bucket a predict-the-mean baseline would have said (for accuracy figures)."""
    baseline_tokens: float = 0.0
    """What that baseline expected, tokens."""


@dataclass(frozen=True, slots=True)
class Request:
    """One request as a policy needs it: its tokens, block keys and affinity hints."""

    request_id: str
    token_ids: Sequence[int]
    keys: Sequence[int]
    """Chained block keys of the prompt (full blocks only), the same scheme the index uses."""
    block_size: int = 16
    session: str | None = None
    """Session or user key (a header, or OpenAI's ``user`` field) for hash-based policies."""
    max_tokens: int = 0
    arrival: float = 0.0
    """When the request arrived, on the same clock as ``now`` (bounds waiting)."""
    model: str | None = None
    """The requested model; the view already holds only replicas that serve it."""
    app: str | None = None
    """Application tag (a header), a feature of the response-length predictor."""
    predicted: LengthGuess | None = None
    """The predicted response length, set by the dispatcher before the policy runs."""
    objective: str | None = None
    """What the cost-model policy minimises for this request: ``"ttft"`` or ``"e2e"``
    (end-to-end latency); None: the policy's configured default."""
    tier: str = "standard"
    """Service tier (``mesh.tiers``): ``interactive``, ``standard`` or ``batch``."""
    deadline: float = math.inf
    """The tier's SLO on ``now``'s clock: first token by then (interactive, standard), or
    completion (batch). Orders the router's queue (earliest deadline first in a tier)."""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class ReplicaView(NamedTuple):
    """One engine replica anywhere in the mesh, as this router believes it to be.

    A named tuple rather than a dataclass: the view builder makes one per replica per
    decision, and a tuple is built in a fifth of the time of a frozen dataclass.
    """

    replica: str
    """The replica's id: its engine URL."""
    region: str
    healthy: bool = True
    waiting: float = 0.0
    """Requests queued at the engine (not yet scheduled), from its last load record."""
    running: float = 0.0
    kv_usage: float = 0.0
    """Fraction of KV-cache blocks in use, 0..1."""
    load_age: float = 0.0
    """Seconds since the load record was measured (``math.inf`` when there is none)."""
    inflight: int = 0
    """Requests in flight to this replica from every router (own ones included)."""
    fresh: int = 0
    """This router's dispatches since the load record was measured: not in it yet."""
    prefill_rate: float | None = None
    """Prefill throughput of the replica's profile, tokens/s (None: the policy's default)."""
    owner: str | None = None
    """Base URL of the live router that reports this replica (forwards go there); None for
    this router's own engines or when unknown."""
    work: float = 0.0
    """Predicted output tokens of this router's own requests in flight to the replica (their
    decode work, not reduced as they progress)."""
    queue_delay: float | None = None
    """Learned seconds of delay per waiting request (None: priced from prompt size and rate)."""
    overhead: float = 0.0
    """Learned fixed cost of a first token beyond the model's parts, seconds."""
    kv_scale: float | None = None
    """Learned share of the model's KV-barrier term the engine really shows (None: all)."""
    prefill_knee: float = 0.0
    """Learned uncached tokens a prefill gets for the engine's minimum step time (its cost is
    in ``overhead``); 0 with a configured rate or none learned."""
    kv_peak: float | None = None
    """The highest KV usage the engine reported lately, kept by the router that scrapes it
    (None: not known here; ``mesh.kv_outlook``)."""
    kv_trend: float | None = None
    """The recent slope of its KV usage, per second (None: not known)."""


@dataclass(frozen=True, slots=True)
class RegionView:
    """A region as seen from this router: how far, and how backed up its routers are."""

    region: str
    rtt: float = 0.0
    """Round trip from this router to the region's router, seconds (0 for the own region)."""
    reachable: bool = True
    queue: int = 0
    """Requests waiting in that region's routers' queues (selective pushing)."""
    pushed: int = 0
    """This router's region-level pushes into it that its load records cannot show yet."""
    routers: tuple[str, ...] = ()
    """Addresses of the region's live routers (where a region-level forward goes)."""
    margin: float | None = None
    """Predicted saving a forward into the region must exceed: the measured error band of
    forwards there (None: not measured yet, the policy's prior applies)."""


class PrefixLookup(Protocol):
    def match(self, keys: Sequence[int]) -> Mapping[str, int]:
        """Replica -> number of leading ``keys`` it holds consecutively (absent: 0)."""
        ...


class NoPrefixes:
    """A lookup that knows of no cached blocks (engines without KV events)."""

    def match(self, keys: Sequence[int]) -> Mapping[str, int]:
        return {}


@dataclass(frozen=True, slots=True)
class View:
    """Everything a policy may read, for one decision."""

    region: str
    replicas: tuple[ReplicaView, ...]
    regions: Mapping[str, RegionView] = field(default_factory=dict)
    prefix: PrefixLookup = field(default_factory=NoPrefixes)
    queue: int = 0
    """Requests waiting in this router's own queue (this one excluded)."""
    mean_prompt_tokens: float = 256.0
    """Recent mean uncached prompt tokens per request: the size of an unknown queued request."""
    mean_output_tokens: float = 256.0
    """Recent mean output tokens per completed request: how long a running decode lasts."""

    def healthy(self, scope: str = "mesh") -> list[ReplicaView]:
        """Healthy replicas in reachable regions; ``scope`` "local" keeps the own region only."""
        home = self.region
        if scope == "local":
            return [r for r in self.replicas if r.healthy and r.region == home]
        reachable = {name: info.reachable for name, info in self.regions.items()}
        reachable[home] = True
        # A region the view does not know counts as reachable (``region_info``'s default).
        return [r for r in self.replicas if r.healthy and reachable.get(r.region, True)]

    def region_info(self, region: str) -> RegionView:
        info = self.regions.get(region)
        if info is None:
            return RegionView(region=region, rtt=0.0 if region == self.region else math.inf)
        return info

    def rtt(self, region: str) -> float:
        return 0.0 if region == self.region else self.region_info(region).rtt

    def without(self, replicas: Iterable[str] = (), regions: Iterable[str] = ()) -> View:
        """The same view with some replicas or whole regions marked down (for retries)."""
        bad, bad_regions = set(replicas), set(regions)
        if not bad and not bad_regions:
            return self
        reps = tuple(
            r._replace(healthy=False) if r.replica in bad or r.region in bad_regions else r
            for r in self.replicas
        )
        return replace(self, replicas=reps)

    def local_only(self) -> View:
        """Only the own region: for requests forwarded here, which never travel again."""
        reps = tuple(r for r in self.replicas if r.region == self.region)
        regions = {k: v for k, v in self.regions.items() if k == self.region}
        return replace(self, replicas=reps, regions=regions)


class Scored(NamedTuple):
    """One candidate and its estimated cost, with the parts of the cost (for explanations).

    A named tuple rather than a dataclass: policies build one per replica per decision.
    """

    replica: str
    region: str
    cost: float
    parts: tuple[tuple[str, float], ...] = ()

    def describe(self) -> str:
        parts = " ".join(f"{k}={v:.4g}" for k, v in self.parts)
        return f"{self.replica}@{self.region} cost={self.cost:.4g} {parts}".rstrip()


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a request goes, and why.

    ``replica`` set: send it there (directly if local, else through its region's router).
    ``replica`` None and ``region`` set: forward to that region's router, which picks.
    ``wait``: hold the request in the router's FCFS queue and ask again in ``retry_after``.
    Neither: nothing can serve it (the router answers 503).
    """

    replica: str | None
    region: str | None
    reason: str
    policy: str = ""
    wait: bool = False
    retry_after: float = 0.01
    matched_blocks: int = 0
    total_blocks: int = 0
    candidates: tuple[Scored, ...] = ()
    """The best few candidates, best first, with their estimated costs."""

    @property
    def routed(self) -> bool:
        return self.replica is not None or (self.region is not None and not self.wait)

    @property
    def outcome(self) -> str:
        if self.wait:
            return "wait"
        if not self.routed:
            return "none"
        return "routed"


_CANDIDATES = Decision.__dict__["candidates"]
"""The slot that holds a decision's candidates (read and written by :class:`Explained`)."""
_FIELDS = tuple(f.name for f in fields(Decision))


def _as_tuple(d: Decision) -> tuple[Any, ...]:
    return tuple(getattr(d, name) for name in _FIELDS)


class Explained(Decision):
    """A decision whose ``candidates`` are worked out when first read.

    Explaining the best few candidates (each cost taken apart) is as much work as deciding
    on one replica, and on most requests nothing reads it: a non-streamed answer's outcome,
    a debug log that is off. ``explain`` is called at most once, on first read, and must
    be a pure function of what the decision was made on (the view, the request): then the
    candidates are what an eager policy would have stored. Everything else (equality,
    ``repr``, ``dataclasses.replace``, pickling) reads the property and sees the same
    values as a plain :class:`Decision`.
    """

    __slots__ = ("_explain",)
    _explain: Callable[[], tuple[Scored, ...]] | None

    def __init__(self, *args: Any, explain: Callable[[], tuple[Scored, ...]] | None = None,
                 **kwargs: Any) -> None:
        object.__setattr__(self, "_explain", explain)
        super().__init__(*args, **kwargs)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Decision):
            return NotImplemented
        return _as_tuple(self) == _as_tuple(other)

    __hash__ = Decision.__hash__

    @property
    def candidates(self) -> tuple[Scored, ...]:
        try:
            explain = self._explain
        except AttributeError:  # unpickled: the candidates came with it
            explain = None
        if explain is not None:
            object.__setattr__(self, "_explain", None)
            _CANDIDATES.__set__(self, explain())
        got: tuple[Scored, ...] = _CANDIDATES.__get__(self, Decision)
        return got

    @candidates.setter
    def candidates(self, value: tuple[Scored, ...]) -> None:
        _CANDIDATES.__set__(self, value)


def no_replica(policy: str, why: str = "no healthy replica") -> Decision:
    return Decision(replica=None, region=None, reason=why, policy=policy)


class Policy(Protocol):
    """A routing policy; stateful ones own their state and update it on each decision."""

    name: str

    def decide(self, request: Request, view: View, now: float, rng: random.Random) -> Decision: ...


class Load(NamedTuple):
    """One replica's estimated load after age discount, gossip and own dispatches."""

    waiting: float
    running: float

    @property
    def outstanding(self) -> float:
        return self.waiting + self.running


def age_discount(age: float, half_life: float) -> float:
    """Weight of a load figure measured ``age`` seconds ago: halves every ``half_life``."""
    if not math.isfinite(age):
        return 0.0
    if half_life <= 0:
        return 1.0
    return float(0.5 ** (max(age, 0.0) / half_life))


def estimate_load(r: ReplicaView, half_life: float = 2.0) -> Load:
    """Fold the scraped record, every router's in-flight count and own fresh dispatches.

    The record is discounted by its age (queues drain; an old figure is weak evidence).
    Own dispatches since the record are not in it, so they add to the queue at once. In-flight
    requests from every router that the record cannot explain (it is old, or they are newer)
    also count as queued. Nothing is counted twice.
    """
    d = age_discount(r.load_age, half_life)
    waiting = d * r.waiting + r.fresh
    running = d * r.running
    unexplained = r.inflight - (waiting + running)
    if unexplained > 0:
        waiting += unexplained
    return Load(waiting=waiting, running=running)


def cached_tokens(request: Request, matched_blocks: int) -> int:
    """Prompt tokens an engine can reuse: whole matched blocks, never the last token."""
    if request.num_tokens == 0:
        return 0
    return max(0, min(matched_blocks * request.block_size, request.num_tokens - 1))


def pick_scope(params_scope: str) -> str:
    if params_scope not in {"mesh", "local"}:
        raise PolicyError(f"scope must be 'mesh' or 'local', got {params_scope!r}")
    return params_scope


def top(scored: Sequence[Scored], n: int = 4) -> tuple[Scored, ...]:
    return tuple(sorted(scored, key=lambda s: s.cost)[:n])
