"""The router's decision path, sans-I/O: from a parsed request with its keys to a target.

The asyncio :class:`mesh.router.Router` and the simulator (:class:`sim.fleet.SimRouter`) both
drive one :class:`Dispatcher` each and decide nothing themselves, so a simulated result is a
result of this code. What it does for one request (:meth:`Dispatcher.submit`)::

    forwarded here naming a healthy engine of ours ("pinned") -> that engine, no policy
    a sheddable tier while a higher tier's SLO is at risk -> shed (the shell answers 429)
    someone of the same or a higher tier already waiting -> join the queue behind them
    otherwise decide now:
        view (now, queue length, prompt-size average, only engines serving the model)
        forwarded -> only this router's own engines (never a second hop)
        excluded replicas / regions (earlier attempts failed) -> marked down
        batch (not yet promoted) -> only replicas with spare capacity, anywhere in the mesh;
            none -> wait
        policy.decide -> "wait": join the queue (or give up when it is full)
    target: an own engine directly; else (not forwarded) the live router that reports the
        replica, else one of the region's routers; none -> no target (the shell rejects)

The queue (:class:`mesh.tiers.TierQueue`) is strict priority across tiers, earliest deadline
first within one; a batch request near its deadline is promoted. With tiers off
(``tiers=None``) it is one first-come-first-served queue. The queue head (the first waiter in
that order) is re-evaluated by :meth:`Dispatcher.pump`, which the shells call when a
request arrives behind others, when a dispatch completes, when an engine's load changes and
at :attr:`Dispatcher.retry_at` (what the last "wait" asked for). The dispatch ledger
(:class:`mesh.view.Dispatches`) is written here too: :meth:`start` when a request leaves for
its target, :meth:`done` when its answer has ended.

Inputs are the request, ``now`` and the view's sources; outputs are placements. No sockets,
no timers, no clock reads: the shells own those.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from mesh.lengths import LengthPredictor
from mesh.policies.base import (
    Decision,
    LengthGuess,
    Policy,
    Request,
    View,
    cached_tokens,
    estimate_load,
)
from mesh.tiers import BATCH, RANK, TierQueue, TierRules
from mesh.view import Dispatches, Ticket, ViewBuilder, region_key

log = logging.getLogger("kvmesh.dispatch")

PROMPT_EWMA = 0.05
"""Weight of the newest uncached prompt size in the moving average the policies read."""
OUTPUT_EWMA = 0.02
"""Weight of the newest completion's output tokens in the moving average the policies read."""
MIN_RETRY = 1e-4
"""Shortest re-evaluation delay of a waiting head, seconds."""


@dataclass(frozen=True, slots=True)
class Ask:
    """One request to place, with what the shell knows about how it came."""

    request: Request
    forwarded: bool = False
    """Sent here by another router: never forwarded again."""
    pinned: str | None = None
    """The replica the forwarding router picked (used if it is ours and healthy)."""
    origin: str = "peer"
    """The forwarding router's node id (for the decision's reason)."""
    excluded_replicas: frozenset[str] = frozenset()
    excluded_regions: frozenset[str] = frozenset()
    attempt: int = 1
    """1 for the first try; later tries follow a failure before the first byte."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where the request goes: an own engine, or a router that serves the replica/region."""

    url: str
    replica: str
    """The replica (empty: the region's router picks)."""
    region: str
    local: bool
    delay: float = 0.0
    """Emulated round trip (``emulate_rtt``) the receiving router holds the forward for."""

    @property
    def ledger_key(self) -> str:
        return self.replica or region_key(self.region)


@dataclass(frozen=True, slots=True)
class Placement:
    """A decision and where it sends the request (``target`` None: nowhere)."""

    decision: Decision
    target: Target | None
    outcome: str
    """``pinned``, ``local``, ``remote`` (a named replica behind a router), ``region`` or
    ``none``."""
    load_age: float | None = None
    """Age of the chosen replica's load record in the view that decided (None: no view)."""


@dataclass(slots=True, eq=False)
class Waiter:
    """A request in the FCFS queue."""

    ask: Ask
    since: float
    first: Decision | None
    """The "wait" decision that queued it (None: queued behind others, not yet decided)."""
    cancelled: bool = False
    promoted: bool = False
    """A batch request close to its deadline: ranks with standard work, no longer held."""

    @property
    def tier(self) -> str:
        return self.ask.request.tier

    @property
    def deadline(self) -> float:
        return self.ask.request.deadline


def with_predicted(req: Request, guess: LengthGuess) -> Request:
    """``dataclasses.replace(req, predicted=guess)``, built field by field in order (the
    generic ``replace`` inspects every field: on each request, that was its cost)."""
    return Request(req.request_id, req.token_ids, req.keys, req.block_size, req.session,
                   req.max_tokens, req.arrival, req.model, req.app, guess, req.objective,
                   req.tier, req.deadline)


