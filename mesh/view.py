"""Builds the routing :class:`~mesh.policies.View` from what this router knows.

Sources, each with one writer:

- this router's engine monitor: health and load of the local engines, measured here;
- the replicated load vector: every replica's last load record (with its age) and the
  in-flight counts every router publishes;
- this router's own dispatch ledger (:class:`Dispatches`): requests in flight right now,
  counted the moment they are dispatched, never waiting for a scrape or a gossip round;
- membership: regions, their routers and the measured round trips;
- the prefix index: which replica holds which blocks.

A replica's ``inflight`` is the other routers' published counts plus this router's live
count, less this router's forwards that the owner's published count already holds, and
``fresh`` is this router's in-flight requests dispatched after the replica's load record was
measured, so :func:`~mesh.policies.base.estimate_load` counts nothing twice.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import NamedTuple

from mesh.policies.base import NoPrefixes, PrefixLookup, RegionView, ReplicaView, View


class ReplicaRecord(NamedTuple):
    """One replica's load as the replicated state has it (local or remote).

    A named tuple rather than a dataclass: the state makes one per replica per decision.
    """

    replica: str
    region: str
    healthy: bool
    waiting: float
    running: float
    kv_usage: float
    age: float
    """Seconds since the record was measured, on the reporting router's clock."""
    others_inflight: int = 0
    """In-flight requests to it published by routers other than this one."""
    prefill_rate: float | None = None
    models: tuple[str, ...] = ()
    """Models the engine serves (empty: not known yet, assumed to serve any)."""
    owner: str | None = None
    """Base URL of the live router reporting it (None: this router's own, or unknown)."""
    inflight_age: float = float("inf")
    """Age of the owner's published in-flight counts: this router's forwards to the replica
    sent before then are in ``others_inflight`` already (inf: assume none are)."""
    queue_delay: float | None = None
    """Learned delay per waiting request, published by the replica's owner."""
    overhead: float | None = None
    """Learned fixed first-token overhead, published by the replica's owner (None: not
    learned yet; the view prices it like its peers, :func:`overhead_prior`)."""
    kv_scale: float | None = None
    """Learned share of the KV-barrier term, published by the replica's owner."""
    prefill_knee: float = 0.0
    """Learned tokens a prefill gets for the step floor (with the learned rate only)."""
    kv_peak: float | None = None
    """The highest KV usage the engine reported lately (this router's own engines only)."""
    kv_trend: float | None = None
    """The recent slope of its KV usage, per second (this router's own engines only)."""


@dataclass(frozen=True, slots=True)
class RegionRecord:
    region: str
    rtt: float | None
    """Measured round trip to the region's routers, seconds (None: not measured yet)."""
    routers: tuple[str, ...]
    """Base URLs of live routers in that region."""
    queue: int = 0


def region_key(region: str) -> str:
    """Ledger key of requests pushed to a region's router without naming a replica."""
    return f"region:{region}"


@dataclass(slots=True)
class Ticket:
    id: int
    replica: str
    region: str
    at: float
    tokens: int
    publish: bool = True
    """False for requests forwarded to another region's router: that router publishes them."""
    work: float = 0.0
    """Predicted output tokens of the request (its decode work)."""


