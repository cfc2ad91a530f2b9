"""The default policy, ``kvmesh``: the replica anywhere with the lowest expected latency.

For every healthy replica ``r`` in a reachable region::

    load      = replica_load(r)   # age-discounted record + in-flight + own fresh; running
                                  # sequences aged over a decode's life, the queue faster
    uncached  = prompt tokens - cached tokens (consecutive prefix blocks r holds, from events)
    rate      = r.prefill_rate or prefill_rate            (tokens/s of the replica's profile)
    rtt       = round trip to r's region's router (0 at home)
    queue     = load.waiting * mean_prompt_tokens / rate            (prefill-bound)
    prefill   = max(uncached - r.prefill_knee, 0) / rate   (knee: the learned step floor)
    decode    = (queue + prefill) * decode_weight * load.running
                + kv_weight * k / (1 - k)                  (k = KV usage, capped at kv_cap,
                  less the share of the sequences ended since the record)
    step      = decode_step * (1 + batch_weight * load.running)     (one decode step now)
    kv_wait   = ramp(k; kv_knee..kv_cap) * (load.waiting + 1)
                * mean_output_tokens * step / max(load.running, 1)  (decode-bound)
    queue     = max(queue, kv_wait)
    ttft      = rtt + queue + prefill + decode

A nearly full KV cache admits a waiting request only when a running one finishes and frees
its blocks: the queue then drains at the rate decodes complete (one every
``mean_output_tokens * step / running`` seconds), not at prefill speed. With the ``e2e``
objective (per request, ``Request.objective``, else the ``objective`` parameter) the cost
adds the predicted decode and the Intelligent Router's mixing penalty::

    out       = request.predicted.tokens or mean_output_tokens
    overlap   = min(load.running * out, r.work) if r.work else load.running * out / 2
    gen       = out * decode_step + overlap * decode_step * batch_weight
    mixing    = mix_weight * (load.running * prefill + overlap * decode_step * batch_weight)
    e2e       = ttft + gen + mixing

``overlap`` is the decode steps the newcomer shares with the replica's running sequences
(bounded by their predicted outstanding tokens, ``r.work``); each shared step is
``batch_weight`` slower for both sides. ``mixing`` is what the newcomer costs the others:
its prefill stalls every running decode, and its decode slows theirs (``mix_weight`` is the
paper's alpha). Running sequences also share every engine step with the prefill
(``decode_weight`` per sequence), and a nearly full KV cache means preemption and
recomputation (the barrier term). With ``kv_tokens`` (the engines' KV capacity) set, only
replicas whose KV in flight (the larger of the ledger's predicted demand and the engine's
reported usage and queue) leaves room for the request compete, the one with the
most room wins, and when none has room the request is held at the router ("wait") for up to
``max_hold`` seconds (:mod:`mesh.policies.headroom`). The winner is drawn at random among
the near-ties, candidates within ``max(tie_abs, tie_rel * best)`` of the best, so routers
that share one stale view spread their requests instead of all sending them to the replica
that looked idle.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial

from mesh.kv_outlook import reach
from mesh.policies import risk
from mesh.policies.base import (
    Decision,
    Explained,
    Load,
    PolicyError,
    ReplicaView,
    Request,
    Scored,
    View,
    cached_tokens,
    no_replica,
)
from mesh.policies.headroom import fitting, headroom
from mesh.policies.kv_release import kv_in_use
from mesh.policies.params import parse_params

OBJECTIVES = ("ttft", "e2e")


@dataclass(frozen=True, slots=True)
class TtftParams:
    prefill_rate: float = 8000.0
    load_half_life: float = 2.0
    decode_weight: float = 0.01
    kv_weight: float = 0.05
    kv_cap: float = 0.99
    tie_rel: float = 0.1
    tie_abs: float = 0.005
    rtt_weight: float = 1.0
    decode_step: float = 0.03
    """Seconds of one decode step of a lone sequence (the engines' low-load inter-token
    latency)."""
    batch_weight: float = 0.01
    """Fraction one more running sequence adds to a decode step."""
    kv_knee: float = 0.9
    """KV usage from which waiting requests wait on decodes, fully at ``kv_cap``."""
    mix_weight: float = 0.5
    """Weight of the delay a newcomer causes the replica's running decodes (``e2e``)."""
    objective: str = "ttft"
    """``ttft`` or ``e2e``: what requests that do not name an objective minimise."""
    calibrated: bool = False
    """Apply learned corrections and the forwarding band (``mesh.policies.risk``). Off by
    default: on skylb-arena-332 (seed 1) it costs +17% p90 TTFT (docs/router.md)."""
    prior_band: float = 0.0
    """Forwarding band before any outcome was measured (the view's ``margin`` is None), as a
    fraction of the forward's prediction. Once the router has local outcomes, a region
    without forwards measured is given their error instead (``mesh.ttft_error``)."""
    kv_tokens: float = 0.0
    """KV-cache capacity of one engine, tokens (vLLM's GPU blocks x block size). Set, the
    policy sends a request only where its predicted KV demand fits (``mesh.policies.
    headroom``) and holds it at the router when none fits; 0: off."""
    kv_fill: float = 1.0
    """Multiple of ``kv_tokens`` the predicted final footprints in flight may add up to."""
    kv_block: int = 16
    """The engines' KV block size, tokens (vLLM's ``--block-size``): each sequence's last
    block is partly empty, ``(kv_block - 1) / 2`` tokens on average (``mesh.policies.
    headroom``). Read only with ``kv_tokens`` set."""
    max_hold: float = 60.0
    """Longest a request is held for KV headroom, seconds since its arrival."""
    hold_retry: float = 0.05
    """Re-decide a held request after this long at the latest (completions re-decide it
    sooner)."""
    kv_release: bool = True
    """Take the KV of sequences that ended since a replica's load record out of its usage
    (:mod:`mesh.policies.kv_release`: the record's requests less those still counted in
    flight). Off: the reported usage, for engines that also serve traffic outside the
    mesh. Not applied with ``calibrated`` (its learned barrier share was fitted on the
    reported usage)."""
    kv_outlook: bool = True
    """A forward is not paid by the KV barrier of a home cache that is not expected to
    reach ``kv_knee`` within a request's life (its recent peak and trend, kept by the
    router that scrapes it: :mod:`mesh.kv_outlook`); there, it would only add a round
    trip. Off: the barrier ranks forwards at any usage. Not applied with ``calibrated``
    (its risk step has a rule of its own)."""
    recheck_pins: bool = False
    """Decide a forward that names one of this router's engines again among its own
    engines, on their fresh load and prefix state (:meth:`mesh.dispatch.Dispatcher.
    submit`). Off by default: it moved no figure on held-out WildChat seeds and cost
    sageserve-tiers its interactive target (docs/evaluation.md)."""

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise PolicyError(f"policy.objective: expected one of {', '.join(OBJECTIVES)}, "
                              f"got {self.objective!r}")
        if self.kv_block < 1:
            raise PolicyError(f"policy.kv_block: expected a block size of at least 1 token, "
                              f"got {self.kv_block}")


