"""The mesh plane's in-flight sums answer exactly as the LoadVector they speed up."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from crdt.load_vector import LoadVector
from sim.mesh_plane import SummedLoadVector

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


@settings(max_examples=60, deadline=None)
@given(ops)
def test_summed_inflight_matches_the_plain_load_vector(
    seq: list[tuple[str, dict[str, int], float]],
) -> None:
    plain, summed = (
        LoadVector(max_age=30.0, node_id="a"),
        SummedLoadVector(max_age=30.0, node_id="a"),
    )
    now = 0.0
    for counter, (router, counts, dt) in enumerate(seq, start=1):
        now += dt
        for lv in (plain, summed):
            lv.set_inflight(router, (1, counter), counts, now)
            lv.expire(now)
        for replica in REPLICAS:
            for exclude in (None, *ROUTERS):
                assert summed.inflight(replica, exclude) == plain.inflight(replica, exclude)
    # A merged delta (gossip) invalidates the sums too.
    other = LoadVector(max_age=30.0)
    other.set_inflight("d", (1, 1), {"x": 7}, now)
    summed.merge(other.full_delta(now), now)
    plain.merge(other.full_delta(now), now)
    assert summed.inflight("x") == plain.inflight("x")
