"""EngineTokenizer against a real HTTP /tokenize: the simulated engine (vLLM's shape)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from kvevents.tokenizers.base import BuiltinTokenizer
from kvevents.tokenizers.engine import EngineTokenizer, TokenizeError
from sim.engine_model import EngineConfig, EngineModel
from sim.profiles import L4_LLAMA_3_1_8B
from sim.server import SimEngineServer

pytestmark = pytest.mark.integration

MODEL = "sim-model"


@pytest.fixture
async def engine_url() -> AsyncIterator[str]:
    server = SimEngineServer(EngineModel(L4_LLAMA_3_1_8B, EngineConfig(), seed=3), MODEL)
    port = await server.start("127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await server.stop()


async def test_engine_tokenize_matches_the_engines_tokenizer(engine_url: str) -> None:
    ref = BuiltinTokenizer()
    tok = EngineTokenizer(engine_url, model=MODEL)
    try:
        text = "The quick brown fox, again and again."
        assert await tok.encode(text) == ref.encode(text)
        msgs = [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "what is a KV cache?"},
        ]
        assert await tok.encode_chat(msgs) == ref.encode(ref.apply_chat_template(msgs))
    finally:
        await tok.aclose()


async def test_engine_tokenize_errors_are_typed(engine_url: str) -> None:
    wrong_model = EngineTokenizer(engine_url, model="not-served")
    try:
        with pytest.raises(TokenizeError, match="404"):
            await wrong_model.encode("x")
    finally:
        await wrong_model.aclose()
    bad = EngineTokenizer(engine_url)
    try:
        with pytest.raises(TokenizeError, match="400"):
            await bad.encode_chat([{"role": 5}])  # type: ignore[dict-item]
    finally:
        await bad.aclose()
    nowhere = EngineTokenizer("http://127.0.0.1:9", timeout=1.0)  # discard port: refused
    try:
        with pytest.raises(TokenizeError):
            await nowhere.encode("x")
    finally:
        await nowhere.aclose()
