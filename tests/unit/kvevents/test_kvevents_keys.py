"""Router-side block keys: chaining, namespaces, the refcounted engine-hash map."""

from __future__ import annotations

import random

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from kvevents.decode import WireError
from kvevents.events import BlockRemoved, BlockStored
from kvevents.keys import ROOT_KEY, EngineKeyMap, chain_keys, request_keys, root_key, token_bytes


def test_keys_are_xxh3_of_token_bytes_seeded_by_the_parent() -> None:
    tokens = list(range(8))
    keys = request_keys(tokens, 4)
    k0 = xxhash.xxh3_64_intdigest(token_bytes(tokens[:4]), ROOT_KEY)
    k1 = xxhash.xxh3_64_intdigest(token_bytes(tokens[4:]), k0)
    assert keys == [k0, k1]
    assert xxhash.xxh3_64_intdigest(b"kvmesh/keys/v1") == ROOT_KEY
    assert token_bytes([1, 2**32 - 1]) == b"\x01\x00\x00\x00\xff\xff\xff\xff"


def test_only_full_blocks_and_prefix_stability() -> None:
    tokens = [random.Random(1).randrange(100_000) for _ in range(70)]
    keys = request_keys(tokens, 16)
    assert len(keys) == 4  # 70 tokens -> 4 full blocks, the tail is not keyed
    assert request_keys(tokens[:64], 16) == keys
    assert request_keys(tokens[:40], 16) == keys[:2]
    assert request_keys(tokens[:15], 16) == []
    other = tokens[:]
    other[20] += 1
    changed = request_keys(other, 16)
    assert changed[0] == keys[0] and changed[1:] != keys[1:] and set(changed[1:]).isdisjoint(keys)


def test_lora_and_salt_namespace_the_whole_chain() -> None:
    tokens = list(range(32))
    plain = request_keys(tokens, 16)
    lora = request_keys(tokens, 16, lora_name="adapter-a")
    salted = request_keys(tokens, 16, salt="tenant-1")
    both = request_keys(tokens, 16, lora_name="adapter-a", salt="tenant-1")
    assert len({tuple(k) for k in (plain, lora, salted, both)}) == 4
    assert all(set(a).isdisjoint(b) for a, b in [(plain, lora), (plain, salted), (lora, both)])
    assert root_key() == ROOT_KEY
    assert root_key("a", None) != root_key(None, "a")  # no ambiguity between the two names


