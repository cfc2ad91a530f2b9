"""SequenceTracker: the actions it returns for every stream situation."""

from __future__ import annotations

from kvevents.tracker import Apply, RequestReplay, Reset, SequenceTracker, epoch_of


def ts(seq: int, run: int = 0) -> float:
    return 1_700_000_000.0 + run * 100 + seq * 0.01


def applied(actions: list[object]) -> list[tuple[int, int]]:
    return [(a.epoch, a.seq) for a in actions if isinstance(a, Apply)]


def resets(actions: list[object]) -> list[tuple[int, bool]]:
    return [(a.epoch, a.partial) for a in actions if isinstance(a, Reset)]


def test_epoch_is_integer_microseconds_of_ts() -> None:
    assert epoch_of(1.5) == 1_500_000
    assert epoch_of(1_700_000_000.123456) == 1_700_000_000_123_456


def test_start_at_zero_in_order() -> None:
    t: SequenceTracker[str] = SequenceTracker(can_replay=True)
    out = t.live(0, ts(0), "b0") + t.live(1, ts(1), "b1")
    e = epoch_of(ts(0))
    assert resets(out) == [(e, False)]
    assert applied(out) == [(e, 0), (e, 1)]
    assert [a.item for a in out if isinstance(a, Apply)] == ["b0", "b1"]
    assert t.version == (e, 1) and not t.replaying


def test_late_join_replays_from_zero_and_gets_the_true_epoch() -> None:
    t: SequenceTracker[int] = SequenceTracker(can_replay=True)
    out = t.live(5, ts(5), 5)
    assert out == [RequestReplay(0, "joined at seq 5")]
    assert t.replay_from == 0
    assert t.live(6, ts(6), 6) == []  # buffered while replaying
    got: list[object] = []
    for seq in range(0, 7):
        got += t.replayed(seq, ts(seq), seq)
    got += t.replay_done()
    got += t.live(7, ts(7), 7)
    e = epoch_of(ts(0))
    assert resets(got) == [(e, False)]
    assert applied(got) == [(e, s) for s in range(8)]
    assert t.duplicates == 2 and not t.partial


def test_replay_of_a_late_join_that_lost_the_start_uses_first_seen_ts() -> None:
    t: SequenceTracker[int] = SequenceTracker(can_replay=True)
    t.live(40, ts(40), 40)
    got: list[object] = []
    for s in range(30, 41):  # seq 0 is gone from the engine's buffer
        got += t.replayed(s, ts(s), s)
    got += t.replay_done()
    e = epoch_of(ts(30))
    assert resets(got) == [(e, True)]
    assert applied(got) == [(e, s) for s in range(30, 41)]


def test_late_join_without_replay_is_partial_with_first_seen_ts() -> None:
    t: SequenceTracker[int] = SequenceTracker(can_replay=False)
    out = t.live(5, ts(5), 5) + t.live(6, ts(6), 6)
    e = epoch_of(ts(5))
    assert resets(out) == [(e, True)]
    assert applied(out) == [(e, 5), (e, 6)]
    assert t.partial and t.history_lost == 1


def test_gap_replays_from_last_and_verifies_the_anchor() -> None:
    t: SequenceTracker[int] = SequenceTracker(can_replay=True)
    for s in range(3):
        t.live(s, ts(s), s, digest=s)
    out = t.live(6, ts(6), 6, digest=6)
    assert out == [RequestReplay(2, "gap 3..5")]  # one early: the anchor
    assert t.gaps == 1 and t.missed == 3
    got = t.replayed(2, ts(2), 2, digest=2)
    assert got == []  # anchor matches: same run
    for s in range(3, 7):
        got += t.replayed(s, ts(s), s, digest=s)
    got += t.replay_done()
    e = epoch_of(ts(0))
    assert resets(got) == []
    assert applied(got) == [(e, s) for s in range(3, 7)]
    assert t.version == (e, 6) and not t.partial


def test_gap_replay_with_different_anchor_payload_is_a_hidden_restart() -> None:
    t: SequenceTracker[int] = SequenceTracker(can_replay=True)
    for s in range(3):
        t.live(s, ts(s), s, digest=s)
    t.live(9, ts(9, run=1), 9, digest=109)  # the engine restarted and is past our seq
    got = t.replayed(2, ts(2, run=1), 2, digest=102)
    assert got == [RequestReplay(0, "replayed batch differs: new run")]
    assert t.hidden_restarts == 1 and t.restarts == 1
    for s in range(0, 10):
        got += t.replayed(s, ts(s, run=1), s, digest=100 + s)
    got += t.replay_done()
    e1 = epoch_of(ts(0, run=1))
    assert resets(got) == [(e1, False)]
    assert applied(got) == [(e1, s) for s in range(10)]


