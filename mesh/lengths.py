"""Response-length prediction, learned online from the completions the router proxies.

Sans-I/O: :meth:`LengthPredictor.predict` takes a :class:`~mesh.policies.base.Request` and
returns a :class:`~mesh.policies.base.LengthGuess`; :meth:`LengthPredictor.observe` takes the
same request and the output tokens its answer had. The dispatcher calls both (``predict``
before the policy, ``observe`` when the shell reports a completion), so the asyncio router and
the simulator learn through the same code.

The model is a hierarchy of Dirichlet-multinomial count tables over output-length buckets
(and a running token sum per table, for the expected length)::

    prior       cold start: ``prior_tokens`` expected, buckets uniform
    model       the requested model
    who         the application tag if the client sends one, else the caller (API key / user)
    band        who + the prompt length's power of two + max_tokens' power of two

Each level's estimate is its own counts plus ``strength`` pseudo-observations of the level
above (``(counts + s * parent) / (n + s)``), so a key seen once leans on its parent and a key
seen often speaks for itself. The features are all categorical (or banded), for which these
counts are the sufficient statistics: an online tree or a neural model would learn the same
table slower and cost far more per request. Each table is a short list of floats; prediction
is four dict look-ups and a few dozen float operations. Tables are bounded (``max_keys``):
past the bound new keys are not learned (counted in ``stats``), old ones keep learning.

Accuracy is kept per true bucket: how often the predicted bucket (the posterior's mode,
capped by ``max_tokens``) was right, against a predict-the-mean baseline (the bucket of the
running mean of every output), and the mean absolute error of both in tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from mesh.policies.base import LengthGuess, Request

BUCKET_EDGES: tuple[int, ...] = (64, 256, 1024, 4096)
"""Upper bounds (exclusive) of the buckets but the last: <64, 64-255, 256-1023, 1024-4095,
>=4096 tokens."""


_GLOBAL: tuple[object, ...] = ("*",)


def bucket_of(tokens: float, edges: Sequence[int] = BUCKET_EDGES) -> int:
    for i, edge in enumerate(edges):
        if tokens < edge:
            return i
    return len(edges)


def bucket_labels(edges: Sequence[int] = BUCKET_EDGES) -> list[str]:
    lo = 0
    out = []
    for edge in edges:
        out.append(f"{lo}-{edge - 1}")
        lo = edge
    out.append(f"{lo}+")
    return out


@dataclass(slots=True)
class BucketScore:
    """Accuracy figures of one true bucket."""

    n: int = 0
    hits: int = 0
    baseline_hits: int = 0
    abs_error: float = 0.0
    baseline_abs_error: float = 0.0

    def as_dict(self) -> dict[str, float]:
        n = self.n or 1
        return {
            "n": self.n,
            "accuracy": round(self.hits / n, 4) if self.n else 0.0,
            "baseline_accuracy": round(self.baseline_hits / n, 4) if self.n else 0.0,
            "mae_tokens": round(self.abs_error / n, 2) if self.n else 0.0,
            "baseline_mae_tokens": round(self.baseline_abs_error / n, 2) if self.n else 0.0,
        }


@dataclass(slots=True)
class LengthPredictor:
    """The online predictor; see the module docstring."""

    edges: tuple[int, ...] = BUCKET_EDGES
    prior_tokens: float = 256.0
    strength: float = 4.0
    """Pseudo-observations a level borrows from the level above."""
    max_keys: int = 50_000
    tables: dict[tuple[object, ...], list[float]] = field(default_factory=dict)
    """Key -> [n, token sum, count of bucket 0, ...]."""
    scores: list[BucketScore] = field(default_factory=list)
    observed: int = 0
    dropped_keys: int = 0
    """Observations whose new keys were not learned because the tables were full."""
    total_tokens: float = 0.0

    def __post_init__(self) -> None:
        if list(self.edges) != sorted(set(self.edges)) or not self.edges or self.edges[0] <= 0:
            raise ValueError(f"bucket edges must be increasing positive integers: {self.edges}")
        self.scores = [BucketScore() for _ in range(len(self.edges) + 1)]

    # -- features ---------------------------------------------------------------------------
    @staticmethod
    def keys(req: Request) -> tuple[tuple[object, ...], ...]:
        return LengthPredictor.keys_of(req.model, req.app, req.session, req.num_tokens,
                                       req.max_tokens)

    @staticmethod
    def keys_of(model: str | None, app: str | None, session: str | None, num_tokens: int,
                max_tokens: int) -> tuple[tuple[object, ...], ...]:
        """:meth:`keys` of a request's fields."""
        model = model or ""
        if app:
            who: tuple[object, ...] = ("a", model, app)
        elif session:
            who = ("u", model, session)
        else:
            who = ("-", model)
        band = (*who, num_tokens.bit_length(), max_tokens.bit_length())
        return (("m", model), who, band)

    # -- the request path -------------------------------------------------------------------
    def predict(self, req: Request) -> LengthGuess:
        return self.predict_of(req.model, req.app, req.session, req.num_tokens,
                               req.max_tokens)

    def predict_of(self, model: str | None, app: str | None, session: str | None,
                   num_tokens: int, max_tokens: int) -> LengthGuess:
        """:meth:`predict` of a request's fields (before its ``Request`` is built)."""
        nb = len(self.edges) + 1
        s = self.strength
        probs = [1.0 / nb] * nb
        mean = self.prior_tokens
        tables = self.tables
        glob = tables.get(_GLOBAL)
        if glob is not None:
            mean = _blend(glob, mean, probs, s)
        baseline_mean = mean
        for key in self.keys_of(model, app, session, num_tokens, max_tokens):
            t = tables.get(key)
            if t is not None:
                mean = _blend(t, mean, probs, s)
        best = probs.index(max(probs))
        cap = max_tokens
        if cap > 0:
            mean = min(mean, float(cap))
            best = min(best, bucket_of(cap, self.edges))
        return LengthGuess(mean, best, bucket_of(baseline_mean, self.edges), baseline_mean)

    # -- completions ------------------------------------------------------------------------
    def observe(self, req: Request, output_tokens: int) -> None:
        """Learn from one completed request (and score the guess it was routed with)."""
        if output_tokens < 0:
            return
        b = bucket_of(output_tokens, self.edges)
        guess = req.predicted
        if guess is not None:
            sc = self.scores[b]
            sc.n += 1
            sc.hits += guess.bucket == b
            sc.baseline_hits += guess.baseline_bucket == b
            sc.abs_error += abs(guess.tokens - output_tokens)
            sc.baseline_abs_error += abs(guess.baseline_tokens - output_tokens)
        self.observed += 1
        self.total_tokens += output_tokens
        nb = len(self.edges) + 1
        dropped = False
        for key in (_GLOBAL, *self.keys(req)):
            t = self.tables.get(key)
            if t is None:
                if len(self.tables) >= self.max_keys:
                    dropped = True
                    continue
                t = self.tables[key] = [0.0] * (nb + 2)
            t[0] += 1.0
            t[1] += output_tokens
            t[2 + b] += 1.0
        self.dropped_keys += dropped

    def stats(self) -> dict[str, object]:
        """Per-bucket accuracy against the predict-the-mean baseline (for /mesh/status)."""
        n = sum(sc.n for sc in self.scores)
        hits = sum(sc.hits for sc in self.scores)
        base = sum(sc.baseline_hits for sc in self.scores)
        err = sum(sc.abs_error for sc in self.scores)
        base_err = sum(sc.baseline_abs_error for sc in self.scores)
        return {
            "observed": self.observed,
            "scored": n,
            "accuracy": round(hits / n, 4) if n else 0.0,
            "baseline_accuracy": round(base / n, 4) if n else 0.0,
            "mae_tokens": round(err / n, 2) if n else 0.0,
            "baseline_mae_tokens": round(base_err / n, 2) if n else 0.0,
            "mean_output_tokens": round(self.total_tokens / self.observed, 2)
            if self.observed else self.prior_tokens,
            "keys": len(self.tables),
            "dropped_keys": self.dropped_keys,
            "buckets": {label: sc.as_dict()
                        for label, sc in zip(bucket_labels(self.edges), self.scores,
                                             strict=True)},
        }


def _blend(t: list[float], mean: float, probs: list[float], s: float) -> float:
    """One level of the hierarchy: its counts plus ``s`` pseudo-counts of the parent
    (``probs`` updated in place); returns the level's expected length."""
    d = t[0] + s
    for i in range(len(probs)):
        probs[i] = (t[2 + i] + s * probs[i]) / d
    return (t[1] + s * mean) / d
