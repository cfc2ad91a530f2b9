"""A router is killed (``docker kill``) while clients use it, then started again."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import pytest
from chaos_checks import detection_bound, finish_scenario, is_dead, peers
from chaos_load import LoadGenerator
from chaos_record import ScenarioRecord
from chaos_support import each_until, wait_until
from chaos_topology import Mesh

pytestmark = pytest.mark.chaos


def test_router_killed_under_load(
    restored_mesh: Mesh, load: Callable[..., LoadGenerator], record: ScenarioRecord
) -> None:
    """Router killed under load, then restarted."""
    mesh = restored_mesh
    victim, survivor = mesh.routers("us")
    observers = [r for r in mesh.routers() if r is not victim]
    record.faults = f"`docker kill {victim.alias}` under load; `docker start` after detection"
    before = peers(survivor)[victim.alias]
    bound = detection_bound(mesh)

    gen = load(max_duration_s=90)
    gen.wait_for(60, timeout=30)
    t_kill = gen.mark("kill")
    mesh.kill(victim)

    # Every other router declares it dead within the failure detector's bound.
    declared = each_until(
        {o.alias: partial(is_dead, o, victim.alias) for o in observers},
        since=t_kill,
        timeout=2 * bound,
        what=f"every router declares {victim.alias} dead",
    )
    detected = max(declared.values())
    assert detected <= bound, f"declared dead after {declared} (bound {bound:.1f} s)"
    gen.wait_for(60, timeout=30)  # the region keeps being served meanwhile

    t_restart = gen.mark("restart")
    mesh.restart(victim)
    mesh.wait_ready([victim], "/ready", 60)

    def rejoined() -> bool:
        for o in observers:
            p = peers(o).get(victim.alias)
            if p is None or p["state"].lower() != "alive":
                return False
            if p["generation"] <= before["generation"]:
                return False
        return True

    wait_until(rejoined, timeout=60, what=f"{victim.alias} rejoins with a new generation")
    rejoin_s = time.monotonic() - t_restart
    after = peers(survivor)[victim.alias]
    gen.wait_for(60, timeout=30)
    t_back = time.monotonic()
    gen.wait_for(60, timeout=30)
    report = gen.stop()

    # While it was down, its region was served by the other router, with no request lost.
    us_down = [o for o in report.between(t_kill, t_restart) if o.region == victim.region]
    assert us_down, "no request from the victim's region ran while it was down"
    assert all(o.ok and o.attempts[-1].router == survivor.alias for o in us_down)
    assert any(
        a.router == victim.alias and a.status != 200
        for o in report.between(t_kill - 10, t_restart)
        for a in o.attempts
    ), "no client tried the dead router (the scenario did not exercise a retry)"
    # After the rejoin the restarted router serves its clients again.
    assert any(
        o.ok and o.attempts[0].router == victim.alias and len(o.attempts) == 1
        for o in report.between(t_back)
    ), "the restarted router served nothing"

    record.convergence_s = detected
    record.bound_s = bound
    record.note(
        f"declared dead by all {len(observers)} peers after {detected:.2f} s; restarted, "
        f"rejoined in {rejoin_s:.2f} s with generation {after['generation']} "
        f"> {before['generation']}; {len(us_down)} requests of its region ran during the outage"
    )
    finish_scenario(mesh, record, report)
