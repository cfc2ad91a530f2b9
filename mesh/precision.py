"""The router's precise-routing bookkeeping: request keys per block size, the self-check,
engine flags and the decoders' health, behind a few calls from the request path.

- ``keys_for(inference)``: the prompt's :class:`~kvevents.block_sizes.SizedKeys`, in the
  request's namespace (LoRA adapter, cache salt), unmatched when it has parts the keys
  cannot describe (images, audio, files);
- ``prepare`` / ``observe``: before a local dispatch, predict the cached tokens for the chosen
  engine and, for a stream whose client did not ask for usage, ask the engine for it (the tap
  strips it again); after the answer, compare with the engine's own count;
- ``lookup``: the ``PrefixLookup`` every policy reads (sizes, DP ranks, trust).

Block sizes are learned from each engine's store events (``EngineStats.block_size``) and, for
engines behind other routers, from the size those routers publish in their meta entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvevents.block_sizes import BlockSizes, SizedKeys, sized_request_keys
from mesh.api import Inference
from mesh.config import RouterConfig
from mesh.metrics import gauge
from mesh.selfcheck import (
    OUTCOMES,
    EventHealth,
    SelfCheck,
    UsageTap,
    cached_from_usage,
    health_rows,
    wants_usage_injection,
    with_usage,
)
from mesh.sized_lookup import SizedLookup, engine_of

_EVAL_INTERVAL = 0.25
_REJUDGE_INTERVAL = 0.01
"""An answer's outcome re-judges its engine, at most this often (a flag follows the
evidence within a few milliseconds, without a judgement of every engine per answer)."""
_MEDIA_PARTS = frozenset({"image_url", "input_image", "image", "audio_url", "input_audio",
                          "audio", "video_url", "video", "file", "image_embeds"})


def has_media(body: Mapping[str, Any]) -> bool:
    """Chat content parts other than text: the engine's blocks then depend on the media's
    hashes, which the router cannot reproduce, so such a request must never match."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return False
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind in _MEDIA_PARTS or (isinstance(kind, str) and kind != "text"):
                    return True
    return False


def single_prompt(body: Mapping[str, Any]) -> bool:
    """One prompt, one sequence: the engine's cached-token count is about the prompt keyed."""
    for key in ("n", "best_of"):
        value = body.get(key)
        if isinstance(value, int) and value > 1:
            return False
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return len(prompt) == 1
    return True


@dataclass(slots=True)
class Check:
    """One local dispatch under observation."""

    replica: str
    predicted: int
    new_blocks: int
    """Full prompt blocks the engine should store that the index says it lacks."""
    tap: UsageTap
    body: bytes
    concurrent: bool = False
    """Other requests were in flight on the engine at dispatch (a miss may be a race)."""
    comparable: bool = True
    """False when the engine's figure covers more than the one prompt predicted (a batch of
    prompts, ``n`` > 1): the answer is relayed but not scored."""