def objective_of(request: Request, p: TtftParams) -> str:
    """The request's own objective if it names a known one, else the configured default."""
    o = request.objective
    return o if o in OBJECTIVES else p.objective


def replica_load(r: ReplicaView, half_life: float, life: float) -> Load:
    """:func:`~mesh.policies.base.estimate_load`, with running sequences aged as decodes.

    A load record's queue drains fast (``half_life``), but its running sequences last as
    long as a decode does (``life`` seconds: mean output tokens times a decode step) and
    most are still running when the record is a few hundred milliseconds old. Discounting
    them like the queue would turn them into phantom queued requests once the in-flight
    counts (which still hold them) are folded in. ``life`` 0: aged like the queue.
    """
    age = r.load_age
    if not math.isfinite(age):
        d = dr = 0.0
    elif half_life <= 0 or age <= 0.0:
        d = dr = 1.0
    else:
        d = float(0.5 ** (age / half_life))
        dr = math.exp(-age / life) if life > 0 else d
    waiting = d * r.waiting + r.fresh
    running = dr * r.running
    unexplained = r.inflight - (waiting + running)
    if unexplained > 0:
        waiting += unexplained
    return Load(waiting=waiting, running=running)


def expected_ttft(
    request: Request, r: ReplicaView, view: View, matched: int, p: TtftParams
) -> Scored:
    """The explained cost of one replica (see the module docstring)."""
    load = replica_load(r, p.load_half_life, view.mean_output_tokens * p.decode_step)
    rate = r.prefill_rate or p.prefill_rate
    uncached = request.num_tokens - cached_tokens(request, matched)
    rtt = p.rtt_weight * view.rtt(r.region)
    queue = load.waiting * view.mean_prompt_tokens / rate
    prefill = (uncached - r.prefill_knee if uncached > r.prefill_knee else 0.0) / rate
    k = min(max(kv_in_use(r) if p.kv_release and not p.calibrated else r.kv_usage, 0.0),
            p.kv_cap)
    decode = (queue + prefill) * p.decode_weight * load.running + p.kv_weight * k / (1.0 - k)
    step = p.decode_step * (1.0 + p.batch_weight * load.running)
    if k > p.kv_knee:
        ramp = (k - p.kv_knee) / (p.kv_cap - p.kv_knee) if p.kv_cap > p.kv_knee else 1.0
        kv_wait = (ramp * (load.waiting + 1.0) * view.mean_output_tokens * step
                   / max(load.running, 1.0))
        if kv_wait > queue:
            queue = kv_wait
    cost = rtt + queue + prefill + decode
    parts: tuple[tuple[str, float], ...] = (
        ("rtt", rtt), ("queue", queue), ("prefill", prefill), ("decode", decode))
    if objective_of(request, p) == "e2e":
        guess = request.predicted
        out = guess.tokens if guess is not None else view.mean_output_tokens
        overlap = (min(load.running * out, r.work) if r.work > 0.0
                   else load.running * out * 0.5)
        shared = overlap * (p.decode_step * p.batch_weight)
        gen = out * p.decode_step + shared
        mixing = p.mix_weight * (load.running * prefill + shared)
        cost = cost + gen + mixing
        parts = (*parts, ("gen", gen), ("mixing", mixing))
    return Scored(r.replica, r.region, cost, (*parts, ("matched", float(matched))))


