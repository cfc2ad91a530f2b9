"""PrefixIndex: which replicas hold which prefix blocks, merged from per-replica slices.

Theory of operation
-------------------
One writer per fact. Replica R's *slice* (the set of block keys R holds) is written only
from R's own event stream, at versions ``(epoch, seq)`` taken from that stream. Routers
that ingest the same engine replay the same stream and reach identical slices, so merging
their deltas is idempotent; routers that do not ingest R learn its slice from gossip.

A slice is kept as an append-only *log* of operations ``(seq, store|remove, key)`` sorted by
seq (two compact ``array('Q')``: keys, plus runs of ``(seq|flag, end)``), and every held
(key, replica) pair is a bit in one global ``key -> replica bitmask`` map
(``crdt.holders``), which is what queries walk. The log is compacted to the latest
operation per key; removals ("tombstones") are kept back to a *horizon* ``h`` (at least
``grace`` seconds, see ``gc``, and at most ``max(live, min_tombstones)`` of them), so the
log always holds every operation after ``h`` and the latest store of every held key.

Versions and ranks. A slice at ``(epoch, seq)`` is *complete* (its history is whole) or
*partial* (history was lost: a subset of the truth). Slices of one replica are totally
ordered by ``(epoch, seq, state)`` with partial < complete < dropped, flattened into the
digest as ``(epoch, 3 * (seq + 1) + state)``: a digest entry is a *rank*, compared
lexicographically; ``version(replica)`` gives the plain ``(epoch, seq)``.

Deltas are made of *pieces*, one per replica:

- ``CONT`` (lo, hi]: the latest operation of every key whose latest operation lies in
  (lo, hi]. A receiver at seq ``y`` with lo <= y < hi applies the operations after ``y``.
- ``RESET``: a snapshot, the sender's whole log at its seq ``hi``; the receiver replaces its
  slice with it. Sent when the peer lacks the slice, holds an older epoch, has not seen a
  clear, or is partial while the sender is complete.

A CONT cut to a byte budget ends at a seq boundary, so the receiver's version only advances
to what it really got. A RESET that does not fit is cut by *key*: each piece holds the
entries of one arc ``[arc_lo, arc_lo + arc_len)`` of the u64 key space (mod 2**64), the
sender walking a cursor round the key space from piece to piece. The receiver *stages*
arcs (its slice and digest untouched, so it keeps answering queries from what it has) until
they cover the key space, then installs them at once as one RESET. Staging is a pointwise
join: per key point the arc of the newest snapshot seq wins, equal seqs unite, so pieces
merge in any order, duplicated or re-sent. Arcs of one snapshot install exactly that
snapshot; arcs from snapshots at several seqs (the origin moved on between pieces) install
at the oldest of them, ``v``, keeping only entries <= v: the receiver then has every key
whose latest operation is <= v and every key it holds is live as of v. Arcs of snapshots
older than a clear or a sender horizon that a staged piece reports are void (a slice
installed from them could not be continued). That is the
*catching up* state of a receiver whose ``base`` is above its data: any later CONT from a
sender whose horizon is <= base is safe. A CONT whose sender dropped tombstones the
receiver may still need (sender horizon > receiver base) is refused and the receiver asks
for a RESET by reporting rank 0 in its digest (it keeps answering queries from what it has
meanwhile); it takes no RESET older than what it holds. ``AllBlocksCleared`` empties the
log and records the clear's seq; peers that have not seen it get a RESET.

Whole replicas leave with ``drop``: a versioned tombstone that beats every slice of that
replica up to its version (a stale copy cannot come back) and loses to a later one; it is
garbage-collected by ``gc(now, grace)``.

Full-state deltas (no byte budget) join as a semilattice: commutative, associative,
idempotent. Cut pieces converge to the same state once all have been delivered.
"""

from __future__ import annotations

import sys
from array import array
from bisect import bisect_right
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from heapq import nsmallest
from itertools import repeat

from crdt.base import DecodeError, Digest, Version
from crdt.holders import HolderMap
from crdt.wire import as_bytes, as_int, as_list, as_str

__all__ = [
    "DropMark",
    "IndexDelta",
    "PrefixIndex",
    "SliceInfo",
    "SlicePiece",
]

MAX_SEQ = (1 << 62) - 1
"""Largest stream seq a slice accepts (the top bit of a log word flags removals)."""
MAX_EPOCH = (1 << 63) - 1

_FLAG = 1 << 63
_SEQ_MASK = _FLAG - 1
_OPEN = 1 << 63
"""Base of a slice that holds nothing: no held key can turn stale."""

PARTIAL, COMPLETE, DROPPED = 0, 1, 2
_BIG_ENDIAN = sys.byteorder == "big"
_WIRE_TAG = "pfx"
_WIRE_VERSION = 1
_PIECE_OVERHEAD = 64
_ARC_OVERHEAD = 20
_DELTA_OVERHEAD = 16
KEY_SPACE = 1 << 64
"""Arc lengths are taken in this key space; a piece of ``arc_len == KEY_SPACE`` is whole."""
_KEY_MASK = KEY_SPACE - 1
_FORCED_ARC_KEYS = 16
"""Keys in the first arc of a delta when the budget is below a piece's overhead."""
_GOLDEN = 0x9E3779B97F4A7C15
"""2**64 / golden ratio: each lap of a snapshot's arcs shifts by this (evenly spread shifts)."""


def _rank(seq: int, state: int) -> int:
    return 3 * (seq + 1) + state


def _seq_of(word: int) -> int:
    return word & _SEQ_MASK


def _to_le(a: array[int]) -> bytes:
    if _BIG_ENDIAN:
        a = array("Q", a)
        a.byteswap()
    return a.tobytes()


def _from_le(data: bytes) -> array[int]:
    a = array("Q")
    a.frombytes(data)
    if _BIG_ENDIAN:
        a.byteswap()
    return a


@dataclass(frozen=True, slots=True)
class SliceInfo:
    """What /mesh/status shows about one replica's slice."""

    replica: str
    version: Version
    partial: bool
    """History was lost: the slice is a subset of what the replica holds."""
    catching_up: bool
    """Filled from a cut snapshot (or waiting for one): newer keys may still be missing."""
    blocks: int
    horizon: int
    log_entries: int


