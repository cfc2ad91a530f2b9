"""The asyncio router and the simulator's router decide alike when fed the same inputs.

Both shells drive ``mesh.dispatch.Dispatcher``; this checks that nothing around it (how a
request is handed in, how forwards, pins and the FCFS queue are handled, how the ledger is
written and released) makes them differ. Each side gets the same replica records, regions,
prefix index, policy, seed and clock, then the same requests in the same order: from clients,
forwarded with and without a pin, with completions in between, and a queue that builds up
while every replica is busy and drains when one frees.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from kvevents.keys import request_keys
from mesh.config import EngineConfig, RouterConfig
from mesh.dispatch import Ask, Placement, Target
from mesh.policies import POLICIES, Request
from mesh.policies.base import PrefixLookup
from mesh.router import Router
from mesh.view import RegionRecord, ReplicaRecord, Ticket
from sim.fleet import Fleet, FleetSpec, Flight, SimEngine, SimRouter
from sim.metrics import RequestRecord
from sim.profiles import L4_LLAMA_3_1_8B
from sim.topology import Topology
from sim.workloads.base import SimRequest

BLOCK = 16
US = ("us-e0", "us-e1")
EU = ("eu-e0", "eu-e1")
EU_ROUTER = "eu-lb0"


@dataclass
class World:
    """What both routers' views are built from, changed by the test between requests."""

    now: float = 10.0
    load: dict[str, tuple[float, float]] | None = None
    held: dict[int, set[str]] | None = None

    def records(self, now: float) -> Iterable[ReplicaRecord]:
        load = self.load or {}
        for r in (*US, *EU):
            waiting, running = load.get(r, (0.0, 1.0))
            remote = r in EU
            yield ReplicaRecord(r, r[:2], True, waiting, running, 0.3, 0.05 if remote else 0.01,
                                2 if remote else 0, 9000.0, (),
                                EU_ROUTER if remote else None, 0.5 if remote else float("inf"))

    def regions(self, now: float) -> Mapping[str, RegionRecord]:
        return {"eu": RegionRecord("eu", 0.08, (EU_ROUTER,), 0)}


class Held:
    """A prefix lookup over a fixed key -> holders table (consecutive leading keys)."""

    def __init__(self, world: World) -> None:
        self.world = world

    def match(self, keys: Sequence[int]) -> Mapping[str, int]:
        held = self.world.held or {}
        out: dict[str, int] = {}
        alive: set[str] | None = None
        for depth, k in enumerate(keys):
            here = held.get(k, set())
            alive = set(here) if alive is None else alive & here
            if not alive:
                break
            for r in alive:
                out[r] = depth + 1
        return out


class FixedPlane:
    """The simulator's view sources, answering from the same ``World``."""

    name = "fixed"

    def __init__(self, world: World, prefix: PrefixLookup) -> None:
        self.world = world
        self.lookup = prefix

    def start(self, fleet: Fleet) -> None:
        for r in fleet.routers:
            r.views.prefix = self.lookup

    def records(self, router: SimRouter, now: float) -> Iterable[ReplicaRecord]:
        return self.world.records(now)

    def regions(self, router: SimRouter, now: float) -> Mapping[str, RegionRecord]:
        return self.world.regions(now)

    def prefix(self, router: SimRouter) -> PrefixLookup:
        return self.lookup

    def on_kv_events(self, engine: SimEngine, events: Any, now: float) -> None:
        return None

    def on_routed(self, router: SimRouter, flight: Flight, target: str, region: str) -> None:
        return None


def prompt(i: int, shared: int = 0) -> tuple[int, ...]:
    """``shared`` leading blocks common to every prompt, then blocks of its own."""
    head = tuple(range(1000, 1000 + shared * BLOCK))
    return head + tuple(range(100_000 * (i + 1), 100_000 * (i + 1) + 4 * BLOCK))


