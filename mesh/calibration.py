"""Online calibration of the cost model's inputs from the TTFTs the router observes.

The expected-TTFT model prices a replica with a prefill rate, a queueing delay per waiting
request and a round trip per region; configured values are guesses (one default rate for
every engine). Here they are learned from outcomes, per replica this router owns and per
region it forwards into:

- **prefill rate** (tokens/s) from local requests that found no queue: the slope of observed
  time against uncached tokens past the engine's step-time floor (a hinge fit, below:
  additive terms, the floor and outliers do not bias it);
- **queue delay per waiting request, KV-barrier scale and overhead**: from every request,
  ``observed - prefill - interference = overhead + kv_scale * barrier + queue_delay *
  waiting``, fitted one Theil-Sen slope at a time (each against the residual of the other),
  the overhead being the median residual of the requests not sent behind one of the
  router's own still without its first token (never below the fastest of several first
  tokens priced no prefill): the delay a waiting request really adds, how much of the model's
  barrier for a nearly full KV cache the engine really shows in a TTFT, and what a first
  token costs beyond the model's parts (HTTP, step overheads). The prefill is priced at
  each refit with the rate and knee then current;
- **forward round trip** per region, from forwards: the observed TTFT less the model's
  engine-side parts. Membership probes (and configured/emulated delays) are its prior, and
  with no fresh forward it ages back to that prior (``RTT_FRESH_S``, below).

Every estimate is a :class:`BoundedMedian`: the median of a window of samples (one outlier
moves nothing), re-published every few samples and never more than a bounded step from the
last published value; until enough samples are in, the prior (configuration) stands.

The replica figures are facts with one writer: the router that owns the engine learns them
and publishes them in its replicated meta record (``mesh.state``), so every router prices
that replica the same way. Sans-I/O: samples come in with their numbers.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from mesh.ttft_error import Prediction

WINDOW = 64
"""Samples per estimate (the newest)."""
MIN_SAMPLES = 8
"""Samples before an estimate replaces its prior."""
EVERY = 4
"""Samples between re-publications."""
MAX_STEP = 0.5
"""A published value moves by at most this fraction of itself per re-publication..."""
MIN_STEP_S = 0.01
"""...or, for a figure in seconds, by this much (values near zero must be able to move)."""
PAIRS = 48
"""(tokens, seconds) points kept per replica for the rate fit."""
MIN_SPREAD_TOKENS = 64
"""Two points closer than this in uncached tokens say nothing about the slope."""
MIN_STEP_TOKENS = 32.0
"""The smallest bound on a step of the published knee, tokens."""
MIN_SPREAD_BARRIER = 0.005
"""Two points closer than this in barrier seconds say nothing about its scale."""
MIN_SPREAD_WAITING = 1.0
"""Two points closer than this in estimated waiting requests say nothing about its delay."""
IDLE_WAITING = 0.5
"""Estimated waiting requests below which a request found no queue."""
RTT_FRESH_S = 10.0
"""A learned round trip with no forward sample for longer than this ages back to its prior.

It is the observed TTFT less the model's engine-side parts, so it also holds the remote
prediction's error: a burst of forwards that lost (a remote queue the model missed) raises
it well above the network's figure, and a region priced out by it gets no forward again, so
no sample could ever bring it back. Past this, the excess over the prior (the measured round
trip) halves every ``RTT_HALF_LIFE_S``; the old samples describe another time and are
dropped at the next forward, which restarts the estimate from the aged value. While
forwards flow (a sample at least this often) nothing changes. Chosen over a cap at a
multiple of the measured round trip because that would also bound the figure while
forwards keep showing it. The region's forwarding band, measured on the same forwards,
is dropped at the same point (``mesh.outcomes``), or it alone would keep the region shut."""
RTT_HALF_LIFE_S = 10.0
"""Half-life of a stale learned round trip's distance from its prior."""
MIN_RISE = 6
"""Points a hinge fit's rising part needs (fewer cannot show a trend: see ``RISE_Z``)."""
RISE_Z = 2.5
"""Kendall z-score the rising part's trend must reach (one-sided, about 0.6%)."""
RISE_NOISE = 4.0
"""How many times the points' median distance from the fit the rising part must climb.

Measured on synthetic windows (a 47 ms floor, a uniform 0-47 ms wait, 1 in 20 stuck): a
trend the rank test alone lets through on a cloud inside the floor climbs 1.5-5 times that
distance (33 of 6,000 windows passed it, 3 of them this too); a real rise 5-30 times. With
both checks, flat clouds 8-48 points wide up to 2,000 tokens pass 0-0.6% of refits, none
inside the floor, and a floor-then-line window of chat turns passes about half of them."""


