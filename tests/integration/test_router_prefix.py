"""Follow-up turns land on the replica that cached the earlier turns, from its KV events alone."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import aiohttp
import pytest
from router_support import (
    chat,
    healthy,
    index_blocks,
    processes,
    sees_replicas,
    wait_until,
)

pytestmark = pytest.mark.integration


def words(seed: int, n: int) -> str:
    vocab = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota",
             "kappa", "lambda", "mu")
    return " ".join(vocab[(seed * 7 + i * 5) % len(vocab)] + str(i % 13) for i in range(n))


@pytest.mark.parametrize(("policy", "tokenizer"), [
    ("kvmesh", "builtin"), ("precise_prefix", "builtin"), ("kvmesh", "engine"),
])
async def test_follow_up_turns_follow_the_engines_kv_events(
    tmp_path: Path, policy: str, tokenizer: str
) -> None:
    with processes(tmp_path) as procs:
        engines = [procs.engine("engine-a"), procs.engine("engine-b")]
        router = procs.router("router", {
            "region": "us", "policy": policy,
            # "engine": the prompt is tokenized by an engine's own /tokenize.
            "tokenizer": "builtin" if tokenizer == "builtin" else f"engine:{engines[0].url}",
            "engines": [{"url": e.url, "kv_events": e.kv_events, "replay": e.replay}
                        for e in engines],
        })
        async with aiohttp.ClientSession() as s:
            for e in engines:
                await wait_until(partial(healthy, s, e.url), what=f"{e.url} up")
            await wait_until(lambda: sees_replicas(s, router, 2), what="router ready")
            for n, home in enumerate(engines):
                # Turn 1 goes straight to one engine: the router never routed it.
                messages = [{"role": "system", "content": words(11 + n, 300)},
                            {"role": "user", "content": words(3, 40)}]
                status, _, reply = await chat(s, home.url, messages)
                assert status == 200
                await wait_until(partial(_holds, s, router, home.url), what="index learns turn 1")
                for turn in range(2, 5):
                    messages += [{"role": "assistant", "content": reply},
                                 {"role": "user", "content": words(turn, 30)}]
                    status, headers, reply = await chat(s, router, messages)
                    assert status == 200
                    assert headers["x-kvmesh-replica"] == home.url, headers["x-kvmesh-route"]
                    assert headers["x-kvmesh-region"] == "us"
                    matched = headers["x-kvmesh-route"].split("prefix=", 1)[1].split("/", 1)[0]
                    assert int(matched) > 0


async def _holds(s: aiohttp.ClientSession, router: str, replica: str) -> bool:
    return (await index_blocks(s, router)).get(replica, 0) > 0
