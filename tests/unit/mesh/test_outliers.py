"""Outlier ejection: consecutive failures eject, the ejection doubles, one trial re-admits."""

from __future__ import annotations

from mesh.outliers import OutlierDetector


def test_consecutive_failures_eject_and_a_trial_success_restores() -> None:
    d = OutlierDetector(consecutive=3, base_ejection=10.0, max_ejection=25.0)
    assert not d.record("a", False, 0.0, population=4)
    assert not d.record("a", True, 0.1, population=4)  # a success resets the run
    for t in (1.0, 2.0):
        assert not d.record("a", False, t, population=4)
    assert d.record("a", False, 3.0, population=4)
    assert d.excluded(5.0) == {"a"} and d.ejected(12.9) == ["a"]
    d.admit("a", 13.5)  # the ejection is over: half-open, one trial
    assert d.excluded(13.5) == {"a"}  # no second request while the trial is out
    assert d.record("a", False, 14.0, population=4)  # trial failed: ejected again, doubled
    assert d.ejected(33.9) == ["a"] and d.ejected(34.1) == []
    d.admit("a", 35.0)
    assert not d.record("a", True, 35.5, population=4)
    assert d.excluded(35.5) == frozenset()
    for t in (40.0, 41.0, 42.0):
        d.record("a", False, t, population=4)
    assert d.ejected(51.9) == ["a"]  # back to the base time after a recovery


def test_never_more_than_the_allowed_fraction_is_ejected() -> None:
    d = OutlierDetector(consecutive=1, max_ejected_fraction=0.5)
    assert d.record("a", False, 0.0, population=2)
    assert not d.record("b", False, 0.0, population=2)
    assert d.ejected(1.0) == ["a"]
