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


def test_separate_calls_never_hand_out_the_same_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ports are bound later by children: a second call must not repeat an earlier one."""
    if procs._ephemeral_floor() is None:
        pytest.skip("no ephemeral range known here")
    monkeypatch.setattr(procs, "_HANDED_OUT", set())
    # A narrow range makes a repeat near certain without the memory of handed-out ports.
    monkeypatch.setattr(procs, "LOWEST_PORT", procs._ephemeral_floor() - 40)  # type: ignore[operator]
    seen: list[int] = []
    for _ in range(6):
        seen += procs.free_ports(3)
    assert len(seen) == len(set(seen)) == 18
