"""A dict-backed ``IndexWriter``: the reference model of what ingestion writes.

Tests, the benchmark's fallback and ``kvmesh bridge --check`` style tools use it to see a
replica's slice exactly: its epoch, whether it is partial, its last written version and keys.
Writes carrying another epoch than the slice's are refused and counted, as a versioned CRDT
slice would refuse them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(slots=True)
class SliceState:
    epoch: int
    partial: bool
    version: tuple[int, int] | None = None
    keys: set[int] = field(default_factory=set)


class MemoryIndex:
    """Implements ``kvevents.events.IndexWriter`` with plain dicts and sets."""

    def __init__(self, record: bool = False) -> None:
        self.slices: dict[str, SliceState] = {}
        self.stale_writes = 0
        self.record = record
        self.log: list[tuple[object, ...]] = []

    # -- IndexWriter ---------------------------------------------------------------------
    def reset(self, replica: str, epoch: int, partial: bool = False) -> None:
        if self.record:
            self.log.append(("reset", replica, epoch, partial))
        self.slices[replica] = SliceState(epoch, partial)

    def store(self, replica: str, version: tuple[int, int], keys: Sequence[int]) -> None:
        if self.record:
            self.log.append(("store", replica, version, tuple(keys)))
        state = self._at(replica, version)
        if state is not None:
            state.keys.update(keys)

    def remove(self, replica: str, version: tuple[int, int], keys: Sequence[int]) -> None:
        if self.record:
            self.log.append(("remove", replica, version, tuple(keys)))
        state = self._at(replica, version)
        if state is not None:
            state.keys.difference_update(keys)

    def clear(self, replica: str, version: tuple[int, int]) -> None:
        if self.record:
            self.log.append(("clear", replica, version))
        state = self._at(replica, version)
        if state is not None:
            state.keys.clear()

    # -- queries -------------------------------------------------------------------------
    def keys(self, replica: str) -> set[int]:
        state = self.slices.get(replica)
        return set(state.keys) if state is not None else set()

    def version(self, replica: str) -> tuple[int, int] | None:
        state = self.slices.get(replica)
        return state.version if state is not None else None

    def _at(self, replica: str, version: tuple[int, int]) -> SliceState | None:
        state = self.slices.get(replica)
        if (
            state is None
            or state.epoch != version[0]
            or (state.version is not None and version < state.version)
        ):
            self.stale_writes += 1
            return None
        state.version = version
        return state
