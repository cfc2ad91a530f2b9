"""A prefix lookup that matches every replica with keys of its own block size.

The index holds each replica's keys at the block size that replica publishes. A request
arrives as :class:`~kvevents.block_sizes.SizedKeys`: one key chain per block size in the fleet.
Chains of different sizes never share a key (they hash different byte ranges), so asking the
index once per size and keeping, per replica, the longest match in tokens is exact. Results are
reported in the request's unit (the gcd of the sizes), which policies multiply by
``Request.block_size`` as before.

Two more things happen here because every policy reads matches through this one door:

- slices of a data-parallel engine (one per rank, named ``url#dp<rank>``) count as the engine;
- a replica the self-check does not trust (cache-blind, predictions keep missing) matches
  nothing: its prefix is *unknown*, and the policy routes to it by load alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from kvevents.block_sizes import SizedKeys
from kvevents.publisher import offset_endpoint_port
from mesh.config import EngineConfig
from mesh.policies.base import PrefixLookup

DP_SEP = "#dp"


def dp_slice_name(url: str, rank: int) -> str:
    """The slice a data-parallel rank's events are written to (rank 0 is the engine itself)."""
    return url if rank == 0 else f"{url}{DP_SEP}{rank}"


def engine_of(slice_name: str) -> str:
    head, sep, rank = slice_name.rpartition(DP_SEP)
    return head if sep and rank.isdigit() else slice_name


class SizedLookup:
    """``PrefixLookup`` over an inner index; see the module docstring."""

    def __init__(self, inner: PrefixLookup,
                 trusted: Callable[[str], bool] = lambda replica: True) -> None:
        self.inner = inner
        self.trusted = trusted

    def match(self, keys: Sequence[int]) -> Mapping[str, int]:
        raw = self.match_all(keys)
        return {r: n for r, n in raw.items() if self.trusted(r)}

    def match_all(self, keys: Sequence[int]) -> dict[str, int]:
        """Matches in units for every replica, trusted or not (what the self-check predicts)."""
        if not isinstance(keys, SizedKeys):
            out: dict[str, int] = {}
            for name, n in self.inner.match(keys).items():
                eng = engine_of(name)
                if n > out.get(eng, 0):
                    out[eng] = n
            return out
        if keys.unmatched:
            return {}
        unit = keys.unit
        best: dict[str, int] = {}
        for size, chain in keys.by_size.items():
            if not chain:
                continue
            cap = keys.cap(size)
            for name, n in self.inner.match(chain).items():
                tokens = min(n, cap) * size
                eng = engine_of(name)
                if tokens > best.get(eng, 0):
                    best[eng] = tokens
        return {r: t // unit for r, t in best.items() if t >= unit}

    def predicted_tokens(self, keys: Sequence[int], replica: str, block_size: int) -> int:
        """Prompt tokens ``replica`` should find cached for this request, by the index."""
        return self.match_all(keys).get(replica, 0) * block_size


def dp_sources(eng: EngineConfig) -> list[tuple[str, str, str | None]]:
    """``(slice name, kv_events, replay)`` per data-parallel rank of an engine: vLLM gives rank
    r its own publisher on the configured ports + r."""
    assert eng.kv_events is not None
    return [
        (dp_slice_name(eng.url, r), offset_endpoint_port(eng.kv_events, r),
         offset_endpoint_port(eng.replay, r) if eng.replay else None)
        for r in range(eng.data_parallel_size)
    ]


def learned_block_sizes(subscribers: Iterable[Any]) -> dict[str, int]:
    """Engine URL -> the block size its events carry (from its sources' ingest stats)."""
    out: dict[str, int] = {}
    for sub in subscribers:
        try:
            st = sub.stats()
        except Exception:
            continue
        if st.block_size:
            out.setdefault(engine_of(st.replica), int(st.block_size))
    return out
