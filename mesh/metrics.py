"""The router's Prometheus metrics, one registry per router (tests run several in a process).

Counters and histograms are updated on the request path; gauges that mirror state (replica
load, queue length, event ingest, gossip) are read when ``/metrics`` is scraped, through
``providers``: callables that return ready-made metric families, so the subsystems that own
those figures need not know about Prometheus.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

Provider = Callable[[], Iterable[Metric]]

_LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
    10.0, 30.0,
)
_FAST_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
)


class _Providers(Collector):
    def __init__(self) -> None:
        self.providers: list[Provider] = []

    def collect(self) -> Iterator[Metric]:
        for p in self.providers:
            try:
                yield from p()
            except Exception:  # a broken provider must not break the whole scrape
                continue


class FastCounter(Counter):
    """``prometheus_client.Counter`` with a shorter ``inc`` for the request path: the same
    value updated, the same errors raised (it defers to the library for anything but a
    plain non-negative increment of an observable counter)."""

    def inc(self, amount: float = 1, exemplar: dict[str, str] | None = None) -> None:
        if exemplar or not amount >= 0 or (self._labelnames and not self._labelvalues):
            super().inc(amount, exemplar)
            return
        self._value.inc(amount)


class FastHistogram(Histogram):
    """``prometheus_client.Histogram`` whose ``observe`` finds the bucket by bisection (the
    library scans the bounds in Python): the same sum and bucket counts, the same errors."""

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        if exemplar or amount != amount or (self._labelnames and not self._labelvalues):
            super().observe(amount, exemplar)  # (NaN: counted in no bucket, as there)
            return
        self._sum.inc(amount)
        i = bisect_left(self._upper_bounds, amount)  # the first bound >= amount
        if i < len(self._buckets):
            self._buckets[i].inc(1)


class Children:
    """A labelled metric's children by label values: ``prometheus_client``'s ``labels()``
    checks and converts the values and takes a lock on every call, which the request path
    pays several times per request. The same child objects, remembered (up to ``limit``
    label sets; past it, looked up as before)."""

    __slots__ = ("_by", "limit", "metric")

    def __init__(self, metric: Any, limit: int = 256) -> None:
        self.metric = metric
        self.limit = limit
        self._by: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._by.get(values)
        if child is None:
            child = self.metric.labels(*values)
            if len(self._by) < self.limit:
                self._by[values] = child
        return child


class RouterMetrics:
    def __init__(self, hit_window: int = 1000) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = FastCounter(
            "kvmesh_router_requests", "Inference requests answered, by route and status code",
            ["route", "code"], registry=r,
        )
        self.rejected = FastCounter(
            "kvmesh_router_rejected", "Malformed requests rejected with 400, by route and field",
            ["route", "field"], registry=r,
        )
        self.decisions = FastCounter(
            "kvmesh_router_decisions",
            "Routing decisions by policy and outcome (local, remote, region, pinned, wait, none)",
            ["policy", "outcome"], registry=r,
        )
        self.forwards = FastCounter(
            "kvmesh_router_forwards", "Requests forwarded one hop to another region's router",
            ["region"], registry=r,
        )
        self.forwarded_in = FastCounter(
            "kvmesh_router_forwarded_in",
            "Forwarded requests received, by how they were placed (pinned, repicked)",
            ["placement"], registry=r,
        )
        self.retries = FastCounter(
            "kvmesh_router_retries",
            "Dispatch attempts that failed before the first byte (the next one goes elsewhere)",
            ["kind"], registry=r,
        )
        self.prompt_tokens = FastCounter(
            "kvmesh_router_prompt_tokens", "Prompt tokens of routed requests", registry=r,
        )
        self.cached_tokens = FastCounter(
            "kvmesh_router_estimated_cached_tokens",
            "Prompt tokens the chosen replica was believed to hold (KV events)", registry=r,
        )
        self.decision_seconds = FastHistogram(
            "kvmesh_router_decision_seconds", "Time to build the view and run the policy",
            buckets=_FAST_BUCKETS, registry=r,
        )
        self.tokenize_seconds = FastHistogram(
            "kvmesh_router_tokenize_seconds",
            "Time to prepare a request: parse, validate, render (chat template), tokenize, "
            "chain its block keys and hash its body (in a worker)",
            buckets=_FAST_BUCKETS, registry=r,
        )
        self.block_keys_seconds = FastHistogram(
            "kvmesh_router_block_keys_seconds",
            "Time to chain a prompt's block keys (endpoint-picker path; on the HTTP path they "
            "are part of kvmesh_router_tokenize_seconds)",
            buckets=_FAST_BUCKETS, registry=r,
        )
        self.first_byte_seconds = FastHistogram(
            "kvmesh_router_time_to_first_byte_seconds",
            "From request arrival to the first body byte relayed to the client",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.queue_wait_seconds = FastHistogram(
            "kvmesh_router_queue_wait_seconds", "Time requests waited in the FCFS queue",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.length_unknown = FastCounter(
            "kvmesh_router_length_unobserved",
            "Completed answers whose output tokens the engine did not report (not learned)",
            registry=r,
        )
        self.request_count = Children(self.requests)
        self.decision_count = Children(self.decisions)
        self._hits: deque[tuple[int, int]] = deque(maxlen=hit_window)
        self._providers = _Providers()
        r.register(self._providers)
        self.add_provider(self._hit_ratio)

    def add_provider(self, provider: Provider) -> None:
        self._providers.providers.append(provider)

    def observe_hit(self, cached: int, prompt: int) -> None:
        self.prompt_tokens.inc(prompt)
        self.cached_tokens.inc(cached)
        self._hits.append((cached, prompt))

    def note_hit(self, cached: int, prompt: int) -> None:
        """Into the hit-ratio window only: a worker process counted the tokens itself."""
        self._hits.append((cached, prompt))

    def hit_ratio(self) -> float:
        total = sum(p for _, p in self._hits)
        return sum(c for c, _ in self._hits) / total if total else 0.0

    def _hit_ratio(self) -> Iterable[Metric]:
        g = GaugeMetricFamily(
            "kvmesh_router_estimated_cache_hit_ratio",
            "Estimated prefix-cache hit ratio of the last routed requests (cached/prompt tokens)",
        )
        g.add_metric([], self.hit_ratio())
        yield g

    def render(self) -> bytes:
        return generate_latest(self.registry)


def gauge(
    name: str, doc: str, labels: list[str], rows: Iterable[tuple[list[str], float]]
) -> Metric:
    g = GaugeMetricFamily(name, doc, labels=labels)
    for values, v in rows:
        g.add_metric(values, v)
    return g


def length_metrics(stats: Callable[[], dict[str, object]]) -> Provider:
    """Response-length prediction accuracy per true bucket, predictor vs predict-the-mean,
    from :meth:`mesh.lengths.LengthPredictor.stats` at scrape time."""

    def provide() -> Iterable[Metric]:
        st = stats()
        buckets = st.get("buckets")
        rows = buckets.items() if isinstance(buckets, dict) else ()
        acc = GaugeMetricFamily(
            "kvmesh_router_length_accuracy",
            "Share of completions whose output-length bucket was predicted right, by true "
            "bucket and model (predictor, mean: the bucket of the running mean)",
            labels=["bucket", "model"])
        n = GaugeMetricFamily(
            "kvmesh_router_length_scored",
            "Completions scored against their predicted output-length bucket, by true bucket",
            labels=["bucket"])
        for label, row in rows:
            acc.add_metric([label, "predictor"], float(row["accuracy"]))
            acc.add_metric([label, "mean"], float(row["baseline_accuracy"]))
            n.add_metric([label], float(row["n"]))
        yield acc
        yield n

    return provide