@dataclass(frozen=True, slots=True)
class SlicePiece:
    """One replica's part of a delta; see the module docstring for CONT vs RESET."""

    replica: str
    epoch: int
    lo: int
    hi: int
    reset: bool
    complete: bool
    horizon: int
    base: int
    cleared: int
    runs: bytes
    """Little-endian u64 pairs ``(seq | removal flag, count)``, seq ascending."""
    keys: bytes
    """Little-endian u64 keys, ``sum(counts)`` of them."""
    arc_lo: int = 0
    arc_len: int = KEY_SPACE
    """A RESET cut by key holds the keys ``k`` with ``(k - arc_lo) % 2**64 < arc_len``."""

    @property
    def whole(self) -> bool:
        return self.arc_len >= KEY_SPACE

    def to_wire(self) -> list[object]:
        flags = (1 if self.reset else 0) | (2 if self.complete else 0)
        arc: list[object] = [] if self.whole else [self.arc_lo, self.arc_len]
        return [
            self.replica,
            self.epoch,
            self.lo,
            self.hi,
            flags,
            self.horizon,
            self.base,
            self.cleared,
            self.runs,
            self.keys,
            *arc,
        ]

    def entries(self) -> Iterator[tuple[int, bool, array[int]]]:
        """``(seq, removal, keys)`` runs in order."""
        runs = _from_le(self.runs)
        keys = _from_le(self.keys)
        at = 0
        for i in range(0, len(runs), 2):
            word, count = runs[i], runs[i + 1]
            yield word & _SEQ_MASK, bool(word & _FLAG), keys[at : at + count]
            at += count

    def key_count(self) -> int:
        return len(self.keys) // 8


@dataclass(frozen=True, slots=True)
class DropMark:
    """Replica ``replica`` is gone as of ``(epoch, seq)``."""

    replica: str
    epoch: int
    seq: int

    def to_wire(self) -> list[object]:
        return [self.replica, self.epoch, self.seq]


@dataclass(frozen=True, slots=True)
class IndexDelta:
    pieces: tuple[SlicePiece, ...] = ()
    drops: tuple[DropMark, ...] = ()

    def to_wire(self) -> list[object]:
        return [
            _WIRE_TAG,
            _WIRE_VERSION,
            [p.to_wire() for p in self.pieces],
            [d.to_wire() for d in self.drops],
        ]

    def is_empty(self) -> bool:
        return not self.pieces and not self.drops

    def estimated_bytes(self) -> int:
        return (
            _DELTA_OVERHEAD
            + sum(
                _PIECE_OVERHEAD
                + len(p.replica) * 4
                + len(p.runs)
                + len(p.keys)
                + (0 if p.whole else _ARC_OVERHEAD)
                for p in self.pieces
            )
            + sum(24 + len(d.replica) * 4 for d in self.drops)
        )


class _Slice:
    __slots__ = (
        "base",
        "bit",
        "changed_at",
        "clean",
        "cleared",
        "complete",
        "epoch",
        "gc_upto",
        "horizon",
        "keys",
        "last_rank",
        "live",
        "marks",
        "need_reset",
        "pending_gap",
        "run_ends",
        "run_words",
        "seq",
        "slot",
        "snap_cursor",
        "snap_laps",
        "snap_walked",
        "tombs",
    )

    def __init__(self, slot: int, bit: int, epoch: int, complete: bool) -> None:
        self.slot = slot
        self.bit = bit
        self.epoch = epoch
        self.complete = complete
        self.seq = -1
        self.base = _OPEN
        self.horizon = -1
        self.cleared = -1
        self.keys: array[int] = array("Q")
        self.run_words: array[int] = array("Q")
        self.run_ends: array[int] = array("Q")
        self.live = 0
        self.tombs = 0
        self.clean = True
        """No log entry is superseded by a later one (so slices of the log are already deduped)."""
        self.need_reset = False
        self.pending_gap = False
        self.gc_upto = -1
        self.marks: deque[tuple[float, int]] = deque()
        self.last_rank: tuple[int, int] = (-1, -1)
        self.changed_at: float | None = None
        self.snap_cursor = 0
        """Where the next key-cut snapshot piece starts (walks round the key space)."""
        self.snap_walked = 0
        self.snap_laps = 0
        """Key space walked since the cursor last jumped (see ``_snapshot``)."""

    def rank(self) -> int:
        """The digest's rank: 0 while waiting for a reset (so peers send one)."""
        return 0 if self.need_reset else self.held_rank()

    def held_rank(self) -> int:
        """The rank of what the slice holds. A slice waiting for a reset takes none below
        it: going back would lose writes, and an ingester would then continue its stream
        from a log that lacks the batches in between."""
        return _rank(self.seq, COMPLETE if self.complete else PARTIAL)

    def close_run(self, word: int) -> None:
        n = len(self.keys)
        if self.run_words and self.run_words[-1] == word:
            self.run_ends[-1] = n
        else:
            self.run_words.append(word)
            self.run_ends.append(n)


@dataclass(slots=True)
class _Dropped:
    epoch: int
    seq: int
    at: float

    def key(self) -> tuple[int, int]:
        return (self.epoch, _rank(self.seq, DROPPED))


@dataclass(slots=True)
class _Selection:
    """Latest-per-key log entries after some seq: parallel keys and runs."""

    keys: array[int]
    words: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)


def _segments(lo: int, length: int) -> list[tuple[int, int]]:
    """The arc ``[lo, lo + length)`` mod 2**64 as at most two plain intervals."""
    end = lo + length
    if end <= KEY_SPACE:
        return [(lo, end)]
    return [(lo, KEY_SPACE), (0, end - KEY_SPACE)]