class ExpectedTtft:
    name = "kvmesh"

    def __init__(self, params: Mapping[str, object] | None = None) -> None:
        self.params = parse_params(TtftParams, params or {}, self.name)
        self.sees_released = self.params.kv_tokens > 0.0
        """Requests the router's queue releases in one pass must see each other in the
        ledger (:meth:`mesh.dispatch.Dispatcher.pump`): the KV hold counts them."""
        self.rechecks_pins = self.params.recheck_pins
        """A forward that names one of the serving router's engines is decided again there,
        among its own engines (``recheck_pins``)."""

    def decide(self, request: Request, view: View, now: float, rng: random.Random) -> Decision:
        reps = view.healthy("mesh")
        if not reps:
            return no_replica(self.name)
        p = self.params
        matches = view.prefix.match(request.keys) if request.keys else {}
        # The cost of every candidate in one pass over plain floats (``expected_ttft`` inlined:
        # this loop runs for every replica of the mesh on every request); the explained
        # ``Scored`` rows are built only for the winner and the best few.
        costs = _costs(request, reps, view, matches, p)
        predicted = costs
        if p.kv_outlook and not p.calibrated:
            costs = _outlook(costs, reps, view, p)
        if p.calibrated:
            # Learned corrections, then the forwarding premium (mesh/policies/risk.py).
            predicted, costs = risk.corrected(costs, reps, view, p.prefill_rate,
                                              p.load_half_life, p.prior_band, p.kv_weight,
                                              p.kv_cap, p.kv_knee,
                                              view.mean_output_tokens * p.decode_step)
        allowed: Sequence[int] = range(len(costs))
        note = ""
        if p.kv_tokens > 0.0:
            fit = fitting(request, reps, view, p.kv_tokens, p.kv_fill, p.kv_block)
            held = now - request.arrival
            if fit:
                # The most predicted headroom wins (KV, not time, is what runs out).
                room = [headroom(request, reps[i], view, p.kv_tokens, p.kv_block) for i in fit]
                allowed = [fit[room.index(max(room))]]
                note = f" kv_fit={len(fit)}/{len(reps)}"
            elif held < p.max_hold:
                return Decision(
                    None, None,
                    f"kvmesh hold: no replica has KV headroom for "
                    f"{request.num_tokens}+predicted output (held {held:.2f}s)",
                    self.name, wait=True,
                    retry_after=min(p.hold_retry, p.max_hold - held))
            else:
                note = f" kv_fit=0/{len(reps)} held={held:.2f}s"
        best = min(costs[i] for i in allowed)
        band = max(p.tie_abs, p.tie_rel * best)
        limit = best + band
        ties = [i for i in allowed if costs[i] <= limit]
        if p.calibrated and len(ties) > 1:
            ties = risk.same_side(ties, costs, reps, view.region)
        chosen = rng.choice(ties)
        pick = reps[chosen]
        matched = matches.get(pick.replica, 0)
        return Explained(
            pick.replica, pick.region,
            f"kvmesh {objective_of(request, p)}={costs[chosen] * 1000:.1f}ms "
            f"prefix={matched}/{len(request.keys)} ties={len(ties)}{note}",
            self.name, matched_blocks=matched, total_blocks=len(request.keys),
            explain=partial(_explain, request, reps, view, matches, p, costs, predicted,
                            chosen),
        )


