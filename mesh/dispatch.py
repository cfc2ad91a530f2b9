"""The router's decision path, sans-I/O: from a parsed request with its keys to a target.

The asyncio :class:`mesh.router.Router` and the simulator (:class:`sim.fleet.SimRouter`) both
drive one :class:`Dispatcher` each and decide nothing themselves, so a simulated result is a
result of this code. What it does for one request (:meth:`Dispatcher.submit`)::

    forwarded here naming a healthy engine of ours ("pinned") -> that engine, no policy
    someone already waiting -> join the FCFS queue behind them
    otherwise decide now:
        view (now, queue length, prompt-size average, only engines serving the model)
        forwarded -> only this router's own engines (never a second hop)
        excluded replicas / regions (earlier attempts failed) -> marked down
        policy.decide -> "wait": join the queue (or give up when it is full)
    target: an own engine directly; else (not forwarded) the live router that reports the
        replica, else one of the region's routers; none -> no target (the shell rejects)

The queue head is re-evaluated by :meth:`Dispatcher.pump`, which the shells call when a
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
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from mesh.lengths import LengthPredictor
from mesh.policies.base import Decision, Policy, Request, View, cached_tokens
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
    """Round trip the forwarding client adds in user space (emulated regions)."""

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
    queue: deque[Waiter] = field(default_factory=deque)
    retry_at: float | None = None
    """When the waiting head wants re-evaluating (None: no one waits on the policy)."""
    decisions: int = 0
    waits: int = 0

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
        view = view.without(ask.excluded_replicas, ask.excluded_regions)
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
        return replace(req, predicted=self.lengths.predict(req))

    def completed(self, req: Request, output_tokens: int) -> None:
        """A request this router received from its client has ended with ``output_tokens``:
        teach the predictor and move the output-size average the cost model reads."""
        if output_tokens < 0:
            return
        self.lengths.observe(req, output_tokens)
        self.mean_output_tokens += OUTPUT_EWMA * (output_tokens - self.mean_output_tokens)

    # -- arrivals and the queue --------------------------------------------------------------
    def submit(self, ask: Ask, now: float) -> Placement | Waiter:
        """An arrival: its placement now, or its place in the queue.

        A waiter queued behind others (``first`` None) is a moment to re-evaluate the head:
        the shell calls :meth:`pump` next.
        """
        pinned = self._pinned(ask)
        if pinned is not None:
            return pinned
        first: Decision | None = None
        if not self.queue:
            d, view = self.decide(ask, now)
            if not d.wait:
                return self.place(ask, d, view)
            first = d
        if len(self.queue) >= self.max_queue:
            return Placement(Decision(None, None, "router queue full", self.policy.name),
                             None, "none")
        waiter = Waiter(ask, now, first)
        self.queue.append(waiter)
        if first is not None:
            self.retry_at = now + max(first.retry_after, MIN_RETRY)
        return waiter

    def pump(self, now: float) -> list[tuple[Waiter, Placement]]:
        """Re-evaluate the head (and the next ones while they can go): what leaves the queue."""
        out: list[tuple[Waiter, Placement]] = []
        while self.queue:
            head = self.queue[0]
            if head.cancelled:
                self.queue.popleft()
                continue
            try:
                d, view = self.decide(head.ask, now)
            except Exception as exc:  # never let one request stop the queue
                log.exception("policy failed on a queued request")
                d = Decision(None, None, f"policy error: {type(exc).__name__}",
                             self.policy.name)
                self.queue.popleft()
                out.append((head, Placement(d, None, "none")))
                continue
            if d.wait:
                self.retry_at = now + max(d.retry_after, MIN_RETRY)
                return out
            self.queue.popleft()
            out.append((head, self.place(head.ask, d, view)))
        self.retry_at = None
        return out

    def cancel(self, waiter: Waiter) -> None:
        """The client went away: the waiter leaves the queue when it reaches the head."""
        waiter.cancelled = True

    def clear(self) -> list[Waiter]:
        """Empty the queue (shutdown): the waiters that were in it."""
        gone = [w for w in self.queue if not w.cancelled]
        self.queue.clear()
        self.retry_at = None
        return gone

    def queued(self) -> int:
        return len(self.queue)

    # -- target choice ---------------------------------------------------------------------
    def _pinned(self, ask: Ask) -> Placement | None:
        r = ask.pinned
        if not (ask.forwarded and r and ask.attempt == 1 and self.local(r) and self.healthy(r)):
            return None
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