@dataclass(slots=True)
class _Staging:
    """Arcs of snapshots of one replica at ``(epoch, complete)``, gathered until they cover
    the key space. ``cover`` is sorted, disjoint ``(start, end, snapshot seq)``; ``entries``
    maps each staged key to its log word. Every operation is a pointwise join (per key point
    the higher snapshot seq wins, equal seqs unite), so arrival order does not matter.

    Arcs of snapshots older than ``floor`` are void, as if never staged: the latest clear a
    staged piece has seen (they describe a log the clear emptied), or a staged sender's
    horizon (it forgot removals after them). Kept, they would install a slice no sender can
    continue -- a peer below a sender's clear gets a reset, and a continuation from a horizon
    above the peer's base is refused -- and the install would throw away the newer arcs."""

    epoch: int
    complete: bool
    cover: list[tuple[int, int, int]] = field(default_factory=list)
    entries: dict[int, int] = field(default_factory=dict)
    horizon: int = -1
    base: int = _OPEN
    cleared: int = -1
    floor: int = -1

    def add(self, p: SlicePiece) -> bool:
        v = p.hi
        if v < self.floor:
            return False
        changed = False
        if p.cleared > self.cleared:
            self.cleared, changed = p.cleared, True
        floor = max(p.cleared, min(p.horizon, v))  # a catching-up sender's may pass its seq
        if floor > self.floor:
            self.floor, changed = floor, True
            self.cover = [iv for iv in self.cover if iv[2] >= floor]
            spans = [(a, b) for a, b, _ in self.cover]
            self.entries = {k: w for k, w in self.entries.items() if _inside(k, spans)}
        if p.horizon > self.horizon:
            self.horizon, changed = p.horizon, True
        if p.base < self.base:
            self.base, changed = p.base, True
        # Paint the piece's arc over the cover: strictly newer wins, equal joins.
        win: list[tuple[int, int]] = []
        join: list[tuple[int, int]] = []
        cover = self.cover
        for a, b in _segments(p.arc_lo, p.arc_len):
            at = a
            for c0, c1, cv in cover:
                if c1 <= at or c0 >= b:
                    continue
                if c0 > at:
                    win.append((at, c0))
                lo_, hi_ = max(c0, at), min(c1, b)
                if cv < v:
                    win.append((lo_, hi_))
                elif cv == v:
                    join.append((lo_, hi_))
                at = hi_
            if at < b:
                win.append((at, b))
        if win:
            changed = True
            starts = sorted(win)
            gone = [k for k in self.entries if _inside(k, starts)]
            for k in gone:
                del self.entries[k]
            new: list[tuple[int, int, int]] = []
            for c0, c1, cv in cover:  # cut the winning intervals out of the old cover
                pieces = [(c0, c1)]
                for w0, w1 in starts:
                    nxt = []
                    for x0, x1 in pieces:
                        if w1 <= x0 or w0 >= x1:
                            nxt.append((x0, x1))
                            continue
                        if x0 < w0:
                            nxt.append((x0, w0))
                        if w1 < x1:
                            nxt.append((w1, x1))
                    pieces = nxt
                new.extend((x0, x1, cv) for x0, x1 in pieces)
            new.extend((w0, w1, v) for w0, w1 in starts)
            new.sort()
            merged: list[tuple[int, int, int]] = []
            for iv in new:  # canonical form: adjacent intervals of one seq fuse
                if merged and merged[-1][1] == iv[0] and merged[-1][2] == iv[2]:
                    merged[-1] = (merged[-1][0], iv[1], iv[2])
                else:
                    merged.append(iv)
            self.cover = merged
        take = sorted(win + join)
        if take:
            entries = self.entries
            for seq, removal, keys in p.entries():
                word = seq | _FLAG if removal else seq
                for k in keys:
                    if _inside(k, take):
                        old = entries.get(k)
                        if old is None or (old & _SEQ_MASK, old) < (seq, word):
                            entries[k] = word
                            changed = True
        return changed

    def covered(self) -> bool:
        return sum(b - a for a, b, _ in self.cover) == KEY_SPACE

    def best(self) -> int:
        return max((v for _, _, v in self.cover), default=-1)

    def snapshot(self, replica: str) -> SlicePiece:
        """The staged arcs as one whole RESET at the oldest snapshot seq among them."""
        v = min(cv for _, _, cv in self.cover)
        by_word: dict[int, list[int]] = {}
        for k, w in self.entries.items():
            if w & _SEQ_MASK <= v:
                by_word.setdefault(w, []).append(k)
        runs: array[int] = array("Q")
        keys: array[int] = array("Q")
        for w in sorted(by_word, key=lambda w: (w & _SEQ_MASK, w)):
            ks = sorted(by_word[w])
            runs.append(w)
            runs.append(len(ks))
            keys.extend(ks)
        return SlicePiece(
            replica=replica,
            epoch=self.epoch,
            lo=-1,
            hi=v,
            reset=True,
            complete=self.complete,
            horizon=self.horizon,
            base=max(self.base, v),
            cleared=self.cleared,  # <= v: no arc below it is staged
            runs=_to_le(runs),
            keys=_to_le(keys),
        )


def _inside(k: int, intervals: list[tuple[int, int]]) -> bool:
    """``k`` lies in one of the sorted, disjoint ``intervals``."""
    i = bisect_right(intervals, (k, KEY_SPACE + 1)) - 1
    return i >= 0 and intervals[i][0] <= k < intervals[i][1]


def _check_version(version: Version) -> tuple[int, int]:
    try:
        epoch, seq = version
    except (TypeError, ValueError):
        raise ValueError(f"version must be (epoch, seq), got {version!r}") from None
    if type(epoch) is not int or not 0 <= epoch <= MAX_EPOCH:
        raise ValueError(f"epoch must be an int in [0, 2**63), got {epoch!r}")
    if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
        raise ValueError(f"seq must be an int in [0, 2**62), got {seq!r}")
    return epoch, seq


def _as_keys(keys: Iterable[int]) -> array[int]:
    try:
        return array("Q", keys)
    except (OverflowError, TypeError) as exc:
        raise ValueError(f"block keys must be unsigned 64-bit ints: {exc}") from None


