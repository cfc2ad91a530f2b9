"""A Hugging Face ``tokenizers`` tokenizer from local files, with the model's chat template.

``HFTokenizer("/models/qwen")`` reads ``tokenizer.json`` and the chat template (from
``chat_template.jinja``, ``chat_template.json`` or ``tokenizer_config.json``), and renders the
template with jinja2 the way the engines do (sandboxed, ``trim_blocks``/``lstrip_blocks``,
``raise_exception``, a ``tojson`` filter, the special-token variables, generation prompt on).

Special tokens follow vLLM's defaults: a completion prompt is encoded *with* the tokenizer's
special tokens (e.g. BOS), a rendered chat is encoded *without* them (the template wrote them).
``encode_chat(messages)`` does the latter explicitly; ``encode(text)`` recognises text that
``apply_chat_template`` just rendered, so ``encode(apply_chat_template(m))`` is right too.
Chat encodings go through a :class:`PrefixTokenCache` cut at special tokens.
Nothing is ever downloaded: the files must be on disk.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer as _HFTokenizer

from kvevents.tokenizers.base import Message, message_text
from kvevents.tokenizers.prefix_cache import PrefixTokenCache

_SPECIAL_VARS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "sep_token",
    "cls_token",
    "mask_token",
)


_RESERVED = frozenset({"messages", "add_generation_prompt", "tools"})
"""Template variables a request's ``chat_template_kwargs`` cannot set."""


class TemplateError(ValueError):
    """The chat template cannot render these messages (or cannot be loaded)."""


def _token_text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(
    value: object,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_chat_template(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise TemplateError(f"chat template does not compile: {exc}") from None


def _load_template(folder: Path, config: Mapping[str, Any]) -> str | None:
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    json_file = folder / "chat_template.json"
    if json_file.is_file():
        value = json.loads(json_file.read_text()).get("chat_template")
        if isinstance(value, str):
            return value
    value = config.get("chat_template")
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # named templates: the default one, else the first
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        chosen = named.get("default") or next(iter(named.values()), None)
        return chosen if isinstance(chosen, str) else None
    return None


def _offset_sensitive(node: object) -> bool:
    """A pre-tokenizer that behaves differently at the very start of the input (Metaspace
    with ``prepend_scheme: first``) makes chunk-wise encoding differ from a full encode."""
    if isinstance(node, Mapping):
        if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first":
            return True
        return any(_offset_sensitive(v) for v in node.values())
    if isinstance(node, list):
        return any(_offset_sensitive(v) for v in node)
    return False


class HFTokenizer:
    """Implements ``kvevents.tokenizers.base.Tokenizer`` over a local Hugging Face tokenizer.

    ``path``: a folder with ``tokenizer.json`` (and ``tokenizer_config.json``), or the
    ``tokenizer.json`` file itself. ``prefix_cache``: cache chat encodings by prefix.
    """

    def __init__(self, path: str | Path, *, prefix_cache: bool = True, cache_chunks: int = 8192):
        p = Path(path)
        folder, file = (p, p / "tokenizer.json") if p.is_dir() else (p.parent, p)
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {file}")
        self.name = f"hf:{p}"
        self.tok = _HFTokenizer.from_file(str(file))
        self.tok.no_truncation()
        self.tok.no_padding()
        cfg_file = folder / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        self.special_vars: dict[str, object] = {
            key: _token_text(self.config.get(key)) for key in _SPECIAL_VARS
        }
        extra = self.config.get("additional_special_tokens") or []
        self.special_vars["additional_special_tokens"] = [
            t for t in (_token_text(x) for x in extra) if t is not None
        ]
        source = _load_template(folder, self.config)
        self.template = compile_chat_template(source) if source is not None else None
        self._rendered: OrderedDict[str, None] = OrderedDict()
        self._cut = self._cut_pattern()
        safe = (
            prefix_cache
            and self._cut is not None
            and not getattr(self.tok, "encode_special_tokens", False)
            and not _offset_sensitive(json.loads(self.tok.to_str()))
        )
        self.cache: PrefixTokenCache | None = (
            PrefixTokenCache(
                self._cut_points, self._encode_chunks, self._encode_plain, max_chunks=cache_chunks
            )
            if safe
            else None
        )

    # -- Tokenizer protocol -------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Completion prompts get special tokens; a chat this tokenizer rendered does not."""
        if text in self._rendered:
            return self.encode_rendered(text)
        return list(self.tok.encode(text, add_special_tokens=True).ids)

    def apply_chat_template(
        self,
        messages: Sequence[Message],
        *,
        tools: Sequence[object] | None = None,
        template_kwargs: Mapping[str, object] | None = None,
    ) -> str:
        """Render as vLLM does: ``tools`` and the request's ``chat_template_kwargs`` are
        template variables (they cannot override the messages or the special tokens)."""
        if self.template is None:
            raise ValueError(f"{self.name} has no chat template")
        msgs = []
        for m in messages:
            role = m.get("role")
            if not isinstance(role, str) or not role:
                raise ValueError("every message needs a non-empty string 'role'")
            msgs.append({**m, "content": message_text(m.get("content"))})
        try:
            extra = {k: v for k, v in (template_kwargs or {}).items()
                     if k not in self.special_vars and k not in _RESERVED}
            text = self.template.render(
                **extra, messages=msgs, add_generation_prompt=True,
                tools=list(tools) if tools else None, **self.special_vars,
            )
        except (jinja2.TemplateError, TemplateError) as exc:
            raise ValueError(f"chat template: {exc}") from None
        self._rendered[text] = None
        while len(self._rendered) > 64:
            self._rendered.popitem(last=False)
        return text

    # -- explicit entry points --------------------------------------------------------------
    def encode_chat(
        self,
        messages: Sequence[Message],
        *,
        tools: Sequence[object] | None = None,
        template_kwargs: Mapping[str, object] | None = None,
    ) -> list[int]:
        return self.encode_rendered(
            self.apply_chat_template(messages, tools=tools, template_kwargs=template_kwargs)
        )

    def encode_rendered(self, text: str) -> list[int]:
        """A rendered chat: no special tokens added, through the prefix cache."""
        if self.cache is not None:
            return self.cache.encode(text)
        return self._encode_plain(text)

    # -- internals ------------------------------------------------------------------------
    def _encode_plain(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def _encode_chunks(self, chunks: list[str]) -> list[list[int]]:
        if len(chunks) == 1:
            return [self._encode_plain(chunks[0])]
        return [list(e.ids) for e in self.tok.encode_batch(chunks, add_special_tokens=False)]

    def _cut_pattern(self) -> tuple[re.Pattern[str], frozenset[str]] | None:
        """All added tokens matched on raw text (as the tokenizer does: leftmost, longest),
        and the subset after which it is safe to cut: special, with no whitespace stripping."""
        added = list(self.tok.get_added_tokens_decoder().values())
        raw = sorted(
            {t.content for t in added if not t.normalized and t.content},
            key=lambda c: (-len(c), c),
        )
        cut_after = frozenset(
            t.content
            for t in added
            if t.special and not t.normalized and not t.lstrip and not t.rstrip
            and not t.single_word and t.content
        )  # fmt: skip
        if not cut_after:
            return None
        return re.compile("|".join(re.escape(c) for c in raw)), cut_after

    def _cut_points(self, text: str) -> list[int]:
        assert self._cut is not None
        pattern, cut_after = self._cut
        n = len(text)
        return [m.end() for m in pattern.finditer(text) if m.group() in cut_after and m.end() < n]
