"""The self-check: outcomes, the mismatch detector, and the usage tap (unit tests)."""

from __future__ import annotations

import json
import logging

import pytest

from mesh.api import Inference
from mesh.config import EngineConfig
from mesh.precision import has_media, single_prompt
from mesh.selfcheck import (
    CheckParams,
    EventHealth,
    SelfCheck,
    UsageTap,
    cached_from_usage,
    classify,
    wants_usage_injection,
    with_usage,
)
from mesh.sized_lookup import dp_sources

E = "http://e:8000"


def test_classify() -> None:
    assert classify(64, 64) == "exact"
    assert classify(64, 32) == "over"
    assert classify(0, 32) == "under"
    assert classify(0, None) == "no_usage"


def test_exact_predictions_keep_engine_trusted() -> None:
    sc = SelfCheck()
    for i in range(30):
        sc.served(E, 1, float(i))
        sc.record(E, 32 * (i % 3), 32 * (i % 3))
        sc.evaluate({E: EventHealth(events=i + 1, partial=False)}, float(i))
    assert sc.trusted(E) and sc.accuracy() == 1.0
    assert sc.status()["engines"][E]["outcomes"]["exact"] == 30


def test_predictions_that_keep_missing_flag_and_recover(caplog: pytest.LogCaptureFixture) -> None:
    sc = SelfCheck(CheckParams(window=10, min_samples=5, miss_ratio=0.5))
    with caplog.at_level(logging.INFO):
        for i in range(8):
            sc.record(E, 0, 64)  # the engine reuses what the index never matched
            sc.evaluate({E: EventHealth(events=100 + i, partial=False)}, float(i))
        assert not sc.trusted(E)
        flag, reason = sc.flags()[E]
        assert flag == "mispredicted" and "tokenizer or chat template" in reason
        for i in range(10):
            sc.record(E, 64, 64)
            sc.evaluate({E: EventHealth(events=200 + i, partial=False)}, 10.0 + i)
    assert sc.trusted(E)
    msgs = [r.message for r in caplog.records]
    assert sum("flagged mispredicted" in m for m in msgs) == 1  # once per change
    assert sum("trusted again" in m for m in msgs) == 1
    assert sc.flag_changes == 2


def test_over_predictions_name_their_likely_causes() -> None:
    sc = SelfCheck(CheckParams(min_samples=3))
    for _ in range(4):
        sc.record(E, 64, 0)
    sc.evaluate({E: EventHealth(events=5, partial=False)}, 0.0)
    assert "evictions not seen, wrong block size" in sc.flags()[E][1]


def test_cache_blind_needs_served_blocks_time_and_silence() -> None:
    p = CheckParams(blind_requests=3, blind_after=5.0)
    sc = SelfCheck(p)
    sc.evaluate({E: None}, 0.0)
    for t in (0.0, 1.0, 2.0):
        sc.served(E, 2, t)
        sc.evaluate({E: None}, t)
    assert sc.trusted(E), "not before blind_after seconds"
    sc.evaluate({E: None}, 6.0)
    flag, reason = sc.flags()[E]
    assert flag == "cache-blind" and "no kv_events source is configured" in reason
    # A request that stores nothing new (full hit) is no evidence of silence.
    other = SelfCheck(p)
    for t in range(10):
        other.served(E, 0, float(t))
        other.evaluate({E: EventHealth(events=3, partial=False)}, float(t))
    assert other.trusted(E)


def test_cache_blind_clears_when_events_arrive() -> None:
    sc = SelfCheck(CheckParams(blind_requests=2, blind_after=1.0))
    for t in (0.0, 1.0, 2.0):
        sc.served(E, 1, t)
        sc.evaluate({E: EventHealth(events=7, partial=False)}, t)
    assert sc.flags()[E][0] == "cache-blind"
    sc.evaluate({E: EventHealth(events=8, partial=False)}, 3.0)
    assert sc.trusted(E)


def test_publishing_engine_never_looks_blind() -> None:
    """Each answer's events arrive before the next answer is judged."""
    sc = SelfCheck(CheckParams(blind_requests=2, blind_after=0.0))
    for t in range(20):
        sc.served(E, 3, float(t))
        sc.evaluate({E: EventHealth(events=t, partial=False)}, float(t))
        assert sc.trusted(E)


