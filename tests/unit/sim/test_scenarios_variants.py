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


def test_the_queued_kv_variants_differ_from_kvmesh_and_the_oracle_in_that_option_only() -> None:
    sc = SCENARIOS["skylb-wildchat-332"]
    assert "kvmesh+queued-kv" not in _labels("skylb-wildchat-332", RunOptions(extra=True))
    by = {v.label: v for v in (*sc.variants, *sc.named_variants)}
    for base, queued in (("kvmesh", "kvmesh+queued-kv"), ("oracle", "oracle+queued-kv")):
        a, b = fleet_spec(sc, by[base], 7), fleet_spec(sc, by[queued], 7)
        assert dict(b.policy_params) == {**a.policy_params, "kv_queued": True}
        assert "kv_queued" not in a.policy_params  # the default: off
        assert (b.plane, b.mesh_options) == (a.plane, a.mesh_options)
