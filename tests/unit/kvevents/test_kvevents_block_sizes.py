"""Per-size request keys and the size registry (unit + property tests)."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdt.prefix_index import PrefixIndex
from kvevents.block_sizes import BlockSizes, SizedKeys, fleet_unit, sized_request_keys
from kvevents.events import BlockStored
from kvevents.keys import EngineKeyMap, request_keys
from mesh.sized_lookup import SizedLookup, dp_slice_name, engine_of


def store(index: PrefixIndex, replica: str, tokens: list[int], size: int, blocks: int,
          lora: str | None = None) -> None:
    """What ingestion does with one engine's BlockStored of the first ``blocks`` blocks."""
    km = EngineKeyMap()
    n = blocks * size
    ev = BlockStored(block_hashes=[1000 + i for i in range(blocks)], parent_block_hash=None,
                     token_ids=tokens[:n], block_size=size, lora_name=lora)
    index.reset(replica, 1)
    index.store(replica, (1, 0), km.stored(ev))


def test_keys_per_size_and_unit() -> None:
    tokens = list(range(100))
    k = sized_request_keys(tokens, {16, 32})
    assert k.unit == 16 and set(k.by_size) == {16, 32}
    assert list(k) == request_keys(tokens, 16)
    assert k.by_size[32] == request_keys(tokens, 32)
    assert k.cap(32) == 3 and k.cap(16) == 6
    assert fleet_unit([]) == 16 and fleet_unit([32, 48]) == 16 and fleet_unit([1, 32]) == 1


def test_chains_of_different_sizes_share_no_key() -> None:
    tokens = list(range(512))
    a, b = set(request_keys(tokens, 16)), set(request_keys(tokens, 32))
    assert not a & b


def test_mixed_fleet_matches_each_replica_at_its_own_size() -> None:
    tokens = list(range(7, 7 + 401))
    index = PrefixIndex()
    store(index, "sim16", tokens, 16, 25)
    store(index, "vllm32", tokens, 32, 12)
    lookup = SizedLookup(index)
    keys = sized_request_keys(tokens, {16, 32})
    got = lookup.match(keys)
    # In 16-token units: 25 blocks of 16 = 400 tokens; 12 blocks of 32 = 384 tokens.
    assert got == {"sim16": 25, "vllm32": 24}
    # Keyed at 16 only (the old behaviour), the 32-token engine matches nothing: the bug.
    assert index.match(request_keys(tokens, 16)).get("vllm32", 0) == 0


def test_untrusted_replica_matches_nothing_but_is_still_predicted() -> None:
    tokens = list(range(200))
    index = PrefixIndex()
    store(index, "a", tokens, 32, 6)
    lookup = SizedLookup(index, trusted=lambda r: r != "a")
    keys = sized_request_keys(tokens, {32})
    assert lookup.match(keys) == {}
    assert lookup.predicted_tokens(keys, "a", keys.unit) == 6 * 32


def test_unmatched_request_never_matches() -> None:
    tokens = list(range(200))
    index = PrefixIndex()
    store(index, "a", tokens, 32, 6)
    keys = sized_request_keys(tokens, {32}, unmatched=True)
    assert SizedLookup(index).match(keys) == {} and list(keys) == []


def test_lora_namespace_no_false_match_and_real_match() -> None:
    tokens = list(range(300))
    index = PrefixIndex()
    store(index, "base", tokens, 32, 9)
    store(index, "adapter", tokens, 32, 9, lora="sql-lora")
    lookup = SizedLookup(index)
    assert lookup.match(sized_request_keys(tokens, {32})) == {"base": 9}
    assert lookup.match(sized_request_keys(tokens, {32}, lora_name="sql-lora")) == {"adapter": 9}
    assert lookup.match(sized_request_keys(tokens, {32}, lora_name="other")) == {}


def test_salt_kept_apart() -> None:
    tokens = list(range(64))
    assert request_keys(tokens, 32, salt="s1") != request_keys(tokens, 32, salt="s2")
    assert sized_request_keys(tokens, {32}, salt="s1").by_size[32] == request_keys(
        tokens, 32, salt="s1")


def test_data_parallel_ranks_count_as_their_engine() -> None:
    tokens = list(range(256))
    index = PrefixIndex()
    store(index, dp_slice_name("http://e:8000", 0), tokens, 32, 2)
    store(index, dp_slice_name("http://e:8000", 1), tokens, 32, 5)
    assert engine_of("http://e:8000#dp1") == "http://e:8000"
    assert SizedLookup(index).match(sized_request_keys(tokens, {32})) == {"http://e:8000": 5}


def test_configured_size_disagreement_logged_once_and_counted(
        caplog: pytest.LogCaptureFixture) -> None:
    sizes = BlockSizes(configured=16)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            sizes.observe("e1", 32)
        sizes.observe("e2", 16)
    assert sizes.mismatches == 1
    assert [(m.replica, m.configured, m.published) for m in sizes.mismatched()] == [("e1", 16, 32)]
    assert sum("publishes 32-token blocks" in r.message for r in caplog.records) == 1
    assert sizes.sizes() == {16, 32}
    learned = BlockSizes()
    assert learned.sizes() == {16}  # nothing learned yet: the fallback
    learned.observe("e1", 32)
    assert learned.mismatched() == [] and learned.sizes() == {32}
    assert learned.sizes(["e1", "e2"]) == {16, 32}  # e2 not heard from yet
    assert learned.size_of("e1") == 32 and learned.size_of("e2") is None


@settings(max_examples=60, deadline=None)
@given(
    n_tokens=st.integers(0, 300),
    fleet=st.lists(st.tuples(st.sampled_from([1, 2, 3, 4, 8, 16, 32, 64]), st.integers(0, 40)),
                   min_size=1, max_size=4),
)
def test_sized_match_is_exact_in_tokens(n_tokens: int, fleet: list[tuple[int, int]]) -> None:
    """For any fleet of block sizes, each replica's match in tokens is exactly what it holds
    of the prompt, capped at the blocks an engine may reuse (never the last token)."""
    tokens = [(i * 7919) % 5000 for i in range(n_tokens)]
    index = PrefixIndex()
    for i, (size, blocks) in enumerate(fleet):
        blocks = min(blocks, n_tokens // size)
        if blocks:
            store(index, f"r{i}", tokens, size, blocks)
    keys = sized_request_keys(tokens, {s for s, _ in fleet})
    assert isinstance(keys, SizedKeys)
    got = SizedLookup(index).match(keys)
    for i, (size, blocks) in enumerate(fleet):
        blocks = min(blocks, n_tokens // size)
        want = min(blocks, max(0, n_tokens - 1) // size) * size
        assert got.get(f"r{i}", 0) * keys.unit == want
