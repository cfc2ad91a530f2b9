"""Tokenize through the engine's own ``POST /tokenize`` (vLLM's request and response shape).

Exact by construction (the engine's tokenizer and chat template), at the price of one HTTP
round trip per request. Request: ``{"prompt": text, "add_special_tokens": true}`` or
``{"messages": [...], "add_generation_prompt": true, "add_special_tokens": false}`` (plus
``"model"`` when configured); response: ``{"count", "max_model_len", "tokens": [...]}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp

from kvevents.tokenizers.base import Message


class TokenizeError(RuntimeError):
    """The engine's /tokenize failed or answered something that is not a token list."""


class EngineTokenizer:
    """Async adapter over an engine's ``/tokenize``.

    ``base_url``: the engine's base URL (``http://engine:8000``). ``model``: sent as
    ``"model"`` when given. ``session``: an aiohttp session to reuse (else one is created and
    closed by ``aclose``). ``timeout``: seconds per call.
    """

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        session: aiohttp.ClientSession | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.name = f"engine:{self.base_url}"
        self.model = model
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session = session
        self._own_session = session is None

    async def encode(self, text: str) -> list[int]:
        return await self._tokenize({"prompt": text, "add_special_tokens": True})

    async def encode_chat(
        self,
        messages: Sequence[Message],
        *,
        tools: Sequence[object] | None = None,
        template_kwargs: Mapping[str, object] | None = None,
    ) -> list[int]:
        body: dict[str, Any] = {
            "messages": [dict(m) for m in messages],
            "add_generation_prompt": True,
            "add_special_tokens": False,
        }
        if tools:
            body["tools"] = list(tools)
        if template_kwargs:
            body["chat_template_kwargs"] = dict(template_kwargs)
        return await self._tokenize(body)

    async def aclose(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def _tokenize(self, body: dict[str, Any]) -> list[int]:
        if self.model is not None:
            body["model"] = self.model
        if self._session is None:
            self._session = aiohttp.ClientSession()
        url = self.base_url + "/tokenize"
        try:
            async with self._session.post(url, json=body, timeout=self.timeout) as resp:
                if resp.status != 200:
                    detail = (await resp.text())[:200]
                    raise TokenizeError(f"{url} answered {resp.status}: {detail}")
                data = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise TokenizeError(f"{url}: {type(exc).__name__}: {exc}") from None
        tokens = data.get("tokens") if isinstance(data, dict) else None
        if not isinstance(tokens, list) or not all(type(t) is int and t >= 0 for t in tokens):
            raise TokenizeError(f"{url} did not return a list of token ids")
        return tokens
