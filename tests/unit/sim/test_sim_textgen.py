"""Generated text: deterministic, and re-tokenizes to the generated ids."""

from __future__ import annotations

from kvevents.tokenizers.base import BuiltinTokenizer
from sim.textgen import TextGenerator


def test_same_seed_and_prompt_give_the_same_tokens() -> None:
    a = TextGenerator(7).plan([1, 2, 3], 20)
    b = TextGenerator(7).plan([1, 2, 3], 20)
    assert a == b and len(a.token_ids) == 20 and not a.stops_naturally
    assert TextGenerator(8).plan([1, 2, 3], 20) != a
    assert TextGenerator(7).plan([1, 2, 4], 20) != a


def test_generated_text_retokenizes_to_the_generated_ids() -> None:
    gen = TextGenerator(3)
    tok = BuiltinTokenizer()
    for n in (1, 2, 9, 64):
        ids = gen.plan(list(range(n)), n).token_ids
        assert tok.encode(gen.text(ids)) == list(ids)


def test_reply_embedded_in_the_next_chat_turn_keeps_the_engine_tokens() -> None:
    gen = TextGenerator(3)
    tok = BuiltinTokenizer()
    turn1 = [{"role": "user", "content": "hello there"}]
    prompt1 = tok.encode(tok.apply_chat_template(turn1))
    reply = gen.plan(prompt1, 11).token_ids
    turn2 = [*turn1, {"role": "assistant", "content": gen.text(reply)}]
    turn2.append({"role": "user", "content": "and then?"})
    prompt2 = tok.encode(tok.apply_chat_template(turn2))
    assert prompt2[: len(prompt1) + len(reply)] == prompt1 + list(reply)


def test_natural_length_without_max_tokens() -> None:
    plan = TextGenerator(1).plan([5, 6], None, natural_range=(4, 9))
    assert plan.stops_naturally and 4 <= len(plan.token_ids) <= 9
