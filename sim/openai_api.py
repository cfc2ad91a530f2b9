"""vLLM's OpenAI-compatible request validation and response shapes, as plain functions.

Parsing turns a decoded JSON body into a ``GenerationRequest`` or raises ``ApiError`` with the
status and message vLLM would give. The builders return the dicts vLLM serialises (same keys,
same order, same nulls), and ``sse`` frames them the way vLLM streams them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from kvevents.tokenizers.base import BuiltinTokenizer

Kind = Literal["completion", "chat"]

COMPLETIONS_DEFAULT_MAX_TOKENS = 16
"""The legacy completions API's default (vLLM's too); chat defaults to "until the model stops"."""


class ApiError(Exception):
    """An error answered as ``{"error": {message, type, param, code}}`` with HTTP ``status``."""

    _TYPES = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError"}

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param

    def body(self) -> dict[str, Any]:
        kind = self._TYPES.get(self.status, "BadRequestError" if self.status < 500 else "Error")
        return {
            "error": {
                "message": self.message,
                "type": kind,
                "param": self.param,
                "code": self.status,
            }
        }


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    kind: Kind
    model: str
    prompts: tuple[tuple[int, ...], ...]
    """One token-id prompt per choice (completions accept a batch of prompts)."""
    max_tokens: int | None
    stream: bool
    include_usage: bool
    continuous_usage: bool
    cache_salt: str | None


def _json_object(body: object) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise ApiError("The request body must be a JSON object.")
    return body


def _check_model(body: Mapping[str, Any], served: str) -> str:
    model = body.get("model")
    if model is None:
        return served
    if not isinstance(model, str):
        raise ApiError("'model' must be a string.", param="model")
    if model != served:
        raise ApiError(f"The model `{model}` does not exist.", status=404, param="model")
    return model


def _optional_int(body: Mapping[str, Any], key: str, minimum: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(f"'{key}' must be an integer.", param=key)
    if value < minimum:
        raise ApiError(f"'{key}' must be at least {minimum}, got {value}.", param=key)
    return int(value)


def _optional_bool(body: Mapping[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(f"'{key}' must be a boolean.", param=key)
    return value


def _token_ids(value: Sequence[object], vocab_size: int, param: str) -> tuple[int, ...]:
    ids: list[int] = []
    for t in value:
        if isinstance(t, bool) or not isinstance(t, int):
            raise ApiError(f"'{param}' token ids must be integers.", param=param)
        if not 0 <= t < vocab_size:
            raise ApiError(f"Token id {t} is out of vocabulary", param=param)
        ids.append(t)
    return tuple(ids)


def _completion_prompts(prompt: object, tokenizer: BuiltinTokenizer) -> tuple[tuple[int, ...], ...]:
    if prompt is None:
        raise ApiError("'prompt' is required.", param="prompt")
    if isinstance(prompt, str):
        items: list[object] = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt:
        items = list(prompt)
    else:
        raise ApiError(
            "'prompt' must be a string, a list of strings, or token ids.", param="prompt"
        )
    out: list[tuple[int, ...]] = []
    for item in items:
        if isinstance(item, str):
            ids = tuple(tokenizer.encode(item))
        elif isinstance(item, list):
            ids = _token_ids(item, tokenizer.vocab_size, "prompt")
        else:
            raise ApiError(
                "'prompt' must be a string, a list of strings, or token ids.", param="prompt"
            )
        if not ids:
            raise ApiError("The prompt cannot be empty.", param="prompt")
        out.append(ids)
    return tuple(out)


def chat_prompt(messages: object, tokenizer: BuiltinTokenizer) -> tuple[int, ...]:
    if messages is None:
        raise ApiError("'messages' is required.", param="messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("'messages' must be a non-empty list.", param="messages")
    for msg in messages:
        if not isinstance(msg, Mapping):
            raise ApiError("every message must be an object.", param="messages")
    try:
        text = tokenizer.apply_chat_template(messages)
    except ValueError as exc:
        raise ApiError(str(exc), param="messages") from None
    return tuple(tokenizer.encode(text))


def parse_generation(
    kind: Kind, raw: object, served_model: str, tokenizer: BuiltinTokenizer
) -> GenerationRequest:
    body = _json_object(raw)
    model = _check_model(body, served_model)
    if kind == "chat":
        prompts: tuple[tuple[int, ...], ...] = (chat_prompt(body.get("messages"), tokenizer),)
        max_tokens = _optional_int(body, "max_completion_tokens", 1)
        if max_tokens is None:
            max_tokens = _optional_int(body, "max_tokens", 1)
    else:
        prompts = _completion_prompts(body.get("prompt"), tokenizer)
        max_tokens = _optional_int(body, "max_tokens", 1)
        if "max_tokens" not in body:
            max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
    n = _optional_int(body, "n", 1)
    if n is not None and n != 1:
        raise ApiError("The simulated engine supports only n=1.", param="n")
    stream = _optional_bool(body, "stream")
    options = body.get("stream_options")
    include_usage = continuous = False
    if options is not None:
        if not stream:
            raise ApiError(
                "Stream options can only be defined when `stream=True`.", param="stream_options"
            )
        if not isinstance(options, Mapping):
            raise ApiError("'stream_options' must be an object.", param="stream_options")
        include_usage = _optional_bool(options, "include_usage")
        continuous = _optional_bool(options, "continuous_usage_stats")
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise ApiError("'cache_salt' must be a non-empty string.", param="cache_salt")
    return GenerationRequest(
        kind, model, prompts, max_tokens, stream, include_usage, continuous, salt
    )


def parse_tokenize(raw: object, served_model: str, tokenizer: BuiltinTokenizer) -> tuple[int, ...]:
    body = _json_object(raw)
    _check_model(body, served_model)
    if "messages" in body:
        return chat_prompt(body["messages"], tokenizer)
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise ApiError("'prompt' (a string) or 'messages' is required.", param="prompt")
    return tuple(tokenizer.encode(prompt))


# -- responses -------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


@dataclass(frozen=True, slots=True)
class Choice:
    index: int
    text: str
    finish_reason: str | None


def completion_response(
    rid: str, created: int, model: str, choices: Sequence[Choice], use: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": c.index,
                "text": c.text,
                "logprobs": None,
                "finish_reason": c.finish_reason,
                "stop_reason": None,
                "prompt_logprobs": None,
            }
            for c in choices
        ],
        "usage": use,
    }


def chat_response(
    rid: str, created: int, model: str, choice: Choice, use: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": choice.index,
                "message": {
                    "role": "assistant",
                    "reasoning_content": None,
                    "content": choice.text,
                    "tool_calls": [],
                },
                "logprobs": None,
                "finish_reason": choice.finish_reason,
                "stop_reason": None,
            }
        ],
        "usage": use,
        "prompt_logprobs": None,
    }


def completion_chunk(
    rid: str, created: int, model: str, choice: Choice, use: dict[str, Any] | None = None
) -> dict[str, Any]:
    """vLLM dumps completion chunks with every field, so ``usage`` is null unless continuous."""
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": choice.index,
                "text": choice.text,
                "logprobs": None,
                "finish_reason": choice.finish_reason,
                "stop_reason": None,
            }
        ],
        "usage": use,
    }


def chat_chunk(
    rid: str,
    created: int,
    model: str,
    index: int,
    delta: dict[str, Any],
    finish_reason: str | None,
    use: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """vLLM dumps chat chunks without unset fields: ``stop_reason`` only on the last one."""
    choice: dict[str, Any] = {
        "index": index,
        "delta": delta,
        "logprobs": None,
        "finish_reason": finish_reason,
    }
    if finish_reason is not None:
        choice["stop_reason"] = None
    chunk: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [choice],
    }
    if use is not None:
        chunk["usage"] = use
    return chunk


def usage_chunk(
    kind: Kind, rid: str, created: int, model: str, use: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": created,
        "model": model,
        "choices": [],
        "usage": use,
    }


def dumps(payload: object) -> str:
    """Compact UTF-8 JSON, as vLLM's responses and stream chunks are written."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def sse(payload: Mapping[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else dumps(payload)
    return f"data: {data}\n\n".encode()


SSE_DONE = sse("[DONE]")
