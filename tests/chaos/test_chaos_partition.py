"""A region is cut off from the others (``docker network disconnect``), then healed."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import pytest
from chaos_checks import (
    detection_bound,
    finish_scenario,
    heal_bound,
    metric_total,
    peers,
    view_mismatches,
)
from chaos_load import LoadGenerator
from chaos_record import ScenarioRecord
from chaos_support import each_until, wait_until
from chaos_topology import Mesh, Node

pytestmark = pytest.mark.chaos

CUT = "eu"


def sees_split(mesh: Mesh, router: Node) -> bool:
    """``router`` holds every router across the cut as not alive."""
    inside = router.region == CUT
    across = {r.alias for r in mesh.routers() if (r.region == CUT) != inside}
    view = peers(router)
    return all(view.get(a, {}).get("state") in ("suspect", "dead") for a in across)


def all_alive(mesh: Mesh) -> bool:
    names = {r.alias for r in mesh.routers()}
    for router in mesh.routers():
        view = peers(router)
        if {a for a, p in view.items() if p["state"] == "alive"} != names - {router.alias}:
            return False
    return True


def forwards_into_cut(mesh: Mesh) -> float:
    return sum(
        metric_total(r, f'kvmesh_router_forwards_total{{region="{CUT}"}}')
        for r in mesh.routers()
        if r.region != CUT
    )


def test_region_partition_and_heal(
    restored_mesh: Mesh, load: Callable[..., LoadGenerator], record: ScenarioRecord
) -> None:
    """Region partitioned, then healed."""
    mesh = restored_mesh
    record.faults = (
        f"`docker network disconnect` of the gateways between {CUT} and the other regions "
        "under load; reconnect after the split is detected and the load has run on both sides"
    )
    bound = detection_bound(mesh)

    gen = load(max_duration_s=120)
    gen.wait_for(60, timeout=30)
    # Requests about eu's home document are worth a hop into eu: make sure some took it, so
    # "nothing forwarded into the partition" below is a real change of behaviour.
    forwards_before = wait_until(
        lambda: forwards_into_cut(mesh),
        timeout=60,
        what=f"a request forwarded into {CUT} before the cut",
    )
    t_cut = gen.mark("partition")
    mesh.partition(CUT)
    split_at = each_until(
        {r.alias: partial(sees_split, mesh, r) for r in mesh.routers()},
        since=t_cut,
        timeout=2 * bound,
        what=f"both sides of the {CUT} partition detect it",
    )
    t_detect = time.monotonic()
    assert max(split_at.values()) <= bound, f"split seen after {split_at} (bound {bound:.1f} s)"
    forwards_at_detect = forwards_into_cut(mesh)
    gen.wait_for(120, timeout=40)  # both sides keep serving
    forwards_at_heal = forwards_into_cut(mesh)
    report = gen.stop()
    t_stop = time.monotonic()

    # While split, the maps diverged: outside routers cannot have followed the cut engines.
    assert view_mismatches(mesh), "no divergence to repair: the partition had no effect"

    t_heal = time.monotonic()
    mesh.heal(CUT)
    heal_limit = heal_bound(mesh)

    def converged() -> bool:
        return all_alive(mesh) and not view_mismatches(mesh)

    wait_until(
        converged,
        timeout=heal_limit,
        what="membership whole again and every router's view equal to the engines' caches",
        describe=lambda: "; ".join(view_mismatches(mesh)[:6]),
    )
    convergence = time.monotonic() - t_heal

    split = report.between(t_detect, t_stop)
    inside = [o for o in split if o.region == CUT]
    outside = [o for o in split if o.region != CUT]
    assert inside and outside, "one side sent nothing during the partition"
    elsewhere = [o for o in inside
                 if not (o.ok and o.served_by and o.served_by.replica_region == CUT)]
    assert not elsewhere, "the cut region was not served by its own engines:\n" + "\n".join(
        o.describe(t_detect) for o in elsewhere[:10])
    into_cut = [o for o in outside if o.served_by and o.served_by.replica_region == CUT]
    assert not into_cut, f"{len(into_cut)} requests served across the partition:\n" + "\n".join(
        o.describe(t_detect) for o in into_cut[:10])
    assert forwards_at_heal == forwards_at_detect, "requests forwarded into the partition"

    record.convergence_s = convergence
    record.bound_s = heal_limit
    record.note(
        f"split detected by every router within {max(split_at.values()):.2f} s of the cut "
        f"(bound {bound:.1f} s); during the split {len(inside)} requests in {CUT} were served "
        f"by its own engines and {len(outside)} elsewhere by theirs, none forwarded into "
        f"{CUT} ({forwards_before:.0f} forwarded into it before the cut); after the heal "
        f"every router's view of all {len(mesh.engines())} engines equalled their caches "
        f"in {convergence:.2f} s"
    )
    finish_scenario(mesh, record, report)