def _explain(request: Request, reps: Sequence[ReplicaView], view: View,
             matches: Mapping[str, int], p: TtftParams, costs: Sequence[float],
             predicted: Sequence[float], chosen: int) -> tuple[Scored, ...]:
    """The decision's candidates, explained: the best four by cost (the chosen one always
    among them), each cost taken apart (:func:`expected_ttft`), with the learned
    corrections and what the ranking adds to the prediction (``premium``). Read lazily
    (``Explained``).

    The predicted TTFT of every candidate is the calibrated one, with ``calibrated`` or
    without: the learned corrections (:func:`mesh.policies.risk.corrected`) applied to the
    cost model on the reported KV usage, which is what they were fitted on. Without
    ``calibrated`` they do not rank, but the prediction a decision reports (the answer's
    header, the error metrics, the forwarding band) is still the router's best estimate of
    a time to first token: the plain cost is a price, with the whole KV barrier in it, the
    step floor and HTTP left out, and a prefill below the learned knee at 0."""
    shortlist = heapq.nsmallest(4, range(len(costs)), key=costs.__getitem__)
    if chosen not in shortlist:
        shortlist[-1] = chosen
    scored = [expected_ttft(request, reps[i], view, matches.get(reps[i].replica, 0), p)
              for i in shortlist]
    life = view.mean_output_tokens * p.decode_step
    if not p.calibrated:
        predicted = _predicted(request, reps, view, matches, p, costs, shortlist, life)
    home = risk.home_best(predicted, reps, view.region)
    return tuple(risk.explain(s, reps[i], predicted[i], costs[i], home, view.region,
                              replica_load(reps[i], p.load_half_life, life).waiting,
                              risk.barrier(reps[i], p.kv_weight, p.kv_cap))
                 for s, i in zip(scored, shortlist, strict=True))


def _predicted(request: Request, reps: Sequence[ReplicaView], view: View,
               matches: Mapping[str, int], p: TtftParams, costs: Sequence[float],
               shortlist: Sequence[int], life: float) -> list[float]:
    """The calibrated predictions an uncalibrated decision's explanation reads: those of the
    shortlist, and of every home replica when a forward is among it (its ``home`` part);
    the others are left at ``inf``, unread. Only they are priced: this runs on every
    request."""
    home = view.region
    wanted = set(shortlist)
    if any(reps[i].region != home for i in shortlist):
        wanted.update(i for i, r in enumerate(reps) if r.region == home)
    idx = sorted(wanted)
    sub = [reps[i] for i in idx]
    reported = (_costs(request, sub, view, matches, p, release=False) if p.kv_release
                else [costs[i] for i in idx])
    pred, _ = risk.corrected(reported, sub, view, p.prefill_rate, p.load_half_life,
                             p.prior_band, p.kv_weight, p.kv_cap, p.kv_knee, life)
    out = [math.inf] * len(reps)
    for i, v in zip(idx, pred, strict=True):
        out[i] = v
    return out


def _kv(r: ReplicaView, p: TtftParams, release: bool) -> float:
    """The KV usage ``_costs`` prices ``r`` at (released since the record, capped)."""
    k = kv_in_use(r) if release else r.kv_usage
    return 0.0 if k < 0.0 else (p.kv_cap if k > p.kv_cap else k)


def _outlook(costs: list[float], reps: Sequence[ReplicaView], view: View, p: TtftParams
             ) -> list[float]:
    """The costs as ranked: a remote replica carries at least the KV barrier of the best
    home replica when that home cache is not expected to reach ``kv_knee`` within a
    request's life (:func:`mesh.kv_outlook.reach`), so that barrier alone never pays a
    round trip. Unchanged when the home replica's outlook is not known, or reaches the
    knee: there the barrier is the price of a cache that will bound admission and preempt,
    and a forward may avoid it."""
    home = view.region
    best = -1
    for i, r in enumerate(reps):
        if r.region == home and (best < 0 or costs[i] < costs[best]):
            best = i
    if best < 0:
        return costs
    h = reps[best]
    if h.kv_peak is None:
        return costs
    life = view.mean_output_tokens * p.decode_step
    if reach(h.kv_usage, h.kv_peak, h.kv_trend, life) >= p.kv_knee:
        return costs
    release = p.kv_release
    k = _kv(h, p, release)
    floor = p.kv_weight * k / (1.0 - k)
    out = costs
    for i, r in enumerate(reps):
        if r.region != home:
            kr = _kv(r, p, release)
            gap = floor - p.kv_weight * kr / (1.0 - kr)
            if gap > 0.0:
                if out is costs:
                    out = list(costs)
                out[i] += gap
    return out


