"""MeshState: a lone router's status document has the meshed router's shape."""

from __future__ import annotations

from mesh.config import EngineConfig, RouterConfig
from mesh.engines import EngineLoad, EngineState
from mesh.state import MeshState


def test_a_lone_routers_status_is_the_mesh_document() -> None:
    now = [100.0]
    config = RouterConfig(region="us", node_id="us-lb0", advertise="http://10.0.0.1:8080",
                          engines=(EngineConfig(url="http://e0"), EngineConfig(url="http://e1")))
    state = MeshState(config, clock=lambda: now[0])
    assert state.node is None
    state.index.store("http://e0", (1, 1), [11, 12, 13])
    state.publish_engine(EngineState("http://e0", True, EngineLoad(2, 3, 0.5), 99.5, 0, "ok"),
                         "us", now[0])
    doc = state.status()
    assert doc["node"]["id"] == "us-lb0" and doc["node"]["region"] == "us"
    assert doc["node"]["address"] == "http://10.0.0.1:8080"
    assert doc["peers"] == [] and doc["peer_states"] == {}
    rows = {r["url"]: r for r in doc["replicas"]}
    assert rows["http://e0"]["blocks"] == 3
    assert (rows["http://e0"]["waiting"], rows["http://e0"]["running"]) == (2, 3)
    assert rows["http://e0"]["owner"] == "us-lb0"