@dataclass(slots=True)
class BoundedMedian:
    """A robust, rate-limited estimate: the median of recent samples, stepped towards."""

    prior: float | None = None
    lo: float = 0.0
    hi: float = math.inf
    min_step: float = 0.0
    """The smallest bound on a step, in the figure's unit (see ``MAX_STEP``)."""
    jump_first: bool = False
    """The first published value is the samples' own estimate, not a step from the prior
    (for direct measurements whose prior is a placeholder, e.g. an overhead of 0)."""
    value: float | None = None
    """The published value (None: not enough samples yet, the prior stands)."""
    samples: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    _since: int = 0

    def add(self, x: float) -> bool:
        """One sample; True when the published value changed."""
        if not math.isfinite(x):
            return False
        self.samples.append(min(max(x, self.lo), self.hi))
        self._since += 1
        if len(self.samples) < MIN_SAMPLES or self._since < EVERY:
            return False
        self._since = 0
        return self.step_to(statistics.median(self.samples))

    def step_to(self, target: float, first_from: float | None = None) -> bool:
        """Publish a bounded step from the current value towards ``target``; True if it
        changed. (Estimates fitted elsewhere, e.g. a line's slope, publish through this.)
        ``first_from``: where a first value steps from instead of jumping (``jump_first``)."""
        base = self.value if self.value is not None else self.prior
        if self.value is None and first_from is not None:
            base = first_from
        if base is None or (self.value is None and self.jump_first and first_from is None):
            new = target
        else:
            step = max(self.min_step, MAX_STEP * abs(base))
            new = min(max(target, base - step), base + step)
        new = min(max(new, self.lo), self.hi)
        changed = new != self.value
        self.value = new
        return changed

    @property
    def current(self) -> float | None:
        return self.value if self.value is not None else self.prior


@dataclass(frozen=True, slots=True)
class Calibrated:
    """What one replica's owner publishes about it (None: not learned yet)."""

    prefill_rate: float | None = None
    queue_delay: float | None = None
    overhead: float | None = None
    kv_scale: float | None = None
    prefill_knee: float | None = None
    """Uncached tokens a prefill gets for the engine's step-time floor (priced with the
    learned rate only: a configured rate is taken as given, without a knee)."""

    def as_dict(self) -> dict[str, float]:
        out = {}
        for k in ("prefill_rate", "queue_delay", "overhead", "kv_scale", "prefill_knee"):
            v = getattr(self, k)
            if v is not None:
                out[k] = round(v, 6)
        return out

    @staticmethod
    def from_dict(value: object) -> Calibrated:
        """From a replicated meta entry; anything malformed is ignored (not learned)."""
        if not isinstance(value, dict):
            return Calibrated()

        def num(k: str, lo: float, hi: float) -> float | None:
            v = value.get(k)
            if isinstance(v, int | float) and not isinstance(v, bool) and lo <= v <= hi:
                return float(v)
            return None

        return Calibrated(num("prefill_rate", 1.0, 1e9), num("queue_delay", 0.0, 600.0),
                          num("overhead", 0.0, 60.0), num("kv_scale", 0.0, 2.0),
                          num("prefill_knee", 0.0, 1e7))


def theil_sen_slope(points: Sequence[tuple[float, float]], min_dx: float) -> float | None:
    """The median slope over every pair of points at least ``min_dx`` apart in x: a line's
    slope that one bad point in three cannot move (None: no such pair)."""
    slopes = [(y2 - y1) / (x2 - x1)
              for i, (x1, y1) in enumerate(points) for x2, y2 in points[i + 1:]
              if abs(x2 - x1) >= min_dx]
    return statistics.median(slopes) if slopes else None


