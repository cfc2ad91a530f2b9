"""Per-request records and the figures a run is judged by.

Windows: a run measures the requests *sent* in ``[warmup, horizon)`` for latency (TTFT,
end-to-end, hit rate, staleness) and the requests *finished* in that window for throughput.
A request sent in the window that never finished (the run's drain limit passed) counts as
an infinitely slow request in the percentiles, so overload shows up instead of vanishing.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of sorted or unsorted ``values``."""
    if not values:
        return math.nan
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    if math.isinf(xs[hi]) or math.isinf(xs[lo]):
        return xs[hi] if pos > lo else xs[lo]
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(slots=True)
class RequestRecord:
    rid: int
    client: str
    region: str
    """The client's region."""
    user: str
    kind: str
    sent: float
    prompt_tokens: int
    output_tokens: int
    router: str = ""
    router_region: str = ""
    replica: str = ""
    replica_region: str = ""
    forwards: int = 0
    """Router-to-router hops the request took (0 or 1)."""
    cached_tokens: int | None = None
    """Prompt tokens the engine found in its prefix cache (set when scheduled)."""
    queued_at_router: float = 0.0
    staleness: float | None = None
    """Age of the load figure the deciding router had for the chosen replica."""
    decided: float | None = None
    predicted_ttft: float | None = None
    """TTFT the deciding router's cost model predicted for the placement (None: none)."""
    first_token: float | None = None
    done: float | None = None
    tier: str = ""
    deadline: float = math.inf
    """The tier's SLO as a virtual time: first token (TTFT tiers) or completion (batch)."""
    sheds: int = 0
    """Times a router shed it (429); the client sent it again after ``Retry-After``."""

    @property
    def ttft(self) -> float:
        return math.inf if self.first_token is None else self.first_token - self.sent

    @property
    def e2e(self) -> float:
        return math.inf if self.done is None else self.done - self.sent


@dataclass(slots=True)
class RunCounters:
    gossip_bytes: int = 0
    gossip_messages: int = 0
    kv_events: int = 0
    load_reports: int = 0
    decisions: int = 0
    waits: int = 0
    """Decisions that held a request in a router queue (selective pushing)."""
    rejected: int = 0
    """Requests no replica could take (no healthy replica)."""
    shed: int = 0
    """429s for a sheddable tier (the client sent the request again)."""
    load_cv_samples: list[float] = field(default_factory=list)
    """Coefficient of variation of outstanding requests across replicas, sampled."""


@dataclass(frozen=True, slots=True)
class Summary:
    label: str
    window_s: float
    sent: int
    finished: int
    unfinished: int
    ttft_p50: float
    ttft_p90: float
    ttft_p99: float
    ttft_mean: float
    e2e_p50: float
    e2e_p90: float
    e2e_p99: float
    throughput_rps: float
    output_tok_s: float
    input_tok_s: float
    hit_rate: float
    cross_region_share: float
    """Requests served by a replica outside the client's region."""
    router_forwards: int
    gossip_bytes_per_s: float
    staleness_p50: float
    staleness_p90: float
    queued_at_router_mean: float
    load_cv: float
    per_region_ttft_p90: dict[str, float]
    e2e_mean: float = math.nan
    """Mean end-to-end latency of the measured requests that finished."""
    ttft_error_local: float = math.nan
    """Median |TTFT - predicted| / TTFT of requests served in the deciding router's region
    (those whose router predicted one; ``mesh.ttft_error``)."""
    ttft_error_forwarded: float = math.nan
    """The same, of requests forwarded to another region."""

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        for k, v in list(out.items()):
            if isinstance(v, float) and not math.isfinite(v):
                out[k] = None if math.isnan(v) else "inf"
        out["per_region_ttft_p90"] = {
            r: (v if math.isfinite(v) else "inf") for r, v in self.per_region_ttft_p90.items()
        }
        return out


