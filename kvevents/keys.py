"""The router's own chained block keys, and the engine-hash -> key map that resolves removals.

Engines hash blocks with an algorithm and seed of their own (vLLM: sha256 over pickle or CBOR,
seeded by ``PYTHONHASHSEED``; SGLang: SHA-256 over raw tokens, truncated differently). Rather
than reproduce each, the router computes its own key for every full block from the token ids
carried in ``BlockStored``::

    root        = xxh3_64(b"kvmesh/keys/v1")                      (no LoRA, no salt)
                  xxh3_64(b"kvmesh/keys/v1\\0" + msgpack([lora_name, salt]))   (namespaced)
    key[i]      = xxh3_64(tokens of block i as u32 LE [+ extras], seed=key[i-1])

A request's token ids give the same keys (:func:`request_keys`), whatever engine, version, hash
algorithm or seed produced the events. Engine hashes only serve to find a stored block again:
``BlockRemoved`` carries hashes, no tokens, so each replica keeps ``engine hash -> key`` with a
reference count (vLLM stores the same hash twice when two physical blocks hold it).

The parent key enters as XXH3's 64-bit seed, which XXH3 mixes into every input lane just as it
would 8 leading bytes of input, without building that input (the hot path of ingestion).

Decisions, documented in docs/kvevents.md:

- only full blocks get keys; a trailing partial chunk of ``token_ids`` is ignored;
- an unknown non-None parent is a chain break: the event is skipped and counted (the blocks
  cannot be placed in the chain); parent ``0`` that is unknown is taken as "no parent", as the
  llm-d simulator encodes it;
- a block's extra keys other than its LoRA name (multimodal identifiers, embeddings hashes)
  are mixed into its key, so a text-only request never matches an image block; on a root block,
  a single leftover string is vLLM's cache salt and namespaces the chain like SGLang's salt;
- a key is held while any ``(medium, hash)`` entry references it; the index sees a store when
  the first reference appears and a remove when the last one goes.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence
from typing import Protocol

import msgpack  # type: ignore[import-untyped,unused-ignore]
import xxhash

from kvevents.decode import WireError


class StoredLike(Protocol):
    """What ``EngineKeyMap.stored`` reads: ``BlockStored``, or the decoder's typed fast form."""

    @property
    def block_hashes(self) -> Sequence[int]: ...
    @property
    def parent_block_hash(self) -> int | None: ...
    @property
    def token_ids(self) -> Sequence[int] | None: ...
    @property
    def block_size(self) -> int: ...
    @property
    def lora_id(self) -> int | None: ...
    @property
    def medium(self) -> str | None: ...
    @property
    def lora_name(self) -> str | None: ...
    @property
    def extra_keys(self) -> Sequence[object] | None: ...
    @property
    def cache_salt(self) -> str | None: ...


class RemovedLike(Protocol):
    @property
    def block_hashes(self) -> Sequence[int]: ...
    @property
    def medium(self) -> str | None: ...


_xxh3 = xxhash.xxh3_64_intdigest
_DOMAIN = b"kvmesh/keys/v1"
ROOT_KEY = _xxh3(_DOMAIN)
"""Parent of the first block of every chain without LoRA or salt."""

_TOKEN_CODE = "I" if array("I").itemsize == 4 else "L"
if array(_TOKEN_CODE).itemsize != 4:  # pragma: no cover - no such platform in use
    raise ImportError("need a 4-byte unsigned array type for token ids")
_SWAP = sys.byteorder == "big"
_EXTRA_SEP = b"\xffx"


def token_bytes(token_ids: Sequence[int]) -> bytes:
    """Token ids as little-endian u32 bytes; raises ``WireError`` for ids outside [0, 2**32)."""
    try:
        arr = array(_TOKEN_CODE, token_ids)
    except (OverflowError, TypeError) as exc:
        raise WireError(f"token ids must be ints in [0, 2**32): {exc}") from None
    if _SWAP:  # pragma: no cover - big-endian hosts
        arr.byteswap()
    return arr.tobytes()


def root_key(lora_name: str | None = None, salt: str | None = None) -> int:
    """The namespace a chain starts from: one per (LoRA adapter, cache salt)."""
    if lora_name is None and salt is None:
        return ROOT_KEY
    return _xxh3(_DOMAIN + b"\0" + msgpack.packb([lora_name, salt]))


