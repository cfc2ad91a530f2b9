"""An in-memory network for mesh peers in virtual time: partitions, loss, duplication,
delay, crashes and restarts, deterministic from one seed.

It moves the same sealed frames the HTTP transport moves, between the same sans-I/O
:class:`~mesh.gossip.MeshCore` objects the asyncio shell runs, so what passes here is the
production protocol minus sockets. It is a small discrete-event loop:

* a heap of events ordered by ``(time, sequence)``: frame deliveries and node wake-ups;
* after a node handles anything, its ``next_wakeup()`` is (re)scheduled, so an idle mesh
  costs nothing between timers;
* every random choice of the *network* (loss, duplication, jitter) comes from ``rng``;
  nodes get their own seeded generators from :meth:`SimNet.rng_for`.

Reusing it from a larger simulator: build nodes with :meth:`SimNet.spawn` (or add any
:class:`Endpoint`), then interleave with your own events::

    while sim_time < end:
        t = min(net.next_event_time(), my_next_event_time())
        net.run_until(t)        # delivers and ticks everything due up to t
        ...handle my events at t...

``net.now`` is the virtual clock (seconds). Faults: :meth:`partition` / :meth:`heal`
(groups of regions or addresses), :meth:`block` and :meth:`delay` (one direction of one
link), ``loss``,
``duplicate`` and ``jitter`` (settable at any time), :meth:`crash` and :meth:`restart`.
:meth:`inject` puts arbitrary bytes on the wire and ``tap`` sees every frame sent, for
forgery and replay tests.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from crdt.base import Replicated
from mesh.gossip import GossipConfig, MeshCore, Outgoing
from mesh.membership import SwimConfig
from mesh.messages import NodeInfo

Latency = Callable[[str, str], float]
"""(source region, destination region) -> one-way delay in seconds."""

TEST_KEY = b"kvmesh simulated mesh key, 32B!!"


class Endpoint(Protocol):
    """What the network drives: a ``MeshCore`` or anything shaped like one."""

    @property
    def addr(self) -> str: ...

    def receive(self, data: bytes, now: float) -> list[Outgoing]: ...

    def tick(self, now: float) -> list[Outgoing]: ...

    def next_wakeup(self) -> float: ...


Tap = Callable[[float, str, str, bytes], None]
"""Called with ``(now, src, dst, frame)`` for every frame a node sends."""


@dataclass(order=True, slots=True)
class _Event:
    time: float
    seq: int
    kind: int = field(compare=False)  # 0 deliver, 1 wake
    src: str = field(compare=False, default="")
    dst: str = field(compare=False, default="")
    data: bytes = field(compare=False, default=b"")
    token: int = field(compare=False, default=0)


def _constant(delay: float) -> Latency:
    return lambda _a, _b: delay


def region_latency(intra: float, inter: float | Mapping[tuple[str, str], float]) -> Latency:
    """A latency model: ``intra`` inside a region, ``inter`` (or a per-pair table) across."""

    def latency(a: str, b: str) -> float:
        if a == b:
            return intra
        if isinstance(inter, Mapping):
            return inter.get((a, b), inter.get((b, a), max(inter.values())))
        return inter

    return latency


class SimNet:
    def __init__(
        self,
        *,
        seed: int = 0,
        latency: Latency | float = 0.001,
        jitter: float = 0.0,
        loss: float = 0.0,
        duplicate: float = 0.0,
        now: float = 0.0,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(f"simnet:{seed}")
        self.latency: Latency = latency if callable(latency) else _constant(float(latency))
        self.jitter = jitter
        self.loss = loss
        self.duplicate = duplicate
        self.now = now
        self.tap: Tap | None = None
        self.nodes: dict[str, Endpoint] = {}
        self.regions: dict[str, str] = {}
        self.stats: dict[str, Counter[str]] = {}
        self._down: set[str] = set()
        self._groups: dict[str, int] | None = None
        self._blocked: set[tuple[str, str]] = set()
        self._extra: dict[tuple[str, str], float] = {}
        self._heap: list[_Event] = []
        self._seq = 0
        self._tokens: dict[str, int] = {}
        self._wake_at: dict[str, float] = {}

    # ---- building ----------------------------------------------------------------------

    def rng_for(self, name: str) -> random.Random:
        """A generator for one node, independent of the network's and of event order."""
        return random.Random(f"simnet:{self.seed}:{name}")

    def spawn(
        self,
        node_id: str,
        region: str,
        states: Mapping[str, Replicated[Any]],
        *,
        generation: int = 1,
        seeds: Iterable[str] = (),
        keys: Sequence[bytes] = (TEST_KEY,),
        swim: SwimConfig | None = None,
        gossip: GossipConfig | None = None,
        wall_offset: float = 0.0,
    ) -> MeshCore:
        """Build a ``MeshCore`` at ``sim://node_id`` on virtual time and add it."""
        core = MeshCore(
            NodeInfo(node_id, region, self.addr_of(node_id)),
            generation,
            states,
            keys=keys,
            rng=self.rng_for(f"{node_id}/{generation}"),
            now=self.now,
            wall=lambda: self.now + wall_offset,
            swim=swim,
            gossip=gossip,
            seeds=seeds,
        )
        self.add(core, region)
        return core

    @staticmethod
    def addr_of(node_id: str) -> str:
        return f"sim://{node_id}"

    def add(self, node: Endpoint, region: str) -> None:
        self.nodes[node.addr] = node
        self.regions[node.addr] = region
        self.stats.setdefault(node.addr, Counter())
        self._down.discard(node.addr)
        self._reschedule(node.addr)

    def crash(self, addr: str) -> None:
        """Stop a node dead: no ticks, frames to it vanish, nothing it queued is sent."""
        self._down.add(addr)
        self._tokens[addr] = self._tokens.get(addr, 0) + 1
        self._wake_at.pop(addr, None)

    def restart(self, node: Endpoint, region: str | None = None) -> None:
        """Put a fresh endpoint (e.g. a new generation) at a crashed node's address."""
        self.add(node, region or self.regions[node.addr])

    def is_up(self, addr: str) -> bool:
        return addr in self.nodes and addr not in self._down

    # ---- faults ------------------------------------------------------------------------

    def partition(self, *groups: Iterable[str]) -> None:
        """Cut the network into groups of regions and/or addresses; unnamed nodes form one more."""
        index: dict[str, int] = {}
        for i, g in enumerate(groups):
            for name in g:
                index[name] = i
        self._groups = index

    def heal(self) -> None:
        """Undo partitions, blocks and extra delays."""
        self._groups = None
        self._blocked.clear()
        self._extra.clear()

    def delay(self, src: str, dst: str, extra: float) -> None:
        """Add ``extra`` seconds to every frame from ``src`` to ``dst`` (0 removes it)."""
        if extra:
            self._extra[(src, dst)] = extra
        else:
            self._extra.pop((src, dst), None)

    def block(self, src: str, dst: str) -> None:
        self._blocked.add((src, dst))

    def unblock(self, src: str, dst: str) -> None:
        self._blocked.discard((src, dst))

    def _group(self, addr: str) -> int:
        assert self._groups is not None
        g = self._groups.get(addr)
        if g is None:
            g = self._groups.get(self.regions.get(addr, ""), -1)
        return g

    def connected(self, src: str, dst: str) -> bool:
        if (src, dst) in self._blocked:
            return False
        return self._groups is None or self._group(src) == self._group(dst)

    # ---- wire --------------------------------------------------------------------------

    def _push(self, ev: _Event) -> None:
        self._seq += 1
        ev.seq = self._seq
        heapq.heappush(self._heap, ev)

    def _delay(self, src: str, dst: str) -> float:
        d = self.latency(self.regions.get(src, ""), self.regions.get(dst, ""))
        d += self._extra.get((src, dst), 0.0)
        if self.jitter:
            d += self.rng.random() * self.jitter
        return d

    def send(self, src: str, out: Outgoing) -> None:
        """Hand one frame from ``src`` to the network (loss and duplication apply here)."""
        st = self.stats.setdefault(src, Counter())
        st["tx_frames"] += 1
        st["tx_bytes"] += len(out.data)
        if self.tap is not None:
            self.tap(self.now, src, out.addr, out.data)
        copies = 2 if self.duplicate and self.rng.random() < self.duplicate else 1
        for _ in range(copies):
            if self.loss and self.rng.random() < self.loss:
                st["lost"] += 1
                continue
            at = self.now + self._delay(src, out.addr)
            self._push(_Event(at, 0, 0, src, out.addr, out.data))

    def inject(self, src: str, dst: str, data: bytes, delay: float = 0.0) -> None:
        """Deliver raw bytes to ``dst`` as if ``src`` sent them (no loss applied)."""
        self._push(_Event(self.now + delay, 0, 0, src, dst, data))

    def _reschedule(self, addr: str) -> None:
        node = self.nodes.get(addr)
        if node is None or addr in self._down:
            return
        w = node.next_wakeup()
        if math.isinf(w):
            self._wake_at.pop(addr, None)
            return
        w = max(w, self.now)
        if self._wake_at.get(addr) == w:
            return
        token = self._tokens.get(addr, 0) + 1
        self._tokens[addr] = token
        self._wake_at[addr] = w
        self._push(_Event(w, 0, 1, dst=addr, token=token))

    def _sendall(self, src: str, outs: list[Outgoing]) -> None:
        for out in outs:
            self.send(src, out)

    # ---- running -----------------------------------------------------------------------

    def next_event_time(self) -> float:
        return self._heap[0].time if self._heap else math.inf

    def step(self) -> bool:
        """Process the next event; False when there is none."""
        if not self._heap:
            return False
        ev = heapq.heappop(self._heap)
        self.now = max(self.now, ev.time)
        dst = ev.dst
        if ev.kind == 1:
            if ev.token != self._tokens.get(dst) or dst in self._down:
                return True
            self._wake_at.pop(dst, None)
            node = self.nodes[dst]
            self._sendall(dst, node.tick(self.now))
            if node.next_wakeup() <= self.now:  # a timer that did not move: never spin
                self.stats[dst]["stuck_timer"] += 1
                self._wake_at[dst] = self.now + 1e-3
                self._push(_Event(self.now + 1e-3, 0, 1, dst=dst, token=self._tokens[dst]))
                return True
            self._reschedule(dst)
            return True
        st = self.stats.setdefault(dst, Counter())
        if not self.is_up(dst):
            st["dropped_down"] += 1
            return True
        if not self.connected(ev.src, dst):
            st["dropped_partition"] += 1
            return True
        st["rx_frames"] += 1
        st["rx_bytes"] += len(ev.data)
        self._sendall(dst, self.nodes[dst].receive(ev.data, self.now))
        self._reschedule(dst)
        return True

    def run_until(self, t: float) -> None:
        """Process every event due at or before ``t``; leaves ``now == t``."""
        while self._heap and self._heap[0].time <= t:
            self.step()
        self.now = max(self.now, t)

    def run_for(self, dt: float) -> None:
        self.run_until(self.now + dt)

    def run_until_true(
        self, predicate: Callable[[], bool], timeout: float, check_every: float = 0.05
    ) -> bool:
        """Advance until ``predicate()`` holds (checked every ``check_every`` virtual s)."""
        end = self.now + timeout
        while True:
            if predicate():
                return True
            if self.now >= end:
                return False
            self.run_until(min(self.now + check_every, end))

    def total(self, key: str) -> int:
        return sum(c[key] for c in self.stats.values())