def summarize(
    label: str,
    records: Iterable[RequestRecord],
    counters: RunCounters,
    *,
    warmup: float,
    horizon: float,
) -> Summary:
    if horizon <= warmup:
        raise ValueError(f"empty window: warmup {warmup} >= horizon {horizon}")
    window = horizon - warmup
    recs = list(records)
    measured = [r for r in recs if warmup <= r.sent < horizon]
    finished_in = [r for r in recs if r.done is not None and warmup <= r.done < horizon]
    ttfts = [r.ttft for r in measured]
    e2es = [r.e2e for r in measured]
    prompt = sum(r.prompt_tokens for r in measured if r.cached_tokens is not None)
    cached = sum(r.cached_tokens or 0 for r in measured)
    routed = [r for r in measured if r.replica_region]
    cross = sum(1 for r in routed if r.replica_region != r.region)
    stale = [r.staleness for r in measured if r.staleness is not None]
    finite_stale = [s for s in stale if math.isfinite(s)]
    regions = sorted({r.region for r in measured})
    finite_ttft = [t for t in ttfts if math.isfinite(t)]
    finite_e2e = [t for t in e2es if math.isfinite(t)]
    cv = counters.load_cv_samples
    return Summary(
        label=label,
        window_s=window,
        sent=len(measured),
        finished=sum(1 for r in measured if r.done is not None),
        unfinished=sum(1 for r in measured if r.done is None),
        ttft_p50=percentile(ttfts, 50),
        ttft_p90=percentile(ttfts, 90),
        ttft_p99=percentile(ttfts, 99),
        ttft_mean=statistics.fmean(finite_ttft) if finite_ttft else math.nan,
        e2e_p50=percentile(e2es, 50),
        e2e_p90=percentile(e2es, 90),
        e2e_p99=percentile(e2es, 99),
        throughput_rps=len(finished_in) / window,
        output_tok_s=sum(r.output_tokens for r in finished_in) / window,
        input_tok_s=sum(r.prompt_tokens for r in finished_in) / window,
        hit_rate=cached / prompt if prompt else math.nan,
        cross_region_share=cross / len(routed) if routed else math.nan,
        router_forwards=sum(r.forwards for r in measured),
        gossip_bytes_per_s=counters.gossip_bytes / window,
        staleness_p50=percentile(finite_stale, 50),
        staleness_p90=percentile(finite_stale, 90),
        queued_at_router_mean=(
            statistics.fmean(r.queued_at_router for r in measured) if measured else math.nan
        ),
        load_cv=statistics.fmean(cv) if cv else math.nan,
        per_region_ttft_p90={
            reg: percentile([r.ttft for r in measured if r.region == reg], 90) for reg in regions
        },
        e2e_mean=statistics.fmean(finite_e2e) if finite_e2e else math.nan,
        ttft_error_local=_prediction_error(measured, forwarded=False),
        ttft_error_forwarded=_prediction_error(measured, forwarded=True),
    )


def _prediction_error(records: Sequence[RequestRecord], forwarded: bool) -> float:
    errs = [abs(r.ttft - r.predicted_ttft) / r.ttft for r in records
            if r.predicted_ttft is not None and r.first_token is not None and r.ttft > 0
            and (r.forwards > 0) == forwarded]
    return statistics.median(errs) if errs else math.nan


def cdf_points(values: Sequence[float], points: int = 200) -> tuple[list[float], list[float]]:
    """``(x, F(x))`` of the finite values, thinned to about ``points`` points (for plots)."""
    xs = sorted(v for v in values if math.isfinite(v))
    if not xs:
        return [], []
    n = len(xs)
    step = max(1, n // points)
    idx = list(range(0, n, step))
    if idx[-1] != n - 1:
        idx.append(n - 1)
    # F is over every value (unfinished ones included), so a CDF that stops short of 1
    # shows the requests that never got a first token.
    total = len(values)
    return [xs[i] for i in idx], [(i + 1) / total for i in idx]
