"""The sans-I/O endpoint-picker stream (``mesh.picker``): events in, replies and notes out."""

from __future__ import annotations

import json

import pytest

from mesh.picker import (
    DEST_HEADER,
    SERVED_KEY,
    SUBSET_KEY,
    Body,
    BodyReply,
    Finished,
    Headers,
    HeadersReply,
    ImmediateReply,
    NeedPick,
    Pick,
    PickerError,
    PickerStream,
    Refusal,
    Served,
    StreamSettings,
    Trailers,
    TrailersReply,
    endpoint_of,
    parse_endpoints,
)

CHAT = {":path": "/v1/chat/completions", ":method": "POST", "x-request-id": "r1"}


def started(headers: dict[str, str] | None = None, metadata: dict[str, dict[str, object]]
            | None = None, settings: StreamSettings | None = None) -> PickerStream:
    s = PickerStream(settings)
    assert s.feed(Headers("request", headers or CHAT, False, metadata or {})) == []
    return s


def test_body_is_collected_across_chunks_before_the_pick() -> None:
    s = started(metadata={"envoy.lb.subset_hint": {SUBSET_KEY: ["10.0.0.1:8000"]}})
    assert s.feed(Body("request", b'{"model": "m", ', False)) == []
    [need] = s.feed(Body("request", b'"messages": []}', True))
    assert isinstance(need, NeedPick)
    assert need.ask.body == b'{"model": "m", "messages": []}'
    assert need.ask.kind == "chat" and need.ask.path == "/v1/chat/completions"
    assert need.ask.subset == frozenset({"10.0.0.1:8000"})
    assert need.ask.priority == 0 and not need.ask.sheddable


def test_pick_goes_to_header_and_metadata_alike_then_the_body() -> None:
    s = started()
    s.feed(Body("request", b"abc", True))
    out = s.decided(Pick(("10.0.0.1:8000", "10.0.0.2:8000"), "http://10.0.0.1:8000", "us",
                         "why", (("x-kvmesh-hop", "1"),)))
    head, body = out
    assert isinstance(head, HeadersReply) and head.phase == "request"
    headers = dict(head.set_headers)
    assert headers[DEST_HEADER] == "10.0.0.1:8000,10.0.0.2:8000"
    assert head.dynamic_metadata == {"envoy.lb": {DEST_HEADER: headers[DEST_HEADER]}}
    assert headers["x-kvmesh-hop"] == "1"
    assert head.clear_route_cache
    assert body == BodyReply("request", b"abc", True)


def test_bodyless_request_is_picked_at_once_and_gets_no_body_reply() -> None:
    s = PickerStream()
    [need] = s.feed(Headers("request", {":path": "/v1/models"}, True))
    assert isinstance(need, NeedPick) and need.ask.kind is None
    out = s.decided(Pick(("1.2.3.4:80",), "http://1.2.3.4", "us", "r"))
    assert len(out) == 1 and isinstance(out[0], HeadersReply)


@pytest.mark.parametrize(("result", "status"), [
    (Refusal(503, "nothing ready", "no_replica"), 503),
    (Refusal(429, "shed", "shed"), 429),
    (PickerError(400, "bad json", "invalid_request"), 400),
])
def test_refusals_are_immediate_openai_errors(result: Refusal | PickerError,
                                              status: int) -> None:
    s = started()
    s.feed(Body("request", b"{}", True))
    reply, fin = s.decided(result)
    assert isinstance(reply, ImmediateReply) and reply.status == status
    err = json.loads(reply.body)["error"]
    assert err["message"] and err["code"]
    assert err["type"] == ("rate_limit_error" if status == 429 else
                           "server_error" if status >= 500 else "invalid_request_error")
    assert fin == Finished(False)
    assert s.feed(Headers("response", {":status": "200"})) == []


def test_priority_header_sets_sheddable_and_rejects_garbage() -> None:
    s = started({**CHAT, "x-kvmesh-priority": "-2"})
    [need] = s.feed(Body("request", b"{}", True))
    assert isinstance(need, NeedPick) and need.ask.priority == -2 and need.ask.sheddable
    s = started({**CHAT, "x-prio": "5"}, settings=StreamSettings(priority_header="x-prio",
                                                                 shed_below=10))
    [need] = s.feed(Body("request", b"{}", True))
    assert isinstance(need, NeedPick) and need.ask.sheddable
    s = started({**CHAT, "x-kvmesh-priority": "high"})
    reply, _ = s.feed(Body("request", b"{}", True))
    assert isinstance(reply, ImmediateReply) and reply.status == 400
    assert b"x-kvmesh-priority" in reply.body


