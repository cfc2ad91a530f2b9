"""OpenAI request validation and vLLM's response/chunk shapes."""

from __future__ import annotations

from typing import Any

import pytest

from kvevents.tokenizers.base import BuiltinTokenizer
from sim.openai_api import (
    SSE_DONE,
    ApiError,
    Choice,
    chat_chunk,
    completion_chunk,
    parse_generation,
    parse_tokenize,
    sse,
)

MODEL = "m"
TOK = BuiltinTokenizer()


def parse(kind: str, body: object) -> Any:
    return parse_generation("chat" if kind == "chat" else "completion", body, MODEL, TOK)


def test_completion_prompts_accept_text_token_ids_and_batches() -> None:
    assert parse("completion", {"prompt": "a b"}).prompts == (tuple(TOK.encode("a b")),)
    assert parse("completion", {"prompt": [5, 6]}).prompts == ((5, 6),)
    batch = parse("completion", {"prompt": ["x", [7]]}).prompts
    assert batch == (tuple(TOK.encode("x")), (7,))


def test_max_tokens_defaults_like_vllm() -> None:
    assert parse("completion", {"prompt": "a"}).max_tokens == 16
    assert parse("completion", {"prompt": "a", "max_tokens": None}).max_tokens is None
    assert parse("chat", {"messages": [{"role": "user", "content": "a"}]}).max_tokens is None


def test_chat_renders_the_template_and_prefers_max_completion_tokens() -> None:
    req = parse(
        "chat",
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3,
            "max_completion_tokens": 9,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    text = TOK.apply_chat_template([{"role": "user", "content": "hi"}])
    assert req.prompts == (tuple(TOK.encode(text)),)
    assert (req.max_tokens, req.stream, req.include_usage) == (9, True, True)


@pytest.mark.parametrize(
    ("kind", "body", "status", "param"),
    [
        ("completion", [1, 2], 400, None),
        ("completion", {}, 400, "prompt"),
        ("completion", {"prompt": ""}, 400, "prompt"),
        ("completion", {"prompt": []}, 400, "prompt"),
        ("completion", {"prompt": 5}, 400, "prompt"),
        ("completion", {"prompt": [1, "a"]}, 400, "prompt"),
        ("completion", {"prompt": [-1]}, 400, "prompt"),
        ("completion", {"prompt": "a", "max_tokens": "3"}, 400, "max_tokens"),
        ("completion", {"prompt": "a", "max_tokens": True}, 400, "max_tokens"),
        ("completion", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
        ("completion", {"prompt": "a", "stream": "yes"}, 400, "stream"),
        ("completion", {"prompt": "a", "stream_options": {}}, 400, "stream_options"),
        ("completion", {"prompt": "a", "n": 2}, 400, "n"),
        ("completion", {"prompt": "a", "model": 3}, 400, "model"),
        ("completion", {"prompt": "a", "model": "other"}, 404, "model"),
        ("chat", {}, 400, "messages"),
        ("chat", {"messages": []}, 400, "messages"),
        ("chat", {"messages": ["hi"]}, 400, "messages"),
        ("chat", {"messages": [{"content": "no role"}]}, 400, "messages"),
        ("chat", {"messages": [{"role": "user", "content": 5}]}, 400, "messages"),
        ("chat", {"messages": [{"role": "user"}], "cache_salt": ""}, 400, "cache_salt"),
    ],
)
def test_bad_requests_get_openai_errors(kind: str, body: object, status: int, param: str) -> None:
    with pytest.raises(ApiError) as info:
        parse(kind, body)
    err = info.value.body()["error"]
    assert info.value.status == status == err["code"]
    assert err["param"] == param and err["message"]
    assert err["type"] == ("NotFoundError" if status == 404 else "BadRequestError")


def test_tokenize_accepts_prompt_or_messages() -> None:
    assert parse_tokenize({"prompt": "a b"}, MODEL, TOK) == tuple(TOK.encode("a b"))
    msgs = [{"role": "user", "content": "x"}]
    assert parse_tokenize({"messages": msgs}, MODEL, TOK) == tuple(
        TOK.encode(TOK.apply_chat_template(msgs))
    )
    with pytest.raises(ApiError):
        parse_tokenize({"text": "a"}, MODEL, TOK)


def test_chunks_are_framed_like_vllm() -> None:
    chunk = completion_chunk("cmpl-1", 5, MODEL, Choice(0, "é", None))
    assert (
        sse(chunk)
        == (
            'data: {"id":"cmpl-1","object":"text_completion","created":5,"model":"m","choices":'
            '[{"index":0,"text":"é","logprobs":null,"finish_reason":null,"stop_reason":null}],'
            '"usage":null}\n\n'
        ).encode()
    )
    last = chat_chunk("c", 5, MODEL, 0, {"content": "x"}, "length")
    assert last["choices"][0]["stop_reason"] is None and "usage" not in last
    assert "stop_reason" not in chat_chunk("c", 5, MODEL, 0, {"content": "x"}, None)["choices"][0]
    assert SSE_DONE == b"data: [DONE]\n\n"
