"""Per-engine sequence tracking, sans-I/O: feed it batches, it says what to do.

Engines number their batches ``0, 1, 2, ...`` per process. The tracker turns that stream into
actions for one replica's slice:

- ``Apply(epoch, seq, item)``: the next batch, in order;
- ``Reset(epoch, partial)``: start the slice over (engine restart, lost history);
- ``RequestReplay(start)``: ask the engine's replay socket for batches from ``start``.

Epoch rule (so every router ingesting an engine produces the same slice): the epoch of a run
is the engine's ``ts`` of its batch with seq 0, in integer microseconds, whether that batch was
seen live or through replay. When it cannot be had (history lost before the run's start was
known), the epoch is the ``ts`` of the first batch the new slice is built from, and the slice is
marked partial. History lost in the middle of a run whose epoch is known keeps that epoch:
``Reset(epoch, partial=True)`` empties the slice and rebuilds it from the next batch on, and the
slice still orders below the complete ones other routers hold for the same run.

Restarts that leave the sequence number *above* where it was cannot be seen from the number
alone. When the tracker replays a gap it asks from the last applied seq and compares the
replayed payload digest with the one it applied: a different payload under the same seq means
a different run (a hidden restart), handled like any restart. After ``suspect()`` (the shell saw
the connection drop, so the engine may have restarted) the next batch is verified the same way
even when its seq is the expected one. Without a replay endpoint such a batch is taken on trust
and counted in ``unverified``: that is the one case the tracker cannot decide.

``join()`` before any batch replays the run so far: an engine that served before this reader
started holds blocks its live stream will never mention again, and an idle one sends no batch
that would reveal the gap. An empty answer then means the engine has no history yet (not a
failure), unless live batches that arrived meanwhile show the run had started.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


def epoch_of(ts: float) -> int:
    """A batch ``ts`` (float seconds) as the integer microseconds used for epochs."""
    return round(ts * 1_000_000)


@dataclass(frozen=True, slots=True)
class Apply(Generic[T]):
    epoch: int
    seq: int
    item: T


@dataclass(frozen=True, slots=True)
class Reset:
    epoch: int
    partial: bool
    reason: str


@dataclass(frozen=True, slots=True)
class RequestReplay:
    start: int
    reason: str


Action = Apply[T] | Reset | RequestReplay

_FRESH = "fresh"  # replaying a run from its first seq, to learn its epoch
_GAP = "gap"  # replaying the batches missed inside a known run


class SequenceTracker(Generic[T]):
    """One engine stream's position, epoch and replay state.

    ``can_replay``: whether the engine has a replay endpoint. ``first_seq``: the seq a run starts
    at (0 for vLLM and SGLang). ``max_buffer``: live batches kept while a replay is running.
    ``digest`` arguments are optional payload fingerprints used to detect hidden restarts.
    """

    def __init__(self, *, can_replay: bool, first_seq: int = 0, max_buffer: int = 100_000) -> None:
        self.can_replay = can_replay
        self.first_seq = first_seq
        self.max_buffer = max_buffer
        self.epoch: int | None = None
        self.last: int | None = None
        self.last_digest: int | None = None
        self.partial = False
        # replay state
        self._mode: str | None = None
        self._expect = 0
        self._anchor_checked = True
        self._got = False
        self._verify_next = False
        self._strict = False
        self._joining = False
        # Digests of batches applied through replay: a lagging live source (a Redis stream
        # behind the engine) delivers them again later, and they are duplicates, not a restart.
        self._replayed: dict[int, int] = {}
        self._buf: list[tuple[int, float, T, int | None]] = []
        # counters
        self.gaps = 0
        self.missed = 0
        self.restarts = 0
        self.hidden_restarts = 0
        self.history_lost = 0
        self.replays = 0
        self.replay_failures = 0
        self.duplicates = 0
        self.stray_replies = 0
        self.unverified = 0
        self.buffer_overflows = 0

    # -- state ---------------------------------------------------------------------------
    @property
    def replaying(self) -> bool:
        return self._mode is not None

    @property
    def replay_from(self) -> int | None:
        """The seq the next replay attempt should ask for, or None when no replay is wanted."""
        if self._mode is None:
            return None
        if not self._anchor_checked and self.last is not None:
            return self.last
        return self._expect

    @property
    def version(self) -> tuple[int, int] | None:
        if self.epoch is None or self.last is None:
            return None
        return (self.epoch, self.last)

    def assume(
        self, epoch: int, last: int, digest: int | None = None, partial: bool = False
    ) -> None:
        """Start from a known position (e.g. the last entry already relayed) instead of nothing."""
        self.epoch, self.last, self.last_digest, self.partial = epoch, last, digest, partial

    # -- inputs --------------------------------------------------------------------------
    def join(self) -> list[Action[T]]:
        """Before any batch: replay the run so far (see the module docstring)."""
        out: list[Action[T]] = []
        if self.can_replay and self.last is None and self._mode is None:
            self._request(_FRESH, self.first_seq, out, "joining: the run so far")
            self._joining = True
        return out

    def suspect(self) -> None:
        """Continuity is in doubt (connection dropped): verify the next batch before applying."""
        if self.last is not None:
            self._verify_next = True

    def live(self, seq: int, ts: float, item: T, digest: int | None = None) -> list[Action[T]]:
        """A batch from the live stream."""
        if self._mode is not None:
            self._buffer(seq, ts, item, digest)
            return []
        out: list[Action[T]] = []
        self._accept(seq, ts, item, digest, out, drain=False)
        return out

    def replayed(self, seq: int, ts: float, item: T, digest: int | None = None) -> list[Action[T]]:
        """A batch read from the replay socket (in the order received)."""
        if self._mode is None:
            self.stray_replies += 1
            return []
        out: list[Action[T]] = []
        if not self._anchor_checked:
            # A verified gap replay starts at the last applied seq: it must be the same batch.
            assert self.last is not None
            if seq < self.last:
                self.stray_replies += 1
                return out
            self._anchor_checked = True
            if seq == self.last:
                if (
                    digest is not None
                    and self.last_digest is not None
                    and digest != self.last_digest
                ):
                    self.hidden_restarts += 1
                    self._forget_run()
                    self._request(_FRESH, self.first_seq, out, "replayed batch differs: new run")
                return out
            if seq == self.last + 1 and self._strict:
                # Asked to verify after a reconnect, and the anchor is gone: cannot tell.
                self.history_lost += 1
                self._start(epoch_of(ts), True, out, "cannot verify the run after reconnect")
                self._got = True
                self._expect = seq + 1
                self._apply(seq, ts, item, digest, out)
                return out
            if seq == self.last + 1:
                self.unverified += 1  # the anchor left the engine's buffer; take it as continuing
        if seq < self._expect:
            self.duplicates += 1
            return out
        if seq == self._expect:
            if self._mode == _FRESH and not self._got:
                self._start(epoch_of(ts), False, out, "run start (replayed)")
        else:
            self.history_lost += 1
            self._lost(ts, out, f"replay began at {seq}, wanted {self._expect}")
        self._got = True
        self._expect = seq + 1
        self._apply(seq, ts, item, digest, out)
        if digest is not None:
            self._replayed[seq] = digest
        return out

    def replay_done(self) -> list[Action[T]]:
        """The replay ended (end marker, or attempts used up): fold in the buffered live batches."""
        if self._mode is None:
            return []
        joining, self._joining = self._joining, False
        started = any(seq != self.first_seq for seq, _, _, _ in self._buf[:1])
        if not self._got and (not joining or started):
            self.replay_failures += 1
        self._mode = None
        self._anchor_checked = True
        buffered, self._buf = self._buf, []
        out: list[Action[T]] = []
        prev: int | None = None
        for seq, ts, item, digest in buffered:
            if self._mode is not None:  # a restart inside the buffer asked for another replay
                self._buffer(seq, ts, item, digest)
                continue
            if self.last is not None and seq <= self.last and (prev is None or seq > prev):
                self.duplicates += 1  # already applied from the replay
            else:
                self._accept(seq, ts, item, digest, out, drain=True)
            prev = seq
        return out

    # -- internals -----------------------------------------------------------------------
    def _buffer(self, seq: int, ts: float, item: T, digest: int | None) -> None:
        if len(self._buf) >= self.max_buffer:
            self.buffer_overflows += 1
            del self._buf[0]
        self._buf.append((seq, ts, item, digest))

    def _accept(
        self, seq: int, ts: float, item: T, digest: int | None, out: list[Action[T]], drain: bool
    ) -> None:
        last = self.last
        if last is not None and seq == last + 1:
            if self._verify_next and self.can_replay and not drain and self.last_digest is not None:
                self._request(_GAP, last + 1, out, "verify after reconnect")
                self._buffer(seq, ts, item, digest)
                return
            if self._verify_next:
                self.unverified += 1
            if self._replayed:
                self._replayed.clear()  # the live source has caught up with the replay
            self._apply(seq, ts, item, digest, out)
            return
        if last is not None and seq <= last:
            if digest is not None and (
                self._replayed.get(seq) == digest or (seq == last and digest == self.last_digest)
            ):
                self.duplicates += 1
                return
            self._forget_run()
            drain = False  # a new run: its start is worth a replay even while draining
            last = None
        if last is None:
            if seq == self.first_seq:
                self._start(epoch_of(ts), False, out, "run start")
                self._apply(seq, ts, item, digest, out)
            elif self.can_replay and not drain:
                self._request(_FRESH, self.first_seq, out, f"joined at seq {seq}")
                self._buffer(seq, ts, item, digest)
            else:
                self.history_lost += 1
                self._start(epoch_of(ts), True, out, f"joined at seq {seq}, run start unavailable")
                self._apply(seq, ts, item, digest, out)
            return
        if not drain:  # a gap left after its replay was counted when first seen
            self.gaps += 1
            self.missed += seq - last - 1
        if self.can_replay and not drain:
            self._request(_GAP, last + 1, out, f"gap {last + 1}..{seq - 1}")
            self._buffer(seq, ts, item, digest)
        else:
            self.history_lost += 1
            self._lost(ts, out, f"gap {last + 1}..{seq - 1} not recoverable")
            self._apply(seq, ts, item, digest, out)

    def _forget_run(self) -> None:
        """The engine restarted: what we know belongs to the previous run."""
        self._verify_next = False
        self.restarts += 1
        self.epoch = self.last = self.last_digest = None
        self._replayed.clear()
        self._mode = None
        self._got = False

    def _request(self, mode: str, start: int, out: list[Action[T]], reason: str) -> None:
        self.replays += 1
        # After a reconnect the run itself is in doubt: an unverifiable anchor means lost.
        self._strict = self._verify_next and mode == _GAP
        self._mode = mode
        self._got = False
        self._expect = start
        # Gap replays ask one batch early to verify the run (see module docstring).
        self._anchor_checked = not (mode == _GAP and self.last_digest is not None)
        out.append(
            RequestReplay(self.replay_from if self.replay_from is not None else start, reason)
        )

    def _lost(self, ts: float, out: list[Action[T]], reason: str) -> None:
        """History lost: a partial slice, in the run's epoch if known (else from ``ts``)."""
        self._start(self.epoch if self.epoch is not None else epoch_of(ts), True, out, reason)

    def _start(self, epoch: int, partial: bool, out: list[Action[T]], reason: str) -> None:
        self.epoch = epoch
        self.partial = partial
        self.last = self.last_digest = None
        self._replayed.clear()
        out.append(Reset(epoch, partial, reason))

    def _apply(
        self, seq: int, ts: float, item: T, digest: int | None, out: list[Action[T]]
    ) -> None:
        assert self.epoch is not None
        self._verify_next = False
        self.last = seq
        self.last_digest = digest
        out.append(Apply(self.epoch, seq, item))
