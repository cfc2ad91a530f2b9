"""The contract every replicated type in ``crdt/`` offers to the gossip layer.

The gossip layer knows nothing about prefix blocks or load: it asks a named
replicated object for its digest, for what a peer lacks given the peer's
digest, and merges what arrives. One writer per fact: every entry belongs to
one *origin* (a replica's event stream, a router), and its version is a pair
``(epoch or generation, seq or counter)`` taken from that origin's stream,
never from a wall clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, TypeVar

Version = tuple[int, int]
"""``(epoch, seq)`` for engine streams, ``(generation, counter)`` for routers."""

Digest = Mapping[str, Version]
"""Per-origin version summary: what a node has seen of each origin."""


class DecodeError(ValueError):
    """Corrupt, truncated, foreign or wrongly-typed bytes; the only error decoders raise."""


class Delta(Protocol):
    def to_wire(self) -> object:
        """Plain msgpack-able primitives (lists, dicts, ints, bytes, str)."""
        ...

    def is_empty(self) -> bool: ...


D = TypeVar("D", bound=Delta)


class Replicated(Protocol[D]):
    """A delta-state CRDT as the gossip layer sees it."""

    def digest(self) -> dict[str, Version]: ...

    def delta_since(self, peer: Digest, now: float, max_bytes: int | None = None) -> D:
        """What a peer with digest ``peer`` lacks, cut to ``max_bytes`` (stalest origins first).

        ``now`` is the caller's monotonic clock, for types that ship ages (load records).
        """
        ...

    def delta_from_wire(self, obj: object) -> D:
        """Rebuild a delta from ``Delta.to_wire()`` output; raises ``DecodeError`` only."""
        ...

    def merge(self, delta: D, now: float) -> bool:
        """Join ``delta`` into this state; True when anything changed.

        ``now`` is the caller's monotonic clock: it stamps receipt (ages, expiry), it never
        orders versions.
        """
        ...
