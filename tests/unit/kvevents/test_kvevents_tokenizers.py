"""Tokenizer adapters: HF tokenizer.json + chat template, the prefix cache's exactness, factory.

Every tokenizer here is built in the test with the ``tokenizers`` library (nothing is
downloaded): a byte-level BPE like GPT/Qwen, a lower-casing WordPiece like BERT, and two
Metaspace (SentencePiece-style) variants, one of which cannot be cut safely.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

import kvevents.tokenizers.base as tk
from kvevents.tokenizers.base import BuiltinTokenizer
from kvevents.tokenizers.factory import LocalTokenizer, make_tokenizer
from kvevents.tokenizers.hf import HFTokenizer
from kvevents.tokenizers.prefix_cache import PrefixTokenCache

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "hello world, how are you today?",
    "the quick brown fox jumps over the lazy dog",
    "user assistant system: tell me about KV caches and prefix routing",
    "Grüße aus München — naïve café 123 4567",
] * 30

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA_LIKE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] }}\n{{ message['content'] | trim }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_level_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    bos = tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    return tok


def wordpiece_lowercase() -> Tokenizer:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(
        CORPUS, trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]", *SPECIALS])
    )
    return tok


def metaspace(scheme: str) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=scheme)  # type: ignore[arg-type]
    tok.decoder = decoders.Metaspace(prepend_scheme=scheme)  # type: ignore[arg-type]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS))
    return tok


def save(folder: Path, tok: Tokenizer, template: str | None = CHATML, **config: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    cfg: dict[str, object] = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", **config}
    if template is not None:
        cfg["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


FLAVOURS: dict[str, Callable[[], Tokenizer]] = {
    "byte-level-bpe": byte_level_bpe,
    "wordpiece-lowercase": wordpiece_lowercase,
    "metaspace-always": lambda: metaspace("always"),
    "metaspace-first": lambda: metaspace("first"),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {name: save(root / name, build()) for name, build in FLAVOURS.items()}


def conversation(turns: int) -> list[dict[str, object]]:
    msgs: list[dict[str, object]] = [{"role": "system", "content": "You are terse."}]
    for i in range(turns):
        msgs.append({"role": "user", "content": f"question {i}: how are you today? "})
        msgs.append({"role": "assistant", "content": f"fine, thanks  {i}\n\n"})
    return msgs


def test_chat_template_renders_like_the_engine(folders: dict[str, Path]) -> None:
    hf = HFTokenizer(folders["byte-level-bpe"])
    text = hf.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]
    assert "user\nab<|im_end|>" in hf.apply_chat_template(parts)
    with pytest.raises(ValueError):
        hf.apply_chat_template([{"content": "no role"}])


def test_special_tokens_like_vllm(folders: dict[str, Path]) -> None:
    hf = HFTokenizer(folders["byte-level-bpe"])
    raw = Tokenizer.from_file(str(folders["byte-level-bpe"] / "tokenizer.json"))
    bos = raw.token_to_id("<|endoftext|>")
    prompt = hf.encode("hello world")
    assert prompt[0] == bos and prompt == raw.encode("hello world").ids  # completions: BOS added
    msgs = [{"role": "user", "content": "hello world"}]
    rendered = hf.apply_chat_template(msgs)
    chat = hf.encode_chat(msgs)
    assert chat == raw.encode(rendered, add_special_tokens=False).ids  # chat: template's own only
    assert bos not in chat
    assert hf.encode(hf.apply_chat_template(msgs)) == chat  # the router's call pattern


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_prefix_cache_returns_exactly_a_full_encode(folders: dict[str, Path], flavour: str) -> None:
    hf = HFTokenizer(folders[flavour])
    raw = Tokenizer.from_file(str(folders[flavour] / "tokenizer.json"))
    if flavour == "metaspace-first":
        assert hf.cache is None  # offset-sensitive pre-tokenizer: never cut, always exact
    else:
        assert hf.cache is not None
    for turns in range(1, 8):
        msgs = conversation(turns)
        text = hf.apply_chat_template(msgs)
        assert hf.encode_chat(msgs) == raw.encode(text, add_special_tokens=False).ids
    if hf.cache is not None:
        assert hf.cache.enabled and hf.cache.hits > 0


def test_multi_turn_reuses_history(folders: dict[str, Path]) -> None:
    hf = HFTokenizer(folders["byte-level-bpe"])
    assert hf.cache is not None
    hf.encode_chat(conversation(10))
    before = hf.cache.misses
    hf.encode_chat(conversation(11))  # one more user + assistant turn
    # Only the new turn is tokenized again: 2 messages x 2 chunks (each cut after a special
    # token) and the generation prompt; the 10 earlier turns are all hits.
    assert hf.cache.misses - before == 5
    assert hf.cache.hits >= 2 * 10


_piece = st.sampled_from([*"ab ço\n\t.,!?<|>_-:", "<|im_", "im_end|>", "  ", "\n\n", "Grüße"])
_text = st.lists(_piece, max_size=20).map("".join)


@pytest.mark.parametrize("flavour", list(FLAVOURS))
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(contents=st.lists(_text, min_size=1, max_size=6))
def test_prefix_cache_exact_on_arbitrary_text(
    folders: dict[str, Path], flavour: str, contents: list[str]
) -> None:
    hf = HFTokenizer(folders[flavour])
    raw = Tokenizer.from_file(str(folders[flavour] / "tokenizer.json"))
    msgs: list[dict[str, object]] = []
    for i, content in enumerate(contents):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": content})
        text = hf.apply_chat_template(msgs)
        assert hf.encode_chat(msgs) == raw.encode(text, add_special_tokens=False).ids
        # Special tokens typed inside content are split out by the tokenizer too.
        loose = text + content + "<|im_end|>" + content
        assert hf.encode_rendered(loose) == raw.encode(loose, add_special_tokens=False).ids
    # Exact through the chunks themselves, not through the self-check's fallback.
    assert hf.cache is None or hf.cache.enabled


def test_template_sources_and_errors(tmp_path: Path) -> None:
    tok = byte_level_bpe()
    a = save(tmp_path / "a", tok, template=LLAMA_LIKE)
    hf = HFTokenizer(a / "tokenizer.json")  # the file itself works too
    text = hf.apply_chat_template([{"role": "user", "content": "  hi  "}])
    assert text.startswith("<|endoftext|><|im_start|>user\nhi<|im_end|>")
    with pytest.raises(ValueError, match="unknown role"):
        hf.apply_chat_template([{"role": "tool", "content": "x"}])

    b = save(tmp_path / "b", tok, template="ignored {{ oops")
    (b / "chat_template.jinja").write_text(CHATML)  # newer layout wins over the config
    assert (
        HFTokenizer(b)
        .apply_chat_template([{"role": "user", "content": "x"}])
        .startswith("<|im_start|>user")
    )
    c = save(tmp_path / "c", tok, template=None)
    cfg = json.loads((c / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [
        {"name": "tool_use", "template": "T"},
        {"name": "default", "template": "D"},
    ]
    (c / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert HFTokenizer(c).apply_chat_template([{"role": "user", "content": "x"}]) == "D"
    d = save(tmp_path / "d", tok, template=None)
    with pytest.raises(ValueError, match="no chat template"):
        HFTokenizer(d).apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(FileNotFoundError):
        HFTokenizer(tmp_path / "missing")


async def test_factory(folders: dict[str, Path]) -> None:
    builtin = make_tokenizer("builtin")
    assert isinstance(builtin, LocalTokenizer)
    msgs = [{"role": "user", "content": "hello there"}]
    ref = tk.BuiltinTokenizer()
    assert await builtin.encode_chat(msgs) == ref.encode(ref.apply_chat_template(msgs))
    hf = make_tokenizer(f"hf:{folders['byte-level-bpe']}")
    assert hf.name.startswith("hf:")
    assert await hf.encode_chat(msgs) == HFTokenizer(folders["byte-level-bpe"]).encode_chat(msgs)
    engine = make_tokenizer("engine:http://127.0.0.1:9")
    assert engine.name == "engine:http://127.0.0.1:9"
    await engine.aclose()
    for bad in ("", "hf:", "engine:ftp://x", "tiktoken:x", "hf:/nonexistent/dir"):
        with pytest.raises(ValueError):
            make_tokenizer(bad)


def test_builtin_encode_chat_reuses_earlier_turns_and_equals_a_full_encode() -> None:
    tok = tk.BuiltinTokenizer()
    plain = tk.BuiltinTokenizer(prefix_cache=False)
    convo: list[dict[str, object]] = []
    # Content that looks like the template's own turn end, followed by whitespace or not.
    texts = ["hello there", "fine<|end|>\n  and you?", "a\n\n b", "<|end|>\n<|user|>x", "end"]
    for i, text in enumerate(texts):
        convo.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
        want = plain.encode(plain.apply_chat_template(convo))
        assert tok.encode_chat(convo) == want
        assert plain.encode_chat(convo) == want
    cache = tok.prefix_cache
    assert cache is not None and cache.enabled and cache.hits > 0


def test_builtin_piece_cache_is_bounded_in_bytes_and_skips_huge_pieces() -> None:
    tok = BuiltinTokenizer()
    tok.CACHE_BYTES = 64 * 1024  # type: ignore[misc]
    huge = "a" * 1_000_000
    assert tok.encode(huge) == tok.encode(huge)  # same id, recomputed, never cached
    assert tok.cache_bytes == 0
    for i in range(5000):
        tok.encode(f"word{i} other{i}")
    assert tok.cache_bytes <= 64 * 1024 + 200
    assert len(tok._cache) < 2000


def test_prefix_cache_is_bounded_in_bytes() -> None:
    def cuts(text: str) -> list[int]:
        return [i + 1 for i, ch in enumerate(text) if ch == "|"]

    def chunks(parts: list[str]) -> list[list[int]]:
        return [[ord(c) for c in p] for p in parts]

    cache = PrefixTokenCache(cuts, chunks, lambda t: [ord(c) for c in t], max_bytes=100_000)
    for i in range(200):
        text = f"turn {i} " + "x" * 2000 + "|" + f"reply {i}|"
        assert cache.encode(text) == [ord(c) for c in text]
    assert cache.bytes <= 100_000
    assert cache.bytes == sum(200 + 8 * len(p) for p in cache._lru.values())
