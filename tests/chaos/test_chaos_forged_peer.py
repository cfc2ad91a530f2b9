"""A container without the mesh key sends forged gossip to routers in two regions."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from chaos_checks import finish_scenario, peers, replica_views, status
from chaos_forger import FORGED_EPOCH
from chaos_load import LoadGenerator
from chaos_record import ScenarioRecord
from chaos_support import http_get
from chaos_topology import Mesh, Node

from mesh.auth import key_id

pytestmark = pytest.mark.chaos

KINDS = {"own_key": "unknown_key", "forged_tag": "bad_signature", "unsigned": "malformed"}


def rejected_counters(router: Node) -> dict[str, float]:
    """``rx.rejected.<reason>`` -> count, from the router's Prometheus /metrics."""
    _, body, _ = http_get(router.url + "/metrics", timeout=3)
    pattern = re.compile(r'^kvmesh_gossip_events_total\{name="rx\.rejected\.([a-z_]+)"\} (\S+)$')
    out: dict[str, float] = {}
    for line in body.decode().splitlines():
        match = pattern.match(line)
        if match:
            out[match[1]] = float(match[2])
    return out


def test_forged_peer_is_rejected(
    restored_mesh: Mesh, load: Callable[..., LoadGenerator], record: ScenarioRecord
) -> None:
    """Forged gossip from a peer without the mesh key."""
    mesh = restored_mesh
    targets = [mesh.nodes["router-eu-1"], mesh.nodes["router-us-1"]]  # same region, remote
    victim = mesh.nodes["router-us-2"]
    replica = mesh.engine_replica_id("engine-us-1")
    record.faults = (
        "container `forger-1` on net-eu (no mesh key) posts a forged push (fake slice at a "
        "far-ahead version, a live router declared DEAD) sealed with its own key, with the "
        "real key id and a made-up tag, unsigned, and a garbage packet, to router-eu-1 and "
        "(through the gateway) router-us-1"
    )
    gen = load(max_duration_s=60)
    gen.wait_for(40, timeout=30)

    victim_record = peers(targets[0])[victim.alias]
    members_before = {t.alias: _members(t) for t in mesh.routers()}
    counters_before = {t.alias: rejected_counters(t) for t in targets}
    config = {
        "targets": [mesh.router_address(t.region, int(t.alias.rsplit("-", 1)[1])) for t in targets],
        "key_id": key_id(mesh.spec.mesh_key.encode()).hex(),
        "replica": replica,
        "victim": {k: victim_record[k] for k in ("id", "region", "address", "generation")},
    }
    script = mesh.write_file(
        "chaos_forger.py", Path(__file__).with_name("chaos_forger.py").read_text()
    )
    output = mesh.run_job("forger-1", "eu", ["python3", script, json.dumps(config)])
    answers = json.loads(output.strip().splitlines()[-1])

    gen.wait_for(40, timeout=30)
    report = gen.stop()

    # Every forged frame was refused with its reason; the garbage packet with a 400.
    for target_url in config["targets"]:
        for kind, reason in KINDS.items():
            answer = answers[f"{target_url} {kind}"]
            assert answer == {"status": 200, "rejected": reason, "answer_frames": 0}, (kind, answer)
        assert answers[f"{target_url} garbage"]["status"] == 400
    # ... and counted, once each, on the router that received it.
    for t in targets:
        after = rejected_counters(t)
        for reason in (*KINDS.values(), "bad_packet"):
            gained = after.get(reason, 0) - counters_before[t.alias].get(reason, 0)
            assert gained == 1, f"{t.alias} rx.rejected.{reason} grew by {gained}"
    # State unchanged: nobody learned of the forger, nobody took the victim for dead, and no
    # router holds the forged slice.
    for router in mesh.routers():
        members = _members(router)
        assert "forger-1" not in members, router.alias
        assert members == members_before[router.alias], router.alias
        if router is not victim:
            # Accepted, the DEAD claim would have won (or forced a refutation above 10**6);
            # a passing suspicion on a busy machine is the failure detector's business.
            seen = peers(router)[victim.alias]
            assert seen["state"] != "dead" and seen["incarnation"] < 10**6, (router.alias, seen)
        version = replica_views(router)[replica][1]
        assert version is not None and version[0] != FORGED_EPOCH, (router.alias, version)
        assert "forger-1" not in json.dumps(status(router))

    record.convergence_s = None
    record.note(
        f"{len(answers)} forged packets: all refused (unknown_key, bad_signature, malformed, "
        f"bad_packet), each counted once in kvmesh_gossip_events_total; member tables and the "
        f"targeted slice unchanged on all {len(mesh.routers())} routers"
    )
    finish_scenario(mesh, record, report)


def _members(router: Node) -> dict[str, tuple[str, int]]:
    """id -> (address, generation): what a forged membership claim could have changed."""
    return {pid: (p["address"], p["generation"]) for pid, p in peers(router).items()}
