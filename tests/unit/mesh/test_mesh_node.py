"""The shell's pure parts: config options, generations, the status document, packets."""

from __future__ import annotations

from pathlib import Path

import pytest

from crdt.base import DecodeError
from crdt.prefix_index import PrefixIndex
from mesh.membership import PeerView, SwimConfig
from mesh.messages import Status
from mesh.node import MeshConfig, next_generation
from mesh.status import ReplicaLoad, build_status, replica_rows
from mesh.transport import MAX_FRAMES, pack_frames, unpack_frames

BASE = {"node_id": "a", "region": "us", "advertise": "http://10.0.0.1:8000/", "keys": ["k" * 32]}


def test_options_pick_a_profile_then_override_fields() -> None:
    cfg = MeshConfig.from_options(
        **BASE,  # type: ignore[arg-type]
        seeds=["http://seed:8000/"],
        options={"profile": "wan", "gossip_interval": 0.5, "indirect_checks": 5, "generation": 7},
    )
    assert cfg.swim == SwimConfig(
        probe_interval=5.0, probe_timeout=3.0, suspicion_mult=6, dead_grace=300.0, indirect_checks=5
    )
    assert cfg.gossip.gossip_interval == 0.5 and cfg.gossip.gossip_nodes == 4
    assert cfg.generation == 7
    assert cfg.advertise == "http://10.0.0.1:8000" and cfg.seeds == ("http://seed:8000",)
    assert cfg.keys == (b"k" * 32,)
    hexed = MeshConfig.from_options(**{**BASE, "keys": ["hex:" + "ab" * 16]})  # type: ignore[arg-type]
    assert hexed.keys == (b"\xab" * 16,)


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"profile": "moon"}, "gossip.profile"),
        ({"probe_intervall": 1}, "gossip.probe_intervall"),
        ({"gossip_nodes": 2.5}, "gossip.gossip_nodes"),
        ({"gossip_interval": "fast"}, "gossip.gossip_interval"),
        ({"push_timeout": -1}, "gossip.push_timeout"),
        ({"max_message_bytes": True}, "gossip.max_message_bytes"),
        ({"generation_file": 3}, "gossip.generation_file"),
    ],
)
def test_bad_options_name_their_key(options: dict[str, object], key: str) -> None:
    with pytest.raises(ValueError, match=f"^{key}:"):
        MeshConfig.from_options(**BASE, options=options)  # type: ignore[arg-type]


def test_generations_increase_across_restarts(tmp_path: Path) -> None:
    assert next_generation(1_700_000_000.123) == 1_700_000_000_123
    path = str(tmp_path / "generation")
    first = next_generation(1_700_000_000.0, path)
    second = next_generation(1_600_000_000.0, path)  # the clock went back: still larger
    third = next_generation(1_800_000_000.0, path)
    assert first < second < third
    assert second == first + 1 and third == 1_800_000_000_000


def test_replica_rows_join_slices_and_loads() -> None:
    ix = PrefixIndex()
    ix.reset("http://r1", 3)
    ix.store("http://r1", (3, 5), [1, 2, 3])
    ix.store("http://r2", (1, 9), [4])  # no reset seen: history unknown, partial
    loads = {
        "http://r1": ReplicaLoad("us", "router-a", 2, 4, 0.5, 0.2),
        "http://r3": ReplicaLoad("eu", "router-b", 0, 1, 0.1, 1.5),
    }
    rows = {r.url: r for r in replica_rows(ix.slices(), loads)}
    assert set(rows) == {"http://r1", "http://r2", "http://r3"}
    r1, r2, r3 = rows["http://r1"], rows["http://r2"], rows["http://r3"]
    assert (r1.region, r1.owner, r1.blocks, r1.version, r1.waiting) == (
        "us",
        "router-a",
        3,
        (3, 5),
        2,
    )
    assert r2.flags == ("partial",) and r2.region is None and r2.blocks == 1
    assert r3.blocks == 0 and r3.version is None and r3.age_s == 1.5


def test_status_document() -> None:
    peers = [
        PeerView("b", "eu", "http://b", 5, 1, Status.ALIVE, 10.0, 99.5, 81.234567),
        PeerView("c", "ap", "http://c", 6, 0, Status.DEAD, 50.0, None, None),
    ]
    doc = build_status(
        node_id="a",
        region="us",
        address="http://a",
        generation=4,
        incarnation=2,
        peers=peers,
        replicas=[],
        now=100.0,
        region_rtt_ms={"eu": 81.234567},
        counters={"tx.frames": 3},
    )
    assert doc["node"] == {
        "id": "a",
        "region": "us",
        "address": "http://a",
        "generation": 4,
        "incarnation": 2,
    }
    assert doc["peers"][0] == {
        "id": "b",
        "region": "eu",
        "address": "http://b",
        "state": "alive",
        "generation": 5,
        "incarnation": 1,
        "rtt_ms": 81.235,
        "last_seen_s": 0.5,
        "state_for_s": 90.0,
    }
    assert doc["peers"][1]["state"] == "dead" and doc["peers"][1]["last_seen_s"] is None
    assert doc["peer_states"] == {"alive": 1, "dead": 1}
    assert doc["region_rtt_ms"] == {"eu": 81.235}
    assert doc["counters"] == {"tx.frames": 3}


def test_packets() -> None:
    frames = [b"one", b"", b"\x00" * 100]
    assert unpack_frames(pack_frames(frames)) == frames
    for bad in (b"", b"\xc1", pack_frames([]) + b"x", b"\x91\x01", b"\x81\xa1a\xa1b"):
        with pytest.raises(DecodeError):
            unpack_frames(bad)
    with pytest.raises(DecodeError):
        unpack_frames(pack_frames([b"x"] * (MAX_FRAMES + 1)))
