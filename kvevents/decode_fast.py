"""The decoder's fast path: msgspec typed decoding of the batches engines actually send.

Decoding into typed structs skips building a dict with string keys for every event, which is
most of the cost of ``msgpack.unpackb`` on map-encoded events. The schemas below accept only
what is fully understood: every known field of the map era (vLLM >= 0.26, SGLang's map era) or
of the array era (vLLM <= 0.23 layout), int hashes, known tags, nothing unknown
(``forbid_unknown_fields``). Anything else (an unknown field or event type, bytes hashes,
SGLang's positional metadata map, a map-shaped batch, a bad value) makes :func:`decode_fast`
return ``None`` and the tolerant generic decoder in ``kvevents.decode`` takes over, which is
also the one that counts what it skips. Both produce the same ``EventBatch`` (a property test
checks it).
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

import msgspec

from kvevents.events import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch, KVEvent

_MASK = 0xFFFF_FFFF_FFFF_FFFF


class _Meta(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    cache_salt: str | None = None


class _MStored(msgspec.Struct, tag="BlockStored", forbid_unknown_fields=True, kw_only=True):
    block_hashes: list[int]
    parent_block_hash: int | None = None
    token_ids: list[int] | None = None
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: Any = None
    session_id: Any = None
    lookahead_token_ids: Any = None
    event_version: Any = None
    block_mm_infos: Any = None
    is_eagle: Any = None
    component_type: Any = None
    cache_salt: str | None = None
    metadata: _Meta | None = None


class _MRemoved(msgspec.Struct, tag="BlockRemoved", forbid_unknown_fields=True, gc=False):
    block_hashes: list[int]
    medium: str | None = None
    group_idx: int | None = None
    locality: str | None = None
    ownership: Any = None
    component_type: Any = None


class _MCleared(msgspec.Struct, tag="AllBlocksCleared", forbid_unknown_fields=True, gc=False):
    pass


class _AStored(
    msgspec.Struct, tag="BlockStored", array_like=True, forbid_unknown_fields=True, gc=False
):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int] | None
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None


class _ARemoved(
    msgspec.Struct, tag="BlockRemoved", array_like=True, forbid_unknown_fields=True, gc=False
):
    block_hashes: list[int]
    medium: str | None = None
    group_idx: int | None = None
    locality: str | None = None


class _ACleared(
    msgspec.Struct, tag="AllBlocksCleared", array_like=True, forbid_unknown_fields=True, gc=False
):
    pass


class _MapEvents(msgspec.Struct, array_like=True, forbid_unknown_fields=True, gc=False):
    ts: float
    events: list[_MStored | _MRemoved | _MCleared]
    data_parallel_rank: int | None = None


class _ArrayEvents(msgspec.Struct, array_like=True, forbid_unknown_fields=True, gc=False):
    ts: float
    events: list[_AStored | _ARemoved | _ACleared]
    data_parallel_rank: int | None = None


_DECODERS: list[Any] = [msgspec.msgpack.Decoder(_MapEvents), msgspec.msgpack.Decoder(_ArrayEvents)]
_new = object.__new__
_STORED_SET = tuple(getattr(BlockStored, f.name).__set__ for f in fields(BlockStored))
_REMOVED_SET = tuple(getattr(BlockRemoved, f.name).__set__ for f in fields(BlockRemoved))
_CLEARED = AllBlocksCleared()


def _folded(hashes: list[int]) -> list[int]:
    """Hashes as u64 (SGLang sends int64); the list msgspec built is ours to keep."""
    if hashes and min(hashes) < 0:
        return [h & _MASK for h in hashes]
    return hashes


def decode_fast(payload: bytes) -> EventBatch | None:
    """The batch, when it is entirely in a well-understood shape; else None (use the generic)."""
    batch: _MapEvents | _ArrayEvents | None = None
    for i, decoder in enumerate(_DECODERS):
        try:
            batch = decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        if i:  # the producer uses the other era: try its schema first from now on
            _DECODERS.insert(0, _DECODERS.pop(i))
        break
    if batch is None or not math.isfinite(batch.ts):
        return None
    out: list[KVEvent] = []
    append = out.append
    s0, s1, s2, s3, s4, s5, s6, s7, s8, s9 = _STORED_SET
    r0, r1, r2 = _REMOVED_SET
    for e in batch.events:
        t = type(e)
        if t is _MRemoved or t is _ARemoved:
            removed = _new(BlockRemoved)
            r0(removed, _folded(e.block_hashes))  # type: ignore[union-attr]
            r1(removed, e.medium)  # type: ignore[union-attr]
            r2(removed, e.group_idx)  # type: ignore[union-attr]
            append(removed)
        elif t is _MStored or t is _AStored:
            if e.block_size <= 0:  # type: ignore[union-attr]
                return None
            parent = e.parent_block_hash  # type: ignore[union-attr]
            salt = e.cache_salt if t is _MStored else None  # type: ignore[union-attr]
            if salt is None and t is _MStored and e.metadata is not None:  # type: ignore[union-attr]
                salt = e.metadata.cache_salt  # type: ignore[union-attr]
            stored = _new(BlockStored)
            s0(stored, _folded(e.block_hashes))  # type: ignore[union-attr]
            s1(stored, parent & _MASK if parent is not None and parent < 0 else parent)
            tokens = e.token_ids  # type: ignore[union-attr]
            s2(stored, tokens if tokens is not None else [])
            s3(stored, e.block_size)  # type: ignore[union-attr]
            s4(stored, e.lora_id)  # type: ignore[union-attr]
            s5(stored, e.medium)  # type: ignore[union-attr]
            s6(stored, e.lora_name)  # type: ignore[union-attr]
            s7(stored, e.extra_keys)  # type: ignore[union-attr]
            s8(stored, e.group_idx)  # type: ignore[union-attr]
            s9(stored, salt)
            append(stored)
        else:
            append(_CLEARED)
    return EventBatch(batch.ts, out, batch.data_parallel_rank)
