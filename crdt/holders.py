"""HolderMap: block key -> bitmask of the replica slots holding it, compact for lone holders.

Why not one dict. A dict entry for a 64-bit key costs about 80 bytes: the 24-byte entry, its
index slot and free room, and a 36-byte int object for the key. Most blocks of a fleet routed
for locality sit on one replica, so lone-holder keys are the bulk of the map. They live in a
direct-mapped table of two flat arrays, the key (``array('Q')``) and its holder's slot
(``array('I')``) at position ``key % size``: 12 bytes a position, no objects. Keys held by
several replicas, and lone keys whose position is taken, go to an ordinary dict of masks
(``_shared``); a key is in exactly one of the two. Masks of two holders are interned (one
int object per distinct pair), which keeps keys on two replicas at about 55 bytes a pair.

An empty position ``i`` holds ``i + 1``: a key whose home is elsewhere, so a lookup can never
take it for a hit, and no key value has to be reserved as "empty".

The table is sized to the lone-holder count (kept between 1/8 and 3/4 of the positions) and
rebuilt when it leaves that band, taking in the lone keys of the dict when the dict is not
much larger than that count; a rebuild is O(lone keys), amortised over as many writes.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Sequence
from types import ModuleType

_compiled: ModuleType | None
try:  # the compiled query loops (crdt/_match.c); the loops in ``HolderMap`` are the reference
    from crdt import _match as _compiled
except ImportError:  # pragma: no cover - a build without a C compiler
    _compiled = None

__all__ = ["COMPILED", "HolderMap"]

COMPILED = _compiled is not None
"""Whether ``HolderMap.runs`` runs compiled (``crdt/_match.c``)."""

_MIN_SIZE = 1023
_GROW_AT = 0.75
_SHRINK_AT = 0.125
_TARGET = 0.5
_MAX_PAIRS = 1 << 16


class HolderMap:
    """``key -> mask`` where bit ``s`` of the mask is replica slot ``s`` (``bits[s] == 1 << s``).

    ``bits`` is the caller's slot -> bit list; it is read, never written, so masks of one
    holder are the caller's shared int objects.
    """

    __slots__ = (
        "_bits",
        "_keys",
        "_lone",
        "_min",
        "_pairs",
        "_shared",
        "_size",
        "_slots",
        "_table",
    )

    def __init__(self, bits: list[int], *, min_size: int = _MIN_SIZE) -> None:
        if min_size < 2:
            raise ValueError(f"min_size must be at least 2, got {min_size}")
        self._bits = bits
        self._min = min_size
        self._shared: dict[int, int] = {}
        self._pairs: dict[int, int] = {}
        """Two-holder masks, interned: the next most common kind, one int object each."""
        self._lone = 0
        """Keys with exactly one holder, wherever they sit."""
        self._table = 0
        """Keys sitting in the table."""
        self._size = min_size
        self._keys = array("Q", range(1, min_size + 1))
        self._slots = array("I", bytes(4 * min_size))

    def __len__(self) -> int:
        return self._table + len(self._shared)

    def get(self, key: int) -> int:
        i = key % self._size
        if self._keys[i] == key:
            return self._bits[self._slots[i]]
        return self._shared.get(key, 0)

    def runs(self, keys: Sequence[int], compiled: bool = True) -> list[tuple[int, int]]:
        """Where each replica's consecutive run of ``keys`` ends: ``[(at, mask), ...]``.

        Walks ``keys`` with a running AND of their masks, starting from the holders of
        ``keys[0]``; each time bits drop out at key ``at``, the replicas behind them held
        exactly ``at`` leading keys. The last entry, at ``len(keys)``, holds every key.
        Empty when nobody holds ``keys[0]``. Compiled where built (``compiled=False``: this
        loop, the reference the compiled one is tested against).
        """
        if compiled and _compiled is not None:
            out: list[tuple[int, int]] = _compiled.runs(
                keys, self._keys, self._slots, self._shared, self._bits)
            return out
        result: list[tuple[int, int]] = []
        active = 0
        for at, key in enumerate(keys):
            mask = self.get(key)
            if at == 0:
                if not mask:
                    return result
                active = mask
                continue
            nxt = active & mask
            if nxt != active:
                result.append((at, active ^ nxt))
                active = nxt
                if not active:
                    return result
        if active:
            result.append((len(keys), active))
        return result

    def match(self, keys: Sequence[int], names: list[str],
              compiled: bool = True) -> dict[str, int]:
        """``names[slot] -> run length`` for every slot holding ``keys[0]`` (see ``runs``).

        Up to 64 slots, compiled, the running AND is a machine word and the dict is built in C.
        """
        if compiled and _compiled is not None and len(self._bits) <= 64:
            found: dict[str, int] = _compiled.match64(
                keys, self._keys, self._slots, self._shared, names)
            return found
        out: dict[str, int] = {}
        for at, mask in self.runs(keys, compiled):
            while mask:
                low = mask & -mask
                out[names[low.bit_length() - 1]] = at
                mask ^= low
        return out

    def add(self, keys: Iterable[int], slot: int) -> int:
        """Give ``slot`` every key in ``keys``; returns how many it did not hold before."""
        bits, shared, tk, ts, size = self._bits, self._shared, self._keys, self._slots, self._size
        bit = bits[slot]
        pair = self._pairs.setdefault
        added = lone = table = 0
        for k in keys:
            i = k % size
            t = tk[i]
            if t == k:
                other = ts[i]
                if other == slot:
                    continue
                tk[i] = i + 1  # a second holder: the key moves to the dict
                m = bits[other] | bit
                shared[k] = pair(m, m)
                table -= 1
                lone -= 1
                added += 1
                continue
            m = shared.get(k, 0)
            if m & bit:
                continue
            added += 1
            if m:
                if m & (m - 1):
                    shared[k] = m | bit
                else:  # a second holder
                    m |= bit
                    shared[k] = pair(m, m)
                    lone -= 1
            else:
                lone += 1
                if t == i + 1:
                    tk[i] = k
                    ts[i] = slot
                    table += 1
                else:
                    shared[k] = bit
        self._lone += lone
        self._table += table
        if self._lone > _GROW_AT * size:
            self._resize()
        if len(self._pairs) > _MAX_PAIRS:
            self._pairs.clear()
        return added

    def discard(self, keys: Iterable[int], slot: int) -> int:
        """Take ``slot`` off every key in ``keys``; returns how many it held."""
        bits, shared, tk, ts, size = self._bits, self._shared, self._keys, self._slots, self._size
        bit = bits[slot]
        pair = self._pairs.setdefault
        removed = lone = table = 0
        for k in keys:
            i = k % size
            if tk[i] == k:
                if ts[i] == slot:
                    tk[i] = i + 1
                    table -= 1
                    lone -= 1
                    removed += 1
                continue
            m = shared.get(k, 0)
            if not m & bit:
                continue
            removed += 1
            m ^= bit
            if not m:
                del shared[k]
                lone -= 1
            elif m & (m - 1):
                r = m & (m - 1)
                shared[k] = pair(m, m) if not r & (r - 1) else m
            else:  # down to one holder: back to the table if its position is free
                lone += 1
                if tk[i] == i + 1:
                    del shared[k]
                    tk[i] = k
                    ts[i] = m.bit_length() - 1
                    table += 1
                else:
                    shared[k] = bits[m.bit_length() - 1]
        self._lone += lone
        self._table += table
        if size > self._min and self._lone < _SHRINK_AT * size:
            self._resize()
        if len(self._pairs) > _MAX_PAIRS:
            self._pairs.clear()
        return removed

    def items(self) -> Iterator[tuple[int, int]]:
        """Every ``(key, mask)``, table first (order otherwise unspecified)."""
        bits, ts = self._bits, self._slots
        for i, k in enumerate(self._keys):
            if k != i + 1:
                yield k, bits[ts[i]]
        yield from self._shared.items()

    def to_dict(self) -> dict[int, int]:
        return dict(self.items())

    def check(self) -> None:
        """Raise AssertionError if the bookkeeping is off (for tests)."""
        size = self._size
        table = 0
        for i, k in enumerate(self._keys):
            if k != i + 1:
                assert k % size == i, ("key away from its position", k, i)
                assert k not in self._shared, ("key in both places", k)
                table += 1
        assert table == self._table, (table, self._table)
        assert all(self._shared.values()), "a zero mask is stored"
        lone = table + sum(1 for m in self._shared.values() if not m & (m - 1))
        assert lone == self._lone, (lone, self._lone)

    def _resize(self) -> None:
        """Rebuild the table sized for the lone keys now held, moving every lone key in."""
        size = max(self._min, int(self._lone / _TARGET) | 1)
        bits, old_keys, old_slots = self._bits, self._keys, self._slots
        lone = [(k, old_slots[i]) for i, k in enumerate(old_keys) if k != i + 1]
        shared = self._shared
        if len(shared) <= 4 * self._lone:  # worth a scan: lone keys there may move in
            for k, m in list(shared.items()):
                if not m & (m - 1):
                    lone.append((k, m.bit_length() - 1))
                    del shared[k]
        tk = array("Q", range(1, size + 1))
        ts = array("I", bytes(4 * size))
        table = 0
        for k, s in lone:
            i = k % size
            if tk[i] == i + 1:
                tk[i] = k
                ts[i] = s
                table += 1
            else:
                shared[k] = bits[s]
        self._size, self._keys, self._slots, self._table = size, tk, ts, table
