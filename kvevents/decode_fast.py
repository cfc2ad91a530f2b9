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
    wire_salt: str | None = msgspec.field(default=None, name="cache_salt")
    metadata: _Meta | None = None

    @property
    def cache_salt(self) -> str | None:
        if self.wire_salt is not None:
            return self.wire_salt
        return self.metadata.cache_salt if self.metadata is not None else None


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

    @property
    def cache_salt(self) -> str | None:
        return None


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


def _typed(payload: bytes) -> _MapEvents | _ArrayEvents | None:
    for i, decoder in enumerate(_DECODERS):
        try:
            batch: _MapEvents | _ArrayEvents = decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        if i:  # the producer uses the other era: try its schema first from now on
            _DECODERS.insert(0, _DECODERS.pop(i))
        if not math.isfinite(batch.ts):
            return None
        for e in batch.events:
            if type(e) is _MStored or type(e) is _AStored:
                if e.block_size <= 0:
                    return None
                parent = e.parent_block_hash
                if parent is not None and parent < 0:
                    e.parent_block_hash = parent & _MASK
                if e.token_ids is None:
                    e.token_ids = []
            elif type(e) is _ACleared:
                continue
            if type(e) is not _MCleared:
                hashes = e.block_hashes  # type: ignore[union-attr]
                if hashes and min(hashes) < 0:  # SGLang's int64: fold to u64 in place
                    e.block_hashes = [h & _MASK for h in hashes]  # type: ignore[union-attr]
        return batch
    return None


STORED_TYPES = (BlockStored, _MStored, _AStored)
REMOVED_TYPES = (BlockRemoved, _MRemoved, _ARemoved)
CLEARED_TYPES = (AllBlocksCleared, _MCleared, _ACleared)


def decode_for_ingest(payload: bytes) -> tuple[float, list[Any]] | None:
    """``(ts, events)`` for the ingestion hot path, skipping the dataclass conversion.

    The events are the typed structs (``STORED_TYPES``/``REMOVED_TYPES``/``CLEARED_TYPES``),
    with the attributes of ``BlockStored``/``BlockRemoved`` (hashes folded, ``cache_salt``
    resolved). None when the batch needs the generic decoder.
    """
    batch = _typed(payload)
    return None if batch is None else (batch.ts, batch.events)


def decode_fast(payload: bytes) -> EventBatch | None:
    """The batch as ``EventBatch`` of the contract dataclasses; None: use the generic decoder."""
    batch = _typed(payload)
    if batch is None:
        return None
    out: list[KVEvent] = []
    append = out.append
    s0, s1, s2, s3, s4, s5, s6, s7, s8, s9 = _STORED_SET
    r0, r1, r2 = _REMOVED_SET
    for e in batch.events:
        t = type(e)
        if t is _MRemoved or t is _ARemoved:
            removed = _new(BlockRemoved)
            r0(removed, e.block_hashes)  # type: ignore[union-attr]
            r1(removed, e.medium)  # type: ignore[union-attr]
            r2(removed, e.group_idx)  # type: ignore[union-attr]
            append(removed)
        elif t is _MStored or t is _AStored:
            stored = _new(BlockStored)
            s0(stored, e.block_hashes)  # type: ignore[union-attr]
            s1(stored, e.parent_block_hash)  # type: ignore[union-attr]
            s2(stored, e.token_ids)  # type: ignore[union-attr]
            s3(stored, e.block_size)  # type: ignore[union-attr]
            s4(stored, e.lora_id)  # type: ignore[union-attr]
            s5(stored, e.medium)  # type: ignore[union-attr]
            s6(stored, e.lora_name)  # type: ignore[union-attr]
            s7(stored, e.extra_keys)  # type: ignore[union-attr]
            s8(stored, e.group_idx)  # type: ignore[union-attr]
            s9(stored, e.cache_salt)  # type: ignore[union-attr]
            append(stored)
        else:
            append(_CLEARED)
    return EventBatch(batch.ts, out, batch.data_parallel_rank)
