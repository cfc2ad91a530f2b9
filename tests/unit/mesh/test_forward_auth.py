"""Signed forwards: body binding, timestamp window, once-only, malformed headers."""

from __future__ import annotations

import pytest

from mesh.forward_auth import (
    SIG,
    ForwardRejected,
    ForwardVerifier,
    body_digest,
    sign_headers,
)
from mesh.proxy import H_EMULATED_RTT, emulated_hold

KEY = "forward unit-test key, 32 bytes!"
PATH = "/v1/chat/completions"


def signed(rid: str, body: bytes = b"{}", target: str = "http://e", wall: float = 1000.0,
           key: str = KEY, session: str | None = None) -> dict[str, str]:
    return sign_headers(key, "router-a", target, rid, PATH, session, body_digest(body), wall)


def reason(v: ForwardVerifier, headers: dict[str, str], body: bytes = b"{}",
           wall: float = 1000.0, path: str = PATH) -> str:
    with pytest.raises(ForwardRejected) as exc:
        v.verify(headers, path, body_digest(body), wall)
    return exc.value.reason


def test_a_forward_is_accepted_once_and_only_with_its_body_path_and_session() -> None:
    v = ForwardVerifier([KEY], window=30.0)
    h = signed("r1", session="s1")
    fwd = v.verify(h, PATH, body_digest(b"{}"), 1001.0)
    assert (fwd.origin, fwd.target, fwd.request_id) == ("router-a", "http://e", "r1")
    assert reason(v, h) == "replayed"
    h2 = signed("r2", session="s1")
    assert reason(v, h2, body=b'{"other": 1}') == "bad_signature"
    assert reason(v, h2, path="/v1/completions") == "bad_signature"
    assert reason(v, {**h2, "x-session-id": "s2"}) == "bad_signature"
    assert reason(v, signed("r3", key="another key of at least 32 bytes")) == "bad_signature"


def test_timestamps_outside_the_window_and_region_forwards() -> None:
    v = ForwardVerifier([KEY], window=30.0)
    assert reason(v, signed("old", wall=900.0)) == "stale_timestamp"
    assert reason(v, signed("future", wall=1100.0)) == "stale_timestamp"
    fwd = v.verify(signed("region", target=""), PATH, body_digest(b"{}"), 1000.0)
    assert fwd.target == ""


def test_malformed_headers_and_no_key() -> None:
    v = ForwardVerifier([KEY])
    assert reason(v, {**signed("x"), SIG: "\u00e9" * 64}) == "malformed_header"
    assert reason(v, {"x-kvmesh-hop": ""}) == "bad_version"
    assert reason(ForwardVerifier([]), signed("y")) == "no_mesh_key"
    h = signed("z")
    del h["x-request-id"]
    assert reason(v, h) == "missing_header"


def test_a_full_replay_table_refuses_what_it_forgot() -> None:
    v = ForwardVerifier([KEY], window=30.0, max_remembered=2)
    first = signed("a", wall=1000.0)
    v.verify(first, PATH, body_digest(b"{}"), 1000.0)
    v.verify(signed("b", wall=1001.0), PATH, body_digest(b"{}"), 1001.0)
    v.verify(signed("c", wall=1002.0), PATH, body_digest(b"{}"), 1002.0)
    assert len(v) == 2
    assert reason(v, first, wall=1003.0) == "stale_timestamp"  # evicted, still refused


@pytest.mark.parametrize(("value", "seconds"), [(None, 0.0), ("0", 0.0), ("0.08", 0.08),
                                                ("10", 10.0)])
def test_an_emulated_round_trip_is_held_for_the_seconds_it_names(
        value: str | None, seconds: float) -> None:
    assert emulated_hold(value) == seconds


@pytest.mark.parametrize("value", ["-0.1", "10.5", "nan", "inf", "", "soon"])
def test_an_unusable_emulated_round_trip_is_refused_with_the_header_named(value: str) -> None:
    with pytest.raises(ValueError, match=H_EMULATED_RTT):
        emulated_hold(value)
