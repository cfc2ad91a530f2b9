"""Hardware profiles: calibration anchors and the roofline's shape."""

from __future__ import annotations

import pytest

from sim.profiles import (
    H100_LLAMA_3_1_8B,
    L4_LLAMA_3_1_8B,
    PROFILES,
    V100_16GB_LLAMA_2_7B,
    V100_LLAMA_2_7B,
    BatchShape,
    get_profile,
)


def test_l4_prefills_512_tokens_in_about_300_ms_like_the_skylb_testbed() -> None:
    assert L4_LLAMA_3_1_8B.prefill_time(512) == pytest.approx(0.300, rel=1e-9)


def test_h100_is_much_faster_than_l4_for_prefill_and_decode() -> None:
    for n in (128, 512, 2048):
        assert H100_LLAMA_3_1_8B.prefill_time(n) < L4_LLAMA_3_1_8B.prefill_time(n) / 5
    assert H100_LLAMA_3_1_8B.decode_time([512]) < L4_LLAMA_3_1_8B.decode_time([512]) / 5


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_small_decode_batches_are_memory_bound_and_nearly_free_to_grow(name: str) -> None:
    p = get_profile(name)
    one = p.decode_time([256])
    eight = p.decode_time([256] * 8)
    assert eight < 1.2 * one  # weights dominate the bytes moved
    assert eight > one  # KV reads still cost something


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_prefill_time_grows_with_tokens_and_with_cached_context(name: str) -> None:
    p = get_profile(name)
    times = [p.prefill_time(n) for n in (256, 512, 1024, 4096)]
    assert times == sorted(times) and len(set(times)) == 4
    assert p.prefill_time(512, cached_tokens=4096) > p.prefill_time(512)
    # a prefill is never cheaper than streaming the weights once
    assert p.prefill_time(1) >= p.model.weight_bytes / (p.gpu.mem_bandwidth * p.memory_efficiency)


def test_batch_shape_counts_attention_pairs_and_kv_reads() -> None:
    shape = BatchShape.of([(10, 3)], [5, 7])
    assert shape.prefill_tokens == 3 and shape.decode_seqs == 2
    assert shape.attended_pairs == (11 + 12 + 13) + 6 + 8
    assert shape.context_tokens_read == 10 + 5 + 7
    assert L4_LLAMA_3_1_8B.step_time(BatchShape()) == 0.0


def test_kv_capacity_follows_from_memory_left_after_weights() -> None:
    l4, h100 = L4_LLAMA_3_1_8B, H100_LLAMA_3_1_8B
    assert 1500 < l4.num_gpu_blocks < 2500  # ~30k tokens on a 24 GB L4
    assert h100.num_gpu_blocks > 10 * l4.num_gpu_blocks
    assert l4.max_model_len <= l4.num_gpu_blocks * 16


def test_a_16gb_v100_leaves_llama_2_7b_a_few_thousand_tokens_of_kv() -> None:
    small, big = V100_16GB_LLAMA_2_7B, V100_LLAMA_2_7B
    # 13.5 GB of weights on a 16 GB card: ~2.5 GB of KV at 0.5 MiB a token, just over the
    # 4,096 tokens vLLM needs to serve Llama-2's context; the 32 GB card holds ~6x more.
    assert 4096 <= small.num_gpu_blocks * 16 < 6000
    assert big.num_gpu_blocks > 5 * small.num_gpu_blocks
    assert small.decode_time([500]) == big.decode_time([500])


def test_unknown_profile_names_list_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"l4-llama-3\.1-8b"):
        get_profile("tpu")
