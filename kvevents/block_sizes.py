"""Block sizes as the engines actually use them, and request keys for every size in the fleet.

Engines chunk prompts into blocks of their own size (vLLM on GPU: 16 by default; vLLM on CPU:
multiples of 32; SGLang: a page size, 1 by default), and every ``BlockStored`` says which. The
router's keys chain over whole blocks, so a request keyed at 16 tokens never matches an engine
that stored 32-token blocks: the only safe answer is to learn each engine's size from its events
and key each request once per distinct size in the fleet.

``SizedKeys`` carries those key chains. It *is* the list of keys at the fleet's common unit
(the gcd of the sizes), so code that knows one block size only keeps working, and a lookup that
knows about sizes (``mesh.sized_lookup``) matches every replica with keys of its own size and
reports the result in units.

``BlockSizes`` is the sans-I/O record of what each replica publishes versus what the
configuration says; a disagreement is logged once per replica and size, counted, and reported.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from kvevents.keys import chain_keys, root_key

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 16
"""Used for replicas whose size is not known yet (no store event seen) and nothing configured."""


class SizedKeys(list[int]):
    """Request keys at ``unit`` tokens a block, plus the chains at every fleet block size.

    ``by_size[s]`` holds the keys of the full ``s``-token blocks of the prompt. ``unmatched``
    marks a request that must never match a cached prefix (e.g. it carries images the keys
    cannot describe): a lookup then answers nothing for it.
    """

    __slots__ = ("by_size", "num_tokens", "unit", "unmatched")

    def __init__(self, unit_keys: Iterable[int], *, unit: int, by_size: Mapping[int, Sequence[int]],
                 num_tokens: int, unmatched: bool = False) -> None:
        super().__init__(unit_keys)
        self.unit = unit
        self.by_size = dict(by_size)
        self.num_tokens = num_tokens
        self.unmatched = unmatched

    def cap(self, size: int) -> int:
        """Most blocks of ``size`` an engine can reuse: never the prompt's last token."""
        return max(0, self.num_tokens - 1) // size


def fleet_unit(sizes: Iterable[int]) -> int:
    unit = 0
    for s in sizes:
        unit = math.gcd(unit, s)
    return unit or DEFAULT_BLOCK_SIZE


def sized_request_keys(
    token_ids: Sequence[int],
    sizes: Iterable[int],
    *,
    lora_name: str | None = None,
    salt: str | None = None,
    unmatched: bool = False,
) -> SizedKeys:
    """The prompt's key chains at each size in ``sizes`` (and at their gcd, the unit)."""
    wanted = sorted({int(s) for s in sizes if int(s) > 0}) or [DEFAULT_BLOCK_SIZE]
    unit = fleet_unit(wanted)
    if unmatched:
        return SizedKeys((), unit=unit, by_size={}, num_tokens=len(token_ids), unmatched=True)
    root = root_key(lora_name, salt)
    by_size = {s: chain_keys(root, token_ids, s) for s in {*wanted, unit}}
    return SizedKeys(by_size[unit], unit=unit, by_size={s: by_size[s] for s in wanted},
                     num_tokens=len(token_ids))


@dataclass(frozen=True, slots=True)
class SizeMismatch:
    replica: str
    configured: int
    published: int


class BlockSizes:
    """Which block size each replica publishes, against the configured one (if any).

    ``configured``: the router's ``block_size`` setting, or None when it is to be learned.
    ``observe(replica, size)`` is fed from the replica's store events (or a peer's report);
    sizes of replicas not heard from yet fall back to ``configured`` or 16.
    """

    def __init__(self, configured: int | None = None) -> None:
        self.configured = configured
        self._sizes: dict[str, int] = {}
        self._warned: set[tuple[str, int]] = set()
        self.mismatches = 0
        """Replica/size pairs found disagreeing with the configured size (each counted once)."""

    def observe(self, replica: str, size: int | None) -> None:
        if size is None or size <= 0:
            return
        if self._sizes.get(replica) == size:
            return
        self._sizes[replica] = size
        if (self.configured is not None and size != self.configured
                and (replica, size) not in self._warned):
            self._warned.add((replica, size))
            self.mismatches += 1
            log.warning(
                "engine %s publishes %d-token blocks but block_size is configured as %d; "
                "routing uses %d for it (remove block_size from the config to silence this)",
                replica, size, self.configured, size,
            )

    def forget(self, replica: str) -> None:
        self._sizes.pop(replica, None)

    def size_of(self, replica: str) -> int | None:
        """The size the replica publishes, or None before its first store event."""
        return self._sizes.get(replica)

    def fallback(self) -> int:
        return self.configured if self.configured is not None else DEFAULT_BLOCK_SIZE

    def sizes(self, expected: Iterable[str] = ()) -> set[int]:
        """Every size a request must be keyed at: the learned ones, plus the fallback while
        nothing is learned or an ``expected`` replica has not published yet."""
        out = set(self._sizes.values())
        if not out or any(r not in self._sizes for r in expected):
            out.add(self.fallback())
        return out

    def learned(self) -> dict[str, int]:
        return dict(self._sizes)

    def mismatched(self) -> list[SizeMismatch]:
        if self.configured is None:
            return []
        return [SizeMismatch(r, self.configured, s) for r, s in sorted(self._sizes.items())
                if s != self.configured]
