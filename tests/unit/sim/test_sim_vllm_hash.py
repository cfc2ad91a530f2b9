"""vLLM sha256_cbor block hashing against the reference test vectors."""

from __future__ import annotations

from sim.vllm_hash import block_hashes, hash_block_tokens, none_hash, to_u64

NONE_HASH_SEED_0 = "4e1195df020de59e0d65a33a4279f1183e7ae4e5d980e309f8b55adff2e61c3e"


def test_none_hash_is_the_hash_of_the_seed_string() -> None:
    assert none_hash("0").hex() == NONE_HASH_SEED_0
    assert none_hash("42") != none_hash("0")


def test_first_two_blocks_match_the_reference_vectors() -> None:
    root = none_hash("0")
    first = hash_block_tokens(root, range(16))
    second = hash_block_tokens(first, range(16, 32))
    assert first.hex().startswith("d830de3d") and first.hex().endswith("276afc9c")
    assert to_u64(first) == 12687895063098490012
    assert second.hex().startswith("fedd9e4a") and second.hex().endswith("2904fcccac")
    assert to_u64(second) == 1814341696565857452


def test_extra_keys_change_the_hash_as_in_the_reference() -> None:
    root = none_hash("0")
    assert to_u64(hash_block_tokens(root, range(16), ("my-lora",))) == 14363917845617146483


def test_block_hashes_chains_full_blocks_only() -> None:
    root = none_hash("0")
    hashes = block_hashes(root, list(range(40)), 16)
    assert len(hashes) == 2  # the 8 trailing tokens do not fill a block
    assert to_u64(hashes[0]) == 12687895063098490012
    assert to_u64(hashes[1]) == 1814341696565857452


def test_to_u64_reads_the_last_eight_bytes_big_endian() -> None:
    digest = bytes(range(32))
    assert to_u64(digest) == int.from_bytes(bytes(range(24, 32)), "big")
