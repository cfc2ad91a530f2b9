"""Precise routing that checks itself: predicted vs. engine-reported cached tokens.

Every answer from vLLM (``--enable-prompt-tokens-details``) or SGLang (``--enable-cache-report``)
carries ``usage.prompt_tokens_details.cached_tokens``: how many prompt tokens the engine really
took from its prefix cache. The router predicted that number from the index when it chose the
replica. Comparing the two per engine tells, from live traffic, whether the index can be
trusted for that engine. Sans-I/O: :class:`SelfCheck` takes observations and ``now``;
:class:`UsageTap` is a byte filter the proxy runs the answer through.

An engine is *flagged* (and its prefix matches treated as unknown, so it is served by load) when

- ``cache-blind``: it served requests that must have stored new blocks, and no KV event from
  it arrived meanwhile;
- ``mispredicted``: most recent predictions missed (tokenizer or chat-template drift, a block
  size nobody publishes, hashes that never match), with the direction of the misses;
- ``partial``: its event stream lost history (the index only knows what arrived since),
  until enough checked predictions show the index agrees with the engine again.

A flag is logged once when it is raised or its reason changes, and once when it clears.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mesh import json_body

log = logging.getLogger("kvmesh.selfcheck")

EXACT, OVER, UNDER, NO_USAGE = "exact", "over", "under", "no_usage"
OUTCOMES = (EXACT, OVER, UNDER, NO_USAGE)


@dataclass(frozen=True, slots=True)
class CheckParams:
    window: int = 20
    """Recent checked requests per engine the mispredicted test looks at."""
    min_samples: int = 5
    """Checked requests needed before an engine can be called mispredicted."""
    miss_ratio: float = 0.5
    """Fraction of the window that must miss to flag (a miss: predicted != reported)."""
    blind_requests: int = 3
    """Requests with at least one full block served before a silent engine is cache-blind."""
    blind_after: float = 5.0
    """Seconds after the first such request with still no event before it is cache-blind."""


@dataclass(frozen=True, slots=True)
class EventHealth:
    """What ingestion knows of one engine's stream (``kvevents.ingest.EngineStats`` subset)."""

    events: int
    partial: bool
    chain_breaks: int = 0


@dataclass(slots=True)
class EngineRecord:
    checked: int = 0
    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    predicted_tokens: int = 0
    reported_tokens: int = 0
    over_tokens: int = 0
    under_tokens: int = 0
    recent: deque[tuple[str, int, int]] = field(default_factory=lambda: deque(maxlen=64))
    served_blocks: int = 0
    """Requests served since the engine's event count last moved that should have stored a
    new block (an engine caching them must tell)."""
    first_served: float | None = None
    events_seen: int | None = None
    flag: str | None = None
    reason: str = ""

    def accuracy(self) -> float | None:
        n = self.outcomes[EXACT] + self.outcomes[OVER] + self.outcomes[UNDER]
        return self.outcomes[EXACT] / n if n else None


def classify(predicted: int, reported: int | None) -> str:
    if reported is None:
        return NO_USAGE
    if predicted == reported:
        return EXACT
    return OVER if predicted > reported else UNDER


