"""A bounded ring of this router's recent routing decisions, with their reasons.

For people, not for routing: the dashboard and ``/dashboard/api/local`` show the last few
decisions (where each request went and why). Bounded, so a busy router holds a fixed amount;
times are the router's monotonic clock, shown as ages.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class DecisionEntry:
    at: float
    request_id: str
    outcome: str
    """``local``, ``remote``, ``region``, ``pinned`` or ``none``."""
    replica: str | None
    region: str | None
    reason: str
    policy: str
    prompt_tokens: int
    matched_blocks: int
    attempt: int


class DecisionLog:
    def __init__(self, size: int = 200) -> None:
        self._ring: deque[DecisionEntry] = deque(maxlen=size)
        self.total = 0

    def add(self, entry: DecisionEntry) -> None:
        self._ring.append(entry)
        self.total += 1

    def recent(self, now: float, limit: int = 50) -> list[dict[str, Any]]:
        """Newest first, as JSON-ready rows."""
        out = []
        for e in list(self._ring)[-limit:][::-1]:
            out.append({"age_s": round(now - e.at, 3), "request_id": e.request_id,
                        "outcome": e.outcome, "replica": e.replica, "region": e.region,
                        "reason": e.reason, "policy": e.policy,
                        "prompt_tokens": e.prompt_tokens, "matched_blocks": e.matched_blocks,
                        "attempt": e.attempt})
        return out
