"""``make_tokenizer(spec)``: the router's ``tokenizer`` setting -> one async interface.

- ``builtin``: the deterministic :class:`BuiltinTokenizer` (the simulator's);
- ``hf:/path/to/dir`` (or ``hf:/path/tokenizer.json``): :class:`HFTokenizer` from local files;
- ``engine:http://host:8000``: the engine's own ``/tokenize`` (:class:`EngineTokenizer`).

Every result has ``async encode(text)`` (a completion prompt) and
``async encode_chat(messages)`` (chat messages rendered by the chat template, generation prompt
on). Local tokenizers are wrapped; their synchronous object stays reachable as ``.sync`` for
callers that cannot await.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from kvevents.tokenizers.base import BuiltinTokenizer, Message, Tokenizer
from kvevents.tokenizers.engine import EngineTokenizer


class AsyncTokenizer(Protocol):
    name: str

    async def encode(self, text: str) -> list[int]: ...

    async def encode_chat(
        self,
        messages: Sequence[Message],
        *,
        tools: Sequence[object] | None = None,
        template_kwargs: Mapping[str, object] | None = None,
    ) -> list[int]:
        """Messages rendered by the chat template (generation prompt on); ``tools`` and
        ``template_kwargs`` (a request's ``chat_template_kwargs``) as the engine passes them."""
        ...

    async def aclose(self) -> None: ...


class LocalTokenizer:
    """A synchronous ``Tokenizer`` behind the async interface (no I/O, so no thread hop)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.sync = tokenizer
        self.name = tokenizer.name

    async def encode(self, text: str) -> list[int]:
        return self.sync.encode(text)

    async def encode_chat(
        self,
        messages: Sequence[Message],
        *,
        tools: Sequence[object] | None = None,
        template_kwargs: Mapping[str, object] | None = None,
    ) -> list[int]:
        encode_chat = getattr(self.sync, "encode_chat", None)
        if encode_chat is not None:
            options: dict[str, object] = {}
            if tools:
                options["tools"] = tools
            if template_kwargs:
                options["template_kwargs"] = template_kwargs
            ids: list[int] = encode_chat(messages, **options)
            return ids
        return self.sync.encode(self.sync.apply_chat_template(messages))

    async def aclose(self) -> None:
        return None


def make_tokenizer(spec: str) -> AsyncTokenizer:
    """Build the tokenizer a router config names; ``ValueError`` for an unknown spec."""
    if spec == "builtin":
        return LocalTokenizer(BuiltinTokenizer())
    if spec.startswith("hf:") and len(spec) > 3:
        from kvevents.tokenizers.hf import HFTokenizer  # needs the optional `tokenizers` package

        try:
            return LocalTokenizer(HFTokenizer(spec[3:]))
        except (OSError, ValueError) as exc:
            raise ValueError(f"tokenizer {spec!r}: {exc}") from None
    if spec.startswith("engine:") and spec[7:].startswith(("http://", "https://")):
        return EngineTokenizer(spec[7:])
    raise ValueError(
        f"tokenizer must be 'builtin', 'hf:<path>' or 'engine:<http url>', got {spec!r}"
    )
