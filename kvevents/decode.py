"""Sans-I/O decoder for the engines' KV-event wire format (vLLM and SGLang, every era).

A live message is three ZMQ frames ``[topic, seq (u64 big-endian), msgpack batch]``. The batch
is ``[ts, events, dp_rank]`` (older producers: ``[ts, events]``; a map-shaped batch is accepted
too). Each event is either a positional array ``["BlockStored", ...]`` (vLLM <= 0.23, SGLang
before its map switch) or a map ``{"type": "BlockStored", ...}``; the shape is decided per event,
fields are read by position or by name, and anything newer than this decoder is skipped and
counted rather than fatal. Hashes become unsigned 64-bit ints the way vLLM itself folds them.

Everything that cannot be used raises :class:`WireError` (batch level) or is counted in
``EventBatch.malformed_events`` (one event), never anything else.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import msgpack  # type: ignore[import-untyped,unused-ignore]

from kvevents.decode_fast import decode_fast
from kvevents.events import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch, KVEvent

U64_MASK = 0xFFFF_FFFF_FFFF_FFFF
END_SEQ = 0xFFFF_FFFF_FFFF_FFFF
"""Replay end marker: seq ``ff..ff`` with an empty payload."""


class WireError(ValueError):
    """Malformed frames or payload: the one error the decoder raises."""


@dataclass(frozen=True, slots=True)
class RawMessage:
    topic: bytes
    seq: int
    payload: bytes


# Fields each event type may carry, by name (map era) and by position (array era).
_STORED_FIELDS = (
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
    "kv_cache_spec_kind",
    "kv_cache_spec_sliding_window",
    "locality",
)
# Sent by some producer version, understood, not needed for routing: not counted as unknown.
_STORED_IGNORED = (
    "ownership",
    "session_id",
    "lookahead_token_ids",
    "event_version",
    "metadata",
    "cache_salt",
    "block_mm_infos",
    "component_type",
    "is_eagle",
)
_STORED_KNOWN = frozenset(("type", *_STORED_FIELDS, *_STORED_IGNORED))
_STORED_MAX_POSITIONS = 1 + len(_STORED_FIELDS)
_REMOVED_KNOWN = frozenset(
    ("type", "block_hashes", "medium", "group_idx", "locality", "ownership", "component_type")
)
_REMOVED_MAX_POSITIONS = 5
_CLEARED_KNOWN = frozenset(("type",))


def split_message(frames: Sequence[bytes]) -> RawMessage:
    """Check a live multipart message: exactly 3 frames and an 8-byte sequence number."""
    if len(frames) != 3:
        raise WireError(f"expected 3 frames [topic, seq, payload], got {len(frames)}")
    topic, seq, payload = frames
    if len(seq) != 8:
        raise WireError(f"sequence frame must be 8 bytes, got {len(seq)}")
    return RawMessage(bytes(topic), int.from_bytes(seq, "big"), bytes(payload))


def split_replay_reply(frames: Sequence[bytes]) -> RawMessage | None:
    """One reply read by a DEALER from the engine's replay ROUTER; ``None`` for the end marker.

    Accepts ``[b"", topic, seq, payload]`` (vLLM with topic frames), ``[b"", seq, payload]``
    (older vLLM, SGLang) and the same without the empty delimiter (REQ-style).
    """
    parts = list(frames)
    if len(parts) == 4:
        if parts[0] != b"":
            raise WireError("4-frame replay reply must start with an empty delimiter")
        parts = parts[1:]
    if len(parts) == 3:
        topic, seq, payload = parts
    elif len(parts) == 2:
        topic, (seq, payload) = b"", parts
    else:
        raise WireError(f"replay reply has {len(frames)} frames")
    if len(seq) != 8:
        raise WireError(f"replay sequence frame must be 8 bytes, got {len(seq)}")
    value = int.from_bytes(seq, "big")
    if value == END_SEQ:
        return None
    return RawMessage(bytes(topic), value, bytes(payload))


def fold_hash(h: object) -> int:
    """An engine block hash as an unsigned 64-bit int (bytes: last 8 bytes, big-endian)."""
    if type(h) is int:
        return h & U64_MASK
    if type(h) is bytes and h:
        return int.from_bytes(h[-8:], "big")
    raise WireError(f"block hash must be an int or non-empty bytes, got {type(h).__name__}")


def _hashes(raw: object) -> list[int]:
    if type(raw) is not list:
        raise WireError("block_hashes must be an array")
    try:
        return [h & U64_MASK for h in raw]  # the common case: every hash is an int
    except TypeError:
        return [fold_hash(h) for h in raw]


def _opt_int(v: object, name: str) -> int | None:
    if v is None or type(v) is int:
        return v
    raise WireError(f"{name} must be an int or nil")


def _opt_str(v: object, name: str) -> str | None:
    if v is None or type(v) is str:
        return v
    raise WireError(f"{name} must be a string or nil")


def _salt_of(metadata: object) -> str | None:
    if type(metadata) is dict:
        return _opt_str(metadata.get("cache_salt"), "metadata.cache_salt")
    if metadata is None:
        return None
    raise WireError("metadata must be a map")


# Frozen slotted dataclasses are built through their slot descriptors: the same object as
# ``BlockStored(...)`` gives, at half the cost of the generated ``__init__`` (this is the
# per-event hot path of every router).
_new = object.__new__
_STORED_SET = tuple(getattr(BlockStored, f.name).__set__ for f in fields(BlockStored))
_REMOVED_SET = tuple(getattr(BlockRemoved, f.name).__set__ for f in fields(BlockRemoved))
assert len(_STORED_SET) == 10 and len(_REMOVED_SET) == 3, "update the decoder with events.py"


def _stored(
    hashes: object,
    parent: object,
    tokens: object,
    block_size: object,
    lora_id: object,
    medium: object,
    lora_name: object,
    extra_keys: object,
    group_idx: object,
    salt: str | None,
) -> BlockStored:
    if type(hashes) is not list:
        raise WireError("block_hashes must be an array")
    try:
        hashes = [h & U64_MASK for h in hashes]  # the common case: every hash is an int
    except TypeError:
        hashes = [fold_hash(h) for h in hashes]
    if parent is not None:
        parent = parent & U64_MASK if type(parent) is int else fold_hash(parent)
    if tokens is None:
        tokens = []
    elif type(tokens) is not list:
        raise WireError("token_ids must be an array")
    if type(block_size) is not int or block_size <= 0:
        raise WireError("block_size must be a positive int")
    if lora_id is not None and type(lora_id) is not int:
        raise WireError("lora_id must be an int or nil")
    if medium is not None and type(medium) is not str:
        raise WireError("medium must be a string or nil")
    if lora_name is not None and type(lora_name) is not str:
        raise WireError("lora_name must be a string or nil")
    if extra_keys is not None and type(extra_keys) is not list:
        raise WireError("extra_keys must be an array or nil")
    if group_idx is not None and type(group_idx) is not int:
        raise WireError("group_idx must be an int or nil")
    ev = _new(BlockStored)
    s0, s1, s2, s3, s4, s5, s6, s7, s8, s9 = _STORED_SET
    s0(ev, hashes)
    s1(ev, parent)
    s2(ev, tokens)
    s3(ev, block_size)
    s4(ev, lora_id)
    s5(ev, medium)
    s6(ev, lora_name)
    s7(ev, extra_keys)
    s8(ev, group_idx)
    s9(ev, salt)
    return ev


def _removed(hashes: object, medium: object, group_idx: object) -> BlockRemoved:
    if medium is not None and type(medium) is not str:
        raise WireError("medium must be a string or nil")
    if group_idx is not None and type(group_idx) is not int:
        raise WireError("group_idx must be an int or nil")
    ev = _new(BlockRemoved)
    s0, s1, s2 = _REMOVED_SET
    s0(ev, _hashes(hashes))
    s1(ev, medium)
    s2(ev, group_idx)
    return ev


def _stored_from_array(ev: list[Any]) -> tuple[BlockStored, int]:
    n = len(ev)
    if n < 5:
        raise WireError(f"BlockStored array needs at least 5 elements, got {n}")
    if n >= 9:  # vLLM >= lora_name/extra_keys: the common array shape
        at7 = ev[7]
        if type(at7) is dict:  # SGLang's metadata map in this position
            salt, at7 = _salt_of(at7), None
        else:
            salt = None
        event = _stored(
            ev[1], ev[2], ev[3], ev[4], ev[5], ev[6], at7, ev[8], ev[9] if n > 9 else None, salt
        )
        return event, max(0, n - _STORED_MAX_POSITIONS)
    at7 = ev[7] if n > 7 else None
    # Position 7 is vLLM's lora_name, or SGLang's metadata map ({"cache_salt": ...}).
    salt, lora_name = (_salt_of(at7), None) if type(at7) is dict else (None, at7)
    event = _stored(
        ev[1],
        ev[2],
        ev[3],
        ev[4],
        ev[5] if n > 5 else None,
        ev[6] if n > 6 else None,
        lora_name,
        None,
        None,
        salt,
    )
    return event, 0


def _stored_from_map(ev: dict[Any, Any]) -> tuple[BlockStored, int]:
    get = ev.get
    if "block_hashes" not in ev or "block_size" not in ev:
        raise WireError("BlockStored map needs block_hashes and block_size")
    salt = get("cache_salt")
    if salt is None:
        metadata = get("metadata")
        if metadata is not None:
            salt = _salt_of(metadata)
    elif type(salt) is not str:
        raise WireError("cache_salt must be a string or nil")
    event = _stored(
        ev["block_hashes"],
        get("parent_block_hash"),
        get("token_ids"),
        ev["block_size"],
        get("lora_id"),
        get("medium"),
        get("lora_name"),
        get("extra_keys"),
        get("group_idx"),
        salt,
    )
    return event, (0 if ev.keys() <= _STORED_KNOWN else len(ev.keys() - _STORED_KNOWN))


def _removed_from_array(ev: list[Any]) -> tuple[BlockRemoved, int]:
    n = len(ev)
    if n < 2:
        raise WireError("BlockRemoved array needs block_hashes")
    event = _removed(ev[1], ev[2] if n > 2 else None, ev[3] if n > 3 else None)
    return event, max(0, n - _REMOVED_MAX_POSITIONS)


def _removed_from_map(ev: dict[Any, Any]) -> tuple[BlockRemoved, int]:
    if "block_hashes" not in ev:
        raise WireError("BlockRemoved map needs block_hashes")
    get = ev.get
    event = _removed(ev["block_hashes"], get("medium"), get("group_idx"))
    return event, (0 if ev.keys() <= _REMOVED_KNOWN else len(ev.keys() - _REMOVED_KNOWN))


def _unknown_keys(ev: dict[Any, Any], known: frozenset[str]) -> int:
    return 0 if ev.keys() <= known else len(ev.keys() - known)


_CLEARED = AllBlocksCleared()


def decode_events(raw_events: object) -> tuple[list[KVEvent], int, int, int]:
    """Decode an events array: ``(events, unknown_events, unknown_fields, malformed_events)``."""
    if type(raw_events) is not list:
        raise WireError("batch events must be an array")
    out: list[KVEvent] = []
    unknown_events = unknown_fields = malformed = 0
    append = out.append
    new, set_hashes, set_medium, set_group = _new, *_REMOVED_SET
    mask = U64_MASK
    for ev in raw_events:
        kind = type(ev)
        try:
            if kind is dict:
                tag = ev.get("type")
                if tag == "BlockRemoved":
                    # The most frequent event (one per evicted block): a fast path for the
                    # usual {type, block_hashes, medium} with int hashes, the general one else.
                    hashes = ev.get("block_hashes")
                    medium = ev.get("medium")
                    if (
                        len(ev) == 3
                        and type(hashes) is list
                        and (medium is None or type(medium) is str)
                        and "medium" in ev
                    ):
                        try:
                            folded = [h & mask for h in hashes]
                        except TypeError:
                            pass
                        else:
                            removed = new(BlockRemoved)
                            set_hashes(removed, folded)
                            set_medium(removed, medium)
                            set_group(removed, None)
                            append(removed)
                            continue
                    event, extra = _removed_from_map(ev)
                elif tag == "BlockStored":
                    event, extra = _stored_from_map(ev)  # type: ignore[assignment]
                elif tag == "AllBlocksCleared":
                    event, extra = _CLEARED, _unknown_keys(ev, _CLEARED_KNOWN)  # type: ignore[assignment]
                elif type(tag) is str:
                    unknown_events += 1
                    continue
                else:
                    malformed += 1
                    continue
            elif kind is list:
                tag = ev[0] if ev else None
                if tag == "BlockRemoved":
                    event, extra = _removed_from_array(ev)
                elif tag == "BlockStored":
                    event, extra = _stored_from_array(ev)  # type: ignore[assignment]
                elif tag == "AllBlocksCleared":
                    event, extra = _CLEARED, len(ev) - 1  # type: ignore[assignment]
                elif type(tag) is str:
                    unknown_events += 1
                    continue
                else:
                    malformed += 1
                    continue
            else:
                malformed += 1
                continue
        except WireError:
            malformed += 1
            continue
        unknown_fields += extra
        append(event)
    return out, unknown_events, unknown_fields, malformed


def _ts(value: object) -> float:
    if type(value) is float or type(value) is int:
        ts = float(value)
        if math.isfinite(ts):
            return ts
    raise WireError("batch ts must be a finite number")


def decode_batch(payload: bytes) -> EventBatch:
    """Decode one msgpack batch payload into typed events.

    Batches in a fully understood shape take the typed fast path (``kvevents.decode_fast``);
    everything else, including anything to skip and count, the generic one below.
    """
    fast = decode_fast(payload)
    if fast is not None:
        return fast
    return decode_batch_generic(payload)


def decode_batch_generic(payload: bytes) -> EventBatch:
    """The tolerant decoder: ``msgpack.unpackb`` and per-event checks by shape and name."""
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise WireError(f"payload is not valid msgpack: {type(exc).__name__}: {exc}") from None
    extra_fields = 0
    if type(obj) is list:
        if len(obj) == 2:
            ts, raw_events = obj
            rank = None
        elif len(obj) >= 3:
            ts, raw_events, rank = obj[0], obj[1], obj[2]
            extra_fields = len(obj) - 3
        else:
            raise WireError(f"batch array needs [ts, events, dp_rank?], got {len(obj)} elements")
    elif type(obj) is dict:
        if "ts" not in obj or "events" not in obj:
            raise WireError("map batch needs ts and events")
        ts, raw_events = obj["ts"], obj["events"]
        rank = obj.get("data_parallel_rank", obj.get("attn_dp_rank"))
        extra_fields = len(obj.keys() - {"ts", "events", "data_parallel_rank", "attn_dp_rank"})
    else:
        raise WireError(f"batch must be an array or a map, got {type(obj).__name__}")
    if rank is not None and type(rank) is not int:
        raise WireError("data_parallel_rank must be an int or nil")
    events, unknown_events, unknown_fields, malformed = decode_events(raw_events)
    return EventBatch(
        _ts(ts),
        events,
        rank,
        unknown_events=unknown_events,
        unknown_fields=unknown_fields + extra_fields,
        malformed_events=malformed,
    )
