"""The checks every scenario ends with, and the mesh observations they are built from.

``finish_scenario`` asserts the suite-wide invariants (no request lost where a healthy path
existed, no crash loops, bounded memory) and fills the scenario's record with the figures.
The view helpers read what routers believe (``/mesh/status``) and what engines really hold
(``/debug/kv_cache``), so convergence means "equal to the truth", not "equal to each other".
"""

from __future__ import annotations

from typing import Any

from chaos_load import LoadReport, Outcome
from chaos_record import ScenarioRecord
from chaos_support import http_json
from chaos_topology import Mesh, Node

MIB = 1 << 20
RSS_BOUND_MIB = {"router": 200, "engine": 200, "gateway": 100}
"""Resident memory any container may reach during a scenario; the limit is 384 MiB."""


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
        peak = max(peak, health.rss_bytes)
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
    record.peak_rss_mib = peak / MIB
    record.crash_restarts = restarts
    assert not problems, "; ".join(problems)
    if report is not None:
        assert not lost, f"{len(lost)} requests lost: {report.summary()}; first: {lost[:3]}"


# ---- what routers believe and what engines hold -------------------------------------------


def status(node: Node) -> dict[str, Any]:
    data: dict[str, Any] = http_json(node.url + "/mesh/status", timeout=3.0)
    return data


def engine_cache(node: Node) -> dict[str, Any]:
    data: dict[str, Any] = http_json(node.url + "/debug/kv_cache", timeout=3.0)
    return data


def peers(router: Node) -> dict[str, dict[str, Any]]:
    """node id -> peer record (state, generation, ...) in ``router``'s membership view."""
    mesh_part = status(router).get("mesh") or {}
    return {p["id"]: p for p in mesh_part.get("peers", [])}


def peer_state(router: Node, peer_id: str) -> str | None:
    peer = peers(router).get(peer_id)
    return None if peer is None else str(peer.get("state", "")).lower()
