"""The online response-length predictor: cold start, learning per feature, accuracy."""

from __future__ import annotations

import random

import pytest

from mesh.lengths import BUCKET_EDGES, LengthPredictor, bucket_labels, bucket_of
from mesh.policies.base import Request


def req(app: str | None = None, user: str | None = None, prompt: int = 100,
        max_tokens: int = 0, model: str | None = "m") -> Request:
    r = Request("r", list(range(prompt)), [], 16, user, max_tokens, 0.0, model, app=app)
    return r


def test_buckets_and_labels() -> None:
    assert [bucket_of(t) for t in (0, 63, 64, 255, 256, 1023, 1024, 4095, 4096, 10**6)] == \
        [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert bucket_labels() == ["0-63", "64-255", "256-1023", "1024-4095", "4096+"]
    assert len(bucket_labels()) == len(BUCKET_EDGES) + 1
    with pytest.raises(ValueError):
        LengthPredictor(edges=(256, 64))


def test_cold_start_is_the_prior_and_max_tokens_caps_it() -> None:
    p = LengthPredictor(prior_tokens=300.0)
    g = p.predict(req())
    assert g.tokens == 300.0 and g.baseline_tokens == 300.0
    capped = p.predict(req(max_tokens=50))
    assert capped.tokens == 50.0 and capped.bucket == 0


def test_each_application_learns_its_own_length() -> None:
    p = LengthPredictor()
    rng = random.Random(3)
    for _ in range(400):
        app = rng.choice(["translate", "qa"])
        out = rng.randint(20, 60) if app == "translate" else rng.randint(300, 900)
        r = req(app=app)
        p.observe(r, out)
    short, long = p.predict(req(app="translate")), p.predict(req(app="qa"))
    assert short.bucket == 0 and 20 <= short.tokens <= 70
    assert long.bucket == 2 and 300 <= long.tokens <= 900
    # The predict-the-mean baseline says the same for both: the global mean's bucket.
    assert short.baseline_bucket == long.baseline_bucket == 2
    # An unseen application falls back to the model's (global) figures.
    unseen = p.predict(req(app="new"))
    assert 200 < unseen.tokens < 500


def test_accuracy_is_scored_per_true_bucket_against_the_mean_baseline() -> None:
    p = LengthPredictor()
    for i in range(200):
        app = "a" if i % 2 else "b"
        r = req(app=app)
        r = Request(r.request_id, r.token_ids, r.keys, r.block_size, r.session, r.max_tokens,
                    r.arrival, r.model, app=r.app, predicted=p.predict(r))
        p.observe(r, 30 if app == "a" else 600)
    st = p.stats()
    buckets = st["buckets"]
    assert isinstance(buckets, dict)
    assert buckets["0-63"]["n"] == 100 and buckets["256-1023"]["n"] == 100
    assert buckets["0-63"]["accuracy"] > 0.9 and buckets["256-1023"]["accuracy"] > 0.9
    assert float(st["accuracy"]) > float(st["baseline_accuracy"])  # type: ignore[arg-type]


def test_tables_are_bounded_and_bad_counts_are_ignored() -> None:
    p = LengthPredictor(max_keys=3)
    for i in range(10):
        p.observe(req(user=f"u{i}"), 10)
    assert len(p.tables) == 3 and p.dropped_keys > 0
    p.observe(req(), -1)
    assert p.observed == 10
