"""What the router learns from each placement's outcome; the one path both shells report through.

The asyncio router (``mesh.router``) and the simulator (``sim.fleet``) do the same two
things per dispatched request: :meth:`Outcomes.begin` when the placement leaves (the chosen
candidate's predicted TTFT and its parts, from the decision), :meth:`Outcomes.first_byte`
when the first byte of the answer is back. Between them the observed TTFT is measured from
the decision, on the shell's clock. Each outcome goes to

- :class:`mesh.ttft_error.TtftErrors`: the error per route kind and region pair, and the
  forwarding band per region the policy's hysteresis reads (``RegionView.margin``);
- :class:`mesh.calibration.Calibrator`: the owned replicas' prefill rate, queue delay and
  overhead (published into the replicated meta record, read back into every router's view)
  and the forward round trip per region (``RegionView.rtt``).

Every scrape of an own engine also goes to its KV outlook (:meth:`Outcomes.scraped`,
:mod:`mesh.kv_outlook`), which the view reads for that engine.

The newest :data:`TRACE` outcomes are kept as they were predicted and observed (every
predicted part beside the observed TTFT: ``recent``, served at ``/dashboard/api/outcomes``
and read by ``kvmesh bench region-sweep``), so an error can be taken apart.

``margins`` and ``rtt`` are plain dicts the :class:`mesh.view.ViewBuilder` reads on every
view: they are updated here in place, never rebuilt on the request path. Sans-I/O.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from mesh.calibration import RTT_FRESH_S, Calibrated, Calibrator
from mesh.config import RouterConfig
from mesh.kv_outlook import Outlooks
from mesh.policies.base import Decision, Request, cached_tokens
from mesh.ttft_error import Prediction, TtftErrors, prediction_of


@dataclass(frozen=True, slots=True)
class Pending:
    """A placement on its way: what was predicted, and when it was decided."""

    prediction: Prediction
    uncached: int
    local: bool
    """Dispatched by this router to its own engine (a calibration sample of that engine)."""
    at: float
    behind: bool = False
    """A local placement sent while an earlier one of this router's to the same engine had
    no first byte yet (:meth:`Outcomes.begin`)."""
    seq: int = 0
    """Its key among the engine's open placements (:meth:`Outcomes.ended`)."""


PRIOR_EVERY = 16
"""Local outcomes between refreshes of the prior band (every one of the first few dozen)."""
TRACE = 1024
"""Outcomes kept for :meth:`Outcomes.recent` (the newest)."""
OPEN_STALE_S = 60.0
"""A local placement with no first byte after this long no longer counts as one a newer
request queues behind (its answer failed or was cancelled: nothing reports that here)."""


@dataclass(frozen=True, slots=True)
class Traced:
    """One placement's prediction beside its observed TTFT."""

    pending: Pending
    observed: float

    def as_dict(self) -> dict[str, Any]:
        p = self.pending.prediction
        return {"at": round(self.pending.at, 4), "kind": p.kind, "pair": p.pair,
                "replica": p.replica, "uncached": self.pending.uncached,
                "observed_s": round(self.observed, 5), "predicted_s": round(p.cost, 5),
                "parts": {k: round(v, 5) for k, v in p.parts}}


def _no_rate(replica: str) -> float | None:
    return None


def policy_rate(policy: object, default: float = 8000.0) -> float:
    """The prefill rate a policy prices unknown replicas at (the calibration's prior)."""
    rate = getattr(getattr(policy, "params", None), "prefill_rate", None)
    return float(rate) if isinstance(rate, int | float) and rate > 0 else default


def outcomes_for(config: RouterConfig, policy: object) -> Outcomes:
    """A router's outcomes: its region, the policy's default rate, the engines' configured
    rates as priors."""
    rates = {e.url: e.prefill_rate for e in config.engines}
    return Outcomes(config.region, policy_rate(policy), rates.get)


