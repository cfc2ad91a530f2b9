"""Outlier ejection with half-open recovery, per replica (sans-I/O: outcomes and ``now`` in).

Health probes see an engine that answers ``/health`` but fails requests (5xx, no first
byte, resets) as healthy. Here ``consecutive`` failed dispatches in a row eject the replica
from this router's choices for ``base_ejection`` seconds, doubling on each repeat up to
``max_ejection`` (Envoy's outlier detection). When the time is up the replica is
*half-open*: it takes one trial request; success closes the circuit (and resets the
doubling), failure ejects it again. At most ``max_ejected_fraction`` of the replicas this
router dispatches to are ejected at once, so a fleet-wide problem does not empty the view.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class _Circuit:
    failures: int = 0
    ejections: int = 0
    until: float = 0.0
    """Ejected before this time."""
    trial: bool = False
    """Half-open: one trial request is out."""


class OutlierDetector:
    def __init__(self, consecutive: int = 5, base_ejection: float = 10.0,
                 max_ejection: float = 300.0, max_ejected_fraction: float = 0.5) -> None:
        self.consecutive = consecutive
        self.base_ejection = base_ejection
        self.max_ejection = max_ejection
        self.max_ejected_fraction = max_ejected_fraction
        self._c: dict[str, _Circuit] = {}
        self.ejected_total = 0

    def record(self, replica: str, ok: bool, now: float, population: int = 1) -> bool:
        """One dispatch outcome; True when it ejected the replica."""
        c = self._c.setdefault(replica, _Circuit())
        if ok:
            if c.trial or c.until:
                c.ejections = 0
            c.failures, c.until, c.trial = 0, 0.0, False
            return False
        c.failures += 1
        if not c.trial and c.failures < self.consecutive:
            return False
        if not c.trial and self._ejected_count(now) + 1 > max(
                1, int(self.max_ejected_fraction * population)):
            return False
        c.ejections += 1
        c.until = now + min(self.max_ejection, self.base_ejection * 2 ** (c.ejections - 1))
        c.trial = False
        c.failures = 0
        self.ejected_total += 1
        return True

    def _ejected_count(self, now: float) -> int:
        return sum(1 for c in self._c.values() if c.until > now)

    def excluded(self, now: float) -> frozenset[str]:
        """Replicas not to choose now: ejected ones, and half-open ones with a trial out."""
        return frozenset(r for r, c in self._c.items() if c.until > now or c.trial)

    def admit(self, replica: str, now: float) -> None:
        """A dispatch to ``replica`` starts: past its ejection, it is the half-open trial."""
        c = self._c.get(replica)
        if c is not None and c.until and c.until <= now and not c.trial:
            c.trial = True

    def ejected(self, now: float) -> list[str]:
        return sorted(r for r, c in self._c.items() if c.until > now)
