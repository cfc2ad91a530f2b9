"""The load vector's running in-flight totals answer exactly as a sum over its records."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from crdt.load_vector import LoadVector

ROUTERS = ["a", "b", "c"]
REPLICAS = ["x", "y", "z"]

ops = st.lists(
    st.tuples(
        st.sampled_from(ROUTERS),
        st.dictionaries(st.sampled_from(REPLICAS), st.integers(0, 5), max_size=3),
        st.floats(0, 100),
    ),
    max_size=25,
)


def summed(lv: LoadVector, replica: str, exclude: str | None, now: float) -> int:
    """The definition: every held router's count for ``replica``, except ``exclude``'s."""
    return sum(rec.counts.get(replica, 0) for router, rec in lv.inflight_records(now).items()
               if router != exclude)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_running_totals_match_the_sum_over_records(
    seq: list[tuple[str, dict[str, int], float]],
) -> None:
    lv = LoadVector(max_age=30.0, node_id="a")
    now = 0.0
    for counter, (router, counts, dt) in enumerate(seq, start=1):
        now += dt
        lv.set_inflight(router, (1, counter), counts, now)
        lv.expire(now)
        for replica in REPLICAS:
            for exclude in (None, *ROUTERS):
                assert lv.inflight(replica, exclude) == summed(lv, replica, exclude, now)
    # A merged delta (gossip) moves the totals too.
    other = LoadVector(max_age=30.0)
    other.set_inflight("d", (1, 1), {"x": 7}, now)
    lv.merge(other.full_delta(now), now)
    for exclude in (None, "d", "a"):
        assert lv.inflight("x", exclude) == summed(lv, "x", exclude, now)
    assert lv.inflight("x", "d") == lv.inflight("x") - 7


def test_inflight_age_is_the_routers_record_age() -> None:
    lv = LoadVector(max_age=30.0, node_id="a")
    assert lv.inflight_age("b", 5.0) == float("inf")
    lv.set_inflight("b", (1, 1), {"x": 1}, 2.0)
    assert lv.inflight_age("b", 5.0) == 3.0
