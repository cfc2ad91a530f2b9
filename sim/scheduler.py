"""Continuous batching as vLLM v1 schedules it, over ``sim.kv_cache.KVCache``.

Each step has a token budget (``max_num_batched_tokens``). Running requests go first, in
admission order: a decoding request takes one token, a request still prefilling takes the next
chunk. When the cache cannot hold a running request's next tokens, the most recently admitted
running request is preempted (its blocks freed, its progress dropped, back to the head of the
queue to be recomputed). Then, if nothing was preempted, waiting requests are admitted in FIFO
order while there is budget, a free sequence slot (``max_num_seqs``) and room in the cache: a
request first reuses the longest cached prefix of its full blocks (never its last token, which
must be computed to produce logits), then prefills the rest in chunks. Blocks become cached as
soon as the tokens filling them are scheduled, so a request admitted later in the same step
already hits them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from sim.kv_cache import KVCache
from sim.vllm_hash import ExtraKeys, hash_block_tokens


@dataclass(slots=True, eq=False)
class Request:
    """Engine-side state of one request (mutable; owned by the scheduler)."""

    req_id: str
    token_ids: list[int]
    """Prompt followed by the tokens generated so far."""
    num_prompt_tokens: int
    output_plan: tuple[int, ...]
    stops_naturally: bool
    arrival: float
    salt: ExtraKeys = None
    num_computed: int = 0
    block_ids: list[int] = field(default_factory=list)
    digests: list[bytes] = field(default_factory=list)
    num_cached_blocks: int = 0
    num_cached_tokens: int | None = None
    """Prefix-cache hit (tokens) at first admission; None until admitted."""
    num_output: int = 0
    first_token_time: float | None = None
    num_preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def max_output(self) -> int:
        return len(self.output_plan)


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    request: Request
    start: int
    """Tokens already computed before this step."""
    num_tokens: int

    @property
    def is_decode(self) -> bool:
        return self.start >= self.request.num_prompt_tokens and self.num_tokens == 1


@dataclass(slots=True)
class PrefixCacheCounters:
    requests: int = 0
    queries: int = 0
    hits: int = 0


class Scheduler:
    def __init__(
        self,
        kv: KVCache,
        root_hash: bytes,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = True,
        enable_prefix_caching: bool = True,
    ) -> None:
        self.kv = kv
        self.root_hash = root_hash
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.enable_prefix_caching = enable_prefix_caching
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.prefix_cache = PrefixCacheCounters()
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def remove(self, req: Request) -> None:
        """Drop a request wherever it is and release its blocks (finish or abort)."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self._release(req)

    def preempt_all(self) -> None:
        while self.running:
            self._preempt(self.running.pop())

    def schedule(self) -> tuple[list[ScheduledChunk], int]:
        """Pick this step's work; returns the chunks and how many requests were preempted."""
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted_before = self.num_preemptions
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed, budget)
            if not self._make_room(req, n):
                break
            chunks.append(self._scheduled(req, n))
            budget -= n
            i += 1
        preempted = self.num_preemptions - preempted_before
        if preempted:
            return chunks, preempted
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            chunk = self._admit(req, budget)
            if chunk is None:
                break
            self.waiting.popleft()
            self.running.append(req)
            chunks.append(chunk)
            budget -= chunk.num_tokens
        return chunks, preempted

    def hit_blocks(self, req: Request) -> list[int]:
        """Cached blocks ``req`` would reuse now: full blocks, never covering its last token
        (none without prefix caching)."""
        if not self.enable_prefix_caching:
            return []
        limit = (req.num_tokens - 1) // self.kv.block_size
        self._hash_up_to(req, limit)
        return self.kv.cached_prefix(req.digests[:limit])

    # -- internals ---------------------------------------------------------------------------

    def _admit(self, req: Request, budget: int) -> ScheduledChunk | None:
        bs = self.kv.block_size
        hit = self.hit_blocks(req)
        computed = len(hit) * bs
        n = req.num_tokens - computed
        if not self.enable_chunked_prefill and n > budget:
            return None
        n = min(n, budget)
        need = -(-(computed + n) // bs) - len(hit)
        if need > self.kv.num_free - self.kv.num_reusable(hit):
            return None
        self.kv.touch(hit)
        req.block_ids = hit + self.kv.allocate(need)
        req.num_computed = computed
        req.num_cached_blocks = len(hit)
        if req.num_cached_tokens is None:
            req.num_cached_tokens = computed
            self.prefix_cache.requests += 1
            self.prefix_cache.queries += req.num_tokens
            self.prefix_cache.hits += computed
        return self._scheduled(req, n)

    def _make_room(self, req: Request, n: int) -> bool:
        """Give a running request blocks for ``n`` more tokens, preempting from the tail of the
        running list until they fit; False when ``req`` itself had to be preempted."""
        need = -(-(req.num_computed + n) // self.kv.block_size) - len(req.block_ids)
        while need > self.kv.num_free:
            victim = self.running.pop()
            self._preempt(victim)
            if victim is req:
                return False
        if need > 0:
            req.block_ids.extend(self.kv.allocate(need))
        return True

    def _scheduled(self, req: Request, n: int) -> ScheduledChunk:
        chunk = ScheduledChunk(req, req.num_computed, n)
        self._cache_full_blocks(req, req.num_computed + n)
        return chunk

    def _cache_full_blocks(self, req: Request, num_tokens: int) -> None:
        bs = self.kv.block_size
        full = min(num_tokens, req.num_tokens) // bs
        first = req.num_cached_blocks
        if full <= first:
            return
        self._hash_up_to(req, full)
        self.kv.cache(
            req.block_ids[first:full],
            req.digests[first:full],
            req.digests[first - 1] if first > 0 else None,
            req.token_ids[first * bs : full * bs],
            [req.salt if i == 0 else None for i in range(first, full)],
        )
        req.num_cached_blocks = full

    def _hash_up_to(self, req: Request, num_blocks: int) -> None:
        bs = self.kv.block_size
        while len(req.digests) < num_blocks:
            i = len(req.digests)
            parent = req.digests[-1] if req.digests else self.root_hash
            tokens = req.token_ids[i * bs : (i + 1) * bs]
            req.digests.append(hash_block_tokens(parent, tokens, req.salt if i == 0 else None))

    def _preempt(self, req: Request) -> None:
        self._release(req)
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _release(self, req: Request) -> None:
        if req.block_ids:
            self.kv.free(req.block_ids[::-1])
        req.block_ids = []
        req.num_computed = 0
        req.num_cached_blocks = 0
