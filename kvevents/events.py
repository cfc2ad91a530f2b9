"""Typed KV-cache events as engines (vLLM, SGLang) publish them, after decoding.

Hashes are normalised to unsigned 64-bit ints (bytes -> last 8 bytes big-endian,
signed int64 -> two's complement), as vLLM itself does when it publishes ints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: Sequence[int]
    parent_block_hash: int | None
    token_ids: Sequence[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: Sequence[object] | None = None
    group_idx: int | None = None
    cache_salt: str | None = None
    """SGLang's salted chains (``metadata.cache_salt``); vLLM carries the salt in ``extra_keys``."""


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: Sequence[int]
    medium: str | None = None
    group_idx: int | None = None


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class EventBatch:
    ts: float
    events: Sequence[KVEvent]
    data_parallel_rank: int | None = None
    unknown_events: int = field(default=0, compare=False)
    """Events of unknown type skipped while decoding (counted, not fatal)."""
    unknown_fields: int = field(default=0, compare=False)
    """Fields no known engine version sends (ignored, counted)."""
    malformed_events: int = field(default=0, compare=False)
    """Events of a known type with unusable fields (skipped, counted)."""


class IndexWriter(Protocol):
    """Where ingestion writes one replica's slice of the prefix index.

    ``PrefixIndex`` implements this. ``keys`` are the router's own chained block
    keys (``kvevents.keys``), never engine hashes. ``(epoch, seq)`` is the slice
    version: ``epoch`` identifies one run of the engine, ``seq`` the batch.
    """

    def reset(self, replica: str, epoch: int, partial: bool = False) -> None:
        """Start a new epoch for ``replica``: its slice is emptied."""
        ...

    def store(self, replica: str, version: tuple[int, int], keys: Sequence[int]) -> None: ...

    def remove(self, replica: str, version: tuple[int, int], keys: Sequence[int]) -> None: ...

    def clear(self, replica: str, version: tuple[int, int]) -> None:
        """AllBlocksCleared: the replica holds nothing as of ``version``."""
        ...