class Precision:
    def __init__(self, config: RouterConfig, backend: Any,
                 adapters: Callable[[], Mapping[str, frozenset[str]]] = dict) -> None:
        self.config = config
        self.sizes = BlockSizes(config.block_size)
        self.check = SelfCheck()
        self.lookup = SizedLookup(backend.prefix, self.check.trusted)
        self._backend = backend
        self._adapters = adapters
        self._local = [e.url for e in config.engines]
        self._listening = [e.url for e in config.engines if e.kv_events is not None]
        """Engines whose size will be learned (the others never match anything)."""
        self._evaluated = -math.inf

    # -- request path --------------------------------------------------------------------
    def keys_for(self, inf: Inference, now: float) -> SizedKeys:
        if not inf.body and inf.keys:
            # Prepared in a worker process (a very large body): only the token ids and the
            # keys at the fallback size came back, salt included. Replicas publishing another
            # size match nothing for it (never a false hit).
            self.refresh(now)
            size = self.sizes.fallback()
            return SizedKeys(inf.keys, unit=size, by_size={size: inf.keys},
                             num_tokens=len(inf.token_ids))
        if inf.keys:
            # Prepared here: the keys at the fallback size are in already; when that is the
            # one size the fleet uses and the request has no adapter namespace or media, they
            # are the whole answer (sized_request_keys would chain the same ones again).
            self.refresh(now)
            size = self.sizes.fallback()
            if (self.sizes.sizes(self._listening) == {size} and len(inf.keys) ==
                    len(inf.token_ids) // size and self.lora_for(inf.model, inf.body) is None
                    and not has_media(inf.body)):
                return SizedKeys(inf.keys, unit=size, by_size={size: inf.keys},
                                 num_tokens=len(inf.token_ids))
            return self._keys(inf.token_ids, inf.model, inf.body)
        return self.keys(inf.token_ids, inf.model, inf.body, now)

    def keys(self, token_ids: Sequence[int], model: str | None, body: Mapping[str, Any],
             now: float) -> SizedKeys:
        """A prompt's keys at every block size in the fleet, in the request's namespace."""
        self.refresh(now)
        return self._keys(token_ids, model, body)

    def _keys(self, token_ids: Sequence[int], model: str | None,
              body: Mapping[str, Any]) -> SizedKeys:
        salt = body.get("cache_salt")
        return sized_request_keys(
            token_ids, self.sizes.sizes(self._listening),
            lora_name=self.lora_for(model, body),
            salt=salt if isinstance(salt, str) else None, unmatched=has_media(body),
        )

    def keys_in(self, token_ids: Sequence[int], model: str | None, lora_path: str | None,
                salt: str | None, unmatched: bool, now: float) -> SizedKeys:
        """:meth:`keys` from what of the body they depend on (a worker process sends that)."""
        self.refresh(now)
        return sized_request_keys(
            token_ids, self.sizes.sizes(self._listening),
            lora_name=lora_path or self.lora_for(model, {}), salt=salt, unmatched=unmatched,
        )

    def lora_for(self, model: str | None, body: Mapping[str, Any]) -> str | None:
        """The adapter namespace of a request: vLLM serves adapters as model ids (keyed by
        the adapter's name); SGLang names one in ``lora_path``."""
        path = body.get("lora_path")
        if isinstance(path, str) and path:
            return path
        if model is None:
            return None
        for names in self._adapters().values():
            if model in names:
                return model
        return None

    @staticmethod
    def body_for(inf: Inference) -> bytes:
        """The body a local engine is sent: the client's, asking for usage on a stream that
        does not (what :meth:`prepare` puts in its ``Check``)."""
        return with_usage(inf.body, inf.raw) if wants_usage_injection(inf.body) else inf.raw

    def prepare(self, inf: Inference, replica: str, keys: Sequence[int],
                block_size: int, concurrent: bool = False, body: bytes | None = None) -> Check:
        """Predict for a dispatch to a local engine; the body to send (usage asked for).
        ``body``: :meth:`body_for` already made (the router predicts once the request is
        written, while the engine works)."""
        predicted = self.lookup.predicted_tokens(keys, replica, block_size)
        size = self.sizes.size_of(replica) or self.sizes.fallback()
        new = max(0, len(inf.token_ids) // size - predicted // size)
        inject = wants_usage_injection(inf.body)
        if body is None:
            body = with_usage(inf.body, inf.raw) if inject else inf.raw
        return Check(replica, predicted, new, UsageTap(inf.stream, strip=inject), body,
                     concurrent=concurrent,
                     comparable=bool(inf.body) and single_prompt(inf.body))

    def observe(self, check: Check, status: int, completed: bool, now: float) -> str | None:
        """The answer has been relayed; record how the prediction fared."""
        if status != 200:
            return None
        self.check.served(check.replica, check.new_blocks, now)
        if not check.comparable or (not completed and check.tap.usage is None):
            return None
        outcome = self.check.record(check.replica, check.predicted,
                                    cached_from_usage(check.tap.usage), check.concurrent)
        self.refresh(now, within=_REJUDGE_INTERVAL)
        return outcome

    # -- state ---------------------------------------------------------------------------
    def _stats(self) -> list[Any]:
        subs = getattr(self._backend, "subscribers", None) or []
        out = []
        for sub in subs:
            try:
                out.append(sub.stats())
            except Exception:  # a source that cannot report must not stop routing
                continue
        return out

    def refresh(self, now: float, within: float = _EVAL_INTERVAL) -> None:
        """Learn block sizes (every call: a request must be keyed at every size already
        published) and re-judge the engines (at most every ``within`` seconds)."""
        stats = self._stats()
        for st in stats:
            self.sizes.observe(engine_of(st.replica), st.block_size)
        if now - self._evaluated < within:
            return
        self._evaluated = now
        for replica, size in remote_block_sizes(getattr(self._backend, "meta", None)).items():
            if replica not in self._local:
                self.sizes.observe(replica, size)
        rows: dict[str, EventHealth | None] = dict.fromkeys(self._local)
        rows.update(health_rows(stats))
        self.check.evaluate(rows, now)

    def local_block_sizes(self) -> dict[str, int]:
        """What this router publishes for other routers: its engines' learned sizes."""
        return {r: s for r, s in self.sizes.learned().items() if r in self._local}

    def status(self) -> dict[str, Any]:
        doc = self.check.status()
        doc["block_sizes"] = {
            "configured": self.sizes.configured,
            "learned": self.sizes.learned(),
            "keyed_at": sorted(self.sizes.sizes(self._listening)),
            "mismatches": [
                {"replica": m.replica, "configured": m.configured, "published": m.published,
                 "fix": f"remove block_size from the config (the engine uses {m.published})"}
                for m in self.sizes.mismatched()
            ],
        }
        doc["decoders"] = {
            st.replica: {
                "batches": st.batches, "events": st.events, "epoch": st.epoch,
                "blocks_stored": st.blocks_stored, "blocks_removed": st.blocks_removed,
                "clears": st.clears, "held_keys": st.held_keys,
                "unknown_events": st.unknown_events, "unknown_fields": st.unknown_fields,
                "malformed_messages": st.malformed_messages,
                "malformed_events": st.malformed_events, "chain_breaks": st.chain_breaks,
                "unknown_removals": st.unknown_removals, "partial": st.partial,
                "block_size": st.block_size,
            }
            for st in self._stats()
        }
        return doc

    def metrics(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily

        c = self.check
        outcomes = CounterMetricFamily(
            "kvmesh_selfcheck_requests",
            "Answers checked against the prediction, by engine and outcome "
            "(exact, over, under, no_usage)", labels=["replica", "outcome"])
        tokens = CounterMetricFamily(
            "kvmesh_selfcheck_tokens",
            "Cached prompt tokens: predicted, reported by the engine, and the error over/under",
            labels=["replica", "kind"])
        for replica, rec in sorted(c.engines.items()):
            for o in OUTCOMES:
                outcomes.add_metric([replica, o], rec.outcomes[o])
            tokens.add_metric([replica, "predicted"], rec.predicted_tokens)
            tokens.add_metric([replica, "reported"], rec.reported_tokens)
            tokens.add_metric([replica, "over"], rec.over_tokens)
            tokens.add_metric([replica, "under"], rec.under_tokens)
        yield outcomes
        yield tokens
        yield gauge("kvmesh_selfcheck_accuracy",
                    "Fraction of checked answers whose cached tokens were predicted exactly",
                    ["replica"], [([r], acc) for r, rec in sorted(c.engines.items())
                                  if (acc := rec.accuracy()) is not None])
        yield gauge("kvmesh_engine_flagged",
                    "1 while an engine's prefix matches are not trusted, with the reason",
                    ["replica", "flag"], [([r, f], 1.0) for r, (f, _) in sorted(c.flags().items())])
        yield gauge("kvmesh_engine_block_size", "Block size each engine publishes (learned)",
                    ["replica"], [([r], float(s)) for r, s in sorted(self.sizes.learned().items())])
        mism = CounterMetricFamily("kvmesh_block_size_mismatches",
                                   "Engines publishing a block size other than the configured one")
        mism.add_metric([], self.sizes.mismatches)
        yield mism
        dec = CounterMetricFamily(
            "kvmesh_event_decode_problems",
            "Engine events the decoder or key map could not use fully, by replica and kind",
            labels=["replica", "kind"])
        for st in self._stats():
            for kind in ("unknown_events", "unknown_fields", "malformed_messages",
                         "malformed_events", "chain_breaks", "skipped_blocks",
                         "unknown_removals"):
                dec.add_metric([st.replica, kind], getattr(st, kind))
        yield dec


def remote_block_sizes(meta: Any) -> dict[str, int]:
    """Block sizes other routers publish for their engines in their meta entries."""
    out: dict[str, int] = {}
    if meta is None:
        return out
    try:
        items = meta.items()
    except Exception:
        return out
    for value in items.values():
        engines = value.get("engines") if isinstance(value, dict) else None
        if not isinstance(engines, dict):
            continue
        for url, info in engines.items():
            size = info.get("block_size") if isinstance(info, dict) else None
            if isinstance(size, int) and not isinstance(size, bool) and size > 0:
                out[str(url)] = size
    return out