def chain_keys(parent: int, token_ids: Sequence[int], block_size: int) -> list[int]:
    """Keys of the full blocks of ``token_ids``, chained from ``parent``."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    step = block_size * 4
    data = token_bytes(token_ids[: (len(token_ids) // block_size) * block_size])
    # Each key is the hash of its block seeded with the key before it (a comprehension: no
    # method call per block).
    return [parent := _xxh3(data[start : start + step], parent)
            for start in range(0, len(data), step)]


def request_keys(
    token_ids: Sequence[int],
    block_size: int,
    lora_name: str | None = None,
    salt: str | None = None,
) -> list[int]:
    """The keys a request's prompt would have once cached: one per full block."""
    return chain_keys(root_key(lora_name, salt), token_ids, block_size)


class EngineKeyMap:
    """One replica's ``(medium, engine hash) -> router key`` map with reference counts.

    ``stored``/``removed`` return the keys whose presence changed, which is exactly what the
    replica's slice of the index must learn. Counters say what could not be resolved.
    """

    __slots__ = (
        "_key_refs",
        "_tables",
        "block_mismatches",
        "block_sizes",
        "chain_breaks",
        "hash_conflicts",
        "skipped_blocks",
        "unknown_locations",
        "unknown_removals",
    )

    def __init__(self) -> None:
        # (medium) -> engine hash -> key, or [key, key, ...] when stored more than once.
        self._tables: dict[str | None, dict[int, int | list[int]]] = {}
        self._key_refs: dict[int, int] = {}
        self.block_sizes: dict[int, int] = {}
        """Store events seen per block size (the router chunks requests by the usual one)."""
        self.chain_breaks = 0
        self.skipped_blocks = 0
        self.unknown_removals = 0
        self.unknown_locations = 0
        self.block_mismatches = 0
        self.hash_conflicts = 0

    # -- queries -------------------------------------------------------------------------
    @property
    def block_size(self) -> int | None:
        """The block size most store events carried, or None before any."""
        if not self.block_sizes:
            return None
        return max(self.block_sizes.items(), key=lambda kv: (kv[1], -kv[0]))[0]

    def held_keys(self) -> set[int]:
        return set(self._key_refs)

    def __len__(self) -> int:
        return len(self._key_refs)

    def key_of(self, block_hash: int, medium: str | None = None) -> int | None:
        table = self._tables.get(medium)
        refs = table.get(block_hash) if table is not None else None
        return _last(refs)

    # -- updates -------------------------------------------------------------------------
    def clear(self) -> None:
        self._tables.clear()
        self._key_refs.clear()

    def _find(self, block_hash: int, table: dict[int, int | list[int]]) -> int | None:
        key = _last(table.get(block_hash))
        if key is not None:
            return key
        for other in self._tables.values():
            key = _last(other.get(block_hash))
            if key is not None:
                return key
        return None

    def _ref(
        self, table: dict[int, int | list[int]], block_hash: int, key: int, new: list[int]
    ) -> None:
        refs = table.get(block_hash)
        if refs is None:
            table[block_hash] = key
        else:
            if _last(refs) != key:
                self.hash_conflicts += 1
            table[block_hash] = [refs, key] if isinstance(refs, int) else [*refs, key]
        count = self._key_refs.get(key, 0)
        self._key_refs[key] = count + 1
        if count == 0:
            new.append(key)

    def stored(self, ev: StoredLike) -> list[int]:
        """Keys this replica holds from now on that it did not hold before."""
        table = self._tables.get(ev.medium)
        if table is None:
            table = self._tables[ev.medium] = {}
        hashes = ev.block_hashes
        new: list[int] = []
        tokens = ev.token_ids
        if not tokens:
            # A location update (e.g. offloaded to CPU): same blocks, another medium.
            for h in hashes:
                key = self._find(h, table)
                if key is None:
                    self.unknown_locations += 1
                else:
                    self._ref(table, h, key, new)
            return new

        size = ev.block_size
        sizes = self.block_sizes
        sizes[size] = sizes.get(size, 0) + 1
        n_tokens = len(tokens)
        full = n_tokens // size
        count = len(hashes)
        if full != count:
            self.block_mismatches += 1
            count = min(full, count)

        # The namespace (LoRA, salt) only matters where a chain starts, and extra keys only
        # when present: most stores continue a known chain and skip all of it.
        parent_hash = ev.parent_block_hash
        extra_keys = ev.extra_keys
        extras: list[object] | None = None
        parent: int | None = None
        if parent_hash is not None:
            found = table.get(parent_hash)
            parent = found if isinstance(found, int) else self._find(parent_hash, table)
            if parent is None and parent_hash != 0:
                self.chain_breaks += 1
                self.skipped_blocks += count
                return new
        if parent is None or extra_keys:
            lora = ev.lora_name
            if lora is None and ev.lora_id is not None:
                lora = f"lora-id:{ev.lora_id}"
            salt = ev.cache_salt
            if extra_keys:
                extra_salt, extras = _block_extras(ev, lora, count)
                if salt is None:
                    salt = extra_salt
            if parent is None:  # a root (or the simulator's unknown parent 0)
                parent = root_key(lora, salt)

        step = size * 4
        try:
            arr = array(_TOKEN_CODE, tokens if full * size == n_tokens else tokens[: full * size])
        except (OverflowError, TypeError) as exc:
            raise WireError(f"token ids must be ints in [0, 2**32): {exc}") from None
        if _SWAP:  # pragma: no cover - big-endian hosts
            arr.byteswap()
        data = arr.tobytes()
        key_refs = self._key_refs
        pos = 0
        for i in range(count):
            chunk = data[pos : pos + step]
            pos += step
            if extras is not None and extras[i] is not None:
                chunk += _EXTRA_SEP + msgpack.packb(extras[i])
            parent = _xxh3(chunk, parent)
            # Reference the key from this (medium, hash): inline, it is the hot loop.
            h = hashes[i]
            refs = table.get(h)
            if refs is None:
                table[h] = parent
            else:
                if _last(refs) != parent:
                    self.hash_conflicts += 1
                table[h] = [refs, parent] if isinstance(refs, int) else [*refs, parent]
            n = key_refs.get(parent, 0)
            key_refs[parent] = n + 1
            if n == 0:
                new.append(parent)
        return new

    def removed(self, ev: RemovedLike) -> list[int]:
        """Keys this replica no longer holds in any medium."""
        table = self._tables.get(ev.medium)
        gone: list[int] = []
        if table is None:
            self.unknown_removals += len(ev.block_hashes)
            return gone
        key_refs = self._key_refs
        for h in ev.block_hashes:
            refs = table.get(h)
            if refs is None:
                self.unknown_removals += 1
                continue
            if isinstance(refs, int):
                key = refs
                del table[h]
            else:
                key = refs.pop()
                if len(refs) == 1:
                    table[h] = refs[0]
            count = key_refs[key] - 1
            if count:
                key_refs[key] = count
            else:
                del key_refs[key]
                gone.append(key)
        return gone