def no_hook(req: Request, view: View, d: Decision, seconds: float) -> None:
    return None


@dataclass(slots=True)
class Dispatcher:
    """One router's decision machine; see the module docstring."""

    region: str
    policy: Policy
    views: ViewBuilder
    local: Callable[[str], bool]
    """Is this replica an engine this router dispatches to itself?"""
    healthy: Callable[[str], bool] = lambda replica: True
    """Is this own engine taking requests (for pinned forwards)?"""
    rng: random.Random = field(default_factory=random.Random)
    max_queue: float = math.inf
    emulated_rtt: Mapping[str, float] = field(default_factory=dict)
    on_decision: Callable[[Request, View, Decision, float], None] = no_hook
    """Called after every policy call with the CPU seconds it took (metrics, debug log)."""
    mean_prompt_tokens: float = 256.0
    mean_output_tokens: float = 256.0
    lengths: LengthPredictor = field(default_factory=LengthPredictor)
    """Response-length predictor: :meth:`annotate` asks it, :meth:`completed` teaches it."""
    tiers: TierRules | None = None
    """Service tiers (``mesh.tiers``); None: every request alike, one FCFS queue."""
    queue: TierQueue = field(default_factory=lambda: TierQueue(fcfs=True))
    retry_at: float | None = None
    """When the waiting head wants re-evaluating (None: no one waits on the policy)."""
    decisions: int = 0
    waits: int = 0
    shed: int = 0

    def __post_init__(self) -> None:
        if self.tiers is not None:
            self.queue = TierQueue(self.tiers.config.promote_margin)

    @property
    def dispatches(self) -> Dispatches:
        return self.views.dispatches

    # -- the view and one decision ---------------------------------------------------------
    def view(self, now: float, model: str | None = None) -> View:
        return self.views.build(now, max(0, len(self.queue) - 1), self.mean_prompt_tokens,
                                model, mean_output_tokens=self.mean_output_tokens)

    def decide(self, ask: Ask, now: float) -> tuple[Decision, View]:
        """The policy's answer for ``ask`` on the view at ``now``, with the product's filters."""
        started = time.perf_counter()
        view = self.view(now, ask.request.model)
        if ask.forwarded:
            # Never a second hop: only engines this router serves itself.
            view = view.local_only()
            view = view.without([r.replica for r in view.replicas if not self.local(r.replica)])
        if ask.excluded_replicas or ask.excluded_regions:
            view = view.without(ask.excluded_replicas, ask.excluded_regions)
        if self._held(ask.request, now):
            view = self._spare_only(view)
            if not view.healthy("mesh"):
                d = Decision(None, None, "batch held: no spare capacity in the mesh",
                             self.policy.name, wait=True,
                             retry_after=self.tiers.config.batch_recheck if self.tiers else 0.1)
                self.decisions += 1
                self.waits += 1
                self.on_decision(ask.request, view, d, time.perf_counter() - started)
                return d, view
        d = self.policy.decide(ask.request, view, now, self.rng)
        self.decisions += 1
        if d.wait:
            self.waits += 1
        self.on_decision(ask.request, view, d, time.perf_counter() - started)
        return d, view

    # -- response lengths --------------------------------------------------------------------
    def annotate(self, req: Request) -> Request:
        """``req`` with its predicted response length (kept if it already has one).

        The shells call this once per arrival, before :meth:`submit`, and hand the returned
        request back to :meth:`completed` when its answer has ended.
        """
        if req.predicted is not None:
            return req
        return with_predicted(req, self.lengths.predict(req))

    def arrival(self, request_id: str, token_ids: Sequence[int], keys: Sequence[int],
                block_size: int, session: str | None, max_tokens: int, arrival: float,
                model: str | None, app: str | None, tier: str, deadline: float) -> Request:
        """``annotate(Request(...))`` for a new request, built once (a shell's arrivals:
        the same request, without a first copy made only to be replaced)."""
        guess = self.lengths.predict_of(model, app, session, len(token_ids), max_tokens)
        return Request(request_id, token_ids, keys, block_size, session, max_tokens, arrival,
                       model, app, guess, None, tier, deadline)

    def completed(self, req: Request, output_tokens: int) -> None:
        """A request this router received from its client has ended with ``output_tokens``:
        teach the predictor and move the output-size average the cost model reads."""
        if output_tokens < 0:
            return
        self.lengths.observe(req, output_tokens)
        self.mean_output_tokens += OUTPUT_EWMA * (output_tokens - self.mean_output_tokens)
    # -- tiers ---------------------------------------------------------------------------------
    def _held(self, req: Request, now: float) -> bool:
        """Is this batch work that waits for spare capacity (not yet near its deadline)?"""
        t = self.tiers
        return (t is not None and req.tier == BATCH
                and req.deadline - t.config.promote_margin > now)

    def _spare_only(self, view: View) -> View:
        """The view with every replica that has no spare capacity for batch work marked down."""
        t = self.tiers
        assert t is not None
        busy = [r.replica for r in view.replicas
                if not t.spare(*estimate_load(r), r.kv_usage)]
        return view.without(busy)

    def _rank(self, ask: Ask, now: float) -> int:
        req = ask.request
        if self.tiers is None:
            return 0
        if req.tier == BATCH and not self._held(req, now):
            return RANK["standard"]
        return RANK.get(req.tier, RANK["standard"])

    def shed_check(self, ask: Ask, now: float) -> Placement | None:
        """A shed placement (outcome ``shed``, ``retry_after`` set) if ``ask`` is of a
        sheddable tier, not promoted, and a higher tier's SLO is at risk; else None."""
        t = self.tiers
        req = ask.request
        if t is None or ask.forwarded or not t.sheddable(req.tier):
            return None
        rank = self._rank(ask, now)
        if req.tier == BATCH and rank != RANK[BATCH]:
            return None  # near its deadline: served, not shed
        risk = t.at_risk(rank, now, self.queue)
        if risk is None:
            return None
        self.shed += 1
        d = Decision(None, None, f"shed: a higher tier's SLO is at risk ({req.tier})",
                     self.policy.name, retry_after=max(risk, 0.001))
        return Placement(d, None, "shed")

    def observe_first_token(self, req: Request, now: float) -> None:
        """The shell saw ``req``'s first token at ``now`` (feeds the SLO-risk signal)."""
        if self.tiers is not None:
            self.tiers.observe_first_token(req.tier, now - req.arrival, now)

    # -- arrivals and the queue --------------------------------------------------------------
    def submit(self, ask: Ask, now: float) -> Placement | Waiter:
        """An arrival: its placement now, or its place in the queue.

        A waiter queued behind others (``first`` None) is a moment to re-evaluate the head:
        the shell calls :meth:`pump` next.
        """
        pinned = self._pinned(ask, now)
        if pinned is not None:
            return pinned
        shed = self.shed_check(ask, now)
        if shed is not None:
            return shed
        self.queue.promote(now)
        first: Decision | None = None
        if not self.queue.ahead_of(self._rank(ask, now)):
            d, view = self.decide(ask, now)
            if not d.wait:
                return self.place(ask, d, view)
            first = d
        if len(self.queue) >= self.max_queue:
            return Placement(Decision(None, None, "router queue full", self.policy.name),
                             None, "none")
        req = ask.request
        waiter = Waiter(ask, now, first, promoted=(
            self.tiers is not None and req.tier == BATCH and not self._held(req, now)))
        self.queue.push(waiter)
        if first is not None:
            at = now + max(first.retry_after, MIN_RETRY)
            self.retry_at = at if self.retry_at is None else min(self.retry_at, at)
        return waiter

    def offer(self, ask: Ask, now: float) -> Placement:
        """Place ``ask`` now or not at all (a gateway's sheddable request): outcome ``shed``
        when it would wait, when the same or a higher tier is queued, or when
        :meth:`shed_check` sheds it."""
        shed = self.shed_check(ask, now)
        if shed is not None:
            return shed
        self.queue.promote(now)
        if self.queue.ahead_of(self._rank(ask, now)):
            d = Decision(None, None, "requests are queued", self.policy.name, wait=True)
        else:
            d, view = self.decide(ask, now)
            if not d.wait:
                return self.place(ask, d, view)
        self.shed += 1
        return Placement(d, None, "shed")

    def pump(self, now: float) -> list[tuple[Waiter, Placement]]:
        """Re-evaluate the head (and the next ones while they can go): what leaves the queue.

        Strict priority: when the head must wait, nothing behind it goes either.
        """
        out: list[tuple[Waiter, Placement]] = []
        held: list[Ticket] = []
        try:
            self._pump(now, out, held)
        finally:
            for t in held:
                self.dispatches.done(t)
        return out

    def _pump(self, now: float, out: list[tuple[Waiter, Placement]],
              held: list[Ticket]) -> None:
        """:meth:`pump`'s loop. The shells start the placed requests in the ledger after it
        returns; for a policy with ``sees_released`` (the kvmesh policy holding for KV
        headroom) each one placed here is held in the ledger meanwhile (``held``, ended by
        :meth:`pump`), so the next decision of the pass sees it, as it would had it arrived
        alone. (Other waiting policies keep deciding a pass on one view: ``skylb``'s figures
        and the shells' equivalence test were measured that way.)"""
        self.queue.promote(now)
        while True:
            head = self.queue.head()
            if head is None:
                break
            try:
                d, view = self.decide(head.ask, now)
            except Exception as exc:  # never let one request stop the queue
                log.exception("policy failed on a queued request")
                d = Decision(None, None, f"policy error: {type(exc).__name__}",
                             self.policy.name)
                self.queue.pop_head()
                out.append((head, Placement(d, None, "none")))
                continue
            if d.wait:
                at = now + max(d.retry_after, MIN_RETRY)
                promo = self.queue.next_promotion()
                if promo is not None and promo > now:
                    at = min(at, promo)
                self.retry_at = at
                return
            self.queue.pop_head()
            placed = self.place(head.ask, d, view)
            out.append((head, placed))
            if placed.target is not None and self.queue and getattr(
                    self.policy, "sees_released", False):
                req = head.ask.request
                held.append(self.dispatches.start(
                    placed.target.ledger_key, placed.target.region, req.num_tokens, now,
                    publish=False, work=req.predicted.tokens if req.predicted else 0.0))
        self.retry_at = None

    def cancel(self, waiter: Waiter) -> None:
        """The client went away: the waiter leaves the queue when it reaches the head."""
        waiter.cancelled = True

    def clear(self) -> list[Waiter]:
        """Empty the queue (shutdown): the waiters that were in it."""
        gone = self.queue.clear()
        self.retry_at = None
        return gone

    def queued(self) -> int:
        return len(self.queue)

    # -- target choice ---------------------------------------------------------------------
    def _pinned(self, ask: Ask, now: float) -> Placement | None:
        """A forward naming a healthy engine of ours goes there, without policy or queue.

        A policy with ``rechecks_pins`` (the kvmesh cost model with ``recheck_pins`` set)
        first decides again among this router's own engines: the origin chose on a load
        record and prefix index a gossip round old (0.1-0.3 s across regions), this router
        reads its own engines' fresh ones. When that decision is another of our engines,
        the request goes there (outcome ``local``, a decision of this router's); otherwise
        (the named engine again, or it would wait, or finds none) it goes to the named
        engine as before.
        """
        r = ask.pinned
        if not (ask.forwarded and r and ask.attempt == 1 and self.local(r) and self.healthy(r)):
            return None
        if getattr(self.policy, "rechecks_pins", False):
            d, view = self.decide(ask, now)
            if (d.routed and d.replica is not None and d.replica != r
                    and self.local(d.replica)):
                return self.place(ask, replace(d, reason=f"{d.reason} (named {r})"), view)
        d = Decision(r, self.region, f"pinned by {ask.origin}", "forwarded")
        return Placement(d, Target(r, r, self.region, True), "pinned")

    def place(self, ask: Ask, d: Decision, view: View) -> Placement:
        """Where decision ``d`` sends the request; notes its prompt size when it goes."""
        if not d.routed:
            return Placement(d, None, "none")
        chosen = next((r for r in view.replicas if r.replica == d.replica), None)
        age = chosen.load_age if chosen is not None else None
        region = d.region or (chosen.region if chosen is not None else self.region)
        target: Target | None
        if d.replica is not None and self.local(d.replica):
            target = Target(d.replica, d.replica,
                            chosen.region if chosen is not None else self.region, True)
        elif ask.forwarded:
            target = None
        else:
            url = chosen.owner if chosen is not None else None
            if url is None:
                info = view.regions.get(region)
                routers = info.routers if info is not None else ()
                if routers:
                    url = routers[0] if len(routers) == 1 else self.rng.choice(routers)
            target = None if url is None else Target(
                url, d.replica or "", region, False, self.emulated_rtt.get(region, 0.0))
        if target is None:
            return Placement(d, None, "none", age)
        if ask.attempt == 1:
            self.note_prompt(ask.request, d)
        outcome = "local" if target.local else "remote" if d.replica else "region"
        return Placement(d, target, outcome, age)

    def note_prompt(self, req: Request, d: Decision) -> None:
        """The moving average of uncached prompt tokens the cost models read."""
        uncached = req.num_tokens - cached_tokens(req, d.matched_blocks)
        self.mean_prompt_tokens += PROMPT_EWMA * (uncached - self.mean_prompt_tokens)

    # -- the ledger ------------------------------------------------------------------------
    def start(self, target: Target, tokens: int, now: float, work: float = 0.0) -> Ticket:
        """The request leaves for ``target``: counted at once in this router's view.

        ``work`` is its predicted output tokens (the replica's outstanding decode work in the
        view). A forward is published by the router that dispatches it to the engine, not
        here, so the mesh counts it once.
        """
        return self.dispatches.start(target.ledger_key, target.region, tokens, now,
                                     publish=target.local, work=work)

    def done(self, ticket: Ticket) -> None:
        self.dispatches.done(ticket)
