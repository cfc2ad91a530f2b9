"""An engine's KV-cache capacity in tokens, from its ``/metrics`` page or the configuration.

The capacity turns a queue length into KV: a request waiting at an engine holds no blocks
yet, but it will take its prompt's blocks the moment the engine admits it, before anything
sent now (:mod:`mesh.policies.queued_kv`). It is a fact of the engine, fixed while the
engine runs, and is published by the one router that probes the engine, in its meta record.

Sources, first found wins:

- vLLM: the info gauge ``vllm:cache_config_info``, whose labels hold the engine's
  ``CacheConfig`` (``num_gpu_blocks="2048"``, ``block_size="16"``); capacity is their
  product. Before the engine has profiled its memory the label reads ``None``: unknown.
- SGLang: the gauge ``sglang:max_total_num_tokens``, the token pool's size.
- the engine's ``kv_capacity`` in the router's configuration (for engines that export
  neither, or behind a proxy that hides them).

Unknown (None) everywhere: the cost model prices the KV barrier as it did without it.
"""

from __future__ import annotations

_VLLM_INFO = "vllm:cache_config_info"
_SGLANG_TOKENS = "sglang:max_total_num_tokens"


def _labels(text: str) -> dict[str, str]:
    """``a="1",b="x"`` -> {a: 1, b: x}; escaped quotes are kept as they are (the labels read
    here are numbers)."""
    out: dict[str, str] = {}
    i, n = 0, len(text)
    while i < n:
        eq = text.find("=", i)
        if eq < 0 or eq + 1 >= n or text[eq + 1] != '"':
            break
        name = text[i:eq].strip().lstrip(",").strip()
        j = eq + 2
        while j < n and text[j] != '"':
            j += 2 if text[j] == "\\" else 1
        out[name] = text[eq + 2:j]
        i = j + 1
    return out


def _positive_int(raw: str | None) -> int | None:
    if raw is None:
        return None
    try:
        value = int(float(raw))
    except (ValueError, OverflowError):
        return None
    return value if value > 0 else None


def parse_capacity(text: str) -> int | None:
    """The engine's KV capacity in tokens from a Prometheus text page (None: not exported,
    not known yet, or malformed). Data-parallel ranks' figures are summed, as the load
    gauges are."""
    vllm = sglang = 0
    for line in text.splitlines():
        if line.startswith(_VLLM_INFO):
            rest = line[len(_VLLM_INFO):]
            if not rest.startswith("{") or "}" not in rest:
                continue
            labels = _labels(rest[1:rest.rfind("}")])
            blocks = _positive_int(labels.get("num_gpu_blocks"))
            size = _positive_int(labels.get("block_size"))
            if blocks is not None and size is not None:
                vllm += blocks * size
        elif line.startswith(_SGLANG_TOKENS):
            rest = line[len(_SGLANG_TOKENS):]
            if rest.startswith("{"):
                rest = rest[rest.find("}") + 1:] if "}" in rest else ""
            elif not rest.startswith(" "):
                continue  # another metric whose name starts the same
            parts = rest.split()
            tokens = _positive_int(parts[0] if parts else None)
            if tokens is not None:
                sglang += tokens
    if vllm:
        return vllm
    return sglang or None


def capacity_of(scraped: int | None, configured: int | None) -> int | None:
    """The capacity the router publishes: the engine's own figure, else the configured one."""
    return scraped if scraped is not None else configured