def _last(refs: int | list[int] | None) -> int | None:
    """The most recent key stored under one engine hash."""
    if refs is None or isinstance(refs, int):
        return refs
    return refs[-1]


def _block_extras(
    ev: StoredLike, lora: str | None, count: int
) -> tuple[str | None, list[object] | None]:
    """``(salt, extras)``: the cache salt vLLM put in the root block's extra keys, and per-block
    extras to mix into keys (aligned with the blocks, ``None`` = nothing), after dropping what
    the namespace already carries (the LoRA name or id).
    """
    raw = ev.extra_keys or ()
    root = ev.parent_block_hash is None
    salt: str | None = None
    out: list[object] = [None] * count
    any_left = False
    for i in range(min(count, len(raw))):
        entry = raw[i]
        if entry is None:
            continue
        items = entry if isinstance(entry, list | tuple) else [entry]
        left: list[object] = []
        for item in items:
            if item is None or item == lora or (lora is not None and item == ev.lora_id):
                continue
            if isinstance(item, dict):
                kind = item.get("type")
                if kind == "lora":
                    continue
                if kind == "cache_salt" and i == 0 and root:
                    value = next((v for k, v in item.items() if k != "type"), None)
                    if isinstance(value, str):
                        salt = value
                        continue
            left.append(item)
        if i == 0 and root and salt is None and len(left) == 1 and isinstance(left[0], str):
            salt = left[0]
        elif left:
            out[i] = left
            any_left = True
    return salt, (out if any_left else None)
