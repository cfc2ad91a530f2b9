"""The checks every scenario ends with, and the mesh observations they are built from.

``finish_scenario`` asserts the suite-wide invariants (no request lost where a healthy path
existed, no crash loops, bounded memory) and fills the scenario's record with the figures.
The view helpers read what routers believe (``/mesh/status``) and what engines really hold
(``/debug/kv_cache``), so convergence means "equal to the truth", not "equal to each other".
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from chaos_load import LoadReport, Outcome
from chaos_record import ScenarioRecord
from chaos_support import http_get, http_json
from chaos_topology import Mesh, Node

from mesh.node import MeshConfig

MIB = 1 << 20
RSS_BOUND_MIB = {"router": 200, "engine": 200, "gateway": 100}
"""Resident memory a container may hold at the end of a scenario; the limit is 384 MiB."""
PEAK_BOUND_MIB = 256
"""The cgroup's high-water mark (resident + page cache, since the container started)."""


def finish_scenario(
    mesh: Mesh,
    record: ScenarioRecord,
    report: LoadReport | None,
    *,
    lost: list[Outcome] | None = None,
) -> None:
    """Record and assert the invariants of every scenario.

    ``lost`` defaults to every request of the report whose attempts all failed; a scenario
    that knows some requests had no healthy path (none here do) passes its own list.
    """
    if report is not None:
        record.sent = report.sent
        record.retried = len(report.retried)
        lost = report.lost if lost is None else lost
        record.lost = len(lost)
    problems: list[str] = []
    peak = 0
    restarts = 0
    for node, health in mesh.health():
        restarts += health.restart_count
        peak = max(peak, health.peak_bytes)
        if not node.expect_running:
            continue
        if not health.running:
            problems.append(f"{node.alias} is not running:\n{node.logs(30)}")
        if health.restart_count:
            problems.append(f"{node.alias} restarted {health.restart_count} times (crash loop)")
        if health.oom_killed:
            problems.append(f"{node.alias} was OOM-killed")
        if node.started_at and health.started_at != node.started_at:
            problems.append(f"{node.alias} restarted on its own ({health.started_at})")
        bound = RSS_BOUND_MIB.get(node.role, 200)
        if health.rss_bytes > bound * MIB:
            problems.append(f"{node.alias} RSS {health.rss_bytes / MIB:.0f} MiB > {bound} MiB")
        if health.peak_bytes > PEAK_BOUND_MIB * MIB:
            problems.append(
                f"{node.alias} memory peaked at {health.peak_bytes / MIB:.0f} MiB "
                f"> {PEAK_BOUND_MIB} MiB"
            )
    record.peak_mib = peak / MIB
    record.crash_restarts = restarts
    converged, limit = record.convergence_s, record.bound_s
    if converged is not None and limit is not None and converged > limit:
        problems.append(f"convergence {converged:.2f} s over its bound {limit:.2f} s")
    assert not problems, "; ".join(problems)
    if report is not None:
        origin = report.outcomes[0].t_start if report.outcomes else 0.0
        named = "\n".join(o.describe(origin) for o in lost[:5])
        assert not lost, f"{len(lost)} requests lost: {report.summary()}\n{named}"


# ---- what routers believe and what engines hold -------------------------------------------


def status(node: Node) -> dict[str, Any]:
    data: dict[str, Any] = http_json(node.url + "/mesh/status", timeout=3.0)
    return data


def engine_cache(node: Node) -> dict[str, Any]:
    data: dict[str, Any] = http_json(node.url + "/debug/kv_cache", timeout=3.0)
    return data


def peers(router: Node) -> dict[str, dict[str, Any]]:
    """node id -> peer record (state, generation, ...) in ``router``'s membership view."""
    return {p["id"]: p for p in status(router).get("peers", [])}


def replica_views(router: Node) -> dict[str, tuple[int, tuple[int, int] | None]]:
    """replica URL -> (blocks, (epoch, seq)) of its prefix slice in ``router``'s index."""
    out: dict[str, tuple[int, tuple[int, int] | None]] = {}
    for row in status(router).get("replicas", []):
        version = row.get("version")
        out[row["url"]] = (int(row["blocks"]), None if version is None else tuple(version))
    return out


def truth(mesh: Mesh) -> dict[str, tuple[int, int | None]]:
    """replica URL -> (unique block hashes held, last published seq), from the engines."""
    out: dict[str, tuple[int, int | None]] = {}
    for engine in mesh.engines():
        cache = engine_cache(engine)
        out[mesh.engine_replica_id(engine.alias)] = (
            int(cache["num_unique_hashes"]),
            cache["last_seq"],
        )
    return out


