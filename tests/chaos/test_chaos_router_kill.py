"""A router is killed (``docker kill``) while clients use it, then started again."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import pytest
from chaos_checks import detection_bound, finish_scenario, is_dead, peers
from chaos_load import LoadGenerator
from chaos_record import ScenarioRecord
from chaos_support import each_until, http_get, wait_until
from chaos_topology import Mesh, Node

pytestmark = pytest.mark.chaos

FIRST_MINUTE_S = 60.0


def time_to_warm(router: Node) -> tuple[str, float]:
    """(how, seconds) from the router's ``kvmesh_time_to_warm_seconds``."""
    status, body, _ = http_get(f"{router.url}/metrics", timeout=5)
    assert status == 200, status
    for line in body.decode().splitlines():
        if line.startswith("kvmesh_time_to_warm_seconds{"):
            how = line.split('how="', 1)[1].split('"', 1)[0]
            return how, float(line.rsplit(" ", 1)[1])
    raise AssertionError("a ready router exports no kvmesh_time_to_warm_seconds")


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


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

    gen = load(max_duration_s=200)
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
    t_ready = gen.mark("ready")
    warm_how, warm_s = time_to_warm(victim)

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
    # The restarted router's first minute of traffic, against the survivor's in that minute.
    wait_until(lambda: time.monotonic() >= t_ready + FIRST_MINUTE_S, timeout=90,
               what="a minute of traffic after the restart")
    report = gen.stop()
    hit_new, n_new = report.hit_rate(victim.alias, t_ready, t_ready + FIRST_MINUTE_S)
    hit_old, n_old = report.hit_rate(survivor.alias, t_ready, t_ready + FIRST_MINUTE_S)
    first = sorted((o for o in report.between(t_ready) if o.served_by is not None
                    and o.served_by.router == victim.alias), key=lambda o: o.t_start)[:20]
    first_prompt = sum(o.attempts[-1].prompt_tokens for o in first)
    first_hit = (sum(o.attempts[-1].cached_tokens for o in first) / first_prompt
                 if first_prompt else None)
    assert n_new > 0 and n_old > 0, (n_new, n_old)

    # While it was down, its region was served by the other router, with no request lost.
    # (Requests still running when the restart began may end at the restarted router: they
    # are not "during the outage", and lost ones are caught by finish_scenario anyway.)
    us_down = [o for o in report.between(t_kill, t_restart)
               if o.region == victim.region and o.t_end < t_restart]
    assert us_down, "no request from the victim's region ran while it was down"
    not_survivor = [o for o in us_down
                    if not (o.ok and o.attempts[-1].router == survivor.alias)]
    assert not not_survivor, (
        f"{len(not_survivor)} of {len(us_down)} requests of {victim.region} during the outage "
        f"were not served by {survivor.alias} (times from the kill):\n"
        + "\n".join(o.describe(t_kill) for o in not_survivor[:10]))
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
    record.note(
        f"warm readiness: ready {t_ready - t_restart:.2f} s after `docker start`, time to warm "
        f"{warm_s:.2f} s ({warm_how}); first minute after ready, engines' prefix-cache hit "
        f"rate of the restarted router's requests {_pct(hit_new)} ({n_new} requests; its first "
        f"{len(first)}: {_pct(first_hit)}) vs the survivor's {_pct(hit_old)} ({n_old})"
    )
    finish_scenario(mesh, record, report)
