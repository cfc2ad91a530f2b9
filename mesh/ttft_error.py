"""Predicted vs observed TTFT, per route kind: how wrong the cost model is, measured.

Every placed request carries the policy's prediction for the replica it chose (its cost and
the parts of it: round trip, queue, prefill, decode interference, calibration). When the
first byte of the answer arrives the shell reports how long it took, and :class:`TtftErrors`
keeps a bounded window of (predicted, observed) pairs per route kind (``local``,
``forwarded``) and per region pair (``us->eu``; at most :data:`MAX_PAIRS` distinct pairs, the
rest under ``other``). From the windows come the median absolute relative error (what the
cost model is judged by), the signed bias, and the *error band* the forwarding rule reads:
how far a forward's observed TTFT strayed above its prediction, and how often a forward did
worse than the best local replica was predicted to do ("lost").

Sans-I/O: observations come in with their numbers; nothing here reads a clock.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from mesh.policies.base import Decision

KINDS = ("local", "forwarded")
MAX_PAIRS = 16
"""Distinct region-pair labels kept (a mesh has few regions; anything else is ``other``)."""
WINDOW = 512
"""Observations kept per route kind and per region pair (the newest)."""
MIN_BAND_SAMPLES = 8
"""Forwards into a region seen before its measured band replaces the prior."""


@dataclass(frozen=True, slots=True)
class Prediction:
    """What the policy expected of one placement, kept until its first byte arrives."""

    replica: str
    home: str
    """The deciding router's region."""
    region: str
    """The chosen replica's region."""
    cost: float
    """Predicted TTFT, seconds (without any forwarding premium)."""
    parts: tuple[tuple[str, float], ...]
    home_best: float | None = None
    """For a forward: the predicted TTFT of the best replica at home (None: none, or local)."""

    @property
    def kind(self) -> str:
        return "local" if self.region == self.home else "forwarded"

    @property
    def pair(self) -> str:
        return f"{self.home}->{self.region}"

    def part(self, name: str, default: float = 0.0) -> float:
        for k, v in self.parts:
            if k == name:
                return v
        return default


NOT_TTFT = frozenset({"premium", "gen", "mixing"})
"""Parts of a candidate's cost that are not time to the first token: the forwarding premium
and, when a policy ranks by end-to-end latency, the predicted decode and mixing penalty."""


def prediction_of(d: Decision, home: str) -> Prediction | None:
    """The chosen candidate's predicted TTFT, from the decision's explained candidates."""
    if d.replica is None:
        return None
    for c in d.candidates:
        if c.replica == d.replica:
            parts = c.parts
            premium = 0.0
            home_best = None
            for k, v in parts:
                if k in NOT_TTFT:
                    premium += v
                elif k == "home":
                    home_best = v if math.isfinite(v) else None
            if not math.isfinite(c.cost):
                return None
            return Prediction(d.replica, home, c.region, c.cost - premium, parts, home_best)
    return None


