"""A sans-I/O model of one vLLM engine: requests in, steps with durations, tokens and KV events out.

The model never reads a clock and never sleeps. The caller passes ``now`` (any monotonic time
base: real seconds, or virtual seconds in the discrete-event simulator) and decides when to run
the next step; ``step(now)`` returns how long that step takes on the profile's hardware. Typical
drivers::

    # discrete-event simulator                      # real-time server (sim/server.py)
    t = 0.0                                         while running:
    engine.add_request("r1", ids, 64, now=t)            result = engine.step(now())
    while engine.has_work():                            publish(result.events)
        r = engine.step(t)                              await sleep(result.duration / speedup)
        t = r.end       # outputs happen at r.end       deliver(result.outputs)

A step's scheduling (admission, prefix hits, allocation, eviction) happens at ``now``; its
KV events are therefore as of ``now``. Its outputs (first tokens, new tokens, completions)
become visible at ``now + duration``. Requests added or aborted while a step is "running" take
effect at the next step; an aborted request's outputs from the current step should be dropped.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from kvevents.events import KVEvent
from sim.kv_cache import KVCache, PendingEvents
from sim.profiles import BatchShape, Profile
from sim.scheduler import Request, ScheduledChunk, Scheduler
from sim.textgen import TextGenerator
from sim.vllm_hash import none_hash

FINISH_LENGTH = "length"
FINISH_STOP = "stop"


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Engine knobs; ``None`` means "the profile's default" (see ``for_profile``)."""

    num_gpu_blocks: int | None = None
    block_size: int = 16
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    """Off: no request reuses cached blocks, so a preempted request recomputes everything
    (vLLM before v1, where prefix caching was off by default)."""
    hash_seed: str = "0"
    """Plays ``PYTHONHASHSEED``: NONE_HASH = sha256(cbor(hash_seed))."""

    def for_profile(self, profile: Profile) -> ResolvedConfig:
        blocks = self.num_gpu_blocks or profile.num_gpu_blocks
        capacity = blocks * self.block_size
        max_len = self.max_model_len or min(profile.max_model_len, capacity)
        cfg = ResolvedConfig(
            num_gpu_blocks=blocks,
            block_size=self.block_size,
            max_num_seqs=self.max_num_seqs or profile.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens or profile.max_num_batched_tokens,
            max_model_len=max_len,
            enable_chunked_prefill=self.enable_chunked_prefill,
            hash_seed=self.hash_seed,
            enable_prefix_caching=self.enable_prefix_caching,
        )
        cfg.validate()
        return cfg


@dataclass(frozen=True, slots=True)
class ResolvedConfig:
    num_gpu_blocks: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool
    hash_seed: str
    enable_prefix_caching: bool = True

    def validate(self) -> None:
        for name in ("num_gpu_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        capacity = self.num_gpu_blocks * self.block_size
        if self.max_model_len > capacity:
            raise ValueError(
                f"max_model_len ({self.max_model_len}) is larger than the KV cache can hold "
                f"({self.num_gpu_blocks} blocks x {self.block_size} = {capacity} tokens)"
            )
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                "without chunked prefill, max_num_batched_tokens must be >= max_model_len"
            )


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """What one step produced for one request, visible at ``StepResult.end``."""

    req_id: str
    new_token_ids: tuple[int, ...]
    first_token: bool
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    """Prompt tokens served from the prefix cache at admission (usage.cached_tokens)."""
    num_output_tokens: int
    arrival: float
    ttft: float | None = None
    """Set on the first token: first-token time minus arrival, in the caller's time base."""


@dataclass(frozen=True, slots=True)
class StepResult:
    now: float
    duration: float
    outputs: tuple[RequestOutput, ...] = ()
    events: tuple[KVEvent, ...] = ()
    digests: Mapping[int, bytes] = field(default_factory=dict)
    """Full 32-byte digest for every hash in ``events`` (for publishers sending bytes)."""
    num_prefill_tokens: int = 0
    num_decode_seqs: int = 0
    num_preempted: int = 0

    @property
    def end(self) -> float:
        return self.now + self.duration


