"""Publisher payload encoding against the reference byte example, and endpoint rules."""

from __future__ import annotations

import msgpack  # type: ignore[import-untyped,unused-ignore]
import pytest

from kvevents.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from kvevents.publisher import encode_batch, offset_endpoint_port, should_bind

EVENTS: list[KVEvent] = [
    BlockStored([2**64 - 1], None, [1, 2], 2, medium="GPU", group_idx=0),
    BlockRemoved([7], medium="GPU"),
    AllBlocksCleared(),
]


def s(text: str) -> str:
    """msgpack fixstr: length byte then UTF-8, as hex."""
    return f"{0xA0 + len(text):02x}" + text.encode().hex()


def test_array_events_are_byte_identical_to_the_reference_example() -> None:
    expected = (
        "93" "cb3ff8000000000000" "93"
        "9c" + s("BlockStored") + "91cfffffffffffffffff" "c0" "920102" "02" "c0" + s("GPU")
        + "c0" "c0" "00" "ae" + b"full_attention".hex() + "c0"
        "94" + s("BlockRemoved") + "9107" + s("GPU") + "c0"
        "91" "b0" + b"AllBlocksCleared".hex() +
        "00"
    )  # fmt: skip
    assert encode_batch(EVENTS, 1.5, 0, "array").hex() == expected


def test_map_events_decode_to_the_reference_example() -> None:
    decoded = msgpack.unpackb(encode_batch(EVENTS, 1.5, 0, "map"), raw=False)
    assert decoded == [
        1.5,
        [
            {
                "type": "BlockStored",
                "block_hashes": [18446744073709551615],
                "parent_block_hash": None,
                "token_ids": [1, 2],
                "block_size": 2,
                "lora_id": None,
                "medium": "GPU",
                "lora_name": None,
                "group_idx": 0,
                "kv_cache_spec_kind": "full_attention",
            },
            {"type": "BlockRemoved", "block_hashes": [7], "medium": "GPU"},
            {"type": "AllBlocksCleared"},
        ],
        0,
    ]
    # the outer batch stays an array; hashes >= 2**63 are msgpack uint64
    raw = encode_batch(EVENTS, 1.5, 0, "map")
    assert raw[0] == 0x93 and bytes.fromhex("cfffffffffffffffff") in raw


def test_bytes_hashes_are_sent_as_bin_from_the_digests() -> None:
    digest = bytes(range(32))
    stored = BlockStored([5], 6, [1, 2], 2, medium="GPU")
    raw = encode_batch([stored], 0.0, 0, "map", hash_bytes=True, digests={5: digest, 6: b"p" * 32})
    (event,) = msgpack.unpackb(raw, raw=False)[1]
    assert event["block_hashes"] == [digest] and event["parent_block_hash"] == b"p" * 32
    assert bytes.fromhex("c420") + digest in raw  # bin8 of length 32
    with pytest.raises(ValueError, match="no digest"):
        encode_batch([stored], 0.0, 0, "map", hash_bytes=True, digests={5: digest})


def test_spec_kind_can_be_left_out_and_extra_keys_are_carried() -> None:
    stored = BlockStored([1], None, [1, 2], 2, medium="GPU", extra_keys=[("salt",)])
    (event,) = msgpack.unpackb(
        encode_batch([stored], 0.0, 0, "map", kv_cache_spec_kind=None), raw=False
    )[1]
    assert "kv_cache_spec_kind" not in event and event["extra_keys"] == [["salt"]]


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="event_format"):
        encode_batch([], 0.0, 0, "json")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        encode_batch(["BlockStored"], 0.0)  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("endpoint", "bind"),
    [
        ("tcp://*:5557", True),
        ("tcp://[::]:5557", True),
        ("ipc:///tmp/kv", True),
        ("inproc://kv", True),
        ("tcp://router:5557", False),
        ("tcp://127.0.0.1:5557", False),
    ],
)
def test_bind_or_connect_follows_vllms_rule(endpoint: str, bind: bool) -> None:
    assert should_bind(endpoint) is bind


def test_data_parallel_ranks_offset_ports() -> None:
    assert offset_endpoint_port("tcp://*:5557", 0) == "tcp://*:5557"
    assert offset_endpoint_port("tcp://*:5557", 2) == "tcp://*:5559"
    assert offset_endpoint_port("inproc://kv", 1) == "inproc://kv_dp1"
    with pytest.raises(ValueError):
        offset_endpoint_port("ipc:///tmp/kv", 1)
