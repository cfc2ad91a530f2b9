"""Frames, key rotation and the replay window (mesh/auth.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.auth import HEADER_LEN, Authenticator, Rejected, ReplayGuard, parse_key

K1 = b"k1" * 16
K2 = b"k2" * 16


def reason(fn: object) -> str:
    assert callable(fn)
    with pytest.raises(Rejected) as info:
        fn()
    return info.value.reason


def test_seal_then_open_returns_the_payload() -> None:
    auth = Authenticator([K1])
    frame = auth.seal(b"hello")
    assert len(frame) == HEADER_LEN + 5
    assert auth.open(frame) == b"hello"


def test_rotation_first_key_signs_every_key_verifies() -> None:
    old, staged, rotated, new = (
        Authenticator([K1]),
        Authenticator([K1, K2]),
        Authenticator([K2, K1]),
        Authenticator([K2]),
    )
    assert staged.open(old.seal(b"a")) == b"a"  # stage 1: add the new key, old still signs
    assert old.open(staged.seal(b"a")) == b"a"
    assert staged.open(rotated.seal(b"b")) == b"b"  # stage 2: new signs, old verifies
    assert rotated.open(staged.seal(b"b")) == b"b"
    assert new.open(rotated.seal(b"c")) == b"c"  # stage 3: drop the old key
    assert reason(lambda: old.open(rotated.seal(b"d"))) == "unknown_key"  # skipped a stage
    assert reason(lambda: new.open(old.seal(b"d"))) == "unknown_key"


def test_tampering_anywhere_is_detected() -> None:
    auth = Authenticator([K1])
    frame = bytearray(auth.seal(b"payload bytes"))
    for i in range(7, len(frame)):  # tag and payload (the key id picks the key)
        bad = bytearray(frame)
        bad[i] ^= 0x01
        assert reason(lambda b=bytes(bad): auth.open(b)) == "bad_signature"


def test_garbage_is_malformed() -> None:
    auth = Authenticator([K1])
    assert reason(lambda: auth.open(b"")) == "malformed"
    assert reason(lambda: auth.open(b"GET / HTTP/1.1\r\n" * 4)) == "malformed"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_open(data: bytes) -> None:
    auth = Authenticator([K1])
    assert reason(lambda: auth.open(data)) in {"malformed", "unknown_key", "bad_signature"}


def test_short_or_missing_keys_are_refused() -> None:
    with pytest.raises(ValueError):
        Authenticator([])
    with pytest.raises(ValueError):
        Authenticator([b"short"])


def test_parse_key_forms() -> None:
    assert parse_key("hex:00ff") == b"\x00\xff"
    assert parse_key("base64:AAE=") == b"\x00\x01"
    assert parse_key("plain text") == b"plain text"


def test_replay_window_accepts_reordering_rejects_duplicates() -> None:
    g = ReplayGuard(window=8, max_skew=60)
    for c in (1, 3, 2, 5, 4):
        g.admit("a", 1, c, 100, 100)
    assert reason(lambda: g.admit("a", 1, 3, 100, 100)) == "replayed"
    g.admit("a", 1, 12, 100, 100)
    assert reason(lambda: g.admit("a", 1, 4, 100, 100)) == "outside_window"
    g.admit("a", 1, 6, 100, 100)  # still inside the window, never seen
    assert reason(lambda: g.admit("a", 1, 6, 100, 100)) == "replayed"


def test_new_generation_resets_and_old_generation_is_refused() -> None:
    g = ReplayGuard()
    g.admit("a", 1, 50, 100, 100)
    g.admit("a", 2, 1, 100, 100)
    assert reason(lambda: g.admit("a", 1, 51, 100, 100)) == "stale_generation"
    g.admit("a", 2, 2, 100, 100)


def test_timestamp_window() -> None:
    g = ReplayGuard(max_skew=30)
    assert reason(lambda: g.admit("a", 1, 1, 60, 100)) == "stale_timestamp"
    assert reason(lambda: g.admit("a", 1, 1, 140, 100)) == "future_timestamp"
    g.admit("a", 1, 1, 75, 100)


def test_sender_table_is_bounded() -> None:
    g = ReplayGuard(max_senders=3)
    for s in "abcd":
        g.admit(s, 1, 1, 0, 0)
    assert len(g) == 3


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=200), max_size=300), st.integers(1, 64))
def test_window_matches_a_set_model(counters: list[int], window: int) -> None:
    """Accepted exactly when new and within ``window`` of the highest accepted counter."""
    g = ReplayGuard(window=window)
    seen: set[int] = set()
    for c in counters:
        top = max(seen, default=None)
        expect_ok = c not in seen and (top is None or c > top - window)
        try:
            g.admit("s", 1, c, 0, 0)
            ok = True
        except Rejected:
            ok = False
        assert ok == expect_ok
        if ok:
            seen.add(c)