@dataclass(slots=True)
class Outcomes:
    region: str
    default_rate: float = 8000.0
    configured_rate: Callable[[str], float | None] = _no_rate
    """The configured prefill rate of an own engine (the calibration's prior)."""
    errors: TtftErrors = field(default_factory=TtftErrors)
    calibrator: Calibrator = field(init=False)
    margins: dict[str, float] = field(default_factory=dict)
    """Region -> seconds a forward there must be predicted to save (measured band)."""
    rtt: dict[str, float] = field(default_factory=dict)
    """Region -> learned forward round trip, seconds."""
    trace: deque[Traced] = field(default_factory=lambda: deque(maxlen=TRACE))
    _prior: float | None = None
    _now: float = 0.0
    _open: dict[str, dict[int, float]] = field(default_factory=dict)
    """Own engine -> this router's placements there without a first byte yet (seq -> sent at,
    oldest first)."""
    _seq: int = 0
    kv: Outlooks = field(default_factory=Outlooks)
    """Own engines' KV history (``mesh.kv_outlook``): read by the view, never gossiped."""

    def __post_init__(self) -> None:
        self.calibrator = Calibrator(self.default_rate)

    def begin(self, d: Decision, req: Request, local: bool, now: float) -> Pending | None:
        """The placement of ``req`` by decision ``d`` leaves now; None when the decision
        carries no prediction (a pinned forward, a policy without costs, a region push)."""
        p = prediction_of(d, self.region)
        if p is None:
            return None
        uncached = req.num_tokens - cached_tokens(req, d.matched_blocks)
        if not local:
            return Pending(p, uncached, local, now)
        # The engine's load record shows a request admitted to its batch as running while
        # its prefill still holds the engine; the router knows its own such requests.
        opened = self._open.get(p.replica)
        if opened is None:
            opened = self._open[p.replica] = {}
        while opened:
            seq = next(iter(opened))
            if now - opened[seq] <= OPEN_STALE_S:
                break
            del opened[seq]
        self._seq += 1
        opened[self._seq] = now
        return Pending(p, uncached, local, now, len(opened) > 1, self._seq)

    def scraped(self, replica: str, kv_usage: float, at: float) -> None:
        """An own engine's load was read, as measured at ``at``: its KV outlook learns it."""
        self.kv.observe(replica, kv_usage, at)

    def ended(self, pending: Pending) -> None:
        """The placement no longer holds its engine's prefill: its first byte came, or it
        never will (the attempt failed, the engine answered an error, the client left).
        Idempotent; without it a failed placement would mark the engine's requests as
        sent behind it for ``OPEN_STALE_S``, and they teach the overhead nothing."""
        opened = self._open.get(pending.prediction.replica)
        if opened is not None:
            opened.pop(pending.seq, None)

    def first_byte(self, pending: Pending, now: float) -> None:
        """The answer's first byte is back: the observed TTFT (from the decision) is noted."""
        observed = now - pending.at
        p = pending.prediction
        self.trace.append(Traced(pending, observed))
        self.errors.observe(p, observed)
        if p.kind == "local":
            n = self.errors.kinds["local"].count
            if n <= PRIOR_EVERY * 4 or n % PRIOR_EVERY == 0:
                self._prior = self.errors.prior()
        if pending.local:
            self.ended(pending)
            self.calibrator.observe_local(p, pending.uncached, observed,
                                          self.configured_rate(p.replica), pending.behind)
        elif p.kind == "forwarded":
            self.calibrator.observe_forward(p, observed, now)
            band = self.errors.band(p.region)
            if band is not None:
                self.margins[p.region] = band
        if self.calibrator.rtt:
            # On every outcome, local ones too: a region no forward goes to any more ages
            # back towards its measured round trip (``calibration.RTT_FRESH_S``), and its
            # band, measured on forwards that old, back to the prior band.
            self.rtt.update(self.calibrator.learned_rtt(now))
            for region, at in self.calibrator.rtt_at.items():
                if now - at > RTT_FRESH_S and region in self.margins:
                    del self.margins[region]
                    self.errors.into.pop(region, None)
        self._now = now

    def prior_margin(self) -> float | None:
        """The forwarding band of regions without a measured one (``TtftErrors.prior``)."""
        return self._prior

    def published(self, replica: str) -> Calibrated:
        """An own replica's learned figures, for the view and the replicated meta record."""
        return self.calibrator.published(replica)

    def status(self) -> dict[str, Any]:
        return {"errors": self.errors.status(), "calibration": self.calibrator.status(self._now)}

    def recent(self, limit: int = TRACE) -> list[dict[str, Any]]:
        """The newest ``limit`` outcomes, oldest first: predicted parts beside observed."""
        rows = list(self.trace)
        return [t.as_dict() for t in rows[max(0, len(rows) - limit):]]

    def metrics(self) -> Iterable[Any]:
        n = CounterMetricFamily(
            "kvmesh_ttft_predictions", "Placements whose predicted TTFT met an observed one",
            labels=["kind", "pair"])
        err = CounterMetricFamily(
            "kvmesh_ttft_prediction_abs_error_seconds",
            "Sum of |observed - predicted| TTFT, seconds", labels=["kind", "pair"])
        rel = GaugeMetricFamily(
            "kvmesh_ttft_prediction_error_ratio",
            "|observed - predicted| / observed TTFT over the recent window, by quantile",
            labels=["kind", "pair", "quantile"])
        bias = GaugeMetricFamily(
            "kvmesh_ttft_prediction_bias_ratio",
            "Median (observed - predicted) / observed TTFT (> 0: the model is optimistic)",
            labels=["kind", "pair"])
        lost = CounterMetricFamily(
            "kvmesh_forwards_lost", "Forwards slower than the best home replica's prediction",
            labels=["pair"])
        for kind, pair, w in self.errors.rows():
            n.add_metric([kind, pair], w.count)
            err.add_metric([kind, pair], w.abs_error_sum)
            for q, v in (("0.5", w.median_abs_rel()), ("0.9", w.quantile_abs_rel(0.9))):
                if v is not None:
                    rel.add_metric([kind, pair, q], v)
            b = w.bias()
            if b is not None:
                bias.add_metric([kind, pair], b)
            if kind == "forwarded":
                lost.add_metric([pair], w.lost)
        yield n
        yield err
        yield rel
        yield bias
        yield lost
        band = GaugeMetricFamily("kvmesh_forward_band_seconds",
                                 "Predicted saving a forward into the region must exceed",
                                 labels=["region"])
        for region, v in sorted(self.margins.items()):
            band.add_metric([region], v)
        yield band
        prior = GaugeMetricFamily("kvmesh_forward_band_prior_seconds",
                                  "Band of regions without a measured one: the local error")
        if self._prior is not None:
            prior.add_metric([], self._prior)
        yield prior
        rtt = GaugeMetricFamily("kvmesh_learned_rtt_seconds",
                                "Forward round trip learned from forwards' TTFTs",
                                labels=["region"])
        for region, v in sorted(self.rtt.items()):
            rtt.add_metric([region], v)
        yield rtt
        cal = GaugeMetricFamily("kvmesh_calibrated",
                                "Cost-model figures learned for own replicas",
                                labels=["replica", "param"])
        for replica in sorted(self.calibrator.replicas):
            for k, v in self.published(replica).as_dict().items():
                cal.add_metric([replica, k], v)
        yield cal
