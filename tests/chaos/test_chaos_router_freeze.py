"""A router is frozen (``docker pause``) past the suspicion timeout, then resumed."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from functools import partial

import pytest
from chaos_checks import (
    detection_bound,
    finish_scenario,
    heal_bound,
    is_dead,
    peers,
    replica_views,
    view_mismatches,
)
from chaos_load import LoadGenerator
from chaos_record import ScenarioRecord
from chaos_support import each_until, wait_until
from chaos_topology import Mesh, Node

pytestmark = pytest.mark.chaos

Version = tuple[int, int]


class VersionWatch:
    """Remembers the highest version each router showed for each replica; any later,
    lower one is a stale state that won."""

    def __init__(self, routers: list[Node]) -> None:
        self.routers = routers
        self.high: dict[tuple[str, str], Version] = {}
        self.regressions: list[str] = []
        self._lock = threading.Lock()

    def observe(self, routers: list[Node] | None = None) -> None:
        for router in self.routers if routers is None else routers:
            views = replica_views(router)
            with self._lock:
                self._note(router, views)

    def _note(self, router: Node, views: dict[str, tuple[int, Version | None]]) -> None:
        for url, (_, version) in views.items():
            if version is None:
                continue
            key = (router.alias, url)
            seen = self.high.get(key)
            if seen is not None and version < seen:
                self.regressions.append(f"{router.alias}: {url} {seen} -> {version}")
            if seen is None or version > seen:
                self.high[key] = version


def failed_attempt_on(gen: LoadGenerator, alias: str, after: float) -> bool:
    return any(
        a.router == alias and a.status != 200 and a.t_end > after
        for o in gen.snapshot()
        for a in o.attempts
    )


def test_router_frozen_then_resumed(
    restored_mesh: Mesh, load: Callable[..., LoadGenerator], record: ScenarioRecord
) -> None:
    """Router frozen past the suspicion timeout, then resumed."""
    mesh = restored_mesh
    victim, survivor = mesh.routers("asia")
    observers = [r for r in mesh.routers() if r is not victim]
    record.faults = (
        f"`docker pause {victim.alias}` under load until every peer declared it dead, "
        "then `docker unpause`"
    )
    bound = detection_bound(mesh)
    before = peers(survivor)[victim.alias]

    gen = load(max_duration_s=120)
    gen.wait_for(60, timeout=30)
    t_pause = gen.mark("pause")
    mesh.pause(victim)
    declared_at = each_until(
        {o.alias: partial(is_dead, o, victim.alias) for o in observers},
        since=t_pause,
        timeout=2 * bound,
        what=f"every router declares the frozen {victim.alias} dead",
    )
    declared = max(declared_at.values())
    assert declared <= bound, f"declared dead after {declared_at} (bound {bound:.1f} s)"
    gen.wait_for(60, timeout=40)  # its engines' caches move on while it is frozen
    wait_until(
        partial(failed_attempt_on, gen, victim.alias, t_pause),
        timeout=30,
        what=f"a client's attempt on the frozen {victim.alias} timed out (and was retried)",
    )

    watch = VersionWatch(mesh.routers())
    watch.observe(observers)  # the survivors' versions just before the stale node returns
    t_resume = gen.mark("resume")
    mesh.unpause(victim)
    limit = heal_bound(mesh)

    def rejoined(observer: Node) -> bool:
        """``observer`` holds the victim alive at a newer (generation, incarnation)."""
        watch.observe([observer])
        p = peers(observer)[victim.alias]
        newer = (p["generation"], p["incarnation"]) > (before["generation"], before["incarnation"])
        return bool(p["state"] == "alive" and newer)

    def sees_all_alive() -> bool:
        watch.observe([victim])
        return all(p["state"] == "alive" for p in peers(victim).values())

    probes: dict[str, Callable[[], object]] = {o.alias: partial(rejoined, o) for o in observers}
    probes[victim.alias] = sees_all_alive
    rejoin_at = each_until(
        probes, since=t_resume, timeout=2 * limit, what=f"{victim.alias} alive again everywhere"
    )
    rejoin_s = max(rejoin_at.values())
    after = peers(survivor)[victim.alias]
    gen.wait_for(40, timeout=30)
    report = gen.stop()
    t_stop = time.monotonic()

    def converged() -> bool:
        watch.observe()
        return not view_mismatches(mesh)

    wait_until(
        converged,
        timeout=limit,
        what="every router's view equal to the engines' caches",
        describe=lambda: "; ".join(view_mismatches(mesh)[:6]),
    )
    views_s = time.monotonic() - t_stop
    assert views_s <= limit, f"views equal to the caches only {views_s:.2f} s after the load"
    assert not watch.regressions, f"stale versions won: {watch.regressions[:5]}"

    how = (
        f"refuted (same generation, incarnation {before['incarnation']} -> {after['incarnation']})"
        if after["generation"] == before["generation"]
        else f"rejoined with generation {after['generation']}"
    )
    record.convergence_s = rejoin_s
    record.bound_s = limit
    record.note(
        f"declared dead by all peers {declared:.2f} s after the pause (bound {bound:.1f} s); "
        f"after the unpause it {how} and was alive everywhere in {rejoin_s:.2f} s; no router's "
        f"version of any replica went backwards; views equal to the caches {views_s:.2f} s "
        "after the load stopped"
    )
    finish_scenario(mesh, record, report)
