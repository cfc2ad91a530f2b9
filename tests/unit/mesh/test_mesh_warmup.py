"""Warm readiness (sans-I/O): what it waits for, the bounded wait, the latch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mesh.decision_log import DecisionEntry, DecisionLog
from mesh.warmup import WarmInputs, Warmup, inputs_of, metrics


def test_waits_for_engines_then_a_peer_then_catch_up() -> None:
    w = Warmup(started_at=100.0, max_wait=30.0)
    assert "engine(s) e1" in (w.observe(WarmInputs(("e1",), True, False), 101.0) or "")
    assert w.observe(WarmInputs((), True, False), 102.0) == "no state from any peer yet"
    assert "still arriving: e2" in (w.observe(WarmInputs((), True, True, ("e2",)), 103.0) or "")
    assert not w.warm and w.time_to_warm is None
    assert w.observe(WarmInputs((), True, True), 104.5) is None
    assert w.warm and w.how == "covered" and w.time_to_warm == 4.5


def test_no_peers_configured_needs_no_peer_state() -> None:
    w = Warmup(0.0, 30.0)
    assert w.observe(WarmInputs((), False, False), 0.2) is None
    assert w.how == "covered"


def test_the_wait_is_bounded_and_warm_latches() -> None:
    w = Warmup(10.0, 5.0)
    assert w.observe(WarmInputs(("e1",), True, False), 14.9) is not None
    assert w.observe(WarmInputs(("e1",), True, False), 15.0) is None
    assert w.how == "timeout" and w.time_to_warm == 5.0
    # Later replays do not flap readiness.
    assert w.observe(WarmInputs(("e1",), True, False), 20.0) is None
    assert w.time_to_warm == 5.0


def test_metrics_export_time_to_warm_only_once_warm() -> None:
    w = Warmup(0.0, 5.0)
    before = {m.name: m.samples for m in metrics(w)}
    assert before["kvmesh_router_warm"][0].value == 0.0
    assert before["kvmesh_time_to_warm_seconds"] == []
    w.observe(WarmInputs(), 1.25)
    after = {m.name: m.samples for m in metrics(w)}
    assert after["kvmesh_router_warm"][0].value == 1.0
    (sample,) = after["kvmesh_time_to_warm_seconds"]
    assert sample.value == 1.25 and sample.labels == {"how": "covered"}


@dataclass
class _Stats:
    replica: str
    last_seq: int | None
    replaying: bool


@dataclass
class _Sub:
    st: _Stats

    def stats(self) -> _Stats:
        return self.st


@dataclass
class _Slice:
    replica: str
    catching_up: bool


@dataclass
class _Index:
    versions: dict[str, tuple[int, int]] = field(default_factory=dict)
    catching: tuple[str, ...] = ()

    def version(self, replica: str) -> tuple[int, int] | None:
        return self.versions.get(replica)

    def slices(self) -> list[_Slice]:
        return [_Slice(r, r in self.catching) for r in sorted({*self.versions, *self.catching})]


@dataclass
class _Node:
    counters: dict[str, int]

    def metrics(self) -> dict[str, int]:
        return dict(self.counters)


@dataclass
class _Backend:
    subscribers: list[Any]
    index: _Index
    node: _Node | None


def test_inputs_from_the_replicated_side() -> None:
    subs = [_Sub(_Stats("seen", 4, False)), _Sub(_Stats("replaying", 9, True)),
            _Sub(_Stats("idle", None, False)), _Sub(_Stats("gossiped", None, False)),
            _Sub(_Stats("empty", None, False))]
    backend = _Backend(subs, _Index({"gossiped": (1, 7)}, ("far",)), _Node({"rx.ping": 3}))
    got = inputs_of(backend, empty={"empty"})
    assert got == WarmInputs(("replaying", "idle"), True, False, ("far",))
    backend.node = _Node({"rx.sync_reply": 1})
    assert inputs_of(backend).peer_state
    assert inputs_of(object()) == WarmInputs()  # no mesh, no sources: nothing to wait for


def test_decision_log_is_bounded_and_newest_first() -> None:
    log = DecisionLog(size=3)
    for i in range(5):
        log.add(DecisionEntry(float(i), f"r{i}", "local", "e", "us", f"why {i}", "kvmesh",
                              100, i, 1))
    rows = log.recent(now=10.0)
    assert [r["request_id"] for r in rows] == ["r4", "r3", "r2"]
    assert rows[0]["age_s"] == 6.0 and rows[0]["reason"] == "why 4"
    assert log.total == 5
