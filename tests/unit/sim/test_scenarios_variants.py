"""Which variants a scenario run selects, and what the diagnostic ones change."""

from __future__ import annotations

import pytest

from sim.scenarios import SCENARIOS, RunOptions, fleet_spec, selected_variants


def _labels(name: str, opts: RunOptions) -> list[str]:
    return [v.label for v in selected_variants(SCENARIOS[name], opts)]


def test_live_load_variants_run_only_when_named() -> None:
    assert "kvmesh+live-own" not in _labels("skylb-wildchat-332", RunOptions(extra=True))
    assert _labels("skylb-wildchat-332",
                   RunOptions(only=("kvmesh+live-own", "kvmesh+live-load", "oracle"))) == [
        "kvmesh+live-own", "kvmesh+live-load", "oracle"]
    with pytest.raises(ValueError, match="unknown variant"):
        _labels("skylb-wildchat-332", RunOptions(only=("kvmesh+live",)))


def test_a_variant_differs_from_kvmesh_in_its_mesh_option_and_tie_stream_is_passed() -> None:
    sc = SCENARIOS["skylb-wildchat-332"]
    by = {v.label: v for v in (*sc.variants, *sc.named_variants)}
    base = fleet_spec(sc, by["kvmesh"], 7)
    own = fleet_spec(sc, by["kvmesh+live-own"], 7, tie_stream=2)
    assert base.tie_stream == 0 and own.tie_stream == 2
    assert dict(own.mesh_options) == {**sc.mesh_options, "live_load": "own"}
    assert own.policy_params == base.policy_params and own.plane == base.plane == "mesh"


def test_the_reported_kv_variants_differ_only_in_kv_release() -> None:
    sc = SCENARIOS["skylb-wildchat-332"]
    assert "kvmesh-reported-kv" not in _labels("skylb-wildchat-332", RunOptions(extra=True))
    by = {v.label: v for v in (*sc.variants, *sc.named_variants)}
    for label, twin in (("kvmesh-reported-kv", "kvmesh"), ("oracle-reported-kv", "oracle")):
        spec, base = fleet_spec(sc, by[label], 7), fleet_spec(sc, by[twin], 7)
        assert dict(spec.policy_params) == {**base.policy_params, "kv_release": False}
        assert spec.plane == base.plane and spec.mesh_options == base.mesh_options


def test_the_calibrated_variant_differs_only_in_calibrated() -> None:
    sc = SCENARIOS["skylb-wildchat-332"]
    assert "kvmesh-calibrated" not in _labels("skylb-wildchat-332", RunOptions(extra=True))
    by = {v.label: v for v in (*sc.variants, *sc.named_variants)}
    spec, base = fleet_spec(sc, by["kvmesh-calibrated"], 7), fleet_spec(sc, by["kvmesh"], 7)
    assert dict(spec.policy_params) == {**base.policy_params, "calibrated": True}
    assert spec.plane == base.plane and spec.mesh_options == base.mesh_options