class PrefixIndex:
    """The merged ``block key -> replicas`` map; see the module docstring.

    ``min_tombstones``: removals kept per slice whatever the live size (memory valve: at most
    ``max(live, min_tombstones)`` are kept; below that, ``gc(now, grace)`` decides).
    """

    def __init__(self, *, min_tombstones: int = 1 << 16) -> None:
        self._slices: dict[str, _Slice] = {}
        self._dropped: dict[str, _Dropped] = {}
        self._names: list[str] = []
        self._free: list[int] = []
        self._bits: list[int] = []
        """slot -> its bit: keys held by one replica all share this int object (memory)."""
        self._holders = HolderMap(self._bits)
        self._mask_names: dict[int, tuple[str, ...]] = {}
        """Cache: bitmask -> replica names (cleared whenever a slot changes hands)."""
        self._min_tombstones = min_tombstones
        self._staging: dict[str, _Staging] = {}
        """Arcs of key-cut snapshots still arriving, per replica (not yet part of the state)."""

    # ---- IndexWriter (local ingestion) -------------------------------------------------

    def reset(self, replica: str, epoch: int, partial: bool = False) -> None:
        """Ingestion starts (or restarts) following ``replica`` in ``epoch``.

        A new epoch empties the slice. For the epoch the index already holds (from gossip
        or an earlier run) the slice is kept and writes at versions it already has are
        ignored; with ``partial=True`` the first write must follow on from the slice's seq
        (seq + 1), otherwise history was lost: the slice is emptied and flagged partial.
        """
        epoch, _ = _check_version((epoch, 0))
        s = self._slices.get(replica)
        if s is None or epoch > s.epoch:
            d = self._dropped.get(replica)
            if d is not None and d.epoch >= epoch:
                return  # a drop at this epoch or later wins; a later write may resurrect
            s = self._fresh(replica, epoch, complete=not partial)
            s.pending_gap = partial
            return
        if epoch == s.epoch and partial:
            s.pending_gap = True

    def store(self, replica: str, version: Version, keys: Sequence[int]) -> None:
        ks = _as_keys(keys)
        s = self._writable(replica, version)
        if s is None:
            return
        self._apply_store(s, version[1], ks)
        self._advance_local(s, version[1])

    def remove(self, replica: str, version: Version, keys: Sequence[int]) -> None:
        ks = _as_keys(keys)
        s = self._writable(replica, version)
        if s is None:
            return
        self._apply_remove(s, version[1], ks)
        self._advance_local(s, version[1])

    def clear(self, replica: str, version: Version) -> None:
        s = self._writable(replica, version)
        if s is None:
            return
        self._wipe(s)
        s.cleared = version[1]
        self._advance_local(s, version[1])

    def _advance_local(self, s: _Slice, seq: int) -> None:
        s.seq = seq
        s.base = seq
        self._maybe_compact(s)

    def _writable(self, replica: str, version: Version) -> _Slice | None:
        epoch, seq = _check_version(version)
        s = self._slices.get(replica)
        if s is None or epoch > s.epoch:
            d = self._dropped.get(replica)
            if d is not None and (d.epoch, d.seq) >= (epoch, seq):
                return None
            # No reset for this epoch (or the replica was dropped): history unknown.
            s = self._fresh(replica, epoch, complete=False)
            s.horizon = seq - 1
            return s
        if epoch < s.epoch:
            return None
        if s.need_reset:
            if s.base != s.seq or seq > s.seq + 1:
                self._restart_partial(s, seq)
                return s
            # What we hold is exact at our seq (a refused continuation changed nothing), and
            # the stream follows on from it: continue it, no reset needed.
            s.need_reset = False
        if seq < s.seq:
            return None
        if s.pending_gap:
            if seq == s.seq:
                return None
            s.pending_gap = False
            if seq != s.seq + 1:
                self._restart_partial(s, seq)
        return s

    def _restart_partial(self, s: _Slice, seq: int) -> None:
        """Our stream resumes at ``seq`` with a gap: keep only what follows (a subset)."""
        self._wipe(s)
        s.need_reset = False
        s.pending_gap = False
        s.complete = False
        s.cleared = -1
        s.horizon = max(s.horizon, seq - 1)

    # ---- expiry ------------------------------------------------------------------------

    def drop(self, replica: str, version: Version | None = None, *, now: float) -> bool:
        """Forget ``replica`` as of ``version`` (default: the slice's own), leaving a tombstone.

        A slice of that replica at or below ``version`` cannot come back from a peer's stale
        copy; a later version (the replica came back) replaces the tombstone.
        """
        s = self._slices.get(replica)
        if version is None:
            if s is None:
                return False
            version = (s.epoch, max(s.seq, -1))
            epoch, seq = version
        else:
            epoch, seq = _check_version(version)
        return self._apply_drop(DropMark(replica, epoch, seq), now)

    def gc(self, now: float, grace: float) -> int:
        """Housekeeping, called now and then with the caller's clock.

        Drop tombstones older than ``grace`` are forgotten, and key removals logged more than
        ``grace`` ago become eligible for compaction (peers behind them get a snapshot).
        Returns the number of drop tombstones forgotten.
        """
        cutoff = now - grace
        for s in self._slices.values():
            self._note_change(s, now)
            marks = s.marks
            if not marks or marks[-1][1] != s.seq:
                marks.append((now, s.seq))
            while len(marks) >= 2 and marks[1][0] <= cutoff:
                marks.popleft()
            if marks[0][0] <= cutoff and marks[0][1] > s.gc_upto:
                s.gc_upto = marks[0][1]
        old = [name for name, d in self._dropped.items() if d.at <= cutoff]
        for name in old:
            del self._dropped[name]
        for name in [n for n in self._staging if self._stale_staging(n)]:
            del self._staging[name]
        return len(old)

    def idle(self, now: float, min_idle: float) -> list[str]:
        """Replicas whose slice has not changed for ``min_idle`` (by the caller's clock).

        The first call only starts the clocks. The caller decides whether an idle replica is
        gone (nobody ingests it any more) and then calls ``drop``.
        """
        out = []
        for name, s in self._slices.items():
            self._note_change(s, now)
            if s.changed_at is not None and now - s.changed_at >= min_idle:
                out.append(name)
        return sorted(out)

    def _note_change(self, s: _Slice, now: float) -> None:
        r = (s.epoch, s.rank())
        if r != s.last_rank:
            s.last_rank = r
            s.changed_at = now

    def compact(self) -> None:
        """Compact every slice's log now (normally done as logs grow)."""
        for s in self._slices.values():
            self._compact(s)

    # ---- queries -----------------------------------------------------------------------

    def match(self, keys: Sequence[int]) -> dict[str, int]:
        """For each replica holding ``keys[0]``: how many leading keys it holds in a row.

        A replica's count stops at its first miss, as the engine's prefix cache does.
        Replicas holding none of the prefix are absent (count 0).
        """
        return self._holders.match(keys, self._names) if keys else {}

    def _names_for(self, mask: int) -> tuple[str, ...]:
        names = self._mask_names.get(mask)
        if names is None:
            found = []
            m = mask
            while m:
                low = m & -m
                found.append(self._names[low.bit_length() - 1])
                m ^= low
            names = tuple(found)
            if len(self._mask_names) >= 4096:
                self._mask_names.clear()
            self._mask_names[mask] = names
        return names

    def holders(self, key: int) -> list[str]:
        """Replicas holding block ``key``."""
        return list(self._names_for(self._holders.get(key)))

    def first_block_holders(self, keys: Sequence[int]) -> list[str]:
        """Replicas holding the first block of ``keys`` (the candidates for any cache hit)."""
        return self.holders(keys[0]) if keys else []

    def blocks(self, replica: str) -> int:
        s = self._slices.get(replica)
        return s.live if s is not None else 0

    def replicas(self) -> list[str]:
        """Replicas with a slice (dropped ones excluded), sorted."""
        return sorted(self._slices)

    def version(self, replica: str) -> Version | None:
        s = self._slices.get(replica)
        return (s.epoch, s.seq) if s is not None else None

    def slice_info(self, replica: str) -> SliceInfo | None:
        s = self._slices.get(replica)
        if s is None:
            return None
        return SliceInfo(
            replica=replica,
            version=(s.epoch, s.seq),
            partial=not s.complete,
            catching_up=s.need_reset or s.base > s.seq or replica in self._staging,
            blocks=s.live,
            horizon=s.horizon,
            log_entries=len(s.keys),
        )

    def slices(self) -> list[SliceInfo]:
        return [info for name in self.replicas() if (info := self.slice_info(name)) is not None]

    def dropped(self) -> dict[str, Version]:
        """Drop tombstones still remembered: replica -> version it was dropped at."""
        return {name: (d.epoch, d.seq) for name, d in sorted(self._dropped.items())}

    def keys(self, replica: str) -> set[int]:
        """Every block key ``replica`` holds (a full scan of its log: for tests and tools)."""
        s = self._slices.get(replica)
        if s is None:
            return set()
        get, bit = self._holders.get, s.bit
        return {k for k in s.keys if get(k) & bit}

    def pair_count(self) -> int:
        return sum(s.live for s in self._slices.values())

    def content(self) -> dict[str, tuple[object, ...]]:
        """A comparable summary of the replicated state (what convergence means).

        Live slices map to ``(epoch, seq, complete, frozenset(keys))``; dropped replicas to
        ``("dropped", epoch, seq)``. Bookkeeping (logs, horizons, bases) is left out.
        """
        out: dict[str, tuple[object, ...]] = {}
        for name, s in self._slices.items():
            out[name] = (s.epoch, s.seq, s.complete, frozenset(self.keys(name)))
        for name, d in self._dropped.items():
            out[name] = ("dropped", d.epoch, d.seq)
        return out

    # ---- Replicated --------------------------------------------------------------------

    def digest(self) -> dict[str, Version]:
        """Per replica ``(epoch, rank)``, rank = 3 * (seq + 1) + 0/1/2 (partial/complete/drop)."""
        out = {name: (s.epoch, s.rank()) for name, s in self._slices.items()}
        for name, d in self._dropped.items():
            out[name] = d.key()
        return out

    def delta_since(self, peer: Digest, now: float, max_bytes: int | None = None) -> IndexDelta:
        """What a peer whose digest is ``peer`` lacks, cut to about ``max_bytes``.

        Drops go first, then snapshots, then continuations, the most behind first. The first
        piece is never cut below one seq's worth of entries (a continuation) or one key (an
        arc of a snapshot), so progress never stalls on a budget.
        """
        del now  # versions, not clocks, decide; kept for the protocol
        budget = max_bytes if max_bytes is not None else -1
        used = _DELTA_OVERHEAD
        drops: list[DropMark] = []
        plans: list[tuple[int, int, str, _Slice, int]] = []
        for name, d in self._dropped.items():
            mine = d.key()
            theirs = peer.get(name)
            if theirs is None or tuple(theirs) < mine:
                drops.append(DropMark(name, d.epoch, d.seq))
        for name, s in self._slices.items():
            if s.need_reset:
                continue
            mine = (s.epoch, s.rank())
            theirs = peer.get(name)
            if theirs is not None and tuple(theirs) >= mine:
                continue
            if theirs is None or theirs[0] < s.epoch:
                lo, kind = -1, 1
            else:
                pseq, pstate = divmod(theirs[1], 3)
                pseq -= 1
                upgrade = pstate == PARTIAL and s.complete  # a complete slice replaces it
                if pstate == DROPPED or pseq < 0 or pseq < s.cleared or upgrade:
                    lo, kind = -1, 1
                else:
                    lo, kind = pseq, 2
            behind = len(s.keys) - self._entry_index_after(s, lo)
            plans.append((kind, -behind, name, s, lo))
        plans.sort(key=lambda p: (p[0], p[1], p[2]))
        drops.sort(key=lambda d: d.replica)
        kept: list[DropMark] = []
        for dm in drops:
            cost = 24 + 4 * len(dm.replica)
            if budget >= 0 and used + cost > budget and kept:
                break
            kept.append(dm)
            used += cost
        pieces: list[SlicePiece] = []
        for kind, _, name, s, lo in plans:
            room = -1 if budget < 0 else budget - used
            force = not pieces and not kept
            if kind == 1:
                piece = self._snapshot(name, s, room=room, force=force)
            else:
                piece = self._piece(name, s, lo, room=room, force=force)
            if piece is None:
                continue
            pieces.append(piece)
            used += _PIECE_OVERHEAD + 4 * len(name) + len(piece.runs) + len(piece.keys)
            used += 0 if piece.whole else _ARC_OVERHEAD
        drops = kept
        return IndexDelta(tuple(pieces), tuple(drops))

    def delta_from_wire(self, obj: object) -> IndexDelta:
        top = as_list(obj, "prefix delta", length=4)
        if top[0] != _WIRE_TAG:
            raise DecodeError(f"prefix delta: wrong tag {top[0]!r}")
        as_int(top[1], "prefix delta version", _WIRE_VERSION, _WIRE_VERSION)
        pieces = tuple(_piece_from_wire(p) for p in as_list(top[2], "prefix delta pieces"))
        drops = tuple(_drop_from_wire(d) for d in as_list(top[3], "prefix delta drops"))
        return IndexDelta(pieces, drops)

    def merge(self, delta: IndexDelta, now: float) -> bool:
        changed = False
        for dm in delta.drops:
            changed |= self._apply_drop(dm, now)
        for piece in delta.pieces:
            changed |= self._apply_piece(piece)
        return changed

    def full_delta(self) -> IndexDelta:
        """Everything this index knows (what a peer with an empty digest would get)."""
        return self.delta_since({}, 0.0)

    # ---- applying pieces and drops -----------------------------------------------------

    def _apply_drop(self, dm: DropMark, now: float) -> bool:
        mark = (dm.epoch, _rank(dm.seq, DROPPED))
        s = self._slices.get(dm.replica)
        if s is not None:
            if (s.epoch, s.rank()) >= mark:
                return False
            self._release(dm.replica, s)
        else:
            d = self._dropped.get(dm.replica)
            if d is not None and d.key() >= mark:
                return False
        self._dropped[dm.replica] = _Dropped(dm.epoch, dm.seq, now)
        return True

    def _apply_piece(self, p: SlicePiece) -> bool:
        if not p.whole:
            return self._stage(p)
        s = self._slices.get(p.replica)
        prank = (p.epoch, _rank(p.hi, COMPLETE if p.complete else PARTIAL))
        if s is None or p.epoch > s.epoch:
            if not p.reset:
                return False
            d = self._dropped.get(p.replica)
            if d is not None and d.key() >= prank:
                return False
            s = self._fresh(p.replica, p.epoch, complete=p.complete)
            self._load(s, p)
            return True
        if p.epoch < s.epoch:
            return False
        if s.need_reset:
            if not p.reset or prank < (s.epoch, s.held_rank()):
                return False
            self._load(s, p)
            return True
        if p.reset:
            if prank <= (s.epoch, s.rank()):
                return False
            self._load(s, p)
            return True
        if p.lo > s.seq or p.hi <= s.seq:
            return False
        if p.horizon > s.base:
            s.need_reset = True  # the sender forgot removals we may still need
            return True
        old_seq = s.seq
        for seq, removal, keys in p.entries():
            if seq <= old_seq:
                continue
            if removal:
                self._apply_remove(s, seq, keys)
            else:
                self._apply_store(s, seq, keys)
        s.complete = s.complete and (p.complete or old_seq >= p.horizon)
        s.base = min(max(s.base, p.hi), p.base)
        s.horizon = max(s.horizon, p.horizon)
        s.seq = p.hi
        self._maybe_compact(s)
        return True

    def _stage(self, p: SlicePiece) -> bool:
        """Gather an arc of a snapshot; install the snapshot once the arcs cover the key space."""
        prank = (p.epoch, _rank(p.hi, COMPLETE if p.complete else PARTIAL))
        s = self._slices.get(p.replica)
        if s is not None and (
            p.epoch < s.epoch
            or prank < (s.epoch, s.held_rank())
            or (not s.need_reset and prank == (s.epoch, s.held_rank()))
        ):
            return False
        d = self._dropped.get(p.replica)
        if d is not None and d.key() >= prank:
            return False
        st = self._staging.get(p.replica)
        if st is None or (p.epoch, p.complete) > (st.epoch, st.complete):
            st = self._staging[p.replica] = _Staging(p.epoch, p.complete)
        elif (p.epoch, p.complete) < (st.epoch, st.complete):
            return False
        changed = st.add(p)
        if st.covered():
            del self._staging[p.replica]
            self._apply_piece(st.snapshot(p.replica))
        return changed

    def _stale_staging(self, replica: str) -> bool:
        """Nothing the staged arcs could install would beat what we hold now."""
        st = self._staging[replica]
        best = (st.epoch, _rank(st.best(), COMPLETE if st.complete else PARTIAL))
        s = self._slices.get(replica)
        if s is not None and (
            best < (s.epoch, s.held_rank()) or (not s.need_reset and best == (s.epoch, s.rank()))
        ):
            return True
        d = self._dropped.get(replica)
        return d is not None and d.key() >= best

    def _load(self, s: _Slice, p: SlicePiece) -> None:
        """Replace ``s`` by a RESET piece."""
        self._wipe(s)
        s.epoch = p.epoch
        s.need_reset = False
        s.pending_gap = False
        s.complete = p.complete
        for seq, removal, keys in p.entries():
            if removal:
                self._apply_remove(s, seq, keys)
            else:
                self._apply_store(s, seq, keys)
        s.seq = p.hi
        s.base = p.base
        s.horizon = p.horizon
        s.cleared = p.cleared
        self._maybe_compact(s)

    # ---- slice storage -----------------------------------------------------------------

    def _fresh(self, replica: str, epoch: int, complete: bool) -> _Slice:
        """An empty slice for ``replica`` at ``(epoch, -1)``, reusing its slot if it has one."""
        self._dropped.pop(replica, None)
        s = self._slices.get(replica)
        if s is not None:
            self._wipe(s)
            slot = s.slot
        elif self._free:
            slot = self._free.pop()
        else:
            slot = len(self._names)
            self._names.append(replica)
            self._bits.append(1 << slot)
        self._names[slot] = replica
        self._mask_names.clear()
        fresh = _Slice(slot, self._bits[slot], epoch, complete)
        self._slices[replica] = fresh
        return fresh

    def _release(self, replica: str, s: _Slice) -> None:
        self._wipe(s)
        del self._slices[replica]
        self._names[s.slot] = ""
        self._free.append(s.slot)
        self._mask_names.clear()

    def _wipe(self, s: _Slice) -> None:
        self._holders.discard(s.keys, s.slot)
        s.keys = array("Q")
        s.run_words = array("Q")
        s.run_ends = array("Q")
        s.live = 0
        s.tombs = 0
        s.clean = True

    def _apply_store(self, s: _Slice, seq: int, keys: array[int]) -> None:
        # Every store is logged, even of a held key: the log must carry each key's latest
        # operation, or a peer that saw a later removal would never see the key come back.
        if not keys:
            return
        added = self._holders.add(keys, s.slot)
        s.keys.extend(keys)
        s.live += added
        if s.tombs or added < len(keys):
            s.clean = False  # may supersede a logged entry
        s.close_run(seq)

    def _apply_remove(self, s: _Slice, seq: int, keys: array[int]) -> None:
        if not keys:
            return
        s.live -= self._holders.discard(keys, s.slot)
        s.keys.extend(keys)
        s.tombs += len(keys)
        s.clean = False
        s.close_run(seq | _FLAG)

    def _entry_index_after(self, s: _Slice, lo: int) -> int:
        """Index of the first log entry with seq > ``lo``."""
        if lo < 0:
            return 0
        r = bisect_right(s.run_words, lo, key=_seq_of)
        return s.run_ends[r - 1] if r else 0

    def _select(self, s: _Slice, lo: int) -> _Selection:
        """Entries with seq > ``lo`` that are the latest entry for their key."""
        r0 = bisect_right(s.run_words, lo, key=_seq_of) if lo >= 0 else 0
        words, ends, log = s.run_words, s.run_ends, s.keys
        if s.clean:
            start = ends[r0 - 1] if r0 else 0
            sel = _Selection(log[start:])
            prev = start
            for r in range(r0, len(words)):
                sel.words.append(words[r])
                sel.counts.append(ends[r] - prev)
                prev = ends[r]
            return sel
        seen: set[int] = set()
        out_keys: array[int] = array("Q")
        out_words: list[int] = []
        out_counts: list[int] = []
        for r in range(len(words) - 1, r0 - 1, -1):
            a = ends[r - 1] if r else 0
            cnt = 0
            for i in range(ends[r] - 1, a - 1, -1):
                k = log[i]
                if k not in seen:
                    seen.add(k)
                    out_keys.append(k)
                    cnt += 1
            if cnt:
                if out_words and out_words[-1] == words[r]:
                    out_counts[-1] += cnt
                else:
                    out_words.append(words[r])
                    out_counts.append(cnt)
        out_keys.reverse()
        out_words.reverse()
        out_counts.reverse()
        return _Selection(out_keys, out_words, out_counts)

    def _snapshot(self, name: str, s: _Slice, *, room: int, force: bool) -> SlicePiece | None:
        """A RESET: whole if it fits ``room``, else the next arc of the key space that does."""
        if not s.clean and len(s.keys) > 2 * max(s.live, 64):
            self._compact(s)
        sel = self._select(s, -1)
        fixed = _PIECE_OVERHEAD + 4 * len(name)
        n = len(sel.keys)
        fits = room < 0 or fixed + 8 * n + 16 * len(sel.words) <= room
        if fits or (n == 0 and force):
            return self._make(name, s, sel.keys, sel.words, sel.counts, -1, s.seq, reset=True)
        if n == 0:
            return None
        fixed += _ARC_OVERHEAD
        if fixed + 24 > room and not force:
            return None
        # Laps round the key space: within a lap consecutive arcs tile it, so a peer fed by
        # one sender is covered after one lap. Peers served in turn by one sender each get
        # every k-th arc; so each lap starts at another key, picked by rank along a golden
        # ratio sequence (evenly spread), and arcs a peer missed fall across arcs it has.
        if s.snap_walked == 0:
            s.snap_laps += 1
            rank = (((s.snap_laps * _GOLDEN) & _KEY_MASK) * n) >> 64
            start = sorted(sel.keys)[rank]
        else:
            start = s.snap_cursor
        # The first piece of a delta takes one key at least, or a few if the budget does not
        # even cover a piece's overhead (as a continuation takes one seq's worth).
        floor = (1 if room >= fixed + 24 else _FORCED_ARC_KEYS) if force else 0
        fit = max(1, floor, (room - fixed) // 8)
        word_of: list[int] = []
        for w, c in zip(sel.words, sel.counts, strict=True):
            word_of.extend(repeat(w, c))
        cand = nsmallest(
            fit + 1,
            (((k - start) & _KEY_MASK, k, w) for k, w in zip(sel.keys, word_of, strict=True)),
        )
        cost, seen, taken = fixed, set(), 0
        for _, _, w in cand:
            extra = 8 if w in seen else 24
            if cost + extra > room and taken >= floor:
                break
            cost += extra
            seen.add(w)
            taken += 1
        if taken == 0:
            return None
        arc_len = KEY_SPACE if taken == len(cand) else cand[taken][0]
        by_word: dict[int, list[int]] = {}
        for _, k, w in cand[:taken]:
            by_word.setdefault(w, []).append(k)
        words = sorted(by_word, key=lambda w: (w & _SEQ_MASK, w))
        keys: array[int] = array("Q")
        for w in words:
            keys.extend(by_word[w])
        s.snap_walked += arc_len
        if s.snap_walked >= KEY_SPACE:
            s.snap_walked = 0
        s.snap_cursor = (start + arc_len) & _KEY_MASK
        return self._make(
            name,
            s,
            keys,
            words,
            [len(by_word[w]) for w in words],
            -1,
            s.seq,
            reset=True,
            arc=(start, arc_len) if arc_len < KEY_SPACE else (0, KEY_SPACE),
        )

    def _make(
        self,
        name: str,
        s: _Slice,
        keys: array[int],
        words: Sequence[int],
        counts: Sequence[int],
        lo: int,
        hi: int,
        *,
        reset: bool,
        arc: tuple[int, int] = (0, KEY_SPACE),
    ) -> SlicePiece:
        runs = array("Q")
        for w, c in zip(words, counts, strict=True):
            runs.append(w)
            runs.append(c)
        return SlicePiece(
            replica=name,
            epoch=s.epoch,
            lo=lo,
            hi=hi,
            reset=reset,
            complete=s.complete,
            horizon=s.horizon,
            base=s.base,
            cleared=s.cleared,
            runs=_to_le(runs),
            keys=_to_le(keys),
            arc_lo=arc[0],
            arc_len=arc[1],
        )

    def _piece(self, name: str, s: _Slice, lo: int, *, room: int, force: bool) -> SlicePiece | None:
        """A CONT (lo, hi], cut at a seq boundary to fit ``room``."""
        sel = self._select(s, lo)
        n_runs = len(sel.words)
        fixed = _PIECE_OVERHEAD + 4 * len(name)
        total = fixed + 8 * len(sel.keys) + 16 * n_runs
        hi = s.seq
        n_keys, n_take = len(sel.keys), n_runs
        if room >= 0 and total > room:
            if not n_runs:
                if not force:
                    return None
            else:
                # The longest prefix of whole seqs that fits (at least one seq if forced).
                cost, n_take, n_keys, r = fixed, 0, 0, 0
                while r < n_runs:
                    seq = sel.words[r] & _SEQ_MASK
                    g, g_keys = r, 0
                    while g < n_runs and sel.words[g] & _SEQ_MASK == seq:
                        g_keys += sel.counts[g]
                        g += 1
                    g_cost = 8 * g_keys + 16 * (g - r)
                    if cost + g_cost > room and not (force and n_take == 0):
                        break
                    cost, n_take, n_keys, r = cost + g_cost, g, n_keys + g_keys, g
                if n_take == 0:
                    return None
                if n_take < n_runs:
                    hi = sel.words[n_take - 1] & _SEQ_MASK
        keys = sel.keys if n_keys == len(sel.keys) else sel.keys[:n_keys]
        return self._make(
            name, s, keys, sel.words[:n_take], sel.counts[:n_take], lo, hi, reset=False
        )

    # ---- compaction --------------------------------------------------------------------

    def _maybe_compact(self, s: _Slice) -> None:
        slack = 2 * max(s.live, self._min_tombstones)
        if len(s.keys) - s.live > slack:
            self._compact(s)

    def _compact(self, s: _Slice) -> None:
        """Keep the latest entry per key; forget removals back to the new horizon."""
        sel = self._select(s, -1)
        words, counts, keys = sel.words, sel.counts, sel.keys
        tombs = sum(c for w, c in zip(words, counts, strict=True) if w & _FLAG)
        cap = max(s.live, self._min_tombstones)
        drop_upto = s.gc_upto
        if tombs > cap:
            # forget the oldest removals beyond the cap (whole seqs at a time)
            excess = tombs - cap
            for w, c in zip(words, counts, strict=True):
                if w & _FLAG:
                    excess -= c
                    if excess <= 0:
                        drop_upto = max(drop_upto, w & _SEQ_MASK)
                        break
        horizon = s.horizon
        new_keys: array[int] = array("Q")
        new_words: array[int] = array("Q")
        new_ends: array[int] = array("Q")
        at = 0
        kept_tombs = 0
        for w, c in zip(words, counts, strict=True):
            seq = w & _SEQ_MASK
            if w & _FLAG:
                if seq <= drop_upto:
                    horizon = max(horizon, seq)
                    at += c
                    continue
                kept_tombs += c
            new_keys.extend(keys[at : at + c])
            at += c
            if new_words and new_words[-1] == w:
                new_ends[-1] = len(new_keys)
            else:
                new_words.append(w)
                new_ends.append(len(new_keys))
        s.keys, s.run_words, s.run_ends = new_keys, new_words, new_ends
        s.tombs = kept_tombs
        s.horizon = horizon
        s.clean = True

    # ---- checks ------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise AssertionError if the bitmask index disagrees with the slice logs."""
        derived: dict[int, int] = {}
        for name, s in self._slices.items():
            assert self._names[s.slot] == name, (name, s.slot)
            latest: dict[int, bool] = {}
            prev_seq = -1
            at = 0
            for w, end in zip(s.run_words, s.run_ends, strict=True):
                assert (w & _SEQ_MASK) >= prev_seq, "log out of order"
                prev_seq = w & _SEQ_MASK
                for k in s.keys[at:end]:
                    latest[k] = not (w & _FLAG)
                at = end
            assert at == len(s.keys), "runs do not cover the log"
            held = {k for k, live in latest.items() if live}
            assert len(held) == s.live, (name, len(held), s.live)
            for k in held:
                derived[k] = derived.get(k, 0) | s.bit
            assert prev_seq <= max(s.seq, 0) or not s.keys, (name, prev_seq, s.seq)
        self._holders.check()
        assert derived == self._holders.to_dict(), "holder masks disagree with slice logs"


def _piece_from_wire(obj: object) -> SlicePiece:
    f = as_list(obj, "slice piece")
    if len(f) not in (10, 12):
        raise DecodeError(f"slice piece: expected 10 or 12 items, got {len(f)}")
    replica = as_str(f[0], "piece replica")
    epoch = as_int(f[1], "piece epoch", 0, MAX_EPOCH)
    lo = as_int(f[2], "piece lo", -1, MAX_SEQ)
    hi = as_int(f[3], "piece hi", lo, MAX_SEQ)
    flags = as_int(f[4], "piece flags", 0, 3)
    horizon = as_int(f[5], "piece horizon", -1, MAX_SEQ)
    base = as_int(f[6], "piece base", hi, _OPEN)
    cleared = as_int(f[7], "piece cleared", -1, hi)
    runs_b = as_bytes(f[8], "piece runs", 16)
    keys_b = as_bytes(f[9], "piece keys", 8)
    reset = bool(flags & 1)
    if reset and lo != -1:
        raise DecodeError("piece: a reset must start at -1")
    runs = _from_le(runs_b)
    total = 0
    prev = lo
    for i in range(0, len(runs), 2):
        seq = runs[i] & _SEQ_MASK
        count = runs[i + 1]
        if seq < prev or seq <= lo or seq > hi or (reset and seq < cleared):
            raise DecodeError(f"piece: run seq {seq} out of order or outside ({lo}, {hi}]")
        if count == 0:
            raise DecodeError("piece: empty run")
        prev = seq
        total += count
    if total * 8 != len(keys_b):
        raise DecodeError(f"piece: runs count {total} keys, payload has {len(keys_b) // 8}")
    arc_lo, arc_len = 0, KEY_SPACE
    if len(f) == 12:
        arc_lo = as_int(f[10], "piece arc start", 0, _KEY_MASK)
        arc_len = as_int(f[11], "piece arc length", 1, _KEY_MASK)
        if not reset:
            raise DecodeError("piece: only a reset is cut by key")
        for k in _from_le(keys_b):
            if (k - arc_lo) & _KEY_MASK >= arc_len:
                raise DecodeError(f"piece: key {k} outside its arc")
    return SlicePiece(
        replica=replica,
        epoch=epoch,
        lo=lo,
        hi=hi,
        reset=reset,
        complete=bool(flags & 2),
        horizon=horizon,
        base=base,
        cleared=cleared,
        runs=runs_b,
        keys=keys_b,
        arc_lo=arc_lo,
        arc_len=arc_len,
    )


def _drop_from_wire(obj: object) -> DropMark:
    f = as_list(obj, "drop mark", length=3)
    return DropMark(
        as_str(f[0], "drop replica"),
        as_int(f[1], "drop epoch", 0, MAX_EPOCH),
        as_int(f[2], "drop seq", -1, MAX_SEQ),
    )
