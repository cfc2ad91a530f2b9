"""A mesh of PrefixIndex routers under partitions, heals, engine and router restarts.

Engines publish batches; some routers ingest them (each replays from its own cursor); all
routers gossip cut deltas over a lossy, duplicating, reordering network that can partition.
A restarted router comes back with an empty index, replays its engines from the start of
their current run and catches up the rest from its peers. At the end the network heals,
every ingester catches up, and anti-entropy must leave every router with the naive model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from crdt import wire
from crdt.base import Version
from crdt.prefix_index import IndexDelta, PrefixIndex

N_ROUTERS = 4
ENGINES = ["http://e0:8000", "http://e1:8000", "http://e2:8000"]
# engine -> routers that ingest it (e0 by two routers of its region)
INGESTERS = {ENGINES[0]: [0, 1], ENGINES[1]: [2], ENGINES[2]: [1]}
keys_st = st.lists(st.integers(0, 30), min_size=1, max_size=5)


@dataclass
class Engine:
    epoch: int = 1
    seq: int = -1
    held: set[int] = field(default_factory=set)
    # batches of the current run: (seq, kind, keys); a restart starts a new list
    run: list[tuple[int, str, tuple[int, ...]]] = field(default_factory=list)
    retired: bool = False


class Mesh(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.rnd = random.Random(0)
        self.nodes = [PrefixIndex(min_tombstones=2) for _ in range(N_ROUTERS)]
        self.engines = {name: Engine() for name in ENGINES}
        # (engine, router) -> index into the engine's current run of the next batch to ingest
        self.cursor: dict[tuple[str, int], int] = {}
        self.inbox: list[tuple[int, IndexDelta]] = []
        self.cut: set[frozenset[int]] = set()
        self.now = 0.0
        self.drops: dict[str, Version] = {}
        self.dropper: int | None = None
        for name, routers in INGESTERS.items():
            for r in routers:
                self.nodes[r].reset(name, 1)
                self.cursor[name, r] = 0

    # ---- engines ---------------------------------------------------------------------

    @rule(
        e=st.sampled_from(ENGINES),
        kind=st.sampled_from(["store"] * 5 + ["remove"] * 3 + ["clear"]),
        keys=keys_st,
    )
    def engine_event(self, e: str, kind: str, keys: list[int]) -> None:
        eng = self.engines[e]
        if eng.retired:
            return
        eng.seq += 1
        if kind == "store":
            eng.held.update(keys)
        elif kind == "remove":
            eng.held.difference_update(keys)
        else:
            eng.held.clear()
        eng.run.append((eng.seq, kind, tuple(keys)))

    @rule(e=st.sampled_from(ENGINES), dice=st.integers(0, 3))
    def engine_restart(self, e: str, dice: int) -> None:
        eng = self.engines[e]
        if eng.retired or dice:  # restarts are rarer than the other rules
            return
        eng.epoch += 1
        eng.seq = -1
        eng.held = set()
        eng.run = []
        for r in INGESTERS[e]:
            self.cursor[e, r] = -1  # the ingester first notices the restart

    @rule(e=st.sampled_from(ENGINES), pick=st.integers(0, 1), n=st.integers(1, 4))
    def ingest(self, e: str, pick: int, n: int) -> None:
        routers = INGESTERS[e]
        r = routers[pick % len(routers)]
        for _ in range(n):
            self._ingest_one(e, r)

    def _ingest_one(self, e: str, r: int) -> bool:
        eng = self.engines[e]
        if eng.retired:
            return False
        at = self.cursor[e, r]
        node = self.nodes[r]
        if at == -1:
            node.reset(e, eng.epoch)
            self.cursor[e, r] = 0
            return True
        if at >= len(eng.run):
            return False
        seq, kind, keys = eng.run[at]
        version = (eng.epoch, seq)
        if kind == "store":
            node.store(e, version, list(keys))
        elif kind == "remove":
            node.remove(e, version, list(keys))
        else:
            node.clear(e, version)
        self.cursor[e, r] = at + 1
        return True

    @precondition(lambda self: not self.drops)
    @rule(e=st.sampled_from(ENGINES), r=st.integers(0, N_ROUTERS - 1))
    def retire_and_drop(self, e: str, r: int) -> None:
        """The engine goes away for good; router ``r`` drops it at whatever version it has."""
        eng = self.engines[e]
        if eng.retired:
            return
        for ingester in INGESTERS[e]:
            while self._ingest_one(e, ingester):
                pass
        version = self.nodes[r].version(e)
        if version is None:
            return
        eng.retired = True
        self.dropper = r
        self.nodes[r].drop(e, now=self.now)
        self.drops[e] = version

    # ---- routers and network ---------------------------------------------------------

    @rule(
        a=st.integers(0, N_ROUTERS - 1),
        b=st.integers(0, N_ROUTERS - 1),
        budget=st.sampled_from([None, 90, 250, 2000]),
    )
    def gossip(self, a: int, b: int, budget: int | None) -> None:
        if a == b or frozenset((a, b)) in self.cut:
            return
        self.inbox.append((b, self.nodes[a].delta_since(self.nodes[b].digest(), self.now, budget)))

    @rule(seed=st.integers(0, 2**16))
    def deliver(self, seed: int) -> None:
        rnd = random.Random(seed)
        rnd.shuffle(self.inbox)
        keep = []
        for to, d in self.inbox:
            fate = rnd.random()
            if fate < 0.15:
                continue  # lost
            self.nodes[to].merge(_rt(self.nodes[to], d), self.now)
            if fate > 0.85:
                keep.append((to, d))  # duplicated: delivered again later
        self.inbox = keep

    @rule(a=st.integers(0, N_ROUTERS - 1), b=st.integers(0, N_ROUTERS - 1))
    def partition(self, a: int, b: int) -> None:
        if a != b:
            self.cut.add(frozenset((a, b)))

    @rule()
    def heal(self) -> None:
        self.cut.clear()

    @rule(r=st.integers(0, N_ROUTERS - 1))
    def router_restart(self, r: int) -> None:
        """Empty index; replay our engines from the start of their current run.

        (The router that dropped a replica keeps running: restarting it before its tombstone
        spread would lose the drop, which its expiry policy would then simply redo.)
        """
        if r == self.dropper:
            return
        self.nodes[r] = PrefixIndex(min_tombstones=2)
        self.inbox = [(to, d) for to, d in self.inbox if to != r]
        for e, routers in INGESTERS.items():
            if r in routers and not self.engines[e].retired:
                self.cursor[e, r] = -1

    @rule(dt=st.floats(0.1, 5.0))
    def housekeeping(self, dt: float) -> None:
        self.now += dt
        for node in self.nodes:
            node.gc(self.now, grace=1e6)
            node.compact()

    @invariant()
    def indexes_are_internally_consistent(self) -> None:
        for node in self.nodes:
            node.check_invariants()

    def teardown(self) -> None:
        self.cut.clear()
        for e, r in sorted(self.cursor):
            while self._ingest_one(e, r):
                pass
        self.deliver(1)
        for _ in range(300):
            sent = False  # until nobody has anything to send (a re-sent arc changes nothing)
            for a in self.nodes:
                for b in self.nodes:
                    if a is not b:
                        d = a.delta_since(b.digest(), self.now, 250)
                        sent |= not d.is_empty()
                        b.merge(_rt(b, d), 0.0)
            if not sent:
                break
        expected: dict[str, tuple[object, ...]] = {}
        for name, eng in self.engines.items():
            final = (eng.epoch, eng.seq)
            dropped = self.drops.get(name)
            if dropped is not None and dropped >= final:
                expected[name] = ("dropped", *final)
            else:
                expected[name] = (eng.epoch, eng.seq, True, frozenset(eng.held))
        for node in self.nodes:
            assert node.content() == expected


def _rt(index: PrefixIndex, delta: IndexDelta) -> IndexDelta:
    return index.delta_from_wire(wire.decode(wire.encode(delta.to_wire())))


Mesh.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_mesh_of_prefix_indexes = Mesh.TestCase