@dataclass(slots=True)
class Dispatches:
    """This router's requests in flight, by replica: the one writer of our in-flight counts."""

    _ids: itertools.count[int] = field(default_factory=itertools.count)
    _open: dict[str, dict[int, Ticket]] = field(default_factory=dict)
    version: int = 0
    """Bumped on every change, so publishers know when to write the load vector."""
    _published: dict[str, int] = field(default_factory=dict)
    """Open tickets with ``publish`` per replica (what :meth:`counts` publishes)."""
    work: dict[str, float] = field(default_factory=dict)
    """Predicted output tokens in flight, by replica (sum of the open tickets' ``work``)."""
    _last_at: float = float("-inf")
    _ordered: bool = True
    """Every ticket so far started no earlier than the one before it (one clock, read in
    order: always so in the router and the simulator). Then each replica's open tickets,
    in the order they started, are in ``at`` order too, and :meth:`fresh` and
    :meth:`covered` stop at the first ticket past their bound instead of reading all."""

    def start(self, replica: str, region: str, tokens: int, now: float,
              publish: bool = True, work: float = 0.0) -> Ticket:
        if now >= self._last_at:
            self._last_at = now
        else:
            self._ordered = False
        t = Ticket(next(self._ids), replica, region, now, tokens, publish, work)
        self._open.setdefault(replica, {})[t.id] = t
        if publish:
            self._published[replica] = self._published.get(replica, 0) + 1
        if work:
            self.work[replica] = self.work.get(replica, 0.0) + work
        self.version += 1
        return t

    def done(self, ticket: Ticket) -> None:
        by = self._open.get(ticket.replica)
        if by is not None and by.pop(ticket.id, None) is not None:
            self.version += 1
            if ticket.publish:
                n = self._published[ticket.replica] - 1
                if n:
                    self._published[ticket.replica] = n
                else:
                    del self._published[ticket.replica]
            if ticket.work:
                left = self.work.get(ticket.replica, 0.0) - ticket.work
                if by and left > 1e-6:
                    self.work[ticket.replica] = left
                else:
                    self.work.pop(ticket.replica, None)
            if not by:
                del self._open[ticket.replica]

    def inflight(self, replica: str) -> int:
        return len(self._open.get(replica, ()))

    def fresh(self, replica: str, since: float) -> int:
        """Open tickets to ``replica`` started after ``since``."""
        open_ = self._open.get(replica)
        if not open_:
            return 0
        if not self._ordered:
            return sum(1 for t in open_.values() if t.at > since)
        n = 0
        for t in reversed(open_.values()):  # newest first: the later ones are a suffix
            if t.at <= since:
                break
            n += 1
        return n

    def covered(self, replica: str, before: float) -> int:
        """Unpublished tickets (forwards) started by ``before``: the remote router that
        dispatched them has published them since."""
        open_ = self._open.get(replica)
        if not open_:
            return 0
        if not self._ordered:
            return sum(1 for t in open_.values() if not t.publish and t.at <= before)
        n = 0
        for t in open_.values():  # oldest first: the earlier ones are a prefix
            if t.at > before:
                break
            if not t.publish:
                n += 1
        return n

    def counts(self, published_only: bool = False) -> dict[str, int]:
        if published_only:
            return dict(self._published)
        out = {}
        for r, ts in self._open.items():
            n = sum(1 for t in ts.values() if t.publish) if published_only else len(ts)
            if n:
                out[r] = n
        return out

    def total(self) -> int:
        return sum(len(ts) for ts in self._open.values())


_by_replica = attrgetter("replica")


def fleet_prior(records: Sequence[ReplicaRecord]) -> tuple[float, float] | None:
    """(prefill rate, knee) for replicas whose rate nobody knows yet: the median of the
    replicas in the view that have one (they serve the same model).

    A replica's rate is learned by its owner from its own traffic; a lightly used replica
    (a quiet region's) may have too few samples for a while. Priced at the configured
    default meanwhile, it would look several times faster than its learned peers, and a
    forward there would win on a prefill estimate alone. None: every replica has a rate,
    or none has."""
    rates = [rate for r in records if (rate := r.prefill_rate)]
    if not rates or len(rates) == len(records):  # the usual cases: nothing more to do
        return None
    rates.sort()
    knees = sorted(r.prefill_knee for r in records if r.prefill_rate)
    mid = len(rates) // 2
    if len(rates) % 2:
        return rates[mid], knees[mid]
    return (rates[mid - 1] + rates[mid]) / 2, (knees[mid - 1] + knees[mid]) / 2


def overhead_prior(records: Sequence[ReplicaRecord]) -> float | None:
    """The first-token overhead of replicas whose owner has not learned one yet: the median
    of the replicas in the view that have one.

    The overhead (step floor, HTTP) is most of a light-load TTFT (~0.07 s of ~0.09 s in the
    region sweep). A busy home region learns its engines' overheads within seconds, a quiet
    region's take its owner tens of seconds; priced at 0 meanwhile, a remote replica looked
    that much faster than home, and forwards won on the difference alone (20 of the first 22
    forwards at light load in the region sweep's simulator). None: every replica has one,
    or none has (then 0)."""
    known = [o for r in records if (o := r.overhead) is not None]
    if not known or len(known) == len(records):
        return None
    known.sort()
    mid = len(known) // 2
    return known[mid] if len(known) % 2 else (known[mid - 1] + known[mid]) / 2


