"""The simulated engine's HTTP surface over real sockets: errors, metrics, tokenize, aborts on
disconnect, injected faults, prefix-cache reset, and one TTFT smoke test."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from kvevents.tokenizers.base import BuiltinTokenizer
from sim.engine_model import EngineConfig, EngineModel
from sim.profiles import L4_LLAMA_3_1_8B
from sim.server import SimEngineServer

pytestmark = pytest.mark.integration

MODEL = "sim-model"


@dataclass
class Sim:
    server: SimEngineServer
    base: str
    http: aiohttp.ClientSession

    async def get_json(self, path: str) -> Any:
        async with self.http.get(self.base + path) as r:
            assert r.status == 200, await r.text()
            return await r.json()

    async def post(self, path: str, body: object) -> tuple[int, Any]:
        async with self.http.post(self.base + path, json=body) as r:
            text = await r.text()
            return r.status, json.loads(text) if text else None


@pytest.fixture
async def sim() -> AsyncIterator[Sim]:
    engine = EngineModel(L4_LLAMA_3_1_8B, EngineConfig(), seed=2)
    server = SimEngineServer(engine, MODEL, speedup=20.0)
    port = await server.start("127.0.0.1", 0)
    async with aiohttp.ClientSession() as http:
        yield Sim(server, f"http://127.0.0.1:{port}", http)
    await server.stop()


async def wait_for(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.02)


async def test_malformed_and_invalid_requests_get_400_and_unknown_models_404(sim: Sim) -> None:
    async with sim.http.post(sim.base + "/v1/completions", data=b"{nope") as r:
        body = await r.json()
        assert r.status == 400 and body["error"]["type"] == "BadRequestError"
        assert body["error"]["code"] == 400 and "Invalid JSON" in body["error"]["message"]
    cases: list[tuple[str, object, int]] = [
        ("/v1/completions", {"model": MODEL}, 400),
        ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400),
        ("/v1/chat/completions", {"messages": "hi"}, 400),
        ("/v1/chat/completions", {"model": "gpt-9", "messages": []}, 404),
        ("/tokenize", {"model": "gpt-9", "prompt": "x"}, 404),
    ]
    for path, body, status in cases:
        code, err = await sim.post(path, body)
        assert code == status and err["error"]["code"] == status, (path, body, err)
        assert set(err["error"]) == {"message", "type", "param", "code"}
    stats = await sim.get_json("/debug/engine")
    assert stats["bad_requests"] == 6 and stats["engine"]["num_waiting"] == 0


async def test_tokenize_matches_the_shared_tokenizer(sim: Sim) -> None:
    tok = BuiltinTokenizer()
    code, body = await sim.post("/tokenize", {"prompt": "hello, mesh"})
    assert code == 200 and body["tokens"] == tok.encode("hello, mesh")
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 8192
    msgs = [{"role": "user", "content": "hi"}]
    code, body = await sim.post("/tokenize", {"messages": msgs})
    assert body["tokens"] == tok.encode(tok.apply_chat_template(msgs))


async def test_metrics_use_vllm_names_and_follow_the_engine(sim: Sim) -> None:
    text = "one two three four " * 10
    for _ in range(2):
        code, _ = await sim.post("/v1/completions", {"prompt": text, "max_tokens": 2})
        assert code == 200
    async with sim.http.get(sim.base + "/metrics") as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        metrics = await r.text()
    labels = f'{{engine="0",model_name="{MODEL}"}}'
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:time_to_first_token_seconds_count",
    ):
        assert f"{name}{labels}" in metrics, name
    values = {
        line.split("{")[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("vllm:") and labels in line
    }
    n = len(BuiltinTokenizer().encode(text))
    assert values["vllm:prefix_cache_queries_total"] == 2 * n
    assert values["vllm:prefix_cache_hits_total"] == (n - 1) // 16 * 16
    assert values["vllm:time_to_first_token_seconds_count"] == 2
    assert values["vllm:num_requests_running"] == 0


async def test_a_cached_prompt_has_a_shorter_engine_ttft(sim: Sim) -> None:
    prompt = list(range(5000, 7000))  # 2000 tokens: one 1.2 s prefill on the L4 profile

    async def ttft_sum() -> float:
        async with sim.http.get(sim.base + "/metrics") as r:
            for line in (await r.text()).splitlines():
                if line.startswith("vllm:time_to_first_token_seconds_sum"):
                    return float(line.rsplit(" ", 1)[1])
        raise AssertionError("no TTFT histogram")

    await sim.post("/v1/completions", {"prompt": prompt, "max_tokens": 1})
    cold = await ttft_sum()
    await sim.post("/v1/completions", {"prompt": prompt, "max_tokens": 1})
    warm = await ttft_sum() - cold
    assert warm < cold / 2  # engine (virtual) seconds, so scheduling noise is not counted


async def test_client_disconnect_aborts_and_frees_blocks(sim: Sim) -> None:
    body = {"prompt": list(range(3000, 3400)), "max_tokens": 4000, "stream": True}
    async with sim.http.post(sim.base + "/v1/completions", json=body) as r:
        await r.content.readline()  # the first chunk: the request is running
        engine = (await sim.get_json("/debug/engine"))["engine"]
        assert engine["num_running"] == 1 and engine["num_free_blocks"] < 1990
    # leaving the block closes the connection mid-stream

    async def freed() -> bool:
        e = (await sim.get_json("/debug/engine"))["engine"]
        return bool(e["num_running"] == 0 and e["num_free_blocks"] == e["num_gpu_blocks"])

    await wait_for(freed)
    stats = await sim.get_json("/debug/engine")
    assert stats["aborted_requests"] == 1 and stats["engine"]["finished_requests"] == 0


async def test_non_stream_disconnect_also_aborts(sim: Sim) -> None:
    body = {"prompt": list(range(100)), "max_tokens": 4000}
    request = asyncio.create_task(sim.http.post(sim.base + "/v1/completions", json=body))

    async def running() -> bool:
        return bool((await sim.get_json("/debug/engine"))["engine"]["num_running"] == 1)

    await wait_for(running)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request

    async def aborted() -> bool:
        return bool((await sim.get_json("/debug/engine"))["aborted_requests"] == 1)

    await wait_for(aborted)


async def test_injected_failures_delays_and_health(sim: Sim) -> None:
    code, faults = await sim.post("/debug/fault", {"fail_next": 2, "fail_status": 503})
    assert code == 200 and faults["fail_next"] == 2
    for _ in range(2):
        code, err = await sim.post("/v1/completions", {"prompt": "x", "max_tokens": 1})
        assert code == 503 and err["error"]["code"] == 503
    code, _ = await sim.post("/v1/completions", {"prompt": "x", "max_tokens": 1})
    assert code == 200
    await sim.post("/debug/fault", {"unhealthy": True})
    async with sim.http.get(sim.base + "/health") as r:
        assert r.status == 503
    code, faults = await sim.post("/debug/fault", {"clear": True})
    assert faults == await sim.get_json("/debug/fault")
    assert faults["unhealthy"] is False and faults["fail_next"] == 0
    code, err = await sim.post("/debug/fault", {"fail_next": "many"})
    assert code == 400 and err["error"]["param"] == "fail_next"
    code, err = await sim.post("/debug/fault", {"explode": 1})
    assert code == 400 and "explode" in err["error"]["message"]


async def test_pause_stalls_the_engine_until_it_resumes(sim: Sim) -> None:
    await sim.post("/debug/fault", {"pause_s": 0.4})
    started = time.monotonic()
    code, _ = await sim.post("/v1/completions", {"prompt": "x", "max_tokens": 1})
    assert code == 200 and time.monotonic() - started >= 0.3


async def test_reset_prefix_cache_empties_the_cache(sim: Sim) -> None:
    await sim.post("/v1/completions", {"prompt": list(range(64)), "max_tokens": 1})
    assert (await sim.get_json("/debug/kv_cache"))["num_cached_blocks"] == 4
    async with sim.http.post(sim.base + "/reset_prefix_cache") as r:
        assert r.status == 200
    cache = await sim.get_json("/debug/kv_cache")
    assert cache["block_hashes"] == [] and cache["num_free_blocks"] == cache["num_gpu_blocks"]
