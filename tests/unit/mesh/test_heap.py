"""The router process's collector settings (``mesh.heap``)."""

from __future__ import annotations

import gc

from mesh.heap import YOUNG, settle


def test_settle_freezes_the_startup_heap_and_makes_young_collections_rarer() -> None:
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        assert settle() > 0 and gc.get_freeze_count() > 0
        assert gc.get_threshold() == (YOUNG, 10, 10)
        gc.set_threshold(YOUNG * 2, 10, 10)  # a larger one set by the operator stays
        settle()
        assert gc.get_threshold() == (YOUNG * 2, 10, 10)
        gc.set_threshold(0, 10, 10)  # the collector off stays off
        settle()
        assert gc.get_threshold()[0] == 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