class SelfCheck:
    """Per-engine prediction record and flags; see the module docstring."""

    def __init__(self, params: CheckParams | None = None) -> None:
        self.params = params or CheckParams()
        self.engines: dict[str, EngineRecord] = {}
        self.flag_changes = 0

    def _rec(self, replica: str) -> EngineRecord:
        rec = self.engines.get(replica)
        if rec is None:
            rec = self.engines[replica] = EngineRecord()
        return rec

    # -- inputs --------------------------------------------------------------------------
    def served(self, replica: str, new_blocks: int, now: float) -> None:
        """The engine answered a request that should have stored ``new_blocks`` full blocks
        it did not hold before (by the prediction)."""
        rec = self._rec(replica)
        if new_blocks > 0:
            rec.served_blocks += 1
            if rec.first_served is None:
                rec.first_served = now

    def record(self, replica: str, predicted: int, reported: int | None,
               concurrent: bool = False) -> str:
        """One answer's outcome; ``reported`` None when the engine sent no cached-token count.

        ``concurrent``: other requests were in flight on the engine when this one was sent, so
        a miss may be a race (blocks stored or evicted by them meanwhile), not a fault. Such
        answers count in the outcomes but are not evidence for the mispredicted flag."""
        rec = self._rec(replica)
        outcome = classify(predicted, reported)
        rec.outcomes[outcome] += 1
        if reported is None:
            return outcome
        rec.checked += 1
        rec.predicted_tokens += predicted
        rec.reported_tokens += reported
        if predicted > reported:
            rec.over_tokens += predicted - reported
        else:
            rec.under_tokens += reported - predicted
        if not concurrent:
            rec.recent.append((outcome, predicted, reported))
        return outcome

    def evaluate(self, health: Mapping[str, EventHealth | None], now: float) -> None:
        """Recompute every engine's flag; ``health[r]`` None: no event source configured."""
        for replica in set(health) | set(self.engines):
            rec = self._rec(replica)
            flag, reason = self._judge(rec, health.get(replica), now)
            if flag != rec.flag:  # reasons carry counts: only a change of flag is logged
                self.flag_changes += 1
                if flag is None:
                    log.info("engine %s: prefix predictions trusted again (was %s)", replica,
                             rec.flag)
                else:
                    log.warning("engine %s flagged %s: %s; its prefix matches are treated as "
                                "unknown (served by load)", replica, flag, reason)
                rec.flag, rec.reason = flag, reason if flag else ""

    def _judge(self, rec: EngineRecord, health: EventHealth | None,
               now: float) -> tuple[str | None, str]:
        p = self.params
        events = health.events if health is not None else 0
        if events != rec.events_seen:  # the engine spoke: start counting silence again
            rec.events_seen = events
            rec.served_blocks = 0
            rec.first_served = None
        if (rec.served_blocks >= p.blind_requests
                and rec.first_served is not None and now - rec.first_served >= p.blind_after):
            where = ("no kv_events source is configured for it" if health is None
                     else "its event source delivered nothing")
            return "cache-blind", (f"served {rec.served_blocks} requests that stored new blocks "
                                   f"but no KV event arrived ({where})")
        window = list(rec.recent)[-p.window:]
        misses = [w for w in window if w[0] != EXACT]
        if len(window) >= p.min_samples and len(misses) >= p.miss_ratio * len(window):
            over = sum(1 for w in misses if w[0] == OVER)
            under = len(misses) - over
            zero = sum(1 for w in misses if w[1] == 0)
            if under >= over and zero == len(misses):
                hint = ("the index never matches what the engine reuses: tokenizer or chat "
                        "template differs from the engine's, or its hashes cannot be keyed")
            elif under >= over:
                hint = "engine reuses more than predicted: events missing or late"
            else:
                hint = ("engine reuses less than predicted: evictions not seen, wrong block "
                        "size or a tokenizer/template mismatch")
            return "mispredicted", (f"{len(misses)} of the last {len(window)} predictions "
                                    f"missed ({over} over, {under} under): {hint}")
        if health is not None and health.partial and len(window) < p.min_samples:
            # Evidence wins: once enough recent predictions held, a partial stream is trusted.
            return "partial", ("its event stream lost history (no replay reached it); the index "
                               "holds only what arrived since")
        return None, ""

    # -- queries -------------------------------------------------------------------------
    def trusted(self, replica: str) -> bool:
        rec = self.engines.get(replica)
        return rec is None or rec.flag is None

    def flags(self) -> dict[str, tuple[str, str]]:
        return {r: (rec.flag, rec.reason) for r, rec in self.engines.items()
                if rec.flag is not None}

    def totals(self) -> dict[str, int]:
        out = dict.fromkeys(OUTCOMES, 0)
        for rec in self.engines.values():
            for k, v in rec.outcomes.items():
                out[k] += v
        return out

    def accuracy(self) -> float | None:
        t = self.totals()
        n = t[EXACT] + t[OVER] + t[UNDER]
        return t[EXACT] / n if n else None

    def status(self) -> dict[str, Any]:
        acc = self.accuracy()
        return {
            "accuracy": None if acc is None else round(acc, 4),
            "outcomes": self.totals(),
            "engines": {
                r: {
                    "flag": rec.flag, "reason": rec.reason or None,
                    "accuracy": None if rec.accuracy() is None else round(rec.accuracy() or 0, 4),
                    "outcomes": dict(rec.outcomes),
                    "predicted_tokens": rec.predicted_tokens,
                    "reported_tokens": rec.reported_tokens,
                    "over_tokens": rec.over_tokens, "under_tokens": rec.under_tokens,
                    "last": [list(x) for x in list(rec.recent)[-5:]],
                }
                for r, rec in sorted(self.engines.items())
            },
        }


# -- reading usage out of answers --------------------------------------------------------------


def cached_from_usage(usage: object) -> int | None:
    """``usage.prompt_tokens_details.cached_tokens`` (None when the engine did not say)."""
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details")
    if not isinstance(details, dict):
        return None
    cached = details.get("cached_tokens")
    if isinstance(cached, int) and not isinstance(cached, bool) and cached >= 0:
        return cached
    return None


def wants_usage_injection(body: Mapping[str, Any]) -> bool:
    """A stream whose client did not ask for usage: the engine must be asked for it."""
    if body.get("stream") is not True:
        return False
    opts = body.get("stream_options")
    return not (isinstance(opts, dict) and opts.get("include_usage") is True)