def test_bad_tokens_raise_wire_error() -> None:
    for bad in ([-1], [2**32], ["a"], [1.5]):
        with pytest.raises(WireError):
            token_bytes(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        chain_keys(ROOT_KEY, [1, 2], 0)


def stored(
    hashes: list[int], parent: int | None, tokens: list[int], bs: int = 4, **kw: object
) -> BlockStored:
    return BlockStored(hashes, parent, tokens, bs, **kw)  # type: ignore[arg-type]


def test_store_events_give_request_keys_whatever_the_engine_hashes() -> None:
    tokens = list(range(100, 116))
    expected = request_keys(tokens, 4)
    # The same prefix stored in two events by one engine, in one by another with other hashes.
    a = EngineKeyMap()
    first = a.stored(stored([11, 12], None, tokens[:8]))
    second = a.stored(stored([13, 14], 12, tokens[8:]))
    assert first + second == expected
    b = EngineKeyMap()
    assert b.stored(stored([901, 902, 903, 904], None, tokens)) == expected
    assert a.key_of(13) == expected[2] and b.key_of(903) == expected[2]
    assert a.block_size == 4


def test_refcounts_same_hash_stored_twice() -> None:
    km = EngineKeyMap()
    keys = km.stored(stored([1], None, [1, 2, 3, 4]))
    assert km.stored(stored([1], None, [1, 2, 3, 4])) == []  # second physical copy: no new key
    assert km.key_of(1) == keys[0]
    assert km.removed(BlockRemoved([1])) == []  # one copy left
    assert km.held_keys() == set(keys) and km.key_of(1) == keys[0]
    assert km.removed(BlockRemoved([1])) == keys  # last copy gone
    assert km.removed(BlockRemoved([1])) == []
    assert km.unknown_removals == 1 and len(km) == 0


def test_mediums_are_counted_separately_and_location_updates_resolve() -> None:
    km = EngineKeyMap()
    keys = km.stored(stored([1, 2], None, list(range(8)), medium="GPU"))
    # Offloaded to CPU: a store without tokens names the same hashes.
    assert km.stored(BlockStored([1, 2], None, [], 4, medium="CPU")) == []
    assert km.removed(BlockRemoved([1, 2], "GPU")) == []  # still held on CPU
    assert km.removed(BlockRemoved([1], "GPU")) == []  # nothing on GPU any more
    assert km.unknown_removals == 1
    assert km.removed(BlockRemoved([1, 2], "CPU")) == keys
    assert km.stored(BlockStored([77], None, [], 4, medium="CPU")) == []
    assert km.unknown_locations == 1


def test_unknown_parent_is_a_chain_break() -> None:
    km = EngineKeyMap()
    assert km.stored(stored([5], 4242, [1, 2, 3, 4])) == []
    assert km.chain_breaks == 1 and km.skipped_blocks == 1 and len(km) == 0
    assert km.removed(BlockRemoved([5])) == []  # never mapped
    # Parent 0 that no block has is the llm-d simulator's "no parent".
    assert km.stored(stored([6], 0, [1, 2, 3, 4])) == request_keys([1, 2, 3, 4], 4)


def test_parent_found_in_another_medium() -> None:
    km = EngineKeyMap()
    km.stored(stored([1], None, [1, 2, 3, 4], medium="GPU"))
    child = km.stored(stored([2], 1, [5, 6, 7, 8], medium="CPU"))
    assert child == request_keys([1, 2, 3, 4, 5, 6, 7, 8], 4)[1:]


def test_lora_name_or_id_namespace_store_events() -> None:
    tokens = list(range(8))
    km = EngineKeyMap()
    assert km.stored(stored([1, 2], None, tokens, lora_name="ad")) == request_keys(
        tokens, 4, lora_name="ad"
    )
    by_id = EngineKeyMap().stored(stored([1, 2], None, tokens, lora_id=3))
    assert set(by_id).isdisjoint(request_keys(tokens, 4)) and len(by_id) == 2


def test_salts_from_sglang_metadata_and_vllm_extra_keys() -> None:
    tokens = list(range(8))
    salted = request_keys(tokens, 4, salt="s1")
    assert EngineKeyMap().stored(stored([1, 2], None, tokens, cache_salt="s1")) == salted
    # vLLM: the salt sits in the first block's extra keys, with the LoRA name if any.
    assert EngineKeyMap().stored(stored([1, 2], None, tokens, extra_keys=[["s1"], None])) == salted
    lora_salted = request_keys(tokens, 4, lora_name="ad", salt="s1")
    ev = stored([1, 2], None, tokens, lora_name="ad", extra_keys=[["ad", "s1"], ["ad"]])
    assert EngineKeyMap().stored(ev) == lora_salted
    typed = stored([1, 2], None, tokens, extra_keys=[[{"type": "cache_salt", "value": "s1"}], None])
    assert EngineKeyMap().stored(typed) == salted


def test_multimodal_extras_never_match_text_requests() -> None:
    tokens = list(range(12))
    plain = request_keys(tokens, 4)
    ev = stored([1, 2, 3], None, tokens, extra_keys=[None, [["img-hash", 0]], None])
    keys = EngineKeyMap().stored(ev)
    assert keys[0] == plain[0]
    assert keys[1] != plain[1] and keys[2] != plain[2]  # the image block and all after it


def test_token_block_mismatch_keys_what_it_can() -> None:
    km = EngineKeyMap()
    keys = km.stored(stored([1, 2, 3], None, list(range(9))))  # 2 full blocks for 3 hashes
    assert keys == request_keys(list(range(8)), 4)
    assert km.block_mismatches == 1
    assert km.removed(BlockRemoved([3])) == [] and km.unknown_removals == 1


def test_two_hashes_one_key_kept_until_both_go() -> None:
    km = EngineKeyMap()
    (key,) = km.stored(stored([1], None, [1, 2, 3, 4]))
    assert km.stored(stored([2], None, [1, 2, 3, 4])) == []
    assert km.removed(BlockRemoved([1])) == []
    assert km.removed(BlockRemoved([2])) == [key]


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.booleans(), st.integers(0, 5), st.sampled_from(["GPU", "CPU"])),
        max_size=60,
    )
)
def test_refcount_model(ops: list[tuple[bool, int, str]]) -> None:
    """Against a counting model: a key is held iff some (medium, hash) copy is."""
    km = EngineKeyMap()
    copies: dict[tuple[str, int], int] = {}
    block_tokens = {h: [h * 4 + i for i in range(4)] for h in range(6)}
    key_of = {h: request_keys(block_tokens[h], 4)[0] for h in range(6)}
    held: set[int] = set()
    for is_store, h, medium in ops:
        if is_store:
            new = km.stored(stored([h], None, block_tokens[h], medium=medium))
            copies[(medium, h)] = copies.get((medium, h), 0) + 1
            assert new == ([key_of[h]] if key_of[h] not in held else [])
        else:
            gone = km.removed(BlockRemoved([h], medium))
            if copies.get((medium, h)):
                copies[(medium, h)] -= 1
            still = any(n for (m, hh), n in copies.items() if hh == h)
            assert gone == ([key_of[h]] if key_of[h] in held and not still else [])
        held = {key_of[hh] for (m, hh), n in copies.items() if n}
        assert km.held_keys() == held