class AsyncSide:
    """The asyncio ``Router``: ``place`` is what its request handler awaits."""

    def __init__(self, world: World, policy: str, seed: int,
                 params: Mapping[str, object] | None = None) -> None:
        config = RouterConfig(region="us", node_id="us-lb0", policy=policy, seed=seed,
                              policy_params=dict(params or {}),
                              engines=tuple(EngineConfig(url=r) for r in US),
                              block_size=BLOCK)
        self.router = Router(config, clock=lambda: world.now, rng=random.Random(seed),
                             tokenizer=object())  # type: ignore[arg-type]
        self.router.views.records = world.records
        self.router.views.regions = world.regions
        self.router.views.prefix = Held(world)
        self.router.dispatcher.healthy = lambda replica: True
        self.world = world
        self.tickets: dict[int, Ticket] = {}
        self.pending: dict[int, tuple[Request, asyncio.Task[Placement]]] = {}
        self.out: dict[int, Placement] = {}
        self.loop_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.loop_task = asyncio.create_task(self.router._queue_loop())

    async def stop(self) -> None:
        if self.loop_task is not None:
            self.loop_task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await self.loop_task

    def send(self, rid: int, req: Request, forwarded: bool, pinned: str | None) -> None:
        if not forwarded:
            req = self.router.dispatcher.annotate(req)  # as the request handler does
        task = asyncio.create_task(self.router.place(Ask(req, forwarded, pinned)))
        self.pending[rid] = (req, task)

    async def settle(self) -> None:
        """Let the queue loop run; collect placements made so far (in the ledger at once,
        as the router's ``_attempt`` does). The loop's retry timer runs on real time, the
        test's clock is virtual: waking the loop lets it see that the retry time has come."""
        self.router._wake.set()
        for _ in range(20):
            await asyncio.sleep(0)
        for rid, (req, task) in list(self.pending.items()):
            if task.done():
                p = task.result()
                del self.pending[rid]
                self.out[rid] = p
                if p.target is not None:
                    self.tickets[rid] = self.router.dispatcher.start(
                        p.target, req.num_tokens, self.world.now,
                        req.predicted.tokens if req.predicted else 0.0)

    def complete(self, rid: int) -> None:
        self.router.dispatcher.done(self.tickets.pop(rid))
        self.router.kick()


class SimSide:
    """The simulator's router, driven by the fleet's own ``receive`` / ``route``."""

    def __init__(self, world: World, policy: str, seed: int,
                 params: Mapping[str, object] | None = None) -> None:
        spec = FleetSpec(
            topology=Topology.build(["us", "eu"], {("us", "eu"): 80.0}, intra_ms=1.0),
            replicas={"us": 2, "eu": 2}, profile=L4_LLAMA_3_1_8B, policy=policy, seed=seed,
            policy_params=dict(params or {}),
            block_size=BLOCK,
        )
        self.fleet = Fleet(spec, plane=FixedPlane(world, Held(world)))
        self.fleet.plane.start(self.fleet)
        self.router = self.fleet.router_by_id["us-lb0"]
        self.router.rng = self.router.core.rng = random.Random(seed)
        # Only the entry router's decisions are compared: engines never answer (completions
        # are the test's), and the peer router only receives.
        for e in self.fleet.engine_list:
            e.submit = lambda flight: None  # type: ignore[method-assign]
        self.fleet.router_by_id[EU_ROUTER].receive = (  # type: ignore[method-assign]
            lambda flight, forwarded: None)
        self.world = world
        self.flights: dict[int, Flight] = {}
        self.out: dict[int, Placement] = {}
        route = self.fleet.route

        def recording(router: SimRouter, flight: Flight, p: Placement, fwd: bool) -> None:
            if router is self.router:
                self.out[flight.req.rid] = p
            route(router, flight, p, fwd)

        self.fleet.route = recording  # type: ignore[method-assign]

    def _advance(self) -> None:
        self.fleet.loop.run(until=self.world.now)

    def send(self, rid: int, req: Request, forwarded: bool, pinned: str | None) -> None:
        self._advance()
        sreq = SimRequest(rid, "c", "us", "u", "s", tuple(req.token_ids), (1,), self.world.now,
                          "t")
        rec = RequestRecord(rid, "c", "us", "u", "t", self.world.now, len(sreq.prompt), 1)
        flight = Flight(sreq, None, rec)  # type: ignore[arg-type]
        flight.policy_request = req
        flight.pinned = pinned
        if forwarded:
            flight.via = self.router  # a peer (not simulated here) was the entry
        else:
            flight.entry = self.router
        self.flights[rid] = flight
        self.router.receive(flight, forwarded)

    async def settle(self) -> None:
        self._advance()

    def complete(self, rid: int) -> None:
        self.fleet._release(self.flights[rid], self.router)


def summary(p: Placement) -> tuple[object, ...]:
    t: Target | None = p.target
    d = p.decision
    return (d.replica, d.region, d.reason, d.wait, p.outcome,
            None if t is None else (t.url, t.replica, t.region, t.local))


HOLD = {"kv_tokens": 1000.0, "objective": "e2e", "hold_retry": 1000.0}
"""The kvmesh policy holding for KV headroom (a few of these requests per replica). Held
requests are released only by completions, which both sides see at the same times (the
retry timers do not fire at the same virtual times here, see below)."""


