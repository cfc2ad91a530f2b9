"""Ports for child processes: free, distinct, and out of the kernel's ephemeral range."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

import sim.procs as procs


def test_ports_are_distinct_free_and_below_the_ephemeral_range() -> None:
    floor = procs._ephemeral_floor()
    ports = procs.free_ports(8)
    assert len(set(ports)) == 8
    if floor is not None:
        assert all(procs.LOWEST_PORT <= p < floor for p in ports)
    for p in ports:  # each can be bound now
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_without_a_known_range_the_kernel_picks(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    monkeypatch.setattr(procs, "EPHEMERAL", tmp_path / "missing")
    assert procs._ephemeral_floor() is None
    ports = procs.free_ports(3)
    assert len(set(ports)) == 3 and all(p > 0 for p in ports)
    (tmp_path / "range").write_text("garbage\n")
    monkeypatch.setattr(procs, "EPHEMERAL", tmp_path / "range")
    assert procs._ephemeral_floor() is None
