"""A mixed fleet (16-token and 32-token engines) behind a router with no block_size set:
each engine is matched at the block size its events carry, and the router's predicted cached
tokens equal what each engine reports."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import aiohttp
import pytest
from router_support import MODEL, get_json, healthy, index_blocks, processes, wait_until

pytestmark = pytest.mark.integration


def words(seed: int, n: int) -> str:
    vocab = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota")
    return " ".join(vocab[(seed * 7 + i * 5) % len(vocab)] + str(i % 11) for i in range(n))


async def _post(s: aiohttp.ClientSession, base: str, messages: list[dict[str, str]]
                ) -> tuple[dict[str, str], dict[str, object]]:
    body = {"model": MODEL, "messages": messages, "max_tokens": 4}
    async with s.post(f"{base}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return ({k.lower(): v for k, v in resp.headers.items()},
                json.loads(await resp.read()))


async def test_mixed_block_sizes_route_precisely(tmp_path: Path) -> None:
    with processes(tmp_path) as procs:
        engines = {16: procs.engine("engine-16"),
                   32: procs.engine("engine-32", 20.0, "--block-size", "32")}
        router = procs.router("router", {
            "region": "us", "policy": "kvmesh", "tokenizer": "builtin",
            "engines": [{"url": e.url, "kv_events": e.kv_events, "replay": e.replay}
                        for e in engines.values()],
        })
        async with aiohttp.ClientSession() as s:
            for e in engines.values():
                await wait_until(partial(healthy, s, e.url), what=f"{e.url} up")
            await wait_until(partial(healthy, s, router), what="router up")
            for size, home in engines.items():
                messages = [{"role": "system", "content": words(size, 250)},
                            {"role": "user", "content": words(3, 30)}]
                _, first = await _post(s, home.url, messages)  # cached there, not routed
                reply = first["choices"][0]["message"]["content"]  # type: ignore[index]

                async def holds(url: str = home.url) -> bool:
                    return (await index_blocks(s, router)).get(url, 0) > 0

                await wait_until(holds, what="index learns the first turn")
                messages += [{"role": "assistant", "content": reply},
                             {"role": "user", "content": words(5, 20)}]
                headers, answer = await _post(s, router, messages)
                usage = answer["usage"]
                reported = usage["prompt_tokens_details"]["cached_tokens"]  # type: ignore[index]
                assert headers["x-kvmesh-replica"] == home.url, headers["x-kvmesh-route"]
                assert int(headers["x-kvmesh-predicted-cached-tokens"]) == reported > 0
                assert reported % size == 0
            status = await get_json(s, f"{router}/mesh/status")
            sizes = status["precision"]["block_sizes"]
            assert sizes["learned"] == {engines[16].url: 16, engines[32].url: 32}
            assert sizes["configured"] is None and sizes["mismatches"] == []
            assert status["precision"]["accuracy"] == 1.0
