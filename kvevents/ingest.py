"""One engine's event stream into one replica's slice of the index, sans-I/O.

``EngineIngest`` decodes messages, runs them through the :class:`SequenceTracker`, turns
block events into the router's own keys (:class:`EngineKeyMap`) and writes the changes through
the ``IndexWriter`` at version ``(epoch, seq)``. The ZMQ subscriber and the Redis reader are thin
shells around it: they hand it messages and ``now``, and run a replay when it asks for one.

Resuming: a router that restarts can pass the slice's last applied version as ``resume_from``.
Batches up to that version still rebuild the engine-hash map but are not written again; the
first later batch is. If the source cannot reach that version (its history is gone), the slice
is reset as partial rather than left silently inconsistent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import xxhash

from kvevents.decode import RawMessage, WireError, decode_batch_generic
from kvevents.decode_fast import CLEARED_TYPES, REMOVED_TYPES, STORED_TYPES, decode_for_ingest
from kvevents.events import (
    EventBatch,
    IndexWriter,
)
from kvevents.keys import EngineKeyMap
from kvevents.tracker import Action, Apply, Reset, SequenceTracker, epoch_of

log = logging.getLogger(__name__)

Version = tuple[int, int]
AliveHook = Callable[[str, float], None]
"""``hook(replica, now)``: called for every well-formed batch from the engine (it is alive)."""

_LOG_INTERVAL = 1.0


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot of one engine stream's counters, for metrics and status pages."""

    replica: str
    epoch: int | None
    last_seq: int | None
    partial: bool
    replaying: bool
    block_size: int | None
    held_keys: int
    batches: int
    events: int
    blocks_stored: int
    blocks_removed: int
    clears: int
    unknown_events: int
    unknown_fields: int
    malformed_messages: int
    malformed_events: int
    gaps: int
    missed_batches: int
    replays: int
    replay_failures: int
    resets: int
    restarts: int
    hidden_restarts: int
    history_lost: int
    duplicates: int
    chain_breaks: int
    skipped_blocks: int
    unknown_removals: int
    internal_errors: int
    """Bugs caught while ingesting (each resets the slice as partial); should stay 0."""
    last_batch_ts: float | None
    last_seen: float | None
    lag_s: float | None
    """``now - ts`` of the last batch (engine clock vs router clock: a gauge, not an order)."""