def kendall_z(points: Sequence[tuple[float, float]], min_dx: float) -> float:
    """Kendall's S over the pairs at least ``min_dx`` apart in x (each +1 when y rises with
    x, -1 when it falls), over its standard deviation were y independent of x.

    That null variance, for any set of pairs: each pair's sign has variance 1; two pairs
    sharing a point covary by +1/3 when the point is the lower-x end of both or the
    upper-x end of both, by -1/3 otherwise. With ``lo``/``hi`` a point's count of pairs in
    which it is the lower/upper end: ``Var S = P + (sum (lo - hi)^2 - 2 P) / 3`` for P
    pairs (all pairs of n points give Kendall's ``n (n - 1) (2n + 5) / 18``).
    """
    pts = sorted(points)
    n = len(pts)
    s = pairs = 0
    ends = [0] * n
    for i in range(n):
        x1, y1 = pts[i]
        for j in range(i + 1, n):
            x2, y2 = pts[j]
            if x2 - x1 >= min_dx:
                pairs += 1
                ends[i] += 1
                ends[j] -= 1
                if y2 != y1:
                    s += 1 if y2 > y1 else -1
    var = pairs + (sum(e * e for e in ends) - 2 * pairs) / 3
    return s / math.sqrt(var) if var > 0 else 0.0


def hinge_fit(points: Sequence[tuple[float, float]], min_dx: float) -> tuple[float, float] | None:
    """(slope, knee) of ``y = floor + slope * max(0, x - knee)``, or None.

    A prefill shorter than a few hundred tokens costs the engine's minimum step time (the
    weights are read once per step however few tokens it computes); only past that knee does
    time grow with tokens. A line through every (uncached tokens, seconds) point is pulled
    flat by the many short prefills on the floor (a rate up to several times the true one),
    so the knee is found first: each candidate knee (the points' x, from the top
    ``MIN_RISE`` points up in steps of 1.25x as many) gets the Theil-Sen slope of the points
    at or past it and the median floor, and the candidate with the least absolute deviation
    over all points wins (least absolute deviation, like Theil-Sen, is not moved by a few
    requests stuck behind something the model never saw). Selecting on x, never on y,
    keeps the slope unbiased. The rising part must show a trend (``RISE_Z``) that climbs
    well clear of the noise (``RISE_NOISE``): points all on the floor say nothing about the
    rate, and leave it where it was.

    The knee returned (the tokens a prefill gets for the floor's price) is then placed at
    the resolution of the points: the x of any point that, with the slope found, leaves the
    least absolute deviation (the candidates above are coarser, to keep the slope fits few).
    """
    pts = sorted(points)
    n = len(pts)
    sizes: list[int] = []
    k = float(n)
    while k >= MIN_RISE:
        if int(k) not in sizes:
            sizes.append(int(k))
        k /= 1.25
    xs = [x for x, _ in pts]
    ys = [y for _, y in pts]
    # Every pair's slope once, by its lower point (a candidate's Theil-Sen slope is the
    # median of the pairs at or past it). The points are sorted, so the points before a
    # split are at or below its knee: ``max(0, x - knee)`` is 0 there and ``x - knee``
    # past it, the same floats as evaluating it everywhere, in the same order.
    by_low = [[(y2 - y1) / (x2 - x1) for x2, y2 in pts[a + 1:] if abs(x2 - x1) >= min_dx]
              for a, (x1, y1) in enumerate(pts)]
    best: tuple[float, float, int, list[float]] | None = None
    for m in sizes:
        i = n - m
        knee = xs[i]
        pairs = [v for a in range(i, n) for v in by_low[a]]
        if not pairs:
            continue
        slope = statistics.median(pairs)
        if slope <= 0:
            continue
        floor = statistics.median(
            ys[:i] + [y - slope * (x - knee) for x, y in zip(xs[i:], ys[i:], strict=True)])
        off = [abs(y - floor) for y in ys[:i]] + [
            abs(y - floor - slope * (x - knee)) for x, y in zip(xs[i:], ys[i:], strict=True)]
        cost = sum(off)
        if best is None or cost < best[0]:
            best = (cost, slope, i, off)
    if best is None:
        return None
    _, slope, i, off = best
    if (kendall_z(pts[i:], min_dx) < RISE_Z
            or slope * (pts[-1][0] - pts[i][0]) < RISE_NOISE * statistics.median(off)):
        return None
    knee, least = 0.0, math.inf
    for j in range(n - MIN_RISE + 1):
        if j:
            k = xs[j]  # past the first point only: no floor seen, no knee
            floor = statistics.median(
                ys[:j] + [y - slope * (x - k) for x, y in zip(xs[j:], ys[j:], strict=True)])
            cost = sum([abs(y - floor) for y in ys[:j]] + [
                abs(y - floor - slope * (x - k)) for x, y in zip(xs[j:], ys[j:], strict=True)])
        else:
            k = 0.0
            floor = statistics.median(y - slope * max(0.0, x - k) for x, y in pts)
            cost = sum(abs(y - floor - slope * max(0.0, x - k)) for x, y in pts)
        if cost < least:
            knee, least = k, cost
    return slope, knee


