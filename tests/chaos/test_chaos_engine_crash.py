"""An engine crashes (``docker kill``) under load and restarts with its sequence reset."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import pytest
from chaos_checks import (
    engine_detection_bound,
    finish_scenario,
    log_lines_since,
    replica_views,
    status,
)
from chaos_load import LoadGenerator
from chaos_record import ScenarioRecord
from chaos_support import each_until, wait_until
from chaos_topology import Mesh, Node

pytestmark = pytest.mark.chaos


def routes_to_nothing_but(router: Node, replica: str) -> bool:
    """``router`` no longer considers ``replica`` a target."""
    rows = {r["replica"]: r for r in status(router)["routing"]["replicas"]}
    return not rows.get(replica, {}).get("healthy")


def healthy_everywhere(mesh: Mesh, replica: str) -> dict[str, bool]:
    """router alias -> whether it would route to ``replica`` now (its routing view)."""
    out = {}
    for router in mesh.routers():
        rows = {r["replica"]: r for r in status(router)["routing"]["replicas"]}
        out[router.alias] = bool(rows.get(replica, {}).get("healthy"))
    return out


def test_engine_crash_and_restart(
    restored_mesh: Mesh, load: Callable[..., LoadGenerator], record: ScenarioRecord
) -> None:
    """Engine crash and restart (sequence reset)."""
    mesh = restored_mesh
    victim: Node = mesh.nodes["engine-eu-1"]
    replica = mesh.engine_replica_id(victim.alias)
    record.faults = f"`docker kill {victim.alias}` under load; `docker start` (seq restarts at 0)"
    bound = engine_detection_bound(mesh)

    gen = load(max_duration_s=120)
    wait_until(
        lambda: any(
            o.ok and o.served_by and o.served_by.replica == replica for o in gen.snapshot()
        ),
        timeout=30,
        what=f"a request served by {victim.alias} before the crash",
    )
    version_before = replica_views(mesh.routers("eu")[0])[replica][1]
    assert version_before is not None

    t_kill = gen.mark("kill")
    mesh.kill(victim)
    detected = each_until(
        {r.alias: partial(routes_to_nothing_but, r, replica) for r in mesh.routers()},
        since=t_kill,
        timeout=2 * bound + 5,
        what=f"every router stops routing to {victim.alias}",
    )
    t_detect, wall_detect = time.monotonic(), time.time()
    assert max(detected.values()) <= bound, f"detection {detected} over the bound {bound:.2f} s"
    gen.wait_for(80, timeout=30)
    # A dispatch to the dead engine fails before the first byte; the router logs each such
    # attempt with the URL it tried, when it fails: up to the connect timeout after it began,
    # plus a second for a starved event loop to get round to it. (The logs' timestamps are
    # read: their start-up lines are.)
    assert all(log_lines_since(r, 0) for r in mesh.routers()), "router logs unreadable"
    connect_timeout = float(mesh.spec.router_config["connect_timeout"])
    began_after_detection = wall_detect + connect_timeout + 1.0
    attempts_on_victim = [
        f"{r.alias}: {line}"
        for r in mesh.routers()
        for line in log_lines_since(r, began_after_detection)
        if f"attempt on {replica}/" in line
    ]

    t_restart = gen.mark("restart")
    mesh.restart(victim)
    mesh.wait_ready([victim], "/health", 60)

    def re_epoched() -> bool:
        for router in mesh.routers():
            view = replica_views(router).get(replica)
            if view is None or view[1] is None or view[1][0] <= version_before[0]:
                return False
        return all(healthy_everywhere(mesh, replica).values())

    wait_until(re_epoched, timeout=60, what=f"every router re-epochs {victim.alias}'s slice")
    t_reepoch = time.monotonic()
    wait_until(
        lambda: any(
            o.ok and o.served_by and o.served_by.replica == replica
            for o in gen.snapshot()
            if o.t_start > t_restart
        ),
        timeout=60,
        what=f"routing to {victim.alias} resumes",
    )
    t_resumed = time.monotonic()
    report = gen.stop()

    down = report.between(t_detect, t_restart)
    assert down, "no request ran while the engine was down"
    served_by_victim = [o for o in down for a in o.attempts if a.replica == replica]
    assert not served_by_victim, f"{len(served_by_victim)} answers from a dead engine?"
    assert not attempts_on_victim, f"dispatched to the down engine: {attempts_on_victim[:3]}"
    epoch_after = replica_views(mesh.routers()[0])[replica][1]
    assert epoch_after is not None

    record.convergence_s = max(detected.values())
    record.bound_s = bound
    record.note(
        f"all routers stopped routing to it within {max(detected.values()):.2f} s of the kill; "
        f"{len(down)} requests while down, none dispatched to it; after restart the slice "
        f"was re-epoched ({version_before[0]} -> {epoch_after[0]}) on every router in "
        f"{t_reepoch - t_restart:.2f} s and routing resumed after {t_resumed - t_restart:.2f} s"
    )
    finish_scenario(mesh, record, report)