def test_bad_subset_hint_and_oversized_body_are_rejected() -> None:
    s = started(metadata={"envoy.lb.subset_hint": {SUBSET_KEY: 7}})
    reply, _ = s.feed(Body("request", b"{}", True))
    assert isinstance(reply, ImmediateReply) and reply.status == 400
    s = started(settings=StreamSettings(max_body=4))
    reply, fin = s.feed(Body("request", b"12345", False))
    assert isinstance(reply, ImmediateReply) and reply.status == 413
    assert fin == Finished(False)


def test_protocol_misuse_is_an_error_not_a_crash() -> None:
    s = PickerStream()
    reply, _ = s.feed(Body("request", b"x", True))
    assert isinstance(reply, ImmediateReply) and reply.status == 400
    s = started()
    reply, _ = s.feed(Headers("request", CHAT))
    assert isinstance(reply, ImmediateReply)


def test_response_reports_the_served_endpoint_and_ends_with_the_stream() -> None:
    s = started()
    s.feed(Body("request", b"{}", True))
    s.decided(Pick(("10.0.0.1:8000", "10.0.0.2:8000"), "http://10.0.0.1:8000", "us", "why"))
    out = s.feed(Headers("response", {":status": "503"}, False,
                         {"envoy.lb": {SERVED_KEY: "10.0.0.2:8000"}},
                         {"upstream.address": "10.0.0.9:1"}))
    served, head = out
    assert isinstance(head, HeadersReply) and dict(head.set_headers)["x-kvmesh-replica"] \
        == "http://10.0.0.1:8000"
    assert served == Served("10.0.0.2:8000", ("10.0.0.1:8000", "10.0.0.2:8000"), 503)
    assert s.feed(Body("response", b"data: 1\n\n", False)) == [
        BodyReply("response", b"data: 1\n\n", False)]
    assert s.feed(Trailers("response")) == [TrailersReply("response")]
    assert s.feed(Body("response", b"", True)) == [Finished(True),
                                                    BodyReply("response", b"", True)]
    assert s.close() == []


def test_served_falls_back_to_the_upstream_attribute_and_close_breaks_off() -> None:
    s = started()
    s.feed(Body("request", b"{}", True))
    s.decided(Pick(("10.0.0.1:8000",), "http://10.0.0.1:8000", "us", "why"))
    served, _ = s.feed(Headers("response", {":status": "200"}, False, {},
                               {"upstream.address": "10.0.0.1:8000"}))
    assert served == Served("10.0.0.1:8000", ("10.0.0.1:8000",), 200)
    assert s.close() == [Finished(False)]
    assert s.close() == []


def test_error_text_in_headers_is_made_header_safe() -> None:
    s = started()
    s.feed(Body("request", b"{}", True))
    reply, _ = s.decided(PickerError(400, "bad\r\nx-evil: 1 \u00e9" + "y" * 500, "x"))
    assert isinstance(reply, ImmediateReply)
    route = dict(reply.headers)["x-kvmesh-route"]
    assert route.startswith("bad??x-evil: 1 ?") and len(route) == 200
    assert "\r\nx-evil" in json.loads(reply.body)["error"]["message"]


def test_request_trailers_end_the_body_and_are_acknowledged_after_it() -> None:
    s = started()
    assert s.feed(Body("request", b"{}", False)) == []
    [need] = s.feed(Trailers("request"))
    assert isinstance(need, NeedPick) and need.ask.body == b"{}"
    out = s.decided(Pick(("1.2.3.4:80",), "http://1.2.3.4", "us", "r"))
    assert out[1:] == [BodyReply("request", b"{}", False), TrailersReply("request")]


def test_endpoints() -> None:
    assert endpoint_of("http://10.1.2.3:8000") == "10.1.2.3:8000"
    assert endpoint_of("http://[::1]:9000/x") == "[::1]:9000"
    assert endpoint_of("https://10.0.0.1") == "10.0.0.1:443"
    assert parse_endpoints("a:1, b:2,") == frozenset({"a:1", "b:2"})
    assert parse_endpoints([]) == frozenset()
    with pytest.raises(PickerError):
        parse_endpoints([1])
