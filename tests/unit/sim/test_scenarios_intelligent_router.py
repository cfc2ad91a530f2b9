"""The intelligent-router scenario's set-up: which variants hold for KV and on what engines."""

from __future__ import annotations

from sim.scenarios import SCENARIOS, fleet_spec, policy_params


def test_kvmesh_and_the_oracle_are_told_the_engines_kv_capacity() -> None:
    sc = SCENARIOS["intelligent-router"]
    by = {v.label: v for v in sc.variants}
    kv = sc.profile.num_gpu_blocks * 16
    assert policy_params(sc, by["kvmesh"])["kv_tokens"] == kv
    assert policy_params(sc, by["oracle"])["kv_tokens"] == kv
    assert "kv_tokens" not in policy_params(sc, by["kvmesh-ttft"])
    assert "kv_tokens" not in policy_params(sc, by["round_robin"])
    assert 4096 <= kv < 6000
    # ... and its block size (each sequence's last block is partly empty).
    assert policy_params(sc, by["kvmesh"])["kv_block"] == 16
    assert "kv_block" not in policy_params(sc, by["kvmesh-ttft"])


def test_the_engines_run_as_the_paper_ran_vllm() -> None:
    sc = SCENARIOS["intelligent-router"]
    spec = fleet_spec(sc, sc.variants[0], 1)
    assert spec.engine_config is not None
    assert not spec.engine_config.enable_prefix_caching
    assert not spec.engine_config.enable_chunked_prefill
    # Other scenarios keep the engines' defaults.
    other = SCENARIOS["skylb-arena-332"]
    assert fleet_spec(other, other.variants[0], 1).engine_config is None