def view_mismatches(mesh: Mesh, routers: list[Node] | None = None) -> list[str]:
    """Differences between each router's view of every engine and the engine's own cache.

    A slice's version ``(epoch, seq)`` is the last batch of the engine's stream that changed
    it (batches that only re-store a held block change nothing), and a slice at a given
    version is a deterministic function of the stream. So: every router at the same version
    of a replica holds the same slice, and that slice is the engine's cache when it holds as
    many blocks as the engine holds unique block hashes and its seq is one the engine has
    published.
    """
    real = truth(mesh)
    problems: list[str] = []
    versions: dict[str, dict[tuple[int, int], list[str]]] = {}
    for router in routers if routers is not None else mesh.routers():
        views = replica_views(router)
        for url, (blocks, last_seq) in real.items():
            v_blocks, version = views.get(url, (0, None))
            if version is None:
                problems.append(f"{router.alias}: no slice for {url}")
                continue
            versions.setdefault(url, {}).setdefault(version, []).append(router.alias)
            if v_blocks != blocks:
                problems.append(f"{router.alias}: {url} has {v_blocks} blocks, engine {blocks}")
            if last_seq is None or version[1] > last_seq:
                problems.append(f"{router.alias}: {url} at {version}, engine at seq {last_seq}")
    for url, seen in versions.items():
        if len(seen) > 1:
            problems.append(f"{url}: routers at different versions {seen}")
    return problems


def _mesh_config(mesh: Mesh) -> MeshConfig:

    options = dict(mesh.spec.router_config.get("gossip", {}))
    return MeshConfig.from_options(
        node_id="x", region="x", advertise="http://x:1", keys=["k" * 16], options=options
    )


def log_lines_since(node: Node, wall_since: float) -> list[str]:
    """The container's log lines written at or after ``wall_since`` (time.time() seconds)."""
    raw = bytes(node.docker.logs(timestamps=True)).decode(errors="replace")
    out = []
    for line in raw.splitlines():
        stamp, _, text = line.partition(" ")
        # RFC 3339 with nanoseconds: 2026-11-21T05:59:27.123456789Z
        try:
            when = dt.datetime.fromisoformat(stamp[:26] + "+00:00").timestamp()
        except ValueError:
            continue
        if when >= wall_since:
            out.append(text)
    return out


def engine_detection_bound(mesh: Mesh) -> float:
    """How long until every router stops routing to a crashed engine.

    Its own region's routers see a failed scrape within one health interval plus the scrape
    timeout; the others when the owner's next load record reaches them (a gossip push,
    bounded by its timeout; twice, as a push may be lost), plus one gossip interval.
    """
    config = mesh.spec.router_config
    gossip = _mesh_config(mesh).gossip
    return (
        float(config["health_interval"])
        + float(config["health_timeout"])
        + 2 * gossip.push_timeout
        + gossip.gossip_interval
    )


def heal_bound(mesh: Mesh) -> float:
    """How long after a heal until membership is whole and every map equals the truth.

    A member held DEAD is offered a reconnect every ``reconnect_interval``; the Sync that
    follows is answered within a push timeout, and anti-entropy (``sync_interval``) plus
    two delta pushes bring the slices up to date.
    """
    g = _mesh_config(mesh).gossip
    return g.reconnect_interval + g.sync_interval + 2 * g.push_timeout + 2 * g.gossip_interval


def metric_total(node: Node, name: str) -> float:
    """Sum of every sample of metric ``name`` (all label sets) on a Prometheus page."""
    _, body, _ = http_get(node.url + "/metrics", timeout=3)
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def detection_bound(mesh: Mesh) -> float:
    """How long the routers' failure detector may take to declare a crashed peer dead.

    The membership module's own worst case for the configured timings (every prober gets
    round to the member, the suspicion runs out unconfirmed) plus two probe intervals for
    the verdict to reach every peer.
    """
    swim = _mesh_config(mesh).swim
    return swim.detection_bound(len(mesh.routers())) + 2 * swim.probe_interval


def peer_state(router: Node, peer_id: str) -> str | None:
    peer = peers(router).get(peer_id)
    return None if peer is None else str(peer.get("state", "")).lower()


def is_dead(router: Node, peer_id: str) -> bool:
    return peer_state(router, peer_id) == "dead"
