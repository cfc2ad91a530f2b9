"""LWWMap: a last-writer-wins map ordered by the writer's ``(generation, counter)``.

For node metadata (id, region, address, generation, engines...). Every key has exactly one
writer by design -- a node writes only its own entry -- so "last writer wins" never has to
arbitrate between concurrent writers and no add-wins (dot-based) set is needed. Should two
writers ever use the same version with different values, the larger encoded value wins, so
merge stays commutative even then.

A deletion is a write of a tombstone at a higher version. Tombstones remember the local time
they were written or received and are forgotten by ``gc(now, grace)``; a peer that was away
longer than ``grace`` and still holds the old value can bring it back (the usual trade-off).
Digests are per key, so this type is for maps of up to some thousands of keys.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import msgpack  # type: ignore[import-untyped,unused-ignore]

from crdt.base import DecodeError, Digest, Version
from crdt.wire import as_bool, as_int, as_list, as_str, check_plain

__all__ = ["LWWDelta", "LWWEntry", "LWWMap"]

_TAG = "lww"
_WIRE_VERSION = 1
_MAX_KEY = 1024


@dataclass(frozen=True, slots=True)
class LWWEntry:
    key: str
    version: Version
    deleted: bool
    value: object = None

    def to_wire(self) -> list[object]:
        return [self.key, self.version[0], self.version[1], self.deleted, self.value]

    def order(self) -> tuple[Version, bool, bytes]:
        """Total order used by merge: version first, then tombstone, then encoded value."""
        return (self.version, self.deleted, _packed(self.value))


@dataclass(frozen=True, slots=True)
class LWWDelta:
    entries: tuple[LWWEntry, ...] = ()

    def to_wire(self) -> list[object]:
        return [_TAG, _WIRE_VERSION, [e.to_wire() for e in self.entries]]

    def is_empty(self) -> bool:
        return not self.entries


@dataclass(slots=True)
class _Slot:
    entry: LWWEntry
    at: float


def _packed(value: object) -> bytes:
    out: bytes = msgpack.packb(value, use_bin_type=True)
    return out


def _check_version(version: Version) -> Version:
    gen, counter = version
    if type(gen) is not int or type(counter) is not int or gen < 0 or counter < 0:
        raise ValueError(f"version must be (generation, counter) of non-negative ints: {version!r}")
    return (gen, counter)


class LWWMap:
    """``key -> value`` where each key's latest ``(generation, counter)`` wins."""

    def __init__(self) -> None:
        self._slots: dict[str, _Slot] = {}

    # ---- writes ------------------------------------------------------------------------

    def set(self, key: str, value: object, version: Version, now: float) -> bool:
        """Write ``value`` (msgpack primitives) at ``version``; False if a newer one is held."""
        if not isinstance(key, str) or not key or len(key) > _MAX_KEY:
            raise ValueError(f"key must be a non-empty str of at most {_MAX_KEY} chars")
        try:
            check_plain(value)
        except DecodeError as exc:
            raise ValueError(f"value is not plain msgpack data: {exc}") from None
        return self._put(LWWEntry(key, _check_version(version), False, value), now)

    def delete(self, key: str, version: Version, now: float) -> bool:
        return self._put(LWWEntry(key, _check_version(version), True, None), now)

    def _put(self, entry: LWWEntry, now: float) -> bool:
        slot = self._slots.get(entry.key)
        if slot is not None:
            if entry.version < slot.entry.version:
                return False
            if entry.version == slot.entry.version and entry.order() <= slot.entry.order():
                return False
        self._slots[entry.key] = _Slot(entry, now)
        return True

    def gc(self, now: float, grace: float) -> int:
        """Forget tombstones older than ``grace``; returns how many."""
        old = [k for k, s in self._slots.items() if s.entry.deleted and s.at <= now - grace]
        for k in old:
            del self._slots[k]
        return len(old)

    # ---- reads -------------------------------------------------------------------------

    def get(self, key: str, default: object = None) -> object:
        slot = self._slots.get(key)
        if slot is None or slot.entry.deleted:
            return default
        return slot.entry.value

    def __contains__(self, key: object) -> bool:
        slot = self._slots.get(key) if isinstance(key, str) else None
        return slot is not None and not slot.entry.deleted

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(k for k, s in self._slots.items() if not s.entry.deleted))

    def __len__(self) -> int:
        return sum(1 for s in self._slots.values() if not s.entry.deleted)

    def items(self) -> dict[str, object]:
        return {k: s.entry.value for k, s in sorted(self._slots.items()) if not s.entry.deleted}

    def version(self, key: str) -> Version | None:
        """The version held for ``key``, tombstones included."""
        slot = self._slots.get(key)
        return slot.entry.version if slot is not None else None

    def entries(self) -> dict[str, LWWEntry]:
        """Every entry held, tombstones included (what convergence compares)."""
        return {k: s.entry for k, s in sorted(self._slots.items())}

    # ---- Replicated --------------------------------------------------------------------

    def digest(self) -> dict[str, Version]:
        return {k: s.entry.version for k, s in self._slots.items()}

    def delta_since(self, peer: Digest, now: float, max_bytes: int | None = None) -> LWWDelta:
        """Entries newer than the peer's; keys it lacks first. The first entry always fits."""
        del now
        wanted = []
        for k, s in self._slots.items():
            theirs = peer.get(k)
            if theirs is None or tuple(theirs) < s.entry.version:
                wanted.append((theirs is not None, k, s.entry))
        wanted.sort(key=lambda w: (w[0], w[1]))
        out: list[LWWEntry] = []
        used = 8
        for _, _, entry in wanted:
            if max_bytes is not None:
                cost = len(_packed(entry.to_wire()))
                if out and used + cost > max_bytes:
                    continue
                used += cost
            out.append(entry)
        return LWWDelta(tuple(out))

    def delta_from_wire(self, obj: object) -> LWWDelta:
        top = as_list(obj, "lww delta", length=3)
        if top[0] != _TAG:
            raise DecodeError(f"lww delta: wrong tag {top[0]!r}")
        as_int(top[1], "lww delta version", _WIRE_VERSION, _WIRE_VERSION)
        entries = []
        for item in as_list(top[2], "lww entries"):
            f = as_list(item, "lww entry", length=5)
            key = as_str(f[0], "lww key", max_len=_MAX_KEY)
            version = (as_int(f[1], "lww generation", 0), as_int(f[2], "lww counter", 0))
            deleted = as_bool(f[3], "lww deleted")
            check_plain(f[4])
            if deleted and f[4] is not None:
                raise DecodeError("lww entry: a tombstone carries no value")
            entries.append(LWWEntry(key, version, deleted, f[4]))
        return LWWDelta(tuple(entries))

    def merge(self, delta: LWWDelta, now: float) -> bool:
        changed = False
        for entry in delta.entries:
            changed |= self._put(entry, now)
        return changed

    def full_delta(self) -> LWWDelta:
        return self.delta_since({}, 0.0)