@dataclass(slots=True)
class ErrorWindow:
    """The newest (predicted, observed) pairs of one route kind or region pair."""

    pairs: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=WINDOW))
    count: int = 0
    abs_error_sum: float = 0.0
    """Sum of |observed - predicted| seconds over every observation (a counter)."""
    lost: int = 0
    """Forwards whose observed TTFT exceeded the predicted TTFT of the best home replica."""
    losses: deque[bool] = field(default_factory=lambda: deque(maxlen=WINDOW))

    def add(self, predicted: float, observed: float, lost: bool | None) -> None:
        self.pairs.append((predicted, observed))
        self.count += 1
        self.abs_error_sum += abs(observed - predicted)
        if lost is not None:
            self.losses.append(lost)
            self.lost += lost

    def rel_errors(self) -> list[float]:
        return [abs(o - p) / o for p, o in self.pairs if o > 0]

    def median_abs_rel(self) -> float | None:
        errs = self.rel_errors()
        return statistics.median(errs) if errs else None

    def quantile_abs_rel(self, q: float) -> float | None:
        errs = sorted(self.rel_errors())
        if not errs:
            return None
        return errs[min(len(errs) - 1, int(q * len(errs)))]

    def bias(self) -> float | None:
        """Median of (observed - predicted) / observed: > 0 means the model is optimistic."""
        errs = [(o - p) / o for p, o in self.pairs if o > 0]
        return statistics.median(errs) if errs else None

    def under(self, q: float) -> float:
        """The ``q``-quantile of how far observations exceeded predictions, seconds (>= 0)."""
        over = sorted(max(0.0, o - p) for p, o in self.pairs)
        if not over:
            return 0.0
        return over[min(len(over) - 1, int(q * len(over)))]

    def over(self, q: float) -> float:
        """The ``q``-quantile of how far predictions exceeded observations, seconds (>= 0)."""
        over = sorted(max(0.0, p - o) for p, o in self.pairs)
        if not over:
            return 0.0
        return over[min(len(over) - 1, int(q * len(over)))]

    def loss_rate(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else 0.0

    def summary(self) -> dict[str, float | int | None]:
        med = self.median_abs_rel()
        p90 = self.quantile_abs_rel(0.9)
        bias = self.bias()
        out: dict[str, float | int | None] = {
            "count": self.count,
            "window": len(self.pairs),
            "median_abs_rel_error": None if med is None else round(med, 4),
            "p90_abs_rel_error": None if p90 is None else round(p90, 4),
            "bias": None if bias is None else round(bias, 4),
            "mean_abs_error_s": round(self.abs_error_sum / self.count, 5) if self.count
            else None,
        }
        if self.losses:
            out["lost"] = self.lost
            out["loss_rate"] = round(self.loss_rate(), 4)
        return out


@dataclass(slots=True)
class TtftErrors:
    """Windows of prediction errors by route kind and region pair (bounded labels)."""

    band_quantile: float = 0.5
    """Which quantile of the one-sided errors makes the band: at 0.5, the measured bias of
    each side (the expected saving; the spread of symmetric noise buys no round trip)."""
    prior_band: float = 0.0
    """Band before enough forwards were seen, as a fraction of the forward's predicted TTFT."""
    kinds: dict[str, ErrorWindow] = field(
        default_factory=lambda: {k: ErrorWindow() for k in KINDS})
    pairs: dict[str, ErrorWindow] = field(default_factory=dict)
    into: dict[str, ErrorWindow] = field(default_factory=dict)
    """Forwards by target region (the band's source), bounded like ``pairs``."""

    def observe(self, p: Prediction, observed: float) -> None:
        """The first byte of ``p``'s answer came ``observed`` seconds after the decision."""
        if not (math.isfinite(observed) and observed >= 0):
            return
        lost = None if p.home_best is None else observed > p.home_best
        self.kinds[p.kind].add(p.cost, observed, lost)
        self._window(self.pairs, p.pair).add(p.cost, observed, lost)
        if p.kind == "forwarded":
            self._window(self.into, p.region).add(p.cost, observed, lost)

    @staticmethod
    def _window(table: dict[str, ErrorWindow], key: str) -> ErrorWindow:
        w = table.get(key)
        if w is None:
            if len(table) >= MAX_PAIRS:
                key = "other"
                w = table.get(key)
            if w is None:
                w = table[key] = ErrorWindow()
        return w

    def band(self, region: str) -> float | None:
        """Seconds a forward into ``region`` must be predicted to save before it is taken:
        the saving is a difference of two predictions, and it is false when the forward is
        slower than predicted or home faster: the ``band_quantile`` of how far forwards there
        overshot their prediction, combined with that of how far local decisions came in
        under theirs, widened by the share of forwards that lost to home. None: too few
        forwards seen yet."""
        w = self.into.get(region)
        if w is None or len(w.pairs) < MIN_BAND_SAMPLES:
            return None
        fwd = w.under(self.band_quantile)
        local = self.kinds["local"].over(self.band_quantile)
        return math.hypot(fwd, local) * (1.0 + w.loss_rate())

    def prior(self) -> float | None:
        """The band of a region no forward into which was measured yet: the local
        decisions' error on both sides, the ``band_quantile`` of how far they came in over
        and under their predictions. A forward's engine side is priced by the same model, so
        its saving is at least that uncertain; early on, before the router has learned its
        engines' overheads and rates, that is most of a TTFT, and no near-tie pays a round
        trip. None: too few local decisions seen (``prior_band`` decides)."""
        w = self.kinds["local"]
        if len(w.pairs) < MIN_BAND_SAMPLES:
            return None
        return math.hypot(w.under(self.band_quantile), w.over(self.band_quantile))

    def bands(self) -> dict[str, float]:
        out = {}
        for region in self.into:
            b = self.band(region)
            if b is not None:
                out[region] = b
        return out

    def status(self) -> dict[str, object]:
        return {
            "kinds": {k: w.summary() for k, w in self.kinds.items()},
            "pairs": {k: w.summary() for k, w in sorted(self.pairs.items())},
            "bands_s": {k: round(v, 5) for k, v in sorted(self.bands().items())},
            "prior_band_s": None if (prior := self.prior()) is None else round(prior, 5),
            "prior_band": self.prior_band,
        }

    def rows(self) -> Iterable[tuple[str, str, ErrorWindow]]:
        """(kind, pair, window) for every pair window; kind from the pair's two ends."""
        for pair, w in sorted(self.pairs.items()):
            src, _, dst = pair.partition("->")
            yield ("local" if src == dst else "forwarded" if dst else "other"), pair, w


def summarize_errors(pairs: Iterable[tuple[float, float]]) -> Mapping[str, float | int | None]:
    """The summary of a list of (predicted, observed) pairs (simulator and bench reports)."""
    w = ErrorWindow(pairs=deque(maxlen=None))
    for p, o in pairs:
        w.add(p, o, None)
    return w.summary()