@dataclass(slots=True)
class ReplicaModel:
    prefill_rate: BoundedMedian
    """Published rate: 1 / the hinge fit's slope of ``idle`` (:func:`hinge_fit`)."""
    prefill_knee: BoundedMedian = field(
        default_factory=lambda: BoundedMedian(0.0, 0.0, 1e7, MIN_STEP_TOKENS, jump_first=True))
    """Published knee (tokens): a prefill of ``u`` uncached tokens is priced
    ``max(0, u - knee) / rate``, the floor below the knee being part of the overhead."""
    idle: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=PAIRS))
    """(uncached tokens, observed seconds) of requests that found no queue."""
    rest: deque[tuple[float, float, float, float, bool]] = field(
        default_factory=lambda: deque(maxlen=PAIRS))
    """(estimated waiting, the model's KV-barrier seconds, observed seconds less round trip
    and decode interference, uncached tokens, whether an earlier request of the router's to
    the engine had no first token yet: ``behind``) of every request. Less the prefill as
    priced at the refit (:meth:`prefill`), ``y = overhead + kv_scale * barrier + queue_delay *
    waiting``, fitted one slope at a time (each a Theil-Sen slope of the residual of the
    other, so an intercept or an outlier biases neither).

    The prefill is taken off at each refit, never when a sample comes in: priced then, at a
    rate and knee since replaced (the configured default before the rate is learned), the
    residuals would be those of another model, and their median (the overhead) with them.
    A too-high early prefill of long prompts, for one, left residuals below 0, an overhead
    fitted to its bound of 0 and, once a knee above short prompts was learned, a first
    token predicted at 0 s."""
    configured: float | None = None
    """The engine's configured prefill rate: priced as given, without a knee."""
    kv_scale: BoundedMedian = field(
        default_factory=lambda: BoundedMedian(1.0, 0.0, 2.0, 0.25))
    overhead: BoundedMedian = field(
        default_factory=lambda: BoundedMedian(0.0, 0.0, 60.0, MIN_STEP_S, jump_first=True))
    """What a first token costs beyond the model's parts (HTTP and step overheads)."""
    queue_delay: BoundedMedian = field(
        default_factory=lambda: BoundedMedian(None, 0.0, 600.0, MIN_STEP_S))
    _since_idle: int = 0
    _since_rest: int = 0

    def published(self) -> Calibrated:
        return Calibrated(self.prefill_rate.value, self.queue_delay.value, self.overhead.value,
                          self.kv_scale.value, self.prefill_knee.value)

    def pricing(self, default_rate: float) -> tuple[float, float]:
        """(rate, knee) of the prefill as the policy prices it now: a configured rate as
        given, else the learned rate past the learned knee (the floor below it is in the
        overhead)."""
        if self.configured:
            return self.configured, 0.0
        return self.prefill_rate.current or default_rate, self.prefill_knee.current or 0.0

    def refit_rate(self) -> bool:
        """Every few idle samples: step the published rate towards 1 / (fitted slope); no
        step while the samples show no rise past the step-time floor."""
        self._since_idle += 1
        if len(self.idle) < MIN_SAMPLES or self._since_idle < EVERY:
            return False
        self._since_idle = 0
        fit = hinge_fit(list(self.idle), MIN_SPREAD_TOKENS)
        if fit is None:
            return False
        slope, knee = fit
        changed = self.prefill_rate.step_to(1.0 / slope)
        return self.prefill_knee.step_to(knee) or changed

    def refit_rest(self, default_rate: float, peers: float | None = None) -> bool:
        """Every few samples: queue delay, barrier scale, then the overhead (intercept), each
        of the residuals of the prefill as priced now.

        The overhead is never below the fastest of at least ``MIN_SAMPLES`` first tokens
        of requests that found no queue and are priced no prefill (at or below the knee):
        the model prices such a request at the overhead (and decode interference), and the
        fastest of several is the least it can be. The median residual can fall below it
        when the queue-delay slope overshoots (the intercept goes below 0), which priced a
        short idle request at about 0 s. With fewer such requests there is no bound (the
        fastest of two or three stuck behind a queue the router did not see says nothing
        about the floor).

        The overhead steps towards the slowest of the newest ``EVERY`` residuals when all of
        them found no queue and are more than one step (``MAX_STEP``) below the window's
        median (a request that found no queue measures the overhead most directly). The median
        follows a change only once half the window shows it, and a burst the model does not
        see (the startup's queues, priced as none) can fill a replica's window with residuals
        of 0.5-1 s: the replica is then priced out, gets a request now and then, and its
        window would take half a minute to turn over while each of those requests comes back
        several times faster (in the region sweep, a home engine priced 0.65 s too slow for
        35 s while the other engine and the forwards carried its load). A whole refit's worth
        of residuals that far below is a regime, not noise (the local decisions' median error
        is about 15%). The older samples are then dropped (the queue delay and barrier scale
        are refitted once ``MIN_SAMPLES`` newer ones are in): kept, the next refit's median
        would pull the figure back up. Steps stay bounded: one refit halves it at most.

        The first published overhead is one bounded step from ``peers`` (the median of the
        router's other replicas' overheads) when there is one, not the samples' own median:
        a startup burst can fill a new window with residuals many times the truth, and the
        replica's peers are the best prior there is (the view prices an unknown overhead at
        its peers' median too). With no peer it is the samples' median, as before.

        The overhead's residuals are those of requests not sent ``behind`` one of the
        router's own to the engine that had no first token yet: the engine counts a request
        admitted to its batch as running while its prefill still holds the engine, so the
        waiting estimate misses that queue and the residual holds the prefills ahead. In a
        burst every residual is such a one (0.6-1 s for a 70 ms overhead, on real
        processes), and a bounded step per refit still climbed to 0.6 s in the burst's two
        seconds. With fewer than ``EVERY`` other residuals in the window the overhead stays
        (unpublished, the view prices it as its peers)."""
        self._since_rest += 1
        if len(self.rest) < MIN_SAMPLES or self._since_rest < EVERY:
            return False
        self._since_rest = 0
        rate, knee = self.pricing(default_rate)
        pts = [(w, kv, y - (u - knee if u > knee else 0.0) / rate)
               for w, kv, y, u, _ in self.rest]
        changed = False
        s = self.kv_scale.current if self.kv_scale.current is not None else 1.0
        q = theil_sen_slope([(w, y - s * kv) for w, kv, y in pts], MIN_SPREAD_WAITING)
        if q is not None:
            changed |= self.queue_delay.step_to(max(0.0, q))
        q = self.queue_delay.current or 0.0
        slope = theil_sen_slope([(kv, y - q * w) for w, kv, y in pts], MIN_SPREAD_BARRIER)
        if slope is not None:
            changed |= self.kv_scale.step_to(slope)
        s = self.kv_scale.current if self.kv_scale.current is not None else 1.0
        floor = [y for u, y in self.idle if u <= knee]
        fastest = min(floor) if len(floor) >= MIN_SAMPLES else 0.0
        res = [y - s * kv - q * w for w, kv, y in pts]
        clear = [x for x, (*_, behind) in zip(res, self.rest, strict=True) if not behind]
        if len(clear) < EVERY:
            # Nearly every request queued behind the router's own (a burst): their
            # residuals hold those prefills, not what one first token costs.
            return changed
        target = statistics.median(clear)
        newest = max(res[-EVERY:])
        if (newest < (1.0 - MAX_STEP) * target and not any(w for w, _, _ in pts[-EVERY:])
                and not any(b for *_, b in list(self.rest)[-EVERY:])):
            # Every request since the last refit found no queue and paid less than one step
            # below the window's median: the window describes another time (the docstring),
            # and only these requests are kept to fit the next steps on.
            target = newest
            fresh = list(self.rest)[-EVERY:]
            self.rest.clear()
            self.rest.extend(fresh)
        changed |= self.overhead.step_to(max(target, fastest), peers)
        return changed