def _costs(request: Request, reps: Sequence[ReplicaView], view: View,
           matches: Mapping[str, int], p: TtftParams, release: bool | None = None
           ) -> list[float]:
    """``expected_ttft(...).cost`` of every replica, without building explanations.

    ``release``: take the KV released since each record out of its usage (default: as
    :func:`expected_ttft` does, ``kv_release`` without ``calibrated``).

    The same arithmetic in the same order as :func:`expected_ttft` and
    :func:`replica_load` (so the same floats), inlined: this loop runs
    for every replica of the mesh on every request.
    """
    half_life, default_rate = p.load_half_life, p.prefill_rate
    decode_weight, kv_weight, kv_cap = p.decode_weight, p.kv_weight, p.kv_cap
    decode_step, batch_weight, kv_knee = p.decode_step, p.batch_weight, p.kv_knee
    mean_prompt, mean_output = view.mean_prompt_tokens, view.mean_output_tokens
    life = mean_output * decode_step
    n_tokens, block = request.num_tokens, request.block_size
    e2e = objective_of(request, p) == "e2e"
    guess = request.predicted
    out_tokens = guess.tokens if guess is not None else mean_output
    gen_base = out_tokens * decode_step
    step_shared = decode_step * batch_weight
    mix_weight = p.mix_weight
    if release is None:
        release = p.kv_release and not p.calibrated
    rtts: dict[str, float] = {}
    inf, exp = math.inf, math.exp
    # ``max(x, 0.0)`` and ``min(x, cap)`` written as comparisons (same values, NaN included).
    out = []
    for r in reps:
        region = r.region
        rtt = rtts.get(region)
        if rtt is None:
            rtt = rtts[region] = p.rtt_weight * view.rtt(region)
        age = r.load_age
        if age == inf or age != age or age == -inf:
            d = dr = 0.0
        elif half_life <= 0 or age <= 0.0:
            d = dr = 1.0
        else:
            d = float(0.5 ** (age / half_life))
            dr = exp(-age / life) if life > 0 else d
        waiting = d * r.waiting + r.fresh
        running = dr * r.running
        unexplained = r.inflight - (waiting + running)
        if unexplained > 0:
            waiting += unexplained
        rate = r.prefill_rate or default_rate
        matched = matches.get(r.replica, 0)
        if matched and n_tokens:
            cached = matched * block
            if cached > n_tokens - 1:
                cached = n_tokens - 1
            if cached < 0:
                cached = 0
        else:
            cached = 0
        queue = waiting * mean_prompt / rate
        uncached = n_tokens - cached
        knee = r.prefill_knee
        prefill = (uncached - knee if uncached > knee else 0.0) / rate
        k = r.kv_usage
        if release and r.running > 0.0 and r.inflight > 0 and k > 0.0:
            # ``kv_in_use(r)``, inlined (the same floats).
            run = r.running
            ended = r.waiting + run - (r.inflight - r.fresh)
            if ended > 0.0:
                k = k * (1.0 - (ended if ended < run else run) / run)
        if k < 0.0:
            k = 0.0
        if k > kv_cap:
            k = kv_cap
        decode = (queue + prefill) * decode_weight * running + kv_weight * k / (1.0 - k)
        if k > kv_knee:
            step = decode_step * (1.0 + batch_weight * running)
            ramp = (k - kv_knee) / (kv_cap - kv_knee) if kv_cap > kv_knee else 1.0
            kv_wait = ramp * (waiting + 1.0) * mean_output * step / max(running, 1.0)
            if kv_wait > queue:
                queue = kv_wait
        cost = rtt + queue + prefill + decode
        if e2e:
            work = r.work
            overlap = (min(running * out_tokens, work) if work > 0.0
                       else running * out_tokens * 0.5)
            shared = overlap * step_shared
            cost = cost + (gen_base + shared) + mix_weight * (running * prefill + shared)
        out.append(cost)
    return out
