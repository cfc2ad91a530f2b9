"""The documented autoscaler example asks Prometheus only for metrics the router exports."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from mesh.demand import DemandMeter, PlanTargets, hint_metrics

EXAMPLE = Path(__file__).parents[3] / "deploy/examples/autoscaling/keda-scaledobject.yaml"


def test_keda_example_queries_exported_metrics() -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    assert doc["kind"] == "ScaledObject" and doc["apiVersion"] == "keda.sh/v1alpha1"
    meter = DemandMeter()
    meter.observe("llama-3.1-8b", 10, 5, now=0.0)
    plan = PlanTargets(86400.0, 3600.0, {"us": {"llama-3.1-8b": tuple(range(24))}})
    exported = {
        m.name for m in hint_metrics("us", meter, plan, {"llama-3.1-8b": 1}, 1.0, 0.0)  # type: ignore[attr-defined]
    }
    triggers = doc["spec"]["triggers"]
    assert len(triggers) == 2
    for trig in triggers:
        assert trig["type"] == "prometheus" and trig["metricType"] == "AverageValue"
        names = set(re.findall(r"(kvmesh_[a-z_]+)\{", trig["metadata"]["query"]))
        assert names and names <= exported, names - exported
    assert triggers[0]["metadata"]["threshold"] == "1"  # replicas = the plan's target


def test_example_spec_is_a_valid_plan_spec() -> None:
    from plan.inputs import read_spec

    spec = read_spec(EXAMPLE.parents[1] / "plan" / "spec.yaml")
    assert set(spec.regions) == {"us", "eu", "asia"} and len(spec.gpus) == 3
