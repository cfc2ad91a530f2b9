"""Bounded label sets: a metric label never takes a value a client chose.

A rejected request names the field at fault (``messages[17].content``); as a label that
would add one time series per index a client sends. Labels go through :func:`field_label`,
which folds indices and maps anything not in :data:`FIELDS` to ``other``.
"""

from __future__ import annotations

import re

FIELDS = frozenset({
    "body", "model", "stream", "max_tokens", "prompt", "messages", "messages[]",
    "messages[].role", "messages[].content", "cache_salt", "user",
    "service_tier", "priority", "x-kvmesh-priority",
    # refused before parsing (mesh.http_guard)
    "body_too_large", "body_timeout", "unsupported_content_encoding",
})
_INDEX = re.compile(r"\[\d+\]")


def field_label(param: str | None) -> str:
    """The rejected-request counter's ``field`` label for an error's ``param``."""
    if not param:
        return "body"
    folded = _INDEX.sub("[]", param[:64])
    return folded if folded in FIELDS else "other"


def bounded(value: str, allowed: frozenset[str] | set[str], other: str = "other") -> str:
    """``value`` if it is one of ``allowed``, else ``other``."""
    return value if value in allowed else other


class TokenBucket:
    """``rate`` tokens a second up to ``burst``; sans-I/O (``now`` in)."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, now: float, n: float = 1.0) -> float:
        """0.0 if ``n`` tokens were taken, else the seconds until they would be there."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= n:
            self.tokens -= n
            return 0.0
        return (n - self.tokens) / self.rate if self.rate > 0 else float("inf")