def test_gap_with_history_lost_resets_partial() -> None:
    t: SequenceTracker[int] = SequenceTracker(can_replay=True)
    for s in range(3):
        t.live(s, ts(s), s, digest=s)
    t.live(20, ts(20), 20, digest=20)
    got: list[object] = []
    for s in range(15, 21):  # the engine only retains from 15
        got += t.replayed(s, ts(s), s, digest=s)
    got += t.replay_done()
    e = epoch_of(ts(0))  # the run is known: its epoch stays, the slice restarts partial
    assert resets(got) == [(e, True)]
    assert applied(got) == [(e, s) for s in range(15, 21)]
    assert t.partial and t.history_lost == 1


def test_gap_with_silent_replay_resets_partial_from_live() -> None:
    t: SequenceTracker[int] = SequenceTracker(can_replay=True)
    for s in range(3):
        t.live(s, ts(s), s)
    t.live(5, ts(5), 5)
    t.live(6, ts(6), 6)
    got = t.replay_done()  # nothing came back
    e = epoch_of(ts(0))
    assert resets(got) == [(e, True)]
    assert applied(got) == [(e, 5), (e, 6)]
    assert t.replay_failures == 1 and t.gaps == 1


def test_restart_at_zero_bumps_epoch() -> None:
    t: SequenceTracker[int] = SequenceTracker(can_replay=True)
    for s in range(5):
        t.live(s, ts(s), s)
    out = t.live(0, ts(0, run=1), 0)
    e1 = epoch_of(ts(0, run=1))
    assert resets(out) == [(e1, False)] and applied(out) == [(e1, 0)]
    assert t.restarts == 1


def test_restart_seen_late_replays_the_new_run() -> None:
    t: SequenceTracker[int] = SequenceTracker(can_replay=True)
    for s in range(9):
        t.live(s, ts(s), s)
    out = t.live(2, ts(2, run=1), 2)
    assert out == [RequestReplay(0, "joined at seq 2")]
    got: list[object] = []
    for s in range(3):
        got += t.replayed(s, ts(s, run=1), s)
    got += t.replay_done()
    e1 = epoch_of(ts(0, run=1))
    assert resets(got) == [(e1, False)] and applied(got) == [(e1, 0), (e1, 1), (e1, 2)]


def test_restart_without_replay_is_partial() -> None:
    t: SequenceTracker[int] = SequenceTracker(can_replay=False)
    for s in range(9):
        t.live(s, ts(s), s)
    out = t.live(2, ts(2, run=1), 2)
    assert resets(out) == [(epoch_of(ts(2, run=1)), True)]


def test_duplicate_of_last_is_ignored_not_a_restart() -> None:
    t: SequenceTracker[int] = SequenceTracker(can_replay=False)
    t.live(0, ts(0), 0, digest=10)
    assert t.live(0, ts(0), 0, digest=10) == []
    assert t.duplicates == 1 and t.restarts == 0


def test_stray_replay_replies_are_ignored() -> None:
    t: SequenceTracker[int] = SequenceTracker(can_replay=True)
    t.live(0, ts(0), 0)
    assert t.replayed(0, ts(0), 0) == [] and t.stray_replies == 1
    assert t.replay_done() == []


def test_first_seq_one_for_engines_that_count_from_one() -> None:
    t: SequenceTracker[int] = SequenceTracker(can_replay=True, first_seq=1)
    out = t.live(1, ts(1), 1)
    assert resets(out) == [(epoch_of(ts(1)), False)]


def test_buffer_overflow_during_replay_is_counted_and_detected() -> None:
    t: SequenceTracker[int] = SequenceTracker(can_replay=True, max_buffer=2)
    t.live(0, ts(0), 0)
    for s in range(3, 7):
        t.live(s, ts(s), s)  # 3 triggers a replay; 3, 4 are pushed out of the buffer
    assert t.buffer_overflows == 2
    got = t.replay_done()
    assert resets(got) == [(epoch_of(ts(0)), True)]
    assert applied(got)[-1][1] == 6


def test_lagging_source_after_replay_delivers_duplicates_not_a_restart() -> None:
    """A Redis stream behind the engine: replay jumps ahead, then the stream catches up."""
    t: SequenceTracker[int] = SequenceTracker(can_replay=True)
    for s in range(3):
        t.live(s, ts(s), s, digest=s)
    t.live(5, ts(5), 5, digest=5)  # the stream lost 3 and 4
    got: list[object] = []
    for s in range(2, 10):  # the engine is already at 9
        got += t.replayed(s, ts(s), s, digest=s)
    got += t.replay_done()
    for s in range(6, 12):  # the stream goes on from where it was
        got += t.live(s, ts(s), s, digest=s)
    e = epoch_of(ts(0))
    assert resets(got) == [] and t.restarts == 0
    assert applied(got) == [(e, s) for s in range(3, 12)]
    assert t.duplicates == 5  # 5 (buffered) and 6..9 (seen again)
    assert t.live(7, ts(7, run=1), 7, digest=107) != []  # a different batch under seq 7: restart
    assert t.restarts == 1
