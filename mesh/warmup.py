"""Readiness that means warm: a router is ready once its index can route by cache.

A router that has just started or restarted knows nothing: its own engines' slices are empty
until their event streams are read (and a gap back to sequence 0 replayed), and the other
regions' slices and load records arrive only by gossip. Answering ``/ready`` before that sends
traffic to a router that routes blind, the cache-miss storm after a failover.

:class:`Warmup` is sans-I/O: it is fed :class:`WarmInputs` (what the router sees now) and
``now``, and latches *warm* the first time

- every own engine with an event source is **covered**: its stream has delivered a batch and
  no replay is running, or its slice already arrived from a peer (its history is held), or
  its replay socket answered a replay from sequence 0 with nothing (it has no history yet:
  an idle new engine publishes nothing, so waiting for a batch would wait forever), and
- when peers are configured, a **peer's state** has arrived (a push-pull reply or a push; a
  peer's first push to a new generation is its whole state) and no slice is still catching up,

or ``max_wait`` seconds after start, whichever comes first (an idle engine publishes nothing,
and a lone survivor has no peer to answer). Once warm it stays warm: later replays are routine
and must not flap readiness. ``time_to_warm`` is what ``kvmesh_time_to_warm_seconds`` exports.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

PEER_STATE_COUNTERS = ("rx.sync_reply", "rx.push")
"""Gossip receive counters (``mesh.gossip``) that mean a peer's state has reached us."""


@dataclass(frozen=True, slots=True)
class WarmInputs:
    """What the router sees now."""

    uncovered: tuple[str, ...] = ()
    """Own engines whose events are not yet covered (no batch yet, or replaying)."""
    peers_configured: bool = False
    peer_state: bool = False
    """A peer's state has arrived by gossip."""
    catching_up: tuple[str, ...] = ()
    """Slices whose snapshot is still arriving."""


class Warmup:
    """Latches warm; see the module docstring."""

    def __init__(self, started_at: float, max_wait: float) -> None:
        self.started_at = started_at
        self.max_wait = max_wait
        self.warm_at: float | None = None
        self.how: str | None = None
        """``covered`` (every condition met) or ``timeout`` (``max_wait`` elapsed first)."""
        self.waiting_for: str | None = "starting"

    @property
    def warm(self) -> bool:
        return self.warm_at is not None

    @property
    def time_to_warm(self) -> float | None:
        return None if self.warm_at is None else self.warm_at - self.started_at

    def observe(self, inputs: WarmInputs, now: float) -> str | None:
        """None once warm; otherwise what it still waits for."""
        if self.warm_at is not None:
            return None
        why = self._missing(inputs)
        if why is None:
            self.warm_at, self.how = now, "covered"
        elif now - self.started_at >= self.max_wait:
            self.warm_at, self.how = now, "timeout"
            why = None
        self.waiting_for = why
        return why

    @staticmethod
    def _missing(inputs: WarmInputs) -> str | None:
        if inputs.uncovered:
            return f"index does not yet cover engine(s) {', '.join(inputs.uncovered)}"
        if inputs.peers_configured and not inputs.peer_state:
            return "no state from any peer yet"
        if inputs.catching_up:
            return f"slice(s) still arriving: {', '.join(inputs.catching_up)}"
        return None

    def status(self) -> dict[str, Any]:
        ttw = self.time_to_warm
        return {"warm": self.warm, "how": self.how,
                "time_to_warm_s": None if ttw is None else round(ttw, 3),
                "waiting_for": self.waiting_for, "max_wait_s": self.max_wait}


async def probe_empty(endpoints: Mapping[str, str], timeout: float = 1.0) -> set[str]:
    """Replicas whose replay socket answers a replay from 0 with its end marker at once.

    Only the first reply is read: an engine with history is not replayed here (its stream's
    own tracker does that, into the index); one that does not answer stays unknown.
    """
    if not endpoints:
        return set()
    import zmq.asyncio

    from kvevents.replay import ReplayOutcome, replay_once

    ctx = zmq.asyncio.Context()

    async def empty(endpoint: str) -> bool:
        try:
            outcome = await replay_once(ctx, endpoint, 0, lambda _m: True, lambda _r: None,
                                        idle_timeout=timeout, max_duration=timeout)
        except Exception:  # a bad endpoint is "unknown", never a crash
            return False
        return outcome is ReplayOutcome.END

    try:
        names = list(endpoints)
        found = await asyncio.gather(*(empty(endpoints[n]) for n in names))
        return {n for n, e in zip(names, found, strict=True) if e}
    finally:
        ctx.term()


def inputs_of(backend: object, empty: Collection[str] = ()) -> WarmInputs:
    """Read a router backend's warm inputs.

    Duck-typed on the replicated side's public parts (``subscribers`` with ``stats()``,
    ``index`` with ``version``/``slices``, ``node`` with ``metrics()``), so a backend
    without them (no mesh, no event sources) is warm at once.
    """
    index: Any = getattr(backend, "index", None)
    node: Any = getattr(backend, "node", None)
    uncovered: list[str] = []
    for sub in getattr(backend, "subscribers", ()) or ():
        st = sub.stats()
        if st.replica in empty and st.last_seq is None:
            continue
        if st.last_seq is not None and not st.replaying:
            continue
        if index is not None and index.version(st.replica) is not None and not st.replaying:
            continue  # its slice came from a peer: the history is held
        uncovered.append(st.replica)
    catching: tuple[str, ...] = ()
    if index is not None:
        catching = tuple(s.replica for s in index.slices() if s.catching_up)
    peer_state = False
    if node is not None:
        counters = node.metrics()
        peer_state = any(counters.get(k, 0) > 0 for k in PEER_STATE_COUNTERS)
    return WarmInputs(tuple(uncovered), node is not None, peer_state, catching)


async def watch(warmup: Warmup, backend: object, replay: Mapping[str, str],
                clock: Callable[[], float], interval: float = 0.05) -> None:
    """Probe the engines' histories, then observe until warm (so ``time_to_warm`` does not
    depend on who polls ``/ready``). ``replay``: own replica -> its replay endpoint."""
    probe = asyncio.create_task(probe_empty(replay))
    empty: set[str] = set()
    try:
        while not warmup.warm:
            if probe.done() and not empty:
                empty = probe.result()
            try:
                warmup.observe(inputs_of(backend, empty), clock())
            except Exception:  # a broken input must not stop the watch; max_wait still ends it
                warmup.observe(WarmInputs(uncovered=("?",)), clock())
            await asyncio.sleep(interval)
    finally:
        probe.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await probe


def metrics(warmup: Warmup) -> Iterable[Any]:
    """``kvmesh_router_warm`` always; ``kvmesh_time_to_warm_seconds`` once warm."""
    from mesh.metrics import gauge

    yield gauge("kvmesh_router_warm", "1 once the router's index is warm (see /ready)", [],
                [([], 1.0 if warmup.warm else 0.0)])
    ttw = warmup.time_to_warm
    yield gauge("kvmesh_time_to_warm_seconds",
                "Seconds from start until the index was warm (or the bounded wait ended)",
                ["how"], [([warmup.how or ""], ttw)] if ttw is not None else [])