@dataclass(slots=True)
class Calibrator:
    """Per owned replica and per forwarded-into region; see the module docstring."""

    default_rate: float = 8000.0
    """The policy's prefill rate: the prior of replicas configured without one."""
    replicas: dict[str, ReplicaModel] = field(default_factory=dict)
    rtt: dict[str, BoundedMedian] = field(default_factory=dict)
    rtt_at: dict[str, float] = field(default_factory=dict)
    """Region -> when its newest forward sample came (the caller's clock)."""
    version: int = 0
    """Bumped whenever a published replica figure changes (the meta record is rewritten)."""

    def own(self, replica: str, configured_rate: float | None) -> ReplicaModel:
        m = self.replicas.get(replica)
        if m is None:
            prior = configured_rate or self.default_rate
            m = self.replicas[replica] = ReplicaModel(BoundedMedian(prior, 1.0, 1e9))
        # As configured now (a reload may set or clear an engine's rate): the refits price
        # the prefill as the policy does.
        m.configured = configured_rate or None
        return m

    def observe_local(self, p: Prediction, uncached: int, observed: float,
                      configured_rate: float | None = None, behind: bool = False) -> None:
        """A request this router sent to its own engine got its first byte after
        ``observed`` seconds (from the decision). ``behind``: when it was sent, an earlier
        request of this router's to the same engine had no first token yet (it queued
        behind that prefill whatever the engine's waiting count said)."""
        if not (math.isfinite(observed) and observed > 0):
            return
        m = self.own(p.replica, configured_rate)
        decode, kv = p.part("decode"), p.part("kv")
        waiting = p.part("waiting")
        idle = waiting < IDLE_WAITING and not behind
        interference = decode - kv
        changed = False
        if idle:
            # The rate from the slope of time against uncached tokens (additive terms of the
            # model, right or wrong, do not bias a slope).
            m.idle.append((float(uncached), observed))
            changed |= m.refit_rate()
        m.rest.append((waiting if waiting >= IDLE_WAITING else 0.0, kv,
                       observed - p.part("rtt") - interference, float(uncached), behind))
        # Only a first overhead steps from its peers': once published, it moves from itself.
        peers = self._peer_overhead(p.replica) if m.overhead.value is None else None
        changed |= m.refit_rest(self.default_rate, peers)
        if changed:
            self.version += 1

    def observe_forward(self, p: Prediction, observed: float, now: float) -> None:
        """A forward into ``p.region`` got its first byte after ``observed`` seconds, at
        ``now``: what the round trip really cost is the rest once the engine-side parts are
        taken off."""
        if not (math.isfinite(observed) and observed > 0):
            return
        rtt = p.part("rtt")
        engine = p.cost - rtt
        est = self.rtt.get(p.region)
        if est is None:
            est = self.rtt[p.region] = BoundedMedian(rtt if rtt > 0 else None, 0.0, 60.0,
                                                     MIN_STEP_S, jump_first=True)
        elif now - self.rtt_at.get(p.region, now) > RTT_FRESH_S:
            # Stale: restart from the aged value; the old samples describe another time.
            est.value = self._aged(p.region, now)
            est.samples.clear()
        self.rtt_at[p.region] = now
        est.add(observed - engine)

    def _aged(self, region: str, now: float) -> float | None:
        est = self.rtt[region]
        if est.value is None or est.prior is None:
            return est.value
        stale = now - self.rtt_at.get(region, now) - RTT_FRESH_S
        if stale <= 0:
            return est.value
        return est.prior + (est.value - est.prior) * math.pow(0.5, stale / RTT_HALF_LIFE_S)

    def _peer_overhead(self, replica: str) -> float | None:
        """The median published overhead of the other owned replicas (None: none has one)."""
        known = [o for r, m in self.replicas.items()
                 if r != replica and (o := m.overhead.value) is not None]
        return statistics.median(known) if known else None

    def published(self, replica: str) -> Calibrated:
        m = self.replicas.get(replica)
        return m.published() if m is not None else Calibrated()

    def learned_rtt(self, now: float) -> dict[str, float]:
        """Region -> learned forward round trip at ``now`` (aged back towards its prior
        when no forward was measured there lately: ``RTT_FRESH_S``)."""
        return {r: v for r in self.rtt if (v := self._aged(r, now)) is not None}

    def status(self, now: float) -> dict[str, object]:
        return {
            "replicas": {r: {**m.published().as_dict(),
                             "samples": {"prefill": len(m.idle), "rest": len(m.rest),
                                         "queue": len(m.queue_delay.samples)}}
                         for r, m in sorted(self.replicas.items())},
            "rtt_s": {r: round(v, 5) for r, v in sorted(self.learned_rtt(now).items())},
        }
