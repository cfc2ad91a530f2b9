"""SequenceTracker.join: replaying the run so far before any batch arrives."""

from __future__ import annotations

from kvevents.tracker import Apply, RequestReplay, Reset, SequenceTracker, epoch_of


def ts(seq: int) -> float:
    return 1_700_000_000.0 + seq * 0.01


def test_join_replays_an_idle_engines_history_with_its_true_epoch() -> None:
    t: SequenceTracker[int] = SequenceTracker(can_replay=True)
    assert t.join() == [RequestReplay(0, "joining: the run so far")]
    got: list[object] = []
    for seq in range(4):
        got += t.replayed(seq, ts(seq), seq)
    got += t.replay_done()
    e = epoch_of(ts(0))
    assert [(a.epoch, a.partial) for a in got if isinstance(a, Reset)] == [(e, False)]
    assert [a.seq for a in got if isinstance(a, Apply)] == [0, 1, 2, 3]
    assert t.version == (e, 3) and not t.replaying and t.replay_failures == 0
    assert t.live(4, ts(4), 4) and t.gaps == 0  # the live stream continues it


def test_an_empty_engine_is_no_failure_and_its_first_batch_starts_the_run() -> None:
    t: SequenceTracker[int] = SequenceTracker(can_replay=True)
    t.join()
    assert t.replay_done() == [] and t.replay_failures == 0 and t.version is None
    out = t.live(0, ts(0), 0)
    assert [a.seq for a in out if isinstance(a, Apply)] == [0] and not t.partial


def test_an_empty_answer_while_live_batches_show_history_is_a_failure() -> None:
    t: SequenceTracker[int] = SequenceTracker(can_replay=True)
    t.join()
    assert t.live(7, ts(7), 7) == []  # buffered during the join
    out = t.replay_done()
    assert t.replay_failures == 1 and t.partial and t.history_lost == 1
    assert [a.seq for a in out if isinstance(a, Apply)] == [7]


def test_join_does_nothing_without_replay_or_once_a_batch_is_known() -> None:
    assert SequenceTracker[int](can_replay=False).join() == []
    t: SequenceTracker[int] = SequenceTracker(can_replay=True)
    t.live(0, ts(0), 0)
    assert t.join() == [] and not t.replaying
