"""vLLM's prefix-cache block hashing (``sha256_cbor``), so simulated engines publish real hashes.

A block hash is ``sha256(cbor2.dumps((parent, tuple(tokens), extra_keys), canonical=True))``,
chained from ``NONE_HASH = sha256(cbor2.dumps(seed, canonical=True))`` where ``seed`` is the
engine's ``PYTHONHASHSEED`` string. Events carry the last 8 bytes of the digest, big-endian,
unless the engine is told to publish the raw 32 bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import cbor2

_U64 = (1 << 64) - 1
ExtraKeys = tuple[object, ...] | None


def sha256_cbor(obj: object) -> bytes:
    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


def none_hash(seed: str) -> bytes:
    """The parent of block 0: the hash of the seed string itself."""
    return sha256_cbor(seed)


def hash_block_tokens(parent: bytes, tokens: Sequence[int], extra_keys: ExtraKeys = None) -> bytes:
    return sha256_cbor((parent, tuple(tokens), extra_keys))


def block_hashes(
    root: bytes,
    token_ids: Sequence[int],
    block_size: int,
    extra_keys: Sequence[ExtraKeys] = (),
) -> list[bytes]:
    """Digests of every full block of ``token_ids``; ``extra_keys[i]`` applies to block ``i``."""
    out: list[bytes] = []
    parent = root
    for i in range(len(token_ids) // block_size):
        extra = extra_keys[i] if i < len(extra_keys) else None
        parent = hash_block_tokens(parent, token_ids[i * block_size : (i + 1) * block_size], extra)
        out.append(parent)
    return out


def to_u64(digest: bytes) -> int:
    """The value vLLM publishes by default: the digest's last 8 bytes, big-endian."""
    return int.from_bytes(digest[-8:], "big") & _U64
