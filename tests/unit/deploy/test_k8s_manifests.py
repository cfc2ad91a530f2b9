"""deploy/k8s/ against the Kubernetes schemas (kubernetes-validate ships them, offline).

Core kinds are validated strictly (unknown fields fail) for the oldest and newest
Kubernetes versions the package carries that kvmesh supports; the ServiceMonitor, a CRD the
package has no schema for, against kvmesh's own subset schema (deploy/k8s/schemas/). The
pieces must also fit together: selectors, ports, the Secret and ConfigMap keys, and every
router configuration in the ConfigMap must be a valid kvmesh configuration.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from mesh.config import ConfigError, build, read_file

K8S = Path(__file__).resolve().parents[3] / "deploy" / "k8s"
VERSIONS = ("1.29.0", "1.37.0")
CRD_SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"):
               K8S / "schemas" / "servicemonitor-monitoring.coreos.com-v1.json"}


def manifests() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):  # the top folder only: sub-folders are their own
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path.name, doc))
    return out


def validate(doc: dict[str, Any], version: str) -> None:
    schema_path = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
    if schema_path is not None:
        jsonschema.validate(doc, json.loads(schema_path.read_text()))
    else:
        kubernetes_validate.validate(doc, version, strict=True)


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in manifests() if d["kind"] == kind]


def test_the_expected_objects_are_there() -> None:
    kinds = sorted(d["kind"] for _, d in manifests())
    assert kinds.count("Deployment") == 3
    assert kinds.count("Service") == 4  # one per region + the headless mesh Service
    assert {"Namespace", "Secret", "ConfigMap", "ServiceMonitor"} <= set(kinds)


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid(version: str) -> None:
    for name, doc in manifests():
        try:
            validate(doc, version)
        except Exception as exc:
            raise AssertionError(f"{name}: {doc['kind']} {doc['metadata']['name']}: "
                                 f"{str(exc).splitlines()[0]}") from None


def test_the_validation_can_fail() -> None:
    deployment = copy.deepcopy(by_kind("Deployment")[0])
    deployment["spec"]["replica"] = 2  # misspelt
    with pytest.raises(jsonschema.ValidationError):
        validate(deployment, VERSIONS[-1])
    monitor = copy.deepcopy(by_kind("ServiceMonitor")[0])
    monitor["spec"]["endpoints"][0]["intervall"] = "10s"
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor, VERSIONS[-1])
    monitor = copy.deepcopy(by_kind("ServiceMonitor")[0])
    monitor["spec"]["endpoints"][0]["interval"] = "10 seconds"
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor, VERSIONS[-1])


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_the_pieces_fit_together() -> None:
    config_map = by_kind("ConfigMap")[0]
    secret = by_kind("Secret")[0]
    services = by_kind("Service")
    regions = set()
    for dep in by_kind("Deployment"):
        pod = dep["spec"]["template"]
        labels = pod["metadata"]["labels"]
        assert _matches(dep["spec"]["selector"]["matchLabels"], labels)
        (container,) = pod["spec"]["containers"]
        config_file = container["args"][container["args"].index("--config") + 1]
        assert Path(config_file).name in config_map["data"], config_file
        env = {e["name"]: e for e in container["env"]}
        ref = env["KVMESH_MESH_KEY"]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
        region = labels["kvmesh.io/region"]
        regions.add(region)
        own = [s for s in services if s["spec"].get("clusterIP") != "None"
               and _matches(s["spec"]["selector"], labels)]
        assert len(own) == 1 and own[0]["metadata"]["name"] == f"kvmesh-router-{region}"
        headless = [s for s in services if s["spec"].get("clusterIP") == "None"]
        assert headless and all(_matches(s["spec"]["selector"], labels) for s in headless)
    assert len(regions) == 3
    monitor = by_kind("ServiceMonitor")[0]["spec"]
    scraped = [s for s in services
               if _matches(monitor["selector"]["matchLabels"], s["metadata"]["labels"])
               and "kvmesh.io/region" in s["metadata"]["labels"]]
    assert len(scraped) == 3
    for s in scraped:
        assert s["metadata"]["labels"][monitor["jobLabel"]] == "kvmesh"  # the alerts' job
        assert monitor["endpoints"][0]["port"] in {p["name"] for p in s["spec"]["ports"]}


def test_every_router_configuration_is_valid(tmp_path: Path) -> None:
    env = {"POD_NAME": "kvmesh-router-x-1", "POD_IP": "10.0.0.7",
           "KVMESH_MESH_KEY": "k" * 48}
    config_map = by_kind("ConfigMap")[0]
    for name, text in config_map["data"].items():
        path = tmp_path / name
        path.write_text(text)
        config = build(read_file(str(path), env))
        assert config.region == re.sub(r"^router-|\.yaml$", "", name)
        assert config.advertise == "http://10.0.0.7:8000" and config.mesh_key == "k" * 48
        assert config.engines and all(e.kv_events and e.replay for e in config.engines)
    with pytest.raises(ConfigError):
        build(read_file(str(path), {}))  # the variables are required
