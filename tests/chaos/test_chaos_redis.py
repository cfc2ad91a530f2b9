"""Redis, carrying an engine's KV events to the routers, crashes and restarts under load.

A deployment of its own: one region with Redis (append-only file, fsync always), a simulated
engine, ``kvmesh bridge`` relaying the engine's ZMQ events into a Redis Stream, and two
routers that read the engine's events from that stream only (no replay endpoint: anything
the transport lost would stay lost and show).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from chaos_checks import finish_scenario, heal_bound, metric_total, status, view_mismatches
from chaos_load import LoadGenerator
from chaos_record import ScenarioRecord
from chaos_support import http_json, wait_until
from chaos_topology import ENGINE_HTTP, Mesh, MeshSpec, Node

pytestmark = pytest.mark.chaos

REGION = "rd"
OUTAGE_BATCHES = 40


@pytest.fixture(scope="module")
def redis_mesh(kvmesh_image: str, docker_client: Any) -> Iterator[Mesh]:
    spec = MeshSpec(regions=(REGION,), routers_per_region=2, engines_per_region=1, rtt_ms={})
    mesh = Mesh(spec, kvmesh_image, docker_client)
    try:
        mesh.add_network(REGION)
        engine = mesh.engine_alias(REGION, 1)
        replica = mesh.engine_replica_id(engine)
        mesh.add_node(
            "redis",
            "redis",
            REGION,
            ["redis-server", "--bind", "0.0.0.0", "--port", "6379", "--protected-mode", "no",
             "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--dir", "/tmp"],
        )  # fmt: skip
        mesh.add_node(engine, "engine", REGION, mesh.engine_command(engine), port=ENGINE_HTTP)
        mesh.add_node(
            "bridge",
            "bridge",
            REGION,
            ["kvmesh", "bridge", "--zmq", f"tcp://{engine}:5557", "--replay",
             f"tcp://{engine}:5558", "--redis", "redis://redis:6379/0", "--engine", replica],
        )  # fmt: skip
        for i in (1, 2):
            config = mesh.router_config(REGION, i)
            config["engines"] = [{"url": replica, "kv_events": "redis://redis:6379/0"}]
            config["rtt"] = {}
            alias = mesh.router_alias(REGION, i)
            path = mesh.write_file(f"{alias}.yaml", yaml.safe_dump(config))
            mesh.add_node(
                alias,
                "router",
                REGION,
                ["kvmesh", "router", "--config", path],
                port=spec.router_port(REGION, i),
                env={"KVMESH_MESH_KEY": spec.mesh_key},
            )
        mesh.wait_ready(mesh.engines(), "/health", 120)
        mesh.wait_ready(mesh.routers(), "/ready", 120)
        yield mesh
    finally:
        mesh.close()


def last_seq(engine: Node) -> int:
    return int(http_json(engine.url + "/debug/kv_cache", timeout=3)["last_seq"])


def batches_applied(mesh: Mesh, replica: str) -> dict[str, float]:
    name = f'kvmesh_event_batches_total{{replica="{replica}"}}'
    return {r.alias: metric_total(r, name) for r in mesh.routers()}


def gaps_seen(mesh: Mesh, replica: str) -> float:
    name = f'kvmesh_event_gaps_total{{replica="{replica}"}}'
    return sum(metric_total(r, name) for r in mesh.routers())


def test_redis_restart_loses_nothing(redis_mesh: Mesh, record: ScenarioRecord) -> None:
    """Redis restart under load, events carried by the Redis transport."""
    mesh = redis_mesh
    mesh.restore()
    redis, engine = mesh.nodes["redis"], mesh.engines()[0]
    replica = mesh.engine_replica_id(engine.alias)
    record.faults = (
        f"`docker kill` of Redis (AOF, fsync always) under load, `docker start` once the engine "
        f"has published {OUTAGE_BATCHES} more batches; routers read the engine's events only "
        "from the stream"
    )
    # Plus one reconnect backoff each for the bridge and the reader (max_retry_delay, 2 s).
    limit = heal_bound(mesh) + 2 * 2.0

    gen = LoadGenerator(mesh.targets, (REGION,), max_duration_s=90).start()
    try:
        wait_until(
            lambda: all(n > 10 for n in batches_applied(mesh, replica).values()),
            timeout=30,
            what="both routers ingesting from the stream",
        )
        gen.wait_for(40, timeout=30)
        seq_at_kill = last_seq(engine)
        t_kill = gen.mark("redis-kill")
        mesh.kill(redis)
        # The engine keeps publishing while Redis is down: the bridge must hold it all.
        wait_until(
            lambda: last_seq(engine) >= seq_at_kill + OUTAGE_BATCHES,
            timeout=30,
            what=f"{OUTAGE_BATCHES} batches published while Redis is down",
        )
        t_start = gen.mark("redis-start")
        mesh.restart(redis)
        gen.wait_for(60, timeout=30)
    finally:
        report = gen.stop()
    t_stop = time.monotonic()

    wait_until(
        lambda: not view_mismatches(mesh),
        timeout=limit,
        what="both routers' views equal to the engine's cache",
        describe=lambda: "; ".join(view_mismatches(mesh)[:4]),
    )
    convergence = time.monotonic() - t_stop
    published = last_seq(engine) + 1
    applied = batches_applied(mesh, replica)
    # Every batch the engine published was applied exactly once by every reader.
    assert all(n == published for n in applied.values()), (applied, published)
    assert gaps_seen(mesh, replica) == 0, "a reader saw a hole in the stream"
    for router in mesh.routers():
        row = {r["url"]: r for r in status(router)["replicas"]}[replica]
        assert "partial" not in row["flags"], router.alias

    record.convergence_s = convergence
    record.bound_s = limit
    record.note(
        f"Redis down {t_start - t_kill:.1f} s while the engine kept publishing; each router "
        f"applied all {published} batches exactly once (no gap, no duplicate applied, no "
        f"partial slice); views equal to the engine's cache {convergence:.2f} s after the "
        "load stopped"
    )
    finish_scenario(mesh, record, report)