@dataclass(slots=True)
class ViewBuilder:
    region: str
    dispatches: Dispatches
    records: Callable[[float], Iterable[ReplicaRecord]]
    """Every replica's record (local ones included) at ``now``."""
    regions: Callable[[float], Mapping[str, RegionRecord]]
    prefix: PrefixLookup = field(default_factory=NoPrefixes)
    static_rtt: Mapping[str, float] = field(default_factory=dict)
    """Configured round trips, used until one is measured."""
    emulated_rtt: Mapping[str, float] = field(default_factory=dict)
    """Emulated round trip (``emulate_rtt``: the receiving router holds a forward that long),
    on top of the measured."""
    default_rtt: float = 0.1
    """Round trip assumed for a region with routers but neither a measurement nor a setting."""
    learned_rtt: Mapping[str, float] = field(default_factory=dict)
    """Forward round trips learned from outcomes (``mesh.outcomes``): replace the rest, but
    never below a measured round trip (see :meth:`rtt`)."""
    margins: Mapping[str, float] = field(default_factory=dict)
    """Measured forwarding error band per region (``mesh.outcomes``)."""
    prior_margin: Callable[[], float | None] = lambda: None
    """The band of a region without a measured one (``mesh.outcomes``; None: the policy's
    ``prior_band``)."""
    _home: RegionView = field(init=False)
    """The own region's entry of every view (immutable, the same each time)."""

    def __post_init__(self) -> None:
        self._home = RegionView(self.region)

    def build(self, now: float, queue: int = 0, mean_prompt_tokens: float = 256.0,
              model: str | None = None, mean_output_tokens: float = 256.0) -> View:
        """The view at ``now``; with ``model``, engines known not to serve it are left out."""
        replicas = []
        freshest: dict[str, float] = {}
        """Per region: the youngest load record in the view (own pushes after it are fresh)."""
        known = self.regions(now)
        inflight, fresh, inf = self.dispatches.inflight, self.dispatches.fresh, float("inf")
        work = self.dispatches.work.get
        recs = [rec for rec in self.records(now)
                if model is None or not rec.models or model in rec.models]
        prior = fleet_prior(recs)
        unknown_overhead = overhead_prior(recs)
        if unknown_overhead is None:
            unknown_overhead = 0.0
        for rec in recs:
            region, age = rec.region, rec.age
            rate, knee = rec.prefill_rate, rec.prefill_knee
            if not rate and prior is not None:
                rate, knee = prior
            overhead = rec.overhead
            if overhead is None:
                overhead = unknown_overhead
            if age < freshest.get(region, inf):
                freshest[region] = age
            else:
                freshest.setdefault(region, age)
            own = inflight(rec.replica)
            if own and rec.inflight_age != inf:
                # A forward reaches the owner half a round trip after it left here.
                half = self.rtt(region, known.get(region)) / 2
                own -= self.dispatches.covered(rec.replica, now - rec.inflight_age - half)
            # Positional (the field order of ReplicaView): this runs per replica per request.
            replicas.append(ReplicaView(
                rec.replica, region, rec.healthy, rec.waiting, rec.running, rec.kv_usage, age,
                rec.others_inflight + own, fresh(rec.replica, now - age) if own else 0,
                rate, rec.owner, work(rec.replica, 0.0), rec.queue_delay, overhead,
                rec.kv_scale, knee, rec.kv_peak, rec.kv_trend,
            ))
        regions: dict[str, RegionView] = {self.region: self._home}
        prior_margin = self.prior_margin()
        for name in freshest.keys() | known.keys():
            if name == self.region:
                continue
            info = known.get(name)
            regions[name] = RegionView(
                region=name,
                rtt=self.rtt(name, info),
                reachable=info is not None and bool(info.routers),
                queue=info.queue if info is not None else 0,
                pushed=fresh(region_key(name), now - freshest.get(name, 0.0)),
                routers=info.routers if info is not None else (),
                margin=self.margins.get(name, prior_margin),
            )
        return View(
            region=self.region,
            replicas=tuple(sorted(replicas, key=_by_replica)),
            regions=regions,
            prefix=self.prefix,
            queue=queue,
            mean_prompt_tokens=mean_prompt_tokens,
            mean_output_tokens=mean_output_tokens,
        )

    def rtt(self, region: str, info: RegionRecord | None) -> float:
        """Round trip of a forward into ``region``: the learned one, floored at the measured.

        A learned round trip is a forward's observed TTFT less the cost model's engine-side
        prediction, so it also holds that prediction's error: where the model overprices the
        engine side (a busy replica's KV barrier), it drifts below the network's round trip,
        down to 0, and forwards look cheaper than staying home by the model's error, which
        the home candidates keep. A forward crosses the network there and back at least
        once, so the round trip membership probes measure (plus any emulated delay) is a
        floor; a configured or default round trip is a guess, not a floor.
        """
        emulated = self.emulated_rtt.get(region, 0.0)
        measured = info.rtt if info is not None else None
        learned = self.learned_rtt.get(region)
        if learned is not None:
            if measured is not None and learned < measured + emulated:
                return measured + emulated
            return learned
        base = measured if measured is not None else self.static_rtt.get(region,
                                                                         self.default_rtt)
        return base + emulated
