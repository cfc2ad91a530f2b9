"""An engine's KV-event stream loses batches: a short burst, then a long blackout."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import partial

import pytest
from chaos_checks import finish_scenario, heal_bound, metric_total, status, view_mismatches
from chaos_load import LoadGenerator
from chaos_record import ScenarioRecord
from chaos_support import http_json, http_post, wait_until
from chaos_topology import Mesh, Node

pytestmark = pytest.mark.chaos

BURSTS = (3, 40)
"""Batches lost in a row: a few (a dropped message or two), then many (a blocked stream)."""


def dropped(engine: Node) -> int:
    stats = http_json(engine.url + "/debug/engine", timeout=3)["publisher"]
    return int(stats["dropped_injected"])


def gaps(routers: list[Node], replica: str) -> float:
    name = f'kvmesh_event_gaps_total{{replica="{replica}"}}'
    return sum(metric_total(r, name) for r in routers)


def test_event_loss_is_repaired(
    restored_mesh: Mesh, load: Callable[..., LoadGenerator], record: ScenarioRecord
) -> None:
    """Event loss: batches dropped from an engine's stream."""
    mesh = restored_mesh
    engine = mesh.nodes["engine-us-1"]
    replica = mesh.engine_replica_id(engine.alias)
    ingesting = mesh.routers(engine.region)
    record.faults = (
        f"{engine.alias}'s publisher loses the next {BURSTS[0]}, later the next {BURSTS[1]} "
        "KV-event batches (seq numbers consumed, messages never sent; history kept for replay)"
    )
    limit = heal_bound(mesh)

    gen = load(max_duration_s=120)
    gen.wait_for(40, timeout=30)
    detections: list[float] = []
    for burst in BURSTS:
        gaps_before = gaps(ingesting, replica)
        dropped_before = dropped(engine)
        code, body = http_post(
            engine.url + "/debug/fault",
            json.dumps({"drop_events": burst}).encode(),
            {"content-type": "application/json"},
        )
        assert code == 200, body
        t_fault = time.monotonic()
        wait_until(
            partial(lambda d: dropped(engine) >= d, dropped_before + burst),
            timeout=60,
            what=f"{burst} batches lost",
        )
        # Both routers that ingest the engine see the hole on the next batch.
        wait_until(
            partial(lambda g: gaps(ingesting, replica) >= g, gaps_before + len(ingesting)),
            timeout=30,
            what="every ingesting router detects the gap",
        )
        detections.append(time.monotonic() - t_fault)
    report = gen.stop()
    t_stop = time.monotonic()

    wait_until(
        lambda: not view_mismatches(mesh),
        timeout=limit,
        what="every router's view equal to the engines' caches",
        describe=lambda: "; ".join(view_mismatches(mesh)[:6]),
    )
    convergence = time.monotonic() - t_stop
    for router in mesh.routers():
        row = {r["url"]: r for r in status(router)["replicas"]}[replica]
        assert "partial" not in row["flags"], f"{router.alias} rebuilt {replica} as partial"

    record.convergence_s = convergence
    record.bound_s = limit
    record.note(
        f"gaps of {BURSTS[0]} and {BURSTS[1]} batches detected by both ingesting routers "
        f"({', '.join(f'{d:.2f} s' for d in detections)} after the loss began), repaired by "
        f"replay (no slice partial); all {len(mesh.routers())} views equal to the engines' "
        f"caches {convergence:.2f} s after the load stopped"
    )
    finish_scenario(mesh, record, report)
