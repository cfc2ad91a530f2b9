"""The paged prefix cache: LRU eviction, reference counts, duplicates, events."""

from __future__ import annotations

import hashlib

import pytest

from kvevents.events import AllBlocksCleared, BlockRemoved, BlockStored
from sim.kv_cache import KVCache
from sim.vllm_hash import to_u64


def digest(i: int) -> bytes:
    return hashlib.sha256(i.to_bytes(4, "big")).digest()


def store(kv: KVCache, blocks: list[int], keys: list[int], parent: int | None = None) -> None:
    kv.cache(
        blocks,
        [digest(k) for k in keys],
        None if parent is None else digest(parent),
        list(range(len(blocks) * kv.block_size)),
    )


def test_cache_emits_one_block_stored_with_chain_and_tokens() -> None:
    kv = KVCache(num_blocks=4, block_size=2)
    blocks = kv.allocate(2)
    store(kv, blocks, [1, 2], parent=0)
    pending = kv.take_events()
    assert pending.events == [
        BlockStored(
            block_hashes=[to_u64(digest(1)), to_u64(digest(2))],
            parent_block_hash=to_u64(digest(0)),
            token_ids=[0, 1, 2, 3],
            block_size=2,
            medium="GPU",
            group_idx=0,
        )
    ]
    assert pending.digests[to_u64(digest(1))] == digest(1)
    assert kv.take_events().events == []


def test_freed_blocks_keep_their_hash_and_are_evicted_least_recently_freed_first() -> None:
    kv = KVCache(num_blocks=3, block_size=1)
    blocks = kv.allocate(3)
    store(kv, blocks, [10, 11, 12])
    kv.take_events()
    kv.free([blocks[1], blocks[0], blocks[2]])
    assert kv.num_free == 3
    assert kv.cached_prefix([digest(10), digest(11)]) == [blocks[0], blocks[1]]
    kv.allocate(1)
    assert kv.take_events().events == [
        BlockRemoved(block_hashes=[to_u64(digest(11))], medium="GPU", group_idx=0)
    ]
    assert kv.cached_prefix([digest(10), digest(11)]) == [blocks[0]]


def test_touched_blocks_leave_the_free_queue_and_survive_eviction() -> None:
    kv = KVCache(num_blocks=2, block_size=1)
    blocks = kv.allocate(2)
    store(kv, blocks, [1, 2])
    kv.free(blocks)
    kv.take_events()
    kv.touch([blocks[0]])
    assert kv.num_free == 1 and kv.num_reusable(blocks) == 1
    kv.allocate(1)
    removed = kv.take_events().events
    assert removed == [BlockRemoved(block_hashes=[to_u64(digest(2))], medium="GPU", group_idx=0)]
    with pytest.raises(RuntimeError):
        kv.allocate(1)


def test_same_hash_in_two_blocks_is_counted_twice_and_removed_once_per_copy() -> None:
    kv = KVCache(num_blocks=2, block_size=1)
    a, b = kv.allocate(2)
    store(kv, [a], [7])
    store(kv, [b], [7])
    assert kv.cached_hashes() == {to_u64(digest(7)): 2}
    kv.free([a, b])
    kv.take_events()
    kv.allocate(1)
    assert kv.cached_hashes() == {to_u64(digest(7)): 1}
    assert len(kv.take_events().events) == 1


def test_reset_is_refused_while_blocks_are_referenced() -> None:
    kv = KVCache(num_blocks=2, block_size=1)
    blocks = kv.allocate(1)
    store(kv, blocks, [1])
    kv.take_events()
    assert kv.reset() is False
    assert kv.take_events().events == []
    kv.free(blocks)
    assert kv.reset() is True
    assert kv.take_events().events == [AllBlocksCleared()]
    assert kv.cached_hashes() == {}
    assert kv.cached_prefix([digest(1)]) == []


def test_usage_counts_referenced_blocks_only() -> None:
    kv = KVCache(num_blocks=4, block_size=1)
    blocks = kv.allocate(3)
    assert kv.usage == pytest.approx(0.75)
    kv.free(blocks)
    assert kv.usage == 0.0


def test_misuse_is_rejected() -> None:
    kv = KVCache(num_blocks=2, block_size=2)
    (b,) = kv.allocate(1)
    with pytest.raises(ValueError):
        kv.cache([b], [digest(1)], None, [1])  # tokens must fill the block
    store(kv, [b], [1])
    with pytest.raises(RuntimeError):
        store(kv, [b], [2])  # already cached
    kv.free([b])
    with pytest.raises(RuntimeError):
        kv.free([b])  # ref count already zero
    with pytest.raises(ValueError):
        KVCache(num_blocks=0, block_size=16)
