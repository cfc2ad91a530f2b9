"""The official ``openai`` client against an in-process simulated engine on a free port."""

from __future__ import annotations

from collections.abc import AsyncIterator

import openai
import pytest

from sim.engine_model import EngineConfig, EngineModel
from sim.profiles import L4_LLAMA_3_1_8B
from sim.server import SimEngineServer

pytestmark = pytest.mark.integration

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


@pytest.fixture
async def client() -> AsyncIterator[openai.AsyncOpenAI]:
    engine = EngineModel(L4_LLAMA_3_1_8B, EngineConfig(), seed=11)
    server = SimEngineServer(engine, MODEL, speedup=50.0)
    port = await server.start("127.0.0.1", 0)
    api = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    try:
        yield api
    finally:
        await api.close()
        await server.stop()


async def test_models_lists_the_served_model(client: openai.AsyncOpenAI) -> None:
    models = await client.models.list()
    assert [m.id for m in models.data] == [MODEL]


async def test_completion_non_stream_honours_max_tokens_and_reports_cached_tokens(
    client: openai.AsyncOpenAI,
) -> None:
    prompt = "the quick brown fox jumps over the lazy dog " * 20
    first = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=6)
    again = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=6)
    assert first.object == "text_completion" and first.id.startswith("cmpl-")
    assert first.choices[0].finish_reason == "length"
    assert first.usage is not None and again.usage is not None
    assert first.usage.completion_tokens == 6
    assert first.usage.total_tokens == first.usage.prompt_tokens + 6
    assert first.usage.prompt_tokens_details is not None
    assert again.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached == (first.usage.prompt_tokens - 1) // 16 * 16
    assert again.choices[0].text == first.choices[0].text  # deterministic from the prompt


async def test_completion_stream_concatenates_to_the_non_stream_text(
    client: openai.AsyncOpenAI,
) -> None:
    full = await client.completions.create(model=MODEL, prompt="stream me", max_tokens=9)
    stream = await client.completions.create(
        model=MODEL,
        prompt="stream me",
        max_tokens=9,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces: list[str] = []
    finish = []
    usage = None
    async for chunk in stream:
        for choice in chunk.choices:
            pieces.append(choice.text)
            finish.append(choice.finish_reason)
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(pieces) == full.choices[0].text
    assert finish[-1] == "length" and set(finish[:-1]) == {None}
    assert usage is not None and usage.completion_tokens == 9


async def test_chat_stream_and_non_stream(client: openai.AsyncOpenAI) -> None:
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is a prefix cache?"},
    ]
    reply = await client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=7
    )
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 7

    stream = await client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=7,
        stream=True,
        stream_options={"include_usage": True},
    )
    roles, content, usage = [], [], None
    async for chunk in stream:
        for choice in chunk.choices:
            roles.append(choice.delta.role)
            content.append(choice.delta.content or "")
        if chunk.usage is not None:
            usage = chunk.usage
    assert roles[0] == "assistant"
    assert "".join(content) == reply.choices[0].message.content
    assert usage is not None and usage.prompt_tokens == reply.usage.prompt_tokens
    assert usage.prompt_tokens_details is not None
    assert (usage.prompt_tokens_details.cached_tokens or 0) > 0  # the same conversation again


async def test_errors_surface_as_openai_exceptions(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError) as info:
        await client.completions.create(model=MODEL, prompt="x", max_tokens=10**6)
    assert "maximum context length" in str(info.value)
