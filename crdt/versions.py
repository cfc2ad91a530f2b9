"""Writer-side versions: ``(generation, counter)`` for facts a router owns.

A router's generation is given to it at start (bumped on every restart, e.g. from its start
time or a persisted counter), so its versions never go backwards across restarts without
anybody reading a clock here.
"""

from __future__ import annotations

from crdt.base import Version

__all__ = ["VersionClock"]


class VersionClock:
    """Hands out strictly increasing ``(generation, counter)`` versions for one writer."""

    __slots__ = ("_counter", "generation")

    def __init__(self, generation: int, counter: int = 0) -> None:
        if type(generation) is not int or generation < 0:
            raise ValueError(f"generation must be a non-negative int, got {generation!r}")
        self.generation = generation
        self._counter = counter

    def next(self) -> Version:
        self._counter += 1
        return (self.generation, self._counter)

    def current(self) -> Version:
        return (self.generation, self._counter)