@pytest.mark.parametrize("policy", [*sorted(POLICIES), "kvmesh-hold", "kvmesh-recheck"])
async def test_router_and_simulator_place_the_same_requests_the_same_way(policy: str) -> None:
    params = (HOLD if policy == "kvmesh-hold"
              else {"recheck_pins": True} if policy == "kvmesh-recheck" else None)
    name = "kvmesh" if policy.startswith("kvmesh-") else policy
    world_a, world_s = World(), World()
    a, s = AsyncSide(world_a, name, 7, params), SimSide(world_s, name, 7, params)
    a.start()

    def request(rid: int, shared: int = 0) -> Request:
        tokens = prompt(rid, shared)
        return Request(str(rid), tokens, request_keys(tokens, BLOCK), BLOCK, "s", 8,
                       world_a.now)

    def both(fn: Any) -> None:
        for w in (world_a, world_s):
            fn(w)

    async def step(dt: float = 0.05) -> None:
        both(lambda w: setattr(w, "now", w.now + dt))
        await a.settle()
        await s.settle()

    async def send(rid: int, forwarded: bool = False, pinned: str | None = None,
                   shared: int = 0) -> None:
        req = request(rid, shared)
        a.send(rid, req, forwarded, pinned)
        s.send(rid, req, forwarded, pinned)
        await a.settle()
        await s.settle()

    try:
        # Light load; eu holds a long shared prefix: some policies forward there.
        keys = request_keys(prompt(0, 3), BLOCK)
        both(lambda w: setattr(w, "held", {k: {"eu-e0"} for k in keys[:3]}))
        both(lambda w: setattr(w, "load", {"us-e0": (0.0, 2.0), "us-e1": (1.0, 3.0)}))
        for rid in range(1, 9):
            await send(rid, shared=3 if rid % 3 == 0 else 0)
            await step()
        # Forwarded here: pinned to an own engine, pinned elsewhere, not pinned.
        await send(20, forwarded=True, pinned="us-e1")
        await send(21, forwarded=True, pinned="eu-e0")
        await send(22, forwarded=True)
        await send(23, forwarded=True, pinned="us-e0")
        for rid in (1, 2, 20):
            a.complete(rid)
            s.complete(rid)
        if params is not None:
            # Releases follow completions: both sides release at the completion's time.
            await a.settle()
            await s.settle()
        await step()
        # Everything busy: waiting policies queue; then one replica frees.
        busy = {r: (4.0, 30.0) for r in (*US, *EU)}
        both(lambda w: setattr(w, "load", busy))
        for rid in range(30, 34):
            await send(rid)
            await step(0.002)
        both(lambda w: setattr(w, "load", {**busy, "us-e1": (0.0, 1.0)}))
        for rid in (3, 4):
            a.complete(rid)
            s.complete(rid)
        if params is not None:
            await a.settle()
            await s.settle()
        for _ in range(30):
            await step(0.05)
            if not a.pending and not s.router.core.queue:
                break
            if params is not None:
                # Held for KV: the queue drains as requests end (one a step, both sides).
                for rid in sorted(a.tickets)[:1]:
                    a.complete(rid)
                    s.complete(rid)
                await a.settle()
                await s.settle()
        assert not a.pending, "the asyncio router left requests waiting"
        assert not s.router.core.queue, "the simulator left requests waiting"
    finally:
        await a.stop()

    assert a.out.keys() == s.out.keys()
    for rid in sorted(a.out):
        assert summary(a.out[rid]) == summary(s.out[rid]), f"request {rid}"
    assert a.router.dispatcher.mean_prompt_tokens == s.router.core.mean_prompt_tokens
    assert a.router.dispatches.counts() == s.router.dispatches.counts()
    # The run went through the paths it is about. (How often a waiting head is asked
    # again differs: the simulator's retry timer fires at every retry time in a step, the
    # asyncio one at most once per step here, as the test's clock is virtual.)
    # With ``recheck_pins`` the kvmesh policy decides a pinned forward again among the
    # router's own engines (on both sides): it agrees with the pin of 20 and moves 23.
    assert a.out[20].outcome == "pinned"
    if policy == "kvmesh-recheck":
        assert a.out[23].outcome == "local" and "(named us-e0)" in a.out[23].decision.reason
    else:
        assert a.out[23].outcome == "pinned"
    assert a.out[21].outcome == "local"
    if policy in ("skylb", "kvmesh-hold"):
        assert a.router.dispatcher.waits > 0 and s.router.core.waits > 0, "nothing waited"