@dataclass(frozen=True, slots=True)
class EngineStats:
    num_waiting: int
    num_running: int
    kv_cache_usage: float
    num_gpu_blocks: int
    num_free_blocks: int
    num_cached_blocks: int
    prefix_cache_requests: int
    prefix_cache_queries: int
    """Prompt tokens looked up in the prefix cache (vllm:prefix_cache_queries)."""
    prefix_cache_hits: int
    """Of which found cached (vllm:prefix_cache_hits)."""
    num_preemptions: int
    prompt_tokens: int
    generation_tokens: int
    finished_requests: int
    num_steps: int
    busy_time: float


class EngineModel:
    """One simulated vLLM engine. See the module docstring for the driving contract."""

    def __init__(
        self,
        profile: Profile,
        config: EngineConfig | None = None,
        seed: int = 0,
        textgen: TextGenerator | None = None,
    ) -> None:
        self.profile = profile
        self.config = (config or EngineConfig()).for_profile(profile)
        self.seed = seed
        self.textgen = textgen or TextGenerator(seed)
        c = self.config
        self.kv = KVCache(c.num_gpu_blocks, c.block_size)
        self.scheduler = Scheduler(
            self.kv,
            none_hash(c.hash_seed),
            c.max_num_seqs,
            c.max_num_batched_tokens,
            c.enable_chunked_prefill,
            c.enable_prefix_caching,
        )
        self._requests: dict[str, Request] = {}
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._finished = 0
        self._steps = 0
        self._busy = 0.0

    # -- requests ----------------------------------------------------------------------------

    def add_request(
        self,
        req_id: str,
        prompt_token_ids: Sequence[int],
        max_tokens: int | None,
        now: float,
        cache_salt: str | None = None,
    ) -> None:
        """Queue a request. ``max_tokens=None`` lets the output stop at a prompt-determined
        natural length (finish_reason "stop"); otherwise exactly ``max_tokens`` are generated.
        Raises ValueError for requests the engine cannot serve (as vLLM rejects them)."""
        if req_id in self._requests:
            raise ValueError(f"request id {req_id!r} is already in the engine")
        n = len(prompt_token_ids)
        if n < 1:
            raise ValueError("the prompt must contain at least one token")
        limit = self.config.max_model_len
        if n >= limit:
            raise ValueError(
                f"This model's maximum context length is {limit} tokens. However, your request "
                f"has {n} input tokens. Please reduce the length of the input."
            )
        if max_tokens is not None:
            if max_tokens < 1:
                raise ValueError(f"max_tokens must be at least 1, got {max_tokens}.")
            if n + max_tokens > limit:
                raise ValueError(
                    f"'max_tokens' is too large: {max_tokens}. This model's maximum context "
                    f"length is {limit} tokens and your request has {n} input tokens "
                    f"({max_tokens} > {limit} - {n})."
                )
        plan = self.textgen.plan(prompt_token_ids, max_tokens)
        tokens = plan.token_ids[: limit - n]
        req = Request(
            req_id=req_id,
            token_ids=list(prompt_token_ids),
            num_prompt_tokens=n,
            output_plan=tokens,
            stops_naturally=plan.stops_naturally and len(tokens) == len(plan.token_ids),
            arrival=now,
            salt=(cache_salt,) if cache_salt else None,
        )
        self._requests[req_id] = req
        self.scheduler.add(req)

    def abort(self, req_id: str) -> bool:
        """Remove a request and free its blocks; False if it is unknown or already finished."""
        req = self._requests.pop(req_id, None)
        if req is None:
            return False
        self.scheduler.remove(req)
        return True

    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    # -- time --------------------------------------------------------------------------------

    def step(self, now: float) -> StepResult:
        """Schedule and run one step starting at ``now``. With no work, a zero-length step that
        only carries pending events (e.g. AllBlocksCleared after a reset)."""
        chunks, preempted = self.scheduler.schedule()
        pending = self.kv.take_events()
        if not chunks:
            return StepResult(now, 0.0, (), tuple(pending.events), pending.digests, 0, 0, preempted)
        shape = BatchShape.of(
            [(c.start, c.num_tokens) for c in chunks if not c.is_decode],
            [c.start for c in chunks if c.is_decode],
        )
        duration = self.profile.step_time(shape)
        outputs = self._advance(chunks, now + duration)
        self._steps += 1
        self._busy += duration
        return StepResult(
            now,
            duration,
            tuple(outputs),
            tuple(pending.events),
            pending.digests,
            shape.prefill_tokens,
            shape.decode_seqs,
            preempted,
        )

    def _advance(self, chunks: list[ScheduledChunk], end: float) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        for chunk in chunks:
            req = chunk.request
            req.num_computed += chunk.num_tokens
            if req.num_computed < req.num_tokens:
                continue
            token = req.output_plan[req.num_output]
            req.token_ids.append(token)
            req.num_output += 1
            self._generation_tokens += 1
            first = req.first_token_time is None
            if first:
                req.first_token_time = end
                self._prompt_tokens += req.num_prompt_tokens
            finished = req.num_output >= req.max_output
            reason = None
            if finished:
                reason = FINISH_STOP if req.stops_naturally else FINISH_LENGTH
                self.scheduler.remove(req)
                del self._requests[req.req_id]
                self._finished += 1
            outputs.append(
                RequestOutput(
                    req_id=req.req_id,
                    new_token_ids=(token,),
                    first_token=first,
                    finished=finished,
                    finish_reason=reason,
                    num_prompt_tokens=req.num_prompt_tokens,
                    num_cached_tokens=req.num_cached_tokens or 0,
                    num_output_tokens=req.num_output,
                    arrival=req.arrival,
                    ttft=end - req.arrival if first else None,
                )
            )
        return outputs

    # -- cache -------------------------------------------------------------------------------

    def reset_prefix_cache(self, reset_running_requests: bool = False) -> bool:
        """Drop the prefix cache (AllBlocksCleared, published by the next ``step`` or
        ``take_events``). Refused while requests hold blocks unless ``reset_running_requests``,
        which first preempts every running request (they recompute from scratch)."""
        if reset_running_requests:
            self.scheduler.preempt_all()
        return self.kv.reset()

    def take_events(self) -> PendingEvents:
        """Drain KV events produced outside ``step`` (e.g. by ``reset_prefix_cache``)."""
        return self.kv.take_events()

    def cached_hashes(self) -> Counter[int]:
        """Published hash -> physical blocks holding it: what a perfect event consumer holds."""
        return self.kv.cached_hashes()

    def cached_prefix_tokens(
        self, prompt_token_ids: Sequence[int], cache_salt: str | None = None
    ) -> int:
        """Tokens of this prompt the prefix cache would serve if it were admitted now."""
        probe = Request(
            req_id="",
            token_ids=list(prompt_token_ids),
            num_prompt_tokens=len(prompt_token_ids),
            output_plan=(),
            stops_naturally=False,
            arrival=0.0,
            salt=(cache_salt,) if cache_salt else None,
        )
        return len(self.scheduler.hit_blocks(probe)) * self.config.block_size

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(
            num_waiting=len(s.waiting),
            num_running=len(s.running),
            kv_cache_usage=self.kv.usage,
            num_gpu_blocks=self.kv.num_blocks,
            num_free_blocks=self.kv.num_free,
            num_cached_blocks=self.kv.num_cached_blocks(),
            prefix_cache_requests=s.prefix_cache.requests,
            prefix_cache_queries=s.prefix_cache.queries,
            prefix_cache_hits=s.prefix_cache.hits,
            num_preemptions=s.num_preemptions,
            prompt_tokens=self._prompt_tokens,
            generation_tokens=self._generation_tokens,
            finished_requests=self._finished,
            num_steps=self._steps,
            busy_time=self._busy,
        )
