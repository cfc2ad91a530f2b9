"""kvmesh routers in front of real vLLM engines (CPU build, tiny random Llama, 32-token blocks).

Every router here has no ``block_size`` configured (it learns 32 from the events) unless a test
says otherwise. The check throughout: the cached prompt tokens the router predicted for the
engine it chose (response header ``x-kvmesh-predicted-cached-tokens``) equal the engine's own
``usage.prompt_tokens_details.cached_tokens``.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from make_model import WORDS
from vllm_support import (
    BLOCK_SIZE,
    LORA,
    MODEL_NAME,
    SAMPLES,
    Engines,
    Router,
    Routers,
    VllmEngine,
    engine_entry,
    http_json,
)

from kvevents.tokenizers.engine import EngineTokenizer
from kvevents.tokenizers.hf import HFTokenizer

pytestmark = [pytest.mark.real, pytest.mark.timeout(900)]

PREDICTED = "x-kvmesh-predicted-cached-tokens"





def text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def prompt_of(tok: HFTokenizer, rng: random.Random, n_tokens: int) -> str:
    """A completion prompt of exactly ``n_tokens`` tokens (BOS included)."""
    words: list[str] = []
    while len(tok.encode(" ".join(words))) < n_tokens:
        words.append(rng.choice(WORDS))
    while len(tok.encode(" ".join(words))) > n_tokens:
        words.pop()
    s = " ".join(words)
    filler = iter(["a", "b", "c", "d", "e", "f", "g", "h"] * 8)
    while len(tok.encode(s)) < n_tokens:
        s += " " + next(filler)
    return s


def client(router: Router) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0,
                         timeout=120)


def cached_of(usage: Any) -> int:
    details = usage.prompt_tokens_details
    assert details is not None, "engine sent no prompt_tokens_details"
    return int(details.cached_tokens or 0)


def complete(router: Router, prompt: str, test: str, max_tokens: int = 2,
             model: str = MODEL_NAME, **extra: Any) -> tuple[int, int, str]:
    """(predicted, reported, replica) for one completion through the router."""
    raw = client(router).completions.with_raw_response.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, **extra)
    out = raw.parse()
    predicted = int(raw.headers[PREDICTED])
    reported = cached_of(out.usage)
    SAMPLES.append((test, predicted, reported))
    return predicted, reported, raw.headers["x-kvmesh-replica"]


def chat(router: Router, messages: list[dict[str, Any]], test: str, stream: bool,
         max_tokens: int = 8, **extra: Any) -> tuple[int, int, str, str]:
    """(predicted, reported, replica, reply) for one chat turn through the router."""
    c = client(router)
    if not stream:
        raw = c.chat.completions.with_raw_response.create(
            model=MODEL_NAME, messages=messages, max_tokens=max_tokens, temperature=0,
            **extra)  # type: ignore[call-overload]
        out = raw.parse()
        reply = out.choices[0].message.content or ""
        reported = cached_of(out.usage)
    else:
        raw = c.chat.completions.with_raw_response.create(
            model=MODEL_NAME, messages=messages, max_tokens=max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True},
            **extra)  # type: ignore[call-overload]
        parts, usage = [], None
        for chunk in raw.parse():
            if chunk.usage is not None:
                usage = chunk.usage
            for ch in chunk.choices:
                parts.append(ch.delta.content or "")
        assert usage is not None, "asked for usage on the stream but got none"
        reply, reported = "".join(parts), cached_of(usage)
    predicted = int(raw.headers[PREDICTED])
    SAMPLES.append((test, predicted, reported))
    return predicted, reported, raw.headers["x-kvmesh-replica"], reply


def events_of(router: Router, engine: VllmEngine) -> int:
    return int(router.engine_stats(engine.url).get("events", 0))


def settle_all(router: Router, engines: list[VllmEngine], before: dict[str, int]) -> None:
    """Wait for the events of the last answer from whichever engine stored something."""
    deadline = time.monotonic() + 30
    while True:
        now = {e.url: events_of(router, e) for e in engines}
        moved = [e for e in engines if now[e.url] > before.get(e.url, 0)]
        if moved:
            for e in moved:
                router.settle(e.url, before.get(e.url, 0))
            return
        if time.monotonic() > deadline:
            raise AssertionError("no events arrived for the last answer")
        time.sleep(0.05)


def hf(model: Path) -> HFTokenizer:
    return HFTokenizer(model)


# -- tests -----------------------------------------------------------------------------------


def test_repeat_of_400_token_prompt_is_precise(engines: Engines, routers: Routers,
                                               tiny_model: Path) -> None:
    r = routers.start("r-default", {"engines": [engine_entry(engines.a), engine_entry(engines.b)],
                                    "tokenizer": f"hf:{tiny_model}"})
    prompt = prompt_of(hf(tiny_model), random.Random(400), 400)
    before = {e.url: events_of(r, e) for e in (engines.a, engines.b)}
    p1, c1, rep1 = complete(r, prompt, "repeat-400")
    assert (p1, c1) == (0, 0)
    settle_all(r, [engines.a, engines.b], before)
    p2, c2, rep2 = complete(r, prompt, "repeat-400")
    full = (400 - 1) // BLOCK_SIZE * BLOCK_SIZE
    assert rep2 == rep1, "the repeat must go where its whole prefix is cached"
    assert p2 == c2 == full, f"predicted {p2}, engine reported {c2}, full prefix is {full}"
    learned = r.status()["precision"]["block_sizes"]["learned"]
    assert learned[rep1] == BLOCK_SIZE


def test_multi_turn_chat_and_completions_predictions_equal_engine(
        engines: Engines, routers: Routers, tiny_model: Path) -> None:
    r = routers.start("r-chat", {"engines": [engine_entry(engines.a), engine_entry(engines.b)],
                                 "tokenizer": f"hf:{tiny_model}"})
    rng = random.Random(7)
    checked: list[tuple[int, int]] = []
    both = [engines.a, engines.b]
    for conv in range(3):
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": f"You are agent {conv}. " + text(rng, 60)}]
        for turn in range(4):
            messages.append({"role": "user", "content": text(rng, 40 + 10 * turn)})
            before = {e.url: events_of(r, e) for e in both}
            predicted, reported, _, reply = chat(r, messages, "multi-turn",
                                                 stream=turn % 2 == 1)
            if turn > 0:
                checked.append((predicted, reported))
            messages.append({"role": "assistant", "content": reply})
            settle_all(r, both, before)
        prompt = text(rng, 150)
        before = {e.url: events_of(r, e) for e in both}
        complete(r, prompt, "multi-turn", max_tokens=4)
        settle_all(r, both, before)
        predicted, reported, _ = complete(r, prompt + " " + text(rng, 30), "multi-turn")
        checked.append((predicted, reported))
    wrong = [(p, c) for p, c in checked if p != c]
    assert not wrong, f"follow-up predictions that missed (predicted, reported): {wrong}"
    assert sum(c for _, c in checked) > 0, "no follow-up turn found anything cached"
    doc = r.status()["precision"]
    assert doc["accuracy"] == 1.0, doc
    assert not any(e["flag"] for e in doc["engines"].values()), doc


def test_stream_usage_asked_for_and_stripped(engines: Engines, routers: Routers,
                                             tiny_model: Path) -> None:
    r = routers.start("r-stream", {"engines": [engine_entry(engines.a)],
                                   "tokenizer": f"hf:{tiny_model}"})
    msgs = [{"role": "user", "content": text(random.Random(3), 120)}]
    c = client(r)
    before = events_of(r, engines.a)
    chunks = list(c.chat.completions.create(model=MODEL_NAME, messages=msgs,  # type: ignore
                                            max_tokens=4, stream=True))
    assert chunks and all(ch.usage is None for ch in chunks), "usage leaked to the client"
    r.settle(engines.a.url, before)
    chunks = list(c.chat.completions.create(model=MODEL_NAME, messages=msgs,  # type: ignore
                                            max_tokens=4, stream=True))
    assert all(ch.usage is None for ch in chunks)
    # The router scores a stream once it has relayed the end, which may come just after the
    # client has read it: wait for the second outcome.
    deadline = time.monotonic() + 10
    while True:
        doc = r.status()["precision"]["engines"][engines.a.url]
        if sum(doc["outcomes"].values()) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert doc["outcomes"]["exact"] == 2 and doc["outcomes"]["no_usage"] == 0, doc
    assert doc["reported_tokens"] > 0, "the second stream should have hit the cache"


def test_late_router_catches_up_by_replay(engines: Engines, routers: Routers,
                                          tiny_model: Path) -> None:
    first = routers.start("r-early", {"engines": [engine_entry(engines.a)],
                                      "tokenizer": f"hf:{tiny_model}"})
    prompt = prompt_of(hf(tiny_model), random.Random(11), 300)
    before = events_of(first, engines.a)
    complete(first, prompt, "late-join")
    first.settle(engines.a.url, before)
    late = routers.start("r-late", {"engines": [engine_entry(engines.a)],
                                    "tokenizer": f"hf:{tiny_model}"})
    want = first.engine_stats(engines.a.url)["held_keys"]
    deadline = time.monotonic() + 60
    while late.engine_stats(engines.a.url).get("held_keys") != want:
        assert time.monotonic() < deadline, (
            f"late router holds {late.engine_stats(engines.a.url)} keys, early one {want}")
        time.sleep(0.1)
    stats = late.engine_stats(engines.a.url)
    assert stats["held_keys"] > 0 and stats["partial"] is False
    predicted, reported, _ = complete(late, prompt, "late-join")
    assert predicted == reported == (300 - 1) // BLOCK_SIZE * BLOCK_SIZE


def test_engine_tokenizer_agrees_with_hf(engines: Engines, routers: Routers,
                                         tiny_model: Path) -> None:
    local = hf(tiny_model)
    rng = random.Random(5)
    prompt = text(rng, 80)
    tools = [{"type": "function", "function": {
        "name": "lookup", "description": "find a block",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]
    msgs = [{"role": "system", "content": text(rng, 20)},
            {"role": "user", "content": text(rng, 30)}]

    async def compare() -> None:
        eng = EngineTokenizer(engines.a.url, model=MODEL_NAME)
        try:
            assert await eng.encode(prompt) == local.encode(prompt)
            assert await eng.encode_chat(msgs) == local.encode_chat(msgs)
            with_tools = await eng.encode_chat(msgs, tools=tools,
                                               template_kwargs={"enable_thinking": True})
            assert with_tools == local.encode_chat(msgs, tools=tools,
                                                   template_kwargs={"enable_thinking": True})
            assert with_tools != await eng.encode_chat(msgs), "tools must change the prompt"
        finally:
            await eng.aclose()

    asyncio.run(compare())
    # A router tokenizing through the engine routes as precisely as one with local files.
    r = routers.start("r-engine-tok", {"engines": [engine_entry(engines.a)],
                                       "tokenizer": f"engine:{engines.a.url}"})
    before = events_of(r, engines.a)
    # tool_choice "none": vLLM still renders the tools (it has no tool parser configured here).
    options: dict[str, Any] = {"tools": tools, "tool_choice": "none",
                               "extra_body": {"chat_template_kwargs": {"enable_thinking": True}}}
    chat(r, msgs, "engine-tokenizer", stream=False, **options)
    r.settle(engines.a.url, before)
    predicted, reported, _, _ = chat(r, msgs, "engine-tokenizer", stream=False, **options)
    assert predicted == reported > 0


def test_lora_adapter_keyed_in_its_own_namespace(engines: Engines, routers: Routers,
                                                 tiny_model: Path) -> None:
    """vLLM keys an adapter's blocks apart from the base model's: no false match against the
    base model's cached prompt, a real match against the adapter's own."""
    r = routers.start("r-lora", {"engines": [engine_entry(engines.a)],
                                 "tokenizer": f"hf:{tiny_model}"})
    prompt = prompt_of(hf(tiny_model), random.Random(8), 250)
    full = (250 - 1) // BLOCK_SIZE * BLOCK_SIZE
    before = events_of(r, engines.a)
    assert complete(r, prompt, "lora")[:2] == (0, 0)  # base model caches it
    r.settle(engines.a.url, before)
    before = events_of(r, engines.a)
    assert complete(r, prompt, "lora", model=LORA)[:2] == (0, 0)  # not the adapter's
    r.settle(engines.a.url, before)
    assert complete(r, prompt, "lora", model=LORA)[:2] == (full, full)
    assert complete(r, prompt, "lora")[:2] == (full, full)


def test_doctor_on_real_engine(engines: Engines, tiny_model: Path, tmp_path: Path) -> None:
    def doctor(config: dict[str, Any]) -> tuple[int, str]:
        path = tmp_path / "router.yaml"
        path.write_text(yaml.safe_dump({"region": "us", "engines": [engine_entry(engines.a)],
                                        **config}))
        p = subprocess.run([sys.executable, "-m", "cli", "doctor", "--config", str(path)],
                           capture_output=True, text=True, timeout=120)
        return p.returncode, p.stdout + p.stderr

    rc, out = doctor({"tokenizer": f"hf:{tiny_model}"})
    assert rc == 0, out
    for line in ("serves tiny, sql-lora", "replay endpoint answers", "reports cached_tokens",
                 "block size 32 (learned from its events)", "completion tokenization agrees",
                 "chat tokenization agrees"):
        assert line in out, out
    rc, out = doctor({"tokenizer": "builtin", "block_size": 16})
    assert rc == 1, out
    assert "publishes 32-token blocks, block_size is configured as 16" in out
    assert "chat tokenization differs from the engine's" in out
    assert f"fix: tokenizer: engine:{engines.a.url}" in out


def test_configured_block_size_mismatch_is_reported_and_survived(
        engines: Engines, routers: Routers, tiny_model: Path) -> None:
    r = routers.start("r-bs16", {"engines": [engine_entry(engines.a)], "block_size": 16,
                                 "tokenizer": f"hf:{tiny_model}"})
    prompt = prompt_of(hf(tiny_model), random.Random(16), 200)
    before = events_of(r, engines.a)
    complete(r, prompt, "mismatch")
    r.settle(engines.a.url, before)
    predicted, reported, _ = complete(r, prompt, "mismatch")
    assert predicted == reported == (200 - 1) // BLOCK_SIZE * BLOCK_SIZE
    sizes = r.status()["precision"]["block_sizes"]
    assert sizes["configured"] == 16
    assert sizes["mismatches"] == [{"replica": engines.a.url, "configured": 16,
                                    "published": BLOCK_SIZE,
                                    "fix": f"remove block_size from the config (the engine "
                                           f"uses {BLOCK_SIZE})"}]
    assert "kvmesh_block_size_mismatches_total 1.0" in r.metrics()
    assert r.log().count("publishes 32-token blocks but block_size is configured as 16") == 1


def test_evictions_and_prefix_cache_reset(engines: Engines, routers: Routers,
                                          tiny_model: Path) -> None:
    b = engines.b
    r = routers.start("r-evict", {"engines": [engine_entry(b)],
                                  "tokenizer": f"hf:{tiny_model}"})
    tok = hf(tiny_model)
    prompts = [prompt_of(tok, random.Random(100 + i), 500) for i in range(8)]
    for p in prompts:  # 8 x 15 blocks through an 80-block cache
        before = events_of(r, b)
        complete(r, p, "evictions")
        r.settle(b.url, before)
    stats = r.engine_stats(b.url)
    assert stats["blocks_removed"] > 0, f"no eviction reached the router: {stats}"
    assert stats["held_keys"] <= 80
    before = events_of(r, b)
    predicted, reported, _ = complete(r, prompts[0], "evictions")  # long evicted
    assert predicted == reported < (500 - 1) // BLOCK_SIZE * BLOCK_SIZE
    r.settle(b.url, before)  # stored again (and evicted others)
    predicted, reported, _ = complete(r, prompts[-1], "evictions")  # still cached: no events
    assert predicted == reported == (500 - 1) // BLOCK_SIZE * BLOCK_SIZE
    # Reset: AllBlocksCleared comes with the engine's next step.
    result = http_json("POST", f"{b.url}/reset_prefix_cache")
    assert result is None or result.get("success", True), result
    clears = r.engine_stats(b.url)["clears"]
    fresh = prompt_of(tok, random.Random(999), 100)
    before = events_of(r, b)
    complete(r, fresh, "reset")
    r.settle(b.url, before)
    stats = r.engine_stats(b.url)
    assert stats["clears"] > clears, stats
    predicted, reported, _ = complete(r, prompts[-1], "reset")
    assert predicted == reported == 0


def test_restart_blind_then_reepoch(engines: Engines, routers: Routers,
                                    tiny_model: Path) -> None:
    """B restarts without KV events (the router keeps listening where it published): flagged
    cache-blind in bounded time; then B restarts with events: a new epoch, trusted again."""
    b = engines.b
    r = routers.start("r-restart", {"engines": [engine_entry(b)],
                                    "tokenizer": f"hf:{tiny_model}"})
    tok = hf(tiny_model)
    before = events_of(r, b)
    complete(r, prompt_of(tok, random.Random(1), 100), "restart")
    r.settle(b.url, before)
    epoch0 = r.engine_stats(b.url)["epoch"]
    b.stop()
    b.kv_events = False
    try:
        b.start()
        b.wait_healthy(time.monotonic() + 300)
    finally:
        b.kv_events = True
    r.wait_healthy()
    started = time.monotonic()
    i = 0
    while True:
        i += 1
        complete(r, prompt_of(tok, random.Random(500 + i), 100), "blind")
        flag = r.status()["precision"]["engines"][b.url]
        if flag["flag"] == "cache-blind":
            break
        assert time.monotonic() - started < 60, f"not flagged cache-blind in 60 s: {flag}"
        time.sleep(0.5)
    blind_after = time.monotonic() - started
    assert f'kvmesh_engine_flagged{{flag="cache-blind",replica="{b.url}"}} 1.0' in r.metrics()
    assert "flagged cache-blind" in r.log()
    print(f"\ncache-blind flagged after {blind_after:.1f}s and {i} requests")
    b.stop()
    b.start()
    b.wait_healthy(time.monotonic() + 300)
    r.wait_healthy()  # the router's own probe must have seen it back before it routes there
    prompt = prompt_of(tok, random.Random(77), 200)
    before = events_of(r, b)
    complete(r, prompt, "restart")
    deadline = time.monotonic() + 60
    while r.engine_stats(b.url).get("epoch") == epoch0:  # the new run's events open an epoch
        assert time.monotonic() < deadline, r.engine_stats(b.url)
        time.sleep(0.1)
    r.settle(b.url, before)
    predicted, reported, _ = complete(r, prompt, "restart")
    assert predicted == reported == (200 - 1) // BLOCK_SIZE * BLOCK_SIZE
    doc = r.status()["precision"]["engines"][b.url]
    assert doc["flag"] is None, doc
