"""The wire form of every replicated type: msgpack with an explicit schema version.

``encode`` wraps a ``Delta.to_wire()`` value (or a digest) as ``[SCHEMA_VERSION, obj]``;
``decode`` reverses it under size and depth limits and raises ``DecodeError`` for anything
corrupt, truncated, foreign or too big -- never another exception, so a gossip loop can
count the bad message and carry on. Decoding only yields plain primitives (None, bool, int,
float, str, bytes, list, dict with str keys); each type's ``delta_from_wire`` then checks the
shape with the ``as_*`` helpers below, which raise ``DecodeError`` with a reason.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import msgpack  # type: ignore[import-untyped,unused-ignore]

from crdt.base import DecodeError, Version

SCHEMA_VERSION = 1
"""Bumped on any incompatible change of any type's wire form."""

MAX_MESSAGE_BYTES = 64 << 20
"""A full snapshot of a large index is tens of MB; anything bigger is not ours."""

MAX_DEPTH = 16
"""Our deepest form (delta -> pieces -> piece -> value) is well under this."""

MAX_INT = (1 << 64) - 1
MIN_INT = -(1 << 63)

__all__ = [
    "MAX_DEPTH",
    "MAX_MESSAGE_BYTES",
    "SCHEMA_VERSION",
    "as_bool",
    "as_bytes",
    "as_float",
    "as_int",
    "as_list",
    "as_str",
    "check_plain",
    "decode",
    "digest_from_wire",
    "digest_to_wire",
    "encode",
]


def encode(obj: object) -> bytes:
    """``obj`` (msgpack primitives) as versioned bytes."""
    out: bytes = msgpack.packb([SCHEMA_VERSION, obj], use_bin_type=True)
    return out


def decode(
    data: bytes | bytearray | memoryview,
    *,
    max_bytes: int = MAX_MESSAGE_BYTES,
    max_depth: int = MAX_DEPTH,
) -> object:
    """The object ``encode`` wrapped; ``DecodeError`` for anything else."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"expected bytes, got {type(data).__name__}")
    size = len(data)
    if size > max_bytes:
        raise DecodeError(f"message of {size} bytes exceeds the limit of {max_bytes}")
    if size == 0:
        raise DecodeError("empty message")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            timestamp=0,
        )
    except Exception as exc:  # msgpack raises a zoo of types for bad input
        raise DecodeError(f"not valid msgpack: {type(exc).__name__}: {exc}") from None
    check_plain(obj, max_depth)
    if not isinstance(obj, list) or len(obj) != 2:
        raise DecodeError("not a kvmesh message: expected [schema, body]")
    schema = obj[0]
    if type(schema) is not int or schema != SCHEMA_VERSION:
        raise DecodeError(f"unsupported schema version {schema!r} (we speak {SCHEMA_VERSION})")
    return obj[1]


_SCALARS = (type(None), bool, int, float, str, bytes)


def check_plain(obj: object, max_depth: int = MAX_DEPTH) -> None:
    """Only plain primitives, nested at most ``max_depth`` deep (iterative: no recursion)."""
    stack: list[tuple[object, int]] = [(obj, 0)]
    while stack:
        item, depth = stack.pop()
        if type(item) in _SCALARS:
            continue
        if depth >= max_depth:
            raise DecodeError(f"nested deeper than {max_depth}")
        if type(item) is list:
            stack.extend((x, depth + 1) for x in item)
        elif type(item) is dict:
            if not all(type(k) is str for k in item):
                raise DecodeError("map keys must be strings")
            stack.extend((v, depth + 1) for v in item.values())
        else:
            raise DecodeError(f"unsupported value of type {type(item).__name__}")


# ---- strict shape checks for delta_from_wire -------------------------------------------


def as_list(
    obj: object, what: str, length: int | None = None, max_len: int | None = None
) -> list[Any]:
    if type(obj) is not list:
        raise DecodeError(f"{what}: expected a list, got {type(obj).__name__}")
    if length is not None and len(obj) != length:
        raise DecodeError(f"{what}: expected {length} items, got {len(obj)}")
    if max_len is not None and len(obj) > max_len:
        raise DecodeError(f"{what}: {len(obj)} items exceeds {max_len}")
    return obj


def as_int(obj: object, what: str, lo: int = MIN_INT, hi: int = MAX_INT) -> int:
    if type(obj) is not int:  # bool is rejected on purpose
        raise DecodeError(f"{what}: expected an int, got {type(obj).__name__}")
    if not lo <= obj <= hi:
        raise DecodeError(f"{what}: {obj} outside [{lo}, {hi}]")
    return obj


def as_float(obj: object, what: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    if type(obj) is int:
        obj = float(obj)
    if type(obj) is not float or not math.isfinite(obj):
        raise DecodeError(f"{what}: expected a finite number, got {obj!r}")
    if not lo <= obj <= hi:
        raise DecodeError(f"{what}: {obj} outside [{lo}, {hi}]")
    return obj


def as_bool(obj: object, what: str) -> bool:
    if type(obj) is not bool:
        raise DecodeError(f"{what}: expected a bool, got {type(obj).__name__}")
    return obj


def as_str(obj: object, what: str, max_len: int = 1024, allow_empty: bool = False) -> str:
    if type(obj) is not str:
        raise DecodeError(f"{what}: expected a str, got {type(obj).__name__}")
    if not obj and not allow_empty:
        raise DecodeError(f"{what}: empty string")
    if len(obj) > max_len:
        raise DecodeError(f"{what}: string of {len(obj)} chars exceeds {max_len}")
    return obj


def as_bytes(obj: object, what: str, multiple_of: int = 1) -> bytes:
    if type(obj) is not bytes:
        raise DecodeError(f"{what}: expected bytes, got {type(obj).__name__}")
    if len(obj) % multiple_of:
        raise DecodeError(f"{what}: length {len(obj)} is not a multiple of {multiple_of}")
    return obj


# ---- digests ---------------------------------------------------------------------------------


def digest_to_wire(digest: Mapping[str, Version]) -> dict[str, list[int]]:
    """A digest as msgpack primitives (sorted, so equal digests encode to equal bytes)."""
    return {origin: [int(v[0]), int(v[1])] for origin, v in sorted(digest.items())}


def digest_from_wire(obj: object, max_origins: int = 1 << 20) -> dict[str, Version]:
    """The inverse of ``digest_to_wire``; ``DecodeError`` for anything malformed."""
    if type(obj) is not dict:
        raise DecodeError(f"digest: expected a map, got {type(obj).__name__}")
    if len(obj) > max_origins:
        raise DecodeError(f"digest: {len(obj)} origins exceeds {max_origins}")
    out: dict[str, Version] = {}
    for origin, value in obj.items():
        name = as_str(origin, "digest origin", max_len=4096)
        pair = as_list(value, f"digest[{name!r}]", length=2)
        out[name] = (
            as_int(pair[0], f"digest[{name!r}][0]"),
            as_int(pair[1], f"digest[{name!r}][1]"),
        )
    return out
