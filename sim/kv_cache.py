"""A paged KV cache with prefix caching, behaving like vLLM v1's block pool.

What matters for routing is reproduced faithfully, because routers learn the cache only from
the events this pool emits:

- capacity is a number of blocks of ``block_size`` tokens; only *full* blocks are cached, keyed
  by their chained hash (``sim.vllm_hash``);
- blocks are reference-counted; a block whose count drops to zero goes to the tail of the free
  queue but keeps its hash, so a later request can still hit it;
- allocation takes blocks from the head of the free queue (least recently freed first) and
  evicts the hash such a block still held: one ``BlockRemoved`` per evicted block;
- the same hash may live in two physical blocks (vLLM does not deduplicate, e.g. when a prompt
  recomputes its last block); each copy is stored and removed with its own event, so consumers
  must reference-count;
- ``reset`` (``/reset_prefix_cache``) drops every hash and emits ``AllBlocksCleared``.

Events carry hashes as published by default (``to_u64``); ``take_events`` also returns the full
digests of the hashes it mentions, for publishers configured to send 32-byte hashes.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from kvevents.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from sim.vllm_hash import ExtraKeys, to_u64

MEDIUM = "GPU"


@dataclass(slots=True)
class Block:
    block_id: int
    ref_cnt: int = 0
    digest: bytes | None = None
    """Set while the block is in the prefix cache."""


@dataclass(frozen=True, slots=True)
class PendingEvents:
    events: list[KVEvent]
    digests: dict[int, bytes]
    """Full digest of every hash the events mention (for 32-byte hash publishing)."""


class KVCache:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._blocks = [Block(i) for i in range(num_blocks)]
        # Blocks with ref_cnt 0, least recently freed first. Dict order is the queue.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[bytes, dict[int, Block]] = {}
        self._num_cached = 0
        self._events: list[KVEvent] = []
        self._event_digests: dict[int, bytes] = {}

    # -- queries -----------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks with no reference, including evictable cached ones (vLLM's definition)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def cached_prefix(self, digests: Sequence[bytes]) -> list[int]:
        """Block ids holding the longest cached prefix of ``digests`` (first miss stops)."""
        out: list[int] = []
        for digest in digests:
            copies = self._cached.get(digest)
            if not copies:
                break
            out.append(next(iter(copies)))
        return out

    def num_reusable(self, block_ids: Sequence[int]) -> int:
        """How many of ``block_ids`` sit in the free queue (touching them shrinks it)."""
        return sum(1 for b in block_ids if self._blocks[b].ref_cnt == 0)

    def cached_hashes(self) -> Counter[int]:
        """Published hash -> number of physical blocks holding it: the truth events describe."""
        counts: Counter[int] = Counter()
        for digest, copies in self._cached.items():
            counts[to_u64(digest)] += len(copies)
        return counts

    def num_cached_blocks(self) -> int:
        """Physical blocks holding a hash (a hash held twice counts twice)."""
        return self._num_cached

    def ref_count(self, block_id: int) -> int:
        return self._blocks[block_id].ref_cnt

    # -- mutations ---------------------------------------------------------------------------

    def touch(self, block_ids: Sequence[int]) -> None:
        """Take a reference on cached blocks a request reuses (prefix hit)."""
        for b in block_ids:
            block = self._blocks[b]
            if block.ref_cnt == 0:
                del self._free[b]
            block.ref_cnt += 1

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks from the head of the free queue, evicting hashes they still hold."""
        if n > len(self._free):
            raise RuntimeError(f"cannot allocate {n} blocks, {len(self._free)} free")
        out: list[int] = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            block = self._blocks[b]
            if block.digest is not None:
                self._evict(block)
            block.ref_cnt = 1
            out.append(b)
        return out

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference per block; blocks reaching zero join the free queue in this order.

        Callers pass a request's blocks tail first, so a sequence's tail is evicted before its
        head (as vLLM does).
        """
        for b in block_ids:
            block = self._blocks[b]
            if block.ref_cnt <= 0:
                raise RuntimeError(f"block {b} freed with ref_cnt {block.ref_cnt}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[b] = None

    def cache(
        self,
        block_ids: Sequence[int],
        digests: Sequence[bytes],
        parent: bytes | None,
        token_ids: Sequence[int],
        extra_keys: Sequence[ExtraKeys] | None = None,
    ) -> None:
        """Record newly full blocks of one request in the prefix cache: one ``BlockStored``."""
        if not block_ids:
            return
        if len(block_ids) != len(digests):
            raise ValueError("one digest per block")
        if len(token_ids) != len(block_ids) * self.block_size:
            raise ValueError("token_ids must cover exactly the stored blocks")
        hashes: list[int] = []
        for b, digest in zip(block_ids, digests, strict=True):
            block = self._blocks[b]
            if block.digest is not None:
                raise RuntimeError(f"block {b} is already cached")
            block.digest = digest
            self._cached.setdefault(digest, {})[b] = block
            self._num_cached += 1
            hashes.append(self._note(digest))
        extra = list(extra_keys) if extra_keys and any(k is not None for k in extra_keys) else None
        self._events.append(
            BlockStored(
                block_hashes=hashes,
                parent_block_hash=None if parent is None else self._note(parent),
                token_ids=list(token_ids),
                block_size=self.block_size,
                medium=MEDIUM,
                extra_keys=extra,
                group_idx=0,
            )
        )

    def reset(self) -> bool:
        """Forget every cached hash; refused (False) while any block is referenced, like vLLM."""
        if len(self._free) != self.num_blocks:
            return False
        for block in self._blocks:
            block.digest = None
        self._cached.clear()
        self._num_cached = 0
        self._events.append(AllBlocksCleared())
        return True

    def take_events(self) -> PendingEvents:
        out = PendingEvents(self._events, self._event_digests)
        self._events = []
        self._event_digests = {}
        return out

    # -- internals ---------------------------------------------------------------------------

    def _note(self, digest: bytes) -> int:
        h = to_u64(digest)
        self._event_digests[h] = digest
        return h

    def _evict(self, block: Block) -> None:
        digest = block.digest
        assert digest is not None
        copies = self._cached[digest]
        del copies[block.block_id]
        if not copies:
            del self._cached[digest]
        block.digest = None
        self._num_cached -= 1
        removed = BlockRemoved(block_hashes=[self._note(digest)], medium=MEDIUM, group_idx=0)
        self._events.append(removed)
