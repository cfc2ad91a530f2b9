"""The KV usage a replica will have once its queue is admitted."""

from __future__ import annotations

import pytest

from mesh.policies.queued_kv import queued_usage


def test_queued_prompts_are_added_own_ones_at_their_size_the_rest_at_the_mean() -> None:
    # 3 waiting: 2 of them this router's own (1,200 tokens together), 1 at the mean 800.
    got = queued_usage(0.5, 3.0, 2.0, 1200.0, 800.0, 10_000.0, 7.5)
    assert got == pytest.approx(0.5 + (1200 + 800 + 3 * 7.5) / 10_000)


@pytest.mark.parametrize(("waiting", "capacity"), [(0.0, 10_000.0), (3.0, None), (3.0, 0.0),
                                                   (-1.0, 10_000.0)])
def test_nothing_queued_or_no_capacity_is_the_reported_usage(
        waiting: float, capacity: float | None) -> None:
    assert queued_usage(0.42, waiting, 0.0, 0.0, 800.0, capacity, 7.5) == 0.42