_USAGE_MEMBER = b'"stream_options":{"include_usage":true}}'


def with_usage(body: Mapping[str, Any], raw: bytes = b"") -> bytes:
    """The request body asking the engine for a final usage chunk.

    With the client's ``raw`` bytes and no ``stream_options`` in the body, the member is
    appended to them (the rest of the body goes on byte for byte, no serialising again);
    otherwise the parsed body is written out with it."""
    if raw and "stream_options" not in body:
        text = raw.strip()
        # A UTF-8 object (another encoding would not start and end on these bytes).
        if text.startswith(b"{") and text.endswith(b"}"):
            head = text[:-1].rstrip()
            return head + (_USAGE_MEMBER if head == b"{" else b"," + _USAGE_MEMBER)
    opts = body.get("stream_options")
    new = dict(opts) if isinstance(opts, dict) else {}
    new["include_usage"] = True
    return json.dumps({**body, "stream_options": new}).encode()


class UsageTap:
    """Watches an answer go by and picks its ``usage`` out; optionally drops the usage chunk.

    ``stream``: the body is SSE (``data: {...}`` events); otherwise one JSON document.
    ``strip``: the client did not ask for usage on its stream, so the usage-only chunk the
    router asked for is removed (every other byte passes unchanged).

    A whole JSON answer is parsed when ``usage`` is first read, not when it ends: the
    client has it by then, and the reader is bookkeeping that runs off the request path
    (``mesh.deferred``).
    """

    MAX_JSON = 8 * 1024 * 1024

    def __init__(self, stream: bool, strip: bool = False) -> None:
        self.stream = stream
        self.strip = strip and stream
        self._usage: dict[str, Any] | None = None
        self._body: bytes | None = None
        """A finished JSON answer not parsed yet."""
        self._buf = bytearray()
        self._overflow = False

    @property
    def usage(self) -> dict[str, Any] | None:
        body = self._body
        if body is not None:
            self._body = None
            try:
                doc = json_body.loads(body)
            except (ValueError, UnicodeDecodeError, RecursionError):
                doc = None
            if isinstance(doc, dict) and isinstance(doc.get("usage"), dict):
                self._usage = doc["usage"]
        return self._usage

    @usage.setter
    def usage(self, value: dict[str, Any] | None) -> None:
        self._body = None
        self._usage = value

    @property
    def rewrites(self) -> bool:
        return self.strip

    def feed(self, chunk: bytes) -> bytes:
        """Bytes to pass on to the client for this chunk."""
        if not self.stream:
            if not self._overflow:
                if len(self._buf) + len(chunk) > self.MAX_JSON:
                    self._overflow = True
                    self._buf.clear()
                else:
                    self._buf += chunk
            return chunk
        self._buf += chunk
        out = bytearray()
        while True:
            end = self._event_end()
            if end < 0:
                break
            event = bytes(self._buf[:end])
            del self._buf[:end]
            if not self._take_event(event) or not self.strip:
                out += event
        if not self.strip:
            # Pass through at once; only the scan waits for complete events.
            return chunk
        return bytes(out)

    def finish(self) -> bytes:
        """End of the body: whatever is still held back (never an unfinished event dropped)."""
        if not self.stream:
            if not self._overflow and self._buf:
                self._body = bytes(self._buf)
            self._buf.clear()
            return b""
        rest = bytes(self._buf)
        self._buf.clear()
        if rest and self._take_event(rest) and self.strip:
            return b""
        return rest if self.strip else b""

    def _event_end(self) -> int:
        for sep in (b"\n\n", b"\r\n\r\n"):
            i = self._buf.find(sep)
            if i >= 0:
                return i + len(sep)
        return -1

    def _take_event(self, event: bytes) -> bool:
        """Record usage from one SSE event; True when it is a usage-only chunk."""
        data = b"".join(line[5:].strip() for line in event.splitlines()
                        if line.startswith(b"data:"))
        if not data or data == b"[DONE]" or b'"usage"' not in data:
            return False
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return False
        if not isinstance(doc, dict) or not isinstance(doc.get("usage"), dict):
            return False
        self.usage = doc["usage"]
        return doc.get("choices") == []


def health_rows(stats: Iterable[Any]) -> dict[str, EventHealth]:
    """``EventHealth`` per engine from ingestion stats (DP ranks folded into their engine)."""
    from mesh.sized_lookup import engine_of

    out: dict[str, EventHealth] = {}
    for st in stats:
        eng = engine_of(st.replica)
        prev = out.get(eng)
        h = EventHealth(st.events, st.partial, st.chain_breaks)
        if prev is not None:
            h = EventHealth(prev.events + h.events, prev.partial or h.partial,
                            prev.chain_breaks + h.chain_breaks)
        out[eng] = h
    return out