class EngineIngest:
    """Sequence tracking + block keys + index writes for one engine (one replica).

    ``replica``: the name its slice is written under. ``writer``: the index (``PrefixIndex``).
    ``can_replay``: the engine has a replay endpoint the shell will use when asked.
    ``first_seq``: where the engine's sequence starts (0 for vLLM/SGLang). ``resume_from``: the
    slice's last applied version when the router restarts (see module docstring).
    ``on_alive``: optional hook called with ``(replica, now)`` for every good batch.
    """

    def __init__(
        self,
        replica: str,
        writer: IndexWriter,
        *,
        can_replay: bool = False,
        first_seq: int = 0,
        resume_from: Version | None = None,
        on_alive: AliveHook | None = None,
        max_buffer: int = 100_000,
    ) -> None:
        self.replica = replica
        self.writer = writer
        self.tracker: SequenceTracker[EventBatch] = SequenceTracker(
            can_replay=can_replay, first_seq=first_seq, max_buffer=max_buffer
        )
        self.keys = EngineKeyMap()
        self.on_alive = on_alive
        self._resume = resume_from
        self.batches = 0
        self.events = 0
        self.blocks_stored = 0
        self.blocks_removed = 0
        self.clears = 0
        self.unknown_events = 0
        self.unknown_fields = 0
        self.malformed_messages = 0
        self.malformed_events = 0
        self.resets = 0
        self.internal_errors = 0
        self.last_batch_ts: float | None = None
        self.last_seen: float | None = None
        self._last_log = float("-inf")
        self._unlogged = 0
        self._clear_first = False

    # -- inputs from the shells ------------------------------------------------------------
    @property
    def replay_from(self) -> int | None:
        """The seq a replay should start at, or None when none is wanted."""
        return self.tracker.replay_from

    @property
    def version(self) -> Version | None:
        return self.tracker.version

    def join(self) -> bool:
        """Before the first batch: True when the shell should replay the run so far."""
        try:
            self._run(self.tracker.join())
        except Exception:
            self._internal_error()
        return self.tracker.replaying

    def on_message(self, msg: RawMessage, now: float) -> bool:
        """A live message; True when the shell should run a replay (see ``replay_from``)."""
        batch = self._decode(msg, now)
        if batch is not None:
            try:
                self._run(self.tracker.live(msg.seq, batch.ts, batch, _digest(msg.payload)))
            except Exception:
                self._internal_error()
        return self.tracker.replaying

    def on_replay_message(self, msg: RawMessage, now: float) -> bool:
        """One replayed message; True when the replay must restart from ``replay_from``."""
        before = self.tracker.replays
        batch = self._decode(msg, now)
        if batch is not None:
            try:
                self._run(self.tracker.replayed(msg.seq, batch.ts, batch, _digest(msg.payload)))
            except Exception:
                self._internal_error()
        return self.tracker.replays != before

    def on_replay_done(self, now: float) -> bool:
        """The replay ended; True when another replay is wanted right away."""
        try:
            self._run(self.tracker.replay_done())
        except Exception:
            self._internal_error()
        return self.tracker.replaying

    def on_disconnect(self) -> None:
        """The transport lost the engine for a while: verify continuity on the next batch."""
        self.tracker.suspect()

    def on_bad_message(self, reason: str, now: float) -> None:
        """Frames the shell could not even split (wrong count, bad seq frame)."""
        self.malformed_messages += 1
        self._log_bad(reason, now)

    def end_catch_up(self, now: float) -> None:
        """The source has delivered all it holds (Redis: stream end reached).

        If a resume position was given and the source never reached it, the slice holds state
        this process cannot account for: reset it as partial.
        """
        resume = self._resume
        version = self.tracker.version
        if resume is None or version is None or version >= resume:
            return
        self._resume = None
        last_ts = self.last_batch_ts if self.last_batch_ts is not None else 0.0
        epoch = max(resume[0] + 1, epoch_of(last_ts))
        log.warning(
            "engine %s: stream ends at %s before the slice's version %s; resetting as partial",
            self.replica,
            version,
            resume,
        )
        self.tracker.history_lost += 1
        self.tracker.assume(epoch, version[1], self.tracker.last_digest, partial=True)
        self._reset(epoch, True)

    # -- stats -----------------------------------------------------------------------------
    def stats(self, now: float | None = None) -> EngineStats:
        t, k = self.tracker, self.keys
        lag = None
        if now is not None and self.last_batch_ts is not None:
            lag = now - self.last_batch_ts
        return EngineStats(
            replica=self.replica,
            epoch=t.epoch,
            last_seq=t.last,
            partial=t.partial,
            replaying=t.replaying,
            block_size=k.block_size,
            held_keys=len(k),
            batches=self.batches,
            events=self.events,
            blocks_stored=self.blocks_stored,
            blocks_removed=self.blocks_removed,
            clears=self.clears,
            unknown_events=self.unknown_events,
            unknown_fields=self.unknown_fields,
            malformed_messages=self.malformed_messages,
            malformed_events=self.malformed_events,
            gaps=t.gaps,
            missed_batches=t.missed,
            replays=t.replays,
            replay_failures=t.replay_failures,
            resets=self.resets,
            restarts=t.restarts,
            hidden_restarts=t.hidden_restarts,
            history_lost=t.history_lost,
            duplicates=t.duplicates,
            chain_breaks=k.chain_breaks,
            skipped_blocks=k.skipped_blocks,
            unknown_removals=k.unknown_removals,
            internal_errors=self.internal_errors,
            last_batch_ts=self.last_batch_ts,
            last_seen=self.last_seen,
            lag_s=lag,
        )

    # -- internals -------------------------------------------------------------------------
    def _decode(self, msg: RawMessage, now: float) -> EventBatch | None:
        fast = decode_for_ingest(msg.payload)
        try:
            if fast is not None:
                # The typed structs carry the events' attributes: no dataclass per event here.
                batch = EventBatch(fast[0], fast[1])
            else:
                batch = decode_batch_generic(msg.payload)
        except WireError as exc:
            self.malformed_messages += 1
            self._log_bad(f"seq {msg.seq}: {exc}", now)
            return None
        self.last_seen = now
        if self.on_alive is not None:
            try:
                self.on_alive(self.replica, now)
            except Exception:  # the router's hook must not stop ingestion
                log.exception("engine %s: on_alive hook failed", self.replica)
        return batch

    def _internal_error(self) -> None:
        """A bug, not bad input: keep ingesting, but never keep a slice we may have garbled."""
        self.internal_errors += 1
        log.exception("engine %s: internal error while ingesting; slice reset", self.replica)
        epoch = self.tracker.epoch
        if epoch is not None:
            self.tracker.partial = True
            self._reset(epoch, True)

    def _log_bad(self, reason: str, now: float) -> None:
        if now - self._last_log < _LOG_INTERVAL:
            self._unlogged += 1
            return
        more = f" ({self._unlogged} more since the last report)" if self._unlogged else ""
        log.warning("engine %s: dropped malformed message: %s%s", self.replica, reason, more)
        self._last_log = now
        self._unlogged = 0

    def _run(self, actions: list[Action[EventBatch]]) -> None:
        for action in actions:
            if isinstance(action, Apply):
                self._apply(action.epoch, action.seq, action.item)
            elif isinstance(action, Reset):
                log.info(
                    "engine %s: new slice epoch %d%s (%s)",
                    self.replica,
                    action.epoch,
                    " partial" if action.partial else "",
                    action.reason,
                )
                self._reset(action.epoch, action.partial)
            # RequestReplay: the shell reads ``replay_from``.

    def _reset(self, epoch: int, partial: bool) -> None:
        self.keys.clear()
        self.resets += 1
        resume = self._resume
        if resume is not None:
            if epoch <= resume[0]:
                return  # this run is the slice's own (or older): it exists already
            self._resume = None
        self.writer.reset(self.replica, epoch, partial)
        # A partial slice in a known epoch may still hold keys from before the loss; say
        # explicitly, at the first batch it is rebuilt from, that it starts empty.
        self._clear_first = partial

    def _apply(self, epoch: int, seq: int, batch: EventBatch) -> None:
        version = (epoch, seq)
        resume = self._resume
        write = True
        if resume is not None:
            if version <= resume:
                write = False
            else:
                self._resume = None
        self.batches += 1
        self.events += len(batch.events)
        self.unknown_events += batch.unknown_events
        self.unknown_fields += batch.unknown_fields
        self.malformed_events += batch.malformed_events
        self.last_batch_ts = batch.ts
        keys, writer, replica = self.keys, self.writer, self.replica
        if self._clear_first:
            self._clear_first = False
            if write:
                writer.clear(replica, version)
        # Consecutive events of one kind go to the index as one call; order across kinds kept.
        stored_n = removed_n = 0
        pending: list[int] = []
        pending_store = True
        op_of = _OP
        for ev in batch.events:
            kind = op_of.get(type(ev), _OTHER)
            if kind is _REMOVE:  # the most frequent: one per evicted block
                removed_n += len(ev.block_hashes)  # type: ignore[union-attr]
                changed = keys.removed(ev)  # type: ignore[arg-type]
                if changed:
                    if pending_store:
                        if pending and write:
                            writer.store(replica, version, pending)
                        pending = changed
                        pending_store = False
                    else:
                        pending += changed
            elif kind is _STORE:
                try:
                    changed = keys.stored(ev)  # type: ignore[arg-type]
                except WireError:
                    self.malformed_events += 1
                    continue
                stored_n += len(ev.block_hashes)  # type: ignore[union-attr]
                if changed:
                    if not pending_store:
                        if pending and write:
                            writer.remove(replica, version, pending)
                        pending = changed
                        pending_store = True
                    else:
                        pending += changed
            elif kind is _CLEAR:
                pending = []  # whatever came before in this batch is cleared anyway
                keys.clear()
                self.clears += 1
                if write:
                    writer.clear(replica, version)
        self.blocks_stored += stored_n
        self.blocks_removed += removed_n
        if pending and write:
            if pending_store:
                writer.store(replica, version, pending)
            else:
                writer.remove(replica, version, pending)


_STORE, _REMOVE, _CLEAR, _OTHER = "store", "remove", "clear", "other"
_OP: dict[type, str] = {
    **dict.fromkeys(STORED_TYPES, _STORE),
    **dict.fromkeys(REMOVED_TYPES, _REMOVE),
    **dict.fromkeys(CLEARED_TYPES, _CLEAR),
}
"""Event class -> operation, for the contract dataclasses and the decoder's typed structs."""


def _digest(payload: bytes) -> int:
    return xxhash.xxh3_64_intdigest(payload)
