"""The step after the expected-TTFT costs: learned corrections, then a price on forwarding.

Two things the cost formula does not know, both read from the view (pure: the learning that
produces them lives in ``mesh.outcomes`` and reaches the policy as view fields):

1. **Calibration**: a replica's owner may have published a residual overhead, the share of
   the KV-barrier term its engine really shows and a measured delay per waiting request
   (``ReplicaView.overhead`` / ``kv_scale`` / ``queue_delay``). The overhead is added, the
   barrier rescaled, and the learned queue delay replaces the formula's
   ``waiting * mean_prompt_tokens / rate``. The result is the *predicted* TTFT, the figure
   recorded next to the observed one. The ranking keeps the whole barrier: the part the
   engine does not show in the next TTFT is still the price of filling its cache (later
   preemption), a risk like the forwarding premium.
2. **Hysteresis**: a replica in another region is ranked with a premium, its region's
   measured error band (``RegionView.margin``: how far forwards there overshot their
   predictions and local decisions undershot theirs, widened by how often forwards lost to
   home; before forwards there were measured, the local decisions' error), or
   ``prior_band`` times its predicted TTFT before any outcome was measured. A
   forward is taken only when its predicted saving exceeds what the prediction is known to
   be wrong by, and it is judged on predicted TTFT: the KV risk price of the home replica
   it would replace counts only once that cache is past the knee (``kv_knee``, where it
   bounds admission), and near-ties are never drawn across the border.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from mesh.policies.base import ReplicaView, Scored, View


def barrier(r: ReplicaView, kv_weight: float, kv_cap: float) -> float:
    """The expected-TTFT model's KV-barrier term of ``r`` (``kv_weight * k / (1 - k)``)."""
    k = min(max(r.kv_usage, 0.0), kv_cap)
    return kv_weight * k / (1.0 - k)


def corrected(costs: Sequence[float], reps: Sequence[ReplicaView], view: View,
              default_rate: float, half_life: float, prior_band: float,
              kv_weight: float, kv_cap: float, kv_knee: float, life: float = 0.0
              ) -> tuple[list[float], list[float]]:
    """(predicted, ranked) costs per replica: calibrated, then with the forwarding premium.

    Runs for every replica on every request, so the load estimate and the barrier are
    inlined (the same arithmetic as the cost's load estimate,
    :func:`mesh.policies.ttft.replica_load` with running sequences aged over ``life``
    seconds, and :func:`barrier`), and a replica without learned figures costs one
    attribute test each. The learned queue delay replaces exactly the waiting requests the
    cost priced: an estimate of its own (running sequences aged like the queue, so more of
    them counted as waiting) would take off more queue than the cost put on.
    """
    home = view.region
    mean_prompt = view.mean_prompt_tokens
    predicted: list[float] = []
    risks: list[float] = []
    add_p, add_k = predicted.append, risks.append
    home_pred = home_risk = math.inf
    home_rep: ReplicaView | None = None
    for c, r in zip(costs, reps, strict=True):
        c += r.overhead
        ks = r.kv_scale
        risk = 0.0
        if ks is not None and r.kv_usage > 0:
            # The predicted TTFT carries the share of the barrier the engine shows; the
            # ranking keeps all of it (a risk price: a full cache preempts later).
            k = min(r.kv_usage, kv_cap)
            risk = (1.0 - ks) * kv_weight * k / (1.0 - k)
            c -= risk
        qd = r.queue_delay
        if qd is not None and (r.waiting or r.fresh or r.inflight):
            age = r.load_age
            if not math.isfinite(age):
                d = dr = 0.0
            elif half_life <= 0 or age <= 0.0:
                d = dr = 1.0
            else:
                d = float(0.5 ** (age / half_life))
                dr = math.exp(-age / life) if life > 0 else d
            w = d * r.waiting + r.fresh
            extra = r.inflight - (w + dr * r.running)
            if extra > 0:
                w += extra
            if w > 0:
                c += w * (qd - mean_prompt / (r.prefill_rate or default_rate))
        add_p(c)
        add_k(risk)
        if r.region == home and c < home_pred:
            home_pred, home_risk, home_rep = c, risk, r
    if not math.isfinite(home_risk):
        home_risk = 0.0
    if home_rep is not None and home_rep.kv_usage > kv_knee:
        # Past the knee the cache bounds admission (the decode-bound queue): its risk price
        # is the one signal of what more requests there cost, and a forward may avoid it.
        home_risk = -math.inf
    premium: dict[str, float | None] = {}
    ranked: list[float] = []
    add_r = ranked.append
    for c, risk, r in zip(predicted, risks, reps, strict=True):
        region = r.region
        if region == home:
            add_r(c + risk)
            continue
        if region in premium:
            m = premium[region]
        else:
            m = premium[region] = view.region_info(region).margin
        # A forward is judged on predicted TTFT: it carries at least the KV risk price of
        # the home replica it would replace, so the home's risk alone never pays a round trip.
        add_r(c + (m if m is not None else prior_band * c) + max(risk, home_risk))
    return predicted, ranked


def same_side(ties: Sequence[int], costs: Sequence[float], reps: Sequence[ReplicaView],
              home: str) -> list[int]:
    """The near-ties on the best candidate's side of the border (home, or away from it).

    Near-ties are drawn at random so routers sharing one stale view spread their requests;
    a forward is never such a tie (its round trip and band were priced to decide *whether*
    to leave home), so a remote replica is not drawn when a home one ranks best, nor the
    reverse."""
    best = min(ties, key=costs.__getitem__)
    away = reps[best].region != home
    return [i for i in ties if (reps[i].region != home) == away]


def explain(s: Scored, r: ReplicaView, predicted: float, ranked: float, home_best: float,
            home: str, waiting: float, kv: float) -> Scored:
    """A candidate's explanation with the step's parts: ``calib`` (correction), ``waiting``
    (the estimate the queue was priced at, ``waiting``), ``kv`` (the barrier inside ``decode``), the
    learned figures the correction applied (``overhead``; ``kv_scale`` and ``queue_delay``
    when learned: the rest of ``calib`` is the barrier rescaled and the queue repriced),
    ``premium`` and, for a forward, ``home`` (the best home replica's predicted TTFT, to
    learn whether the forward lost)."""
    parts = [*s.parts, ("calib", predicted - s.cost),
             ("waiting", waiting), ("kv", kv), ("overhead", r.overhead)]
    if r.kv_scale is not None:
        parts.append(("kv_scale", r.kv_scale))
    if r.queue_delay is not None:
        parts.append(("queue_delay", r.queue_delay))
    if ranked != predicted:
        parts.append(("premium", ranked - predicted))
    if r.region != home:
        parts.append(("home", home_best))
    return Scored(s.replica, s.region, ranked, tuple(parts))


def home_best(predicted: Sequence[float], reps: Sequence[ReplicaView], home: str) -> float:
    best = math.inf
    for c, r in zip(predicted, reps, strict=True):
        if r.region == home and c < best:
            best = c
    return best