def test_partial_stream_flagged_until_predictions_agree() -> None:
    sc = SelfCheck(CheckParams(min_samples=3))
    sc.evaluate({E: EventHealth(events=4, partial=True)}, 0.0)
    assert sc.flags()[E][0] == "partial"
    for i in range(3):
        sc.record(E, 32, 32)
        sc.evaluate({E: EventHealth(events=5 + i, partial=True)}, 1.0 + i)
    assert sc.trusted(E)


def test_cached_from_usage() -> None:
    assert cached_from_usage({"prompt_tokens_details": {"cached_tokens": 96}}) == 96
    assert cached_from_usage({"prompt_tokens_details": None}) is None
    assert cached_from_usage({"prompt_tokens_details": {"cached_tokens": -1}}) is None
    assert cached_from_usage(None) is None


def test_usage_injection_only_for_streams_without_it() -> None:
    assert wants_usage_injection({"stream": True})
    assert wants_usage_injection({"stream": True, "stream_options": {"include_usage": False}})
    assert not wants_usage_injection({"stream": True, "stream_options": {"include_usage": True}})
    assert not wants_usage_injection({"stream": False})
    body = json.loads(with_usage({"stream": True, "stream_options": {"x": 1}, "model": "m"}))
    assert body["stream_options"] == {"x": 1, "include_usage": True} and body["model"] == "m"


def test_usage_member_appended_to_the_raw_body() -> None:
    raw = '  {"model": "m", "stream": true, "messages": [{"role": "user", "content": "é}"}]}\n'
    parsed = json.loads(raw)
    out = with_usage(parsed, raw.encode())
    assert out.startswith(raw.strip()[:-1].encode())  # the client's bytes, unchanged
    assert json.loads(out) == {**parsed, "stream_options": {"include_usage": True}}
    # A body that names stream_options (even as null) is written out again instead.
    named = {"model": "m", "stream": True, "stream_options": None}
    assert json.loads(with_usage(named, json.dumps(named).encode()))["stream_options"] == {
        "include_usage": True}
    # Bytes that are not a UTF-8 object are never spliced.
    utf16 = json.dumps(parsed).encode("utf-16-le")
    assert json.loads(with_usage(parsed, utf16)) == {
        **parsed, "stream_options": {"include_usage": True}}


def _sse(*docs: object) -> bytes:
    return b"".join(b"data: " + (d if isinstance(d, bytes) else json.dumps(d).encode()) + b"\n\n"
                    for d in docs)


USAGE = {"prompt_tokens": 40, "prompt_tokens_details": {"cached_tokens": 32}}
STREAM = _sse({"choices": [{"delta": {"content": "a"}}]},
              {"choices": [{"delta": {"content": "b"}}], "usage": None},
              {"choices": [], "usage": USAGE}, b"[DONE]")


@pytest.mark.parametrize("cut", [1, 3, 7, 50, len(STREAM)])
def test_tap_strips_the_usage_chunk_at_any_chunking(cut: int) -> None:
    tap = UsageTap(stream=True, strip=True)
    out = b"".join(tap.feed(STREAM[i:i + cut]) for i in range(0, len(STREAM), cut))
    out += tap.finish()
    assert tap.usage == USAGE
    assert out == _sse({"choices": [{"delta": {"content": "a"}}]},
                       {"choices": [{"delta": {"content": "b"}}], "usage": None}, b"[DONE]")


def test_tap_passes_through_when_client_asked() -> None:
    tap = UsageTap(stream=True, strip=False)
    out = tap.feed(STREAM[:20]) + tap.feed(STREAM[20:]) + tap.finish()
    assert out == STREAM and tap.usage == USAGE and not tap.rewrites


def test_tap_reads_json_answers() -> None:
    body = json.dumps({"choices": [], "usage": USAGE}).encode()
    tap = UsageTap(stream=False)
    assert tap.feed(body[:10]) + tap.feed(body[10:]) + tap.finish() == body
    assert tap.usage == USAGE
    bad = UsageTap(stream=False)
    bad.feed(b"{not json")
    assert bad.finish() == b"" and bad.usage is None


