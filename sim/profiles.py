"""How long one engine step takes on a given GPU and model: a small roofline model.

A step runs the model once over every scheduled token (prefill chunks plus one token per
decoding sequence). It costs a fixed CPU overhead plus the larger of

- compute: ``2 * params`` FLOPs per token, plus attention ``4 * layers * d_model`` FLOPs per
  (token, attended position) pair, at an effective fraction of the GPU's dense BF16 peak;
- memory: reading the weights once, plus the KV of every earlier position attended to,
  at an effective fraction of the GPU's memory bandwidth.

Small batches are memory bound (decode latency ~ weights / bandwidth), large ones compute bound
(prefill time ~ tokens * FLOPs / throughput), which is the shape that matters for routing: a
cached prefix saves compute, decoding sequences slow everyone a little, and throughput
saturates. Sources and the calibration are in docs/simulator.md.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    params: float
    n_layers: int
    d_model: int
    n_kv_heads: int
    head_dim: int
    bytes_per_param: float = 2.0
    kv_bytes_per_elem: float = 2.0

    @property
    def weight_bytes(self) -> float:
        return self.params * self.bytes_per_param

    @property
    def flops_per_token(self) -> float:
        return 2.0 * self.params

    @property
    def attn_flops_per_pair(self) -> float:
        """QK^T and AV for one (query token, attended position) pair, all layers."""
        return 4.0 * self.n_layers * self.d_model

    @property
    def kv_bytes_per_token(self) -> float:
        return 2.0 * self.n_layers * self.n_kv_heads * self.head_dim * self.kv_bytes_per_elem


@dataclass(frozen=True, slots=True)
class GpuSpec:
    name: str
    peak_flops: float
    """Dense BF16 tensor FLOP/s (datasheet, without sparsity)."""
    mem_bandwidth: float
    """Bytes/s (datasheet)."""
    memory_bytes: float


@dataclass(frozen=True, slots=True)
class BatchShape:
    """What one step computes, as far as its duration is concerned."""

    prefill_tokens: int = 0
    decode_seqs: int = 0
    attended_pairs: int = 0
    """Sum over every token computed this step of the positions it attends to (itself included)."""
    context_tokens_read: int = 0
    """KV positions computed in earlier steps that this step reads."""

    @staticmethod
    def of(prefill_chunks: list[tuple[int, int]], decode_contexts: list[int]) -> BatchShape:
        """``prefill_chunks``: (tokens already computed, new tokens); ``decode_contexts``:
        tokens already computed for each decoding sequence."""
        pairs = 0
        read = 0
        tokens = 0
        for start, n in prefill_chunks:
            tokens += n
            pairs += n * start + n * (n + 1) // 2
            read += start
        for ctx in decode_contexts:
            pairs += ctx + 1
            read += ctx
        return BatchShape(tokens, len(decode_contexts), pairs, read)


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    description: str
    model: ModelSpec
    gpu: GpuSpec
    compute_efficiency: float
    memory_efficiency: float
    step_overhead_s: float
    num_gpu_blocks: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int

    def step_time(self, shape: BatchShape) -> float:
        if shape.prefill_tokens == 0 and shape.decode_seqs == 0:
            return 0.0
        m = self.model
        tokens = shape.prefill_tokens + shape.decode_seqs
        flops = tokens * m.flops_per_token + shape.attended_pairs * m.attn_flops_per_pair
        compute = flops / (self.gpu.peak_flops * self.compute_efficiency)
        moved = m.weight_bytes + shape.context_tokens_read * m.kv_bytes_per_token
        memory = moved / (self.gpu.mem_bandwidth * self.memory_efficiency)
        return self.step_overhead_s + max(compute, memory)

    def prefill_time(self, new_tokens: int, cached_tokens: int = 0) -> float:
        """One step prefilling ``new_tokens`` after ``cached_tokens`` already in the cache."""
        return self.step_time(BatchShape.of([(cached_tokens, new_tokens)], []))

    def decode_time(self, contexts: list[int]) -> float:
        return self.step_time(BatchShape.of([], contexts))


def kv_blocks_for(
    model: ModelSpec,
    gpu: GpuSpec,
    block_size: int = 16,
    gpu_memory_utilization: float = 0.9,
    reserved_bytes: float = 0.0,
) -> int:
    """Blocks vLLM would size its KV cache to: what is left of the memory budget after weights
    and activations (``reserved_bytes``)."""
    free = gpu.memory_bytes * gpu_memory_utilization - model.weight_bytes - reserved_bytes
    return max(1, int(free // (model.kv_bytes_per_token * block_size)))


def _efficiency_for(
    model: ModelSpec, gpu: GpuSpec, tokens: int, seconds: float, overhead: float
) -> float:
    """Compute efficiency that makes a lone ``tokens``-token prefill take ``seconds``."""
    shape = BatchShape.of([(0, tokens)], [])
    flops = tokens * model.flops_per_token + shape.attended_pairs * model.attn_flops_per_pair
    return flops / (gpu.peak_flops * (seconds - overhead))


LLAMA_3_1_8B = ModelSpec(
    name="meta-llama/Llama-3.1-8B-Instruct",
    params=8.03e9,
    n_layers=32,
    d_model=4096,
    n_kv_heads=8,
    head_dim=128,
)

NVIDIA_L4 = GpuSpec(name="NVIDIA L4", peak_flops=121e12, mem_bandwidth=300e9, memory_bytes=24.15e9)
NVIDIA_H100_SXM = GpuSpec(
    name="NVIDIA H100 SXM 80GB", peak_flops=989e12, mem_bandwidth=3.35e12, memory_bytes=85.5e9
)

_OVERHEAD_S = 0.003

L4_LLAMA_3_1_8B = Profile(
    name="l4-llama-3.1-8b",
    description="1x L4 + Llama-3.1-8B-Instruct BF16 (SkyLB testbed): 512-token prefill ~300 ms",
    model=LLAMA_3_1_8B,
    gpu=NVIDIA_L4,
    compute_efficiency=_efficiency_for(LLAMA_3_1_8B, NVIDIA_L4, 512, 0.300, _OVERHEAD_S),
    memory_efficiency=0.8,
    step_overhead_s=_OVERHEAD_S,
    num_gpu_blocks=kv_blocks_for(LLAMA_3_1_8B, NVIDIA_L4, reserved_bytes=1.5e9),
    max_num_seqs=256,
    max_num_batched_tokens=2048,
    max_model_len=8192,
)

H100_LLAMA_3_1_8B = Profile(
    name="h100-llama-3.1-8b",
    description="1x H100 SXM + Llama-3.1-8B-Instruct BF16 (datasheet roofline, 50% MFU)",
    model=LLAMA_3_1_8B,
    gpu=NVIDIA_H100_SXM,
    compute_efficiency=0.5,
    memory_efficiency=0.8,
    step_overhead_s=_OVERHEAD_S,
    num_gpu_blocks=kv_blocks_for(LLAMA_3_1_8B, NVIDIA_H100_SXM, reserved_bytes=3e9),
    max_num_seqs=1024,
    max_num_batched_tokens=8192,
    max_model_len=32768,
)

def decode_params(profile: Profile, context: int = 500) -> dict[str, float]:
    """The kvmesh policy's decode figures for engines of ``profile``: one decode step of a
    lone sequence with ``context`` tokens, and the fraction each more sequence adds (what an
    operator would configure from the engines' inter-token latency)."""
    one = profile.decode_time([context])
    two = profile.decode_time([context, context])
    return {"decode_step": round(one, 5), "batch_weight": round((two - one) / one, 5)}


LLAMA_2_7B = ModelSpec(
    name="meta-llama/Llama-2-7b-hf",
    params=6.74e9,
    n_layers=32,
    d_model=4096,
    n_kv_heads=32,
    head_dim=128,
)
"""Multi-head attention (32 KV heads): 0.5 MiB of KV per token, four times Llama-3.1-8B's."""

NVIDIA_V100_32GB = GpuSpec(
    name="NVIDIA V100 SXM2 32GB", peak_flops=125e12, mem_bandwidth=900e9, memory_bytes=34.36e9
)

V100_LLAMA_2_7B = Profile(
    name="v100-llama-2-7b",
    description="1x V100 32GB + Llama-2-7B FP16 (Intelligent Router testbed): a 1,000-token "
    "prefill ~0.32 s (the paper's 3.2e-4 s/token), a lone decode step ~18 ms (its 17 s for "
    "1,000 tokens)",
    model=LLAMA_2_7B,
    gpu=NVIDIA_V100_32GB,
    compute_efficiency=_efficiency_for(LLAMA_2_7B, NVIDIA_V100_32GB, 1000, 0.320, 0.002),
    memory_efficiency=0.95,
    step_overhead_s=0.002,
    num_gpu_blocks=kv_blocks_for(LLAMA_2_7B, NVIDIA_V100_32GB, reserved_bytes=1.5e9),
    max_num_seqs=256,
    max_num_batched_tokens=4096,
    max_model_len=4096,
)

NVIDIA_V100_16GB = GpuSpec(
    name="NVIDIA V100 SXM2 16GB", peak_flops=125e12, mem_bandwidth=900e9, memory_bytes=17.18e9
)

V100_16GB_LLAMA_2_7B = replace(
    V100_LLAMA_2_7B,
    name="v100-16gb-llama-2-7b",
    description="1x V100 16GB + Llama-2-7B FP16: the 32GB profile's speed, but 13.5 GB of "
    "weights leave about 2.5 GB of KV cache (gpu_memory_utilization 0.95): ~4,800 tokens, "
    "just over the 4,096 vLLM needs to serve Llama-2's full context",
    gpu=NVIDIA_V100_16GB,
    num_gpu_blocks=kv_blocks_for(LLAMA_2_7B, NVIDIA_V100_16GB, gpu_memory_utilization=0.95,
                                 reserved_bytes=0.3e9),
)
"""The same step times as :data:`V100_LLAMA_2_7B` (same chip), a 16 GB card's KV cache."""

PROFILES: dict[str, Profile] = {
    p.name: p for p in (L4_LLAMA_3_1_8B, H100_LLAMA_3_1_8B, V100_LLAMA_2_7B,
                        V100_16GB_LLAMA_2_7B)
}
DEFAULT_PROFILE = L4_LLAMA_3_1_8B.name


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        known = ", ".join(sorted(PROFILES))
        raise ValueError(f"unknown profile {name!r}; known: {known}") from None