def test_media_parts_make_a_request_unmatched() -> None:
    assert not has_media({"messages": [{"role": "user", "content": "hi"}]})
    assert not has_media({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}]}]})
    assert has_media({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "x"}}]}]})
    assert has_media({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]})


def test_data_parallel_sources() -> None:
    eng = EngineConfig("http://e:8000", kv_events="tcp://e:5557", replay="tcp://e:5600",
                       data_parallel_size=3)
    assert dp_sources(eng) == [
        ("http://e:8000", "tcp://e:5557", "tcp://e:5600"),
        ("http://e:8000#dp1", "tcp://e:5558", "tcp://e:5601"),
        ("http://e:8000#dp2", "tcp://e:5559", "tcp://e:5602"),
    ]
    with pytest.raises(ValueError, match="cannot offset"):
        dp_sources(EngineConfig("http://e", kv_events="ipc:///tmp/x", data_parallel_size=2))


def test_lora_namespace_from_served_adapters() -> None:
    from mesh.config import RouterConfig
    from mesh.precision import Precision
    from mesh.state import LocalOnly

    p = Precision(RouterConfig(region="us"), LocalOnly(),
                  lambda: {"http://e": frozenset({"sql-lora"})})
    assert p.lora_for("sql-lora", {}) == "sql-lora"
    assert p.lora_for("base-model", {}) is None
    assert p.lora_for("base-model", {"lora_path": "my-adapter"}) == "my-adapter"
    inf = Inference("completion", "/v1/completions", {"model": "sql-lora"}, b"", "sql-lora",
                    False, list(range(64)), None, 1)
    base = Inference("completion", "/v1/completions", {"model": "base-model"}, b"",
                     "base-model", False, list(range(64)), None, 1)
    assert p.keys_for(inf, 0.0).by_size[16] != p.keys_for(base, 0.0).by_size[16]


def test_only_single_prompt_answers_are_scored() -> None:
    assert single_prompt({"prompt": "x"}) and single_prompt({"prompt": [1, 2, 3]})
    assert single_prompt({"prompt": ["x"]}) and single_prompt({"messages": [], "n": 1})
    assert not single_prompt({"prompt": ["x", "y"]})
    assert not single_prompt({"prompt": [[1], [2]]})
    assert not single_prompt({"messages": [], "n": 2})


def test_misses_under_concurrency_are_counted_but_not_evidence() -> None:
    sc = SelfCheck(CheckParams(min_samples=3))
    for _ in range(10):
        sc.record(E, 0, 64, concurrent=True)
    sc.evaluate({E: EventHealth(events=9, partial=False)}, 0.0)
    assert sc.trusted(E) and sc.totals()["under"] == 10


def test_precision_prepare_with_the_body_made_first_is_the_same_check() -> None:
    """The router makes the body before the write and the prediction after it."""
    from mesh.api import Inference
    from mesh.config import build
    from mesh.precision import Precision
    from mesh.state import LocalOnly

    p = Precision(build({"region": "us", "engines": [{"url": "http://e:1"}]}), LocalOnly())
    for stream, body in [(False, {"messages": [{"role": "user", "content": "hi"}]}),
                         (True, {"messages": [{"role": "user", "content": "hi"}],
                                 "stream": True})]:
        raw = b'{"stream": true}' if stream else b"{}"
        inf = Inference("chat", "/v1/chat/completions", body, raw, "m", stream, list(range(40)),
                        None, 8)
        whole = p.prepare(inf, "http://e:1", [1, 2], 16, True)
        split = p.prepare(inf, "http://e:1", [1, 2], 16, True, p.body_for(inf))
        assert split.body == whole.body == p.body_for(inf)
        assert (split.replica, split.predicted, split.new_blocks, split.concurrent,
                split.comparable, split.tap.stream, split.tap.strip) == (
            whole.replica, whole.predicted, whole.new_blocks, whole.concurrent,
            whole.comparable, whole.tap.stream, whole.tap.strip)
        assert (whole.body != raw) is stream  # a stream asks for usage
