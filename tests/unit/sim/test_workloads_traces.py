"""Mooncake-style traces: parsing, clear errors, shared prefixes, replay."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from sim.traces import (
    BlockTokens,
    SessionTraceSpec,
    TraceFormatError,
    TraceIssues,
    read_mooncake,
    synthesize_sessions,
    to_json,
    trace_workload,
    write_mooncake,
)
from sim.workloads.base import Workload

GOOD = [
    '{"timestamp": 0, "input_length": 1100, "output_length": 20, "hash_ids": [1, 2, 3]}',
    '{"timestamp": 250, "input_length": 700, "output_length": 5, "hash_ids": [1, 9]}',
    "",
    '{"timestamp": 250, "input_length": 300, "output_length": 7, "hash_ids": []}',
]


def test_reads_records_in_order() -> None:
    recs = list(read_mooncake(GOOD))
    assert [r.line for r in recs] == [1, 2, 4]
    assert recs[0].hash_ids == (1, 2, 3) and recs[0].input_length == 1100
    assert recs[1].timestamp_ms == 250.0


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"input_length": 10, "output_length": 1}', "'timestamp' must be a number"),
        ('{"timestamp": -1, "input_length": 10, "output_length": 1}', "finite and >= 0"),
        ('{"timestamp": 1, "output_length": 1}', "missing field 'input_length'"),
        ('{"timestamp": 1, "input_length": "9", "output_length": 1}', "must be an integer"),
        ('{"timestamp": 1, "input_length": 0, "output_length": 1}', "must be >= 1"),
        ('{"timestamp": 1, "input_length": 9, "output_length": 1, "hash_ids": 3}', "a list"),
        (
            '{"timestamp": 1, "input_length": 9, "output_length": 1, "hash_ids": [1, -2]}',
            r"'hash_ids'\[1\] must be a non-negative integer",
        ),
        (
            '{"timestamp": 1, "input_length": 600, "output_length": 1, "hash_ids": [1, 2, 3]}',
            "3 hash_ids cover more than input_length=600",
        ),
        ('{"timestamp": 1, "input_length": 5, "output_length": true}', "must be an integer"),
    ],
)
def test_malformed_line_names_its_line_number(line: str, reason: str) -> None:
    lines = [GOOD[0], GOOD[1], line]
    with pytest.raises(TraceFormatError, match=reason) as info:
        list(read_mooncake(lines))
    assert info.value.where == "<lines>:3"
    assert str(info.value).startswith("<lines>:3: ")


def test_time_going_backwards_is_an_error() -> None:
    lines = [GOOD[1], GOOD[0]]
    with pytest.raises(TraceFormatError, match="goes back from 250 ms") as info:
        list(read_mooncake(lines))
    assert info.value.where == "<lines>:2"


def test_file_errors_name_the_file_and_lenient_mode_counts_skips(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join([GOOD[0], "garbage", GOOD[1], '{"timestamp": 1}']) + "\n")
    with pytest.raises(TraceFormatError) as info:
        list(read_mooncake(path))
    assert info.value.where == f"{path}:2"
    issues = TraceIssues()
    recs = list(read_mooncake(path, strict=False, issues=issues))
    assert [r.line for r in recs] == [1, 3]
    assert issues.skipped == 2
    assert issues.examples[0].startswith(f"{path}:2: not valid JSON")


def test_shared_hash_ids_mean_shared_prompt_prefixes() -> None:
    blocks = BlockTokens(seed=1, block_tokens=512)
    a, b, c = (blocks.prompt(r, r.line) for r in read_mooncake(GOOD))
    assert len(a) == 1100 and len(b) == 700 and len(c) == 300
    assert a[:512] == b[:512]  # hash id 1
    assert a[512:700] != b[512:700]  # 2 vs 9
    # Same hash id -> same block in any request; another seed -> other tokens.
    assert BlockTokens(seed=1).block(2) == blocks.block(2)
    assert BlockTokens(seed=2).block(2) != blocks.block(2)


def test_roundtrip_and_synthetic_sessions_reuse_within_a_user(tmp_path: Path) -> None:
    spec = SessionTraceSpec(users=5, requests_per_user=6, reset_p=0.0)
    recs = synthesize_sessions(spec, seed=3)
    assert len(recs) == 30
    path = tmp_path / "s.jsonl"
    assert write_mooncake(recs, path) == 30
    back = list(read_mooncake(path))
    assert [(r.input_length, r.hash_ids) for r in back] == [
        (r.input_length, r.hash_ids) for r in recs
    ]
    assert json.loads(path.read_text().splitlines()[0]).keys() == {
        "timestamp",
        "input_length",
        "output_length",
        "hash_ids",
    }
    # Without resets, each request of a user extends an earlier one's hash ids.
    by_first: dict[int, list[tuple[int, ...]]] = {}
    for r in recs:
        by_first.setdefault(r.hash_ids[spec.shared_system_blocks], []).append(r.hash_ids)
    assert len(by_first) == 5
    for seq in by_first.values():
        for prev, nxt in itertools.pairwise(seq):
            assert nxt[: len(prev) - 1] == prev[: len(prev) - 1]


def test_replay_is_open_loop_and_time_scaled() -> None:
    w = trace_workload(
        GOOD, ["us", "eu"], seed=1, horizon_s=10, speedup=2.0, region_of=lambda r: "us"
    )
    us = next(c for c in w.clients if c.region == "us")
    eu = next(c for c in w.clients if c.region == "eu")
    assert eu.start(0.0) == []
    first = us.start(0.0)
    sent = []
    while first:
        req = first.pop(0)
        sent.append(req)
        first += us.on_sent(req, req.sent_at)
    assert [r.sent_at for r in sent] == [0.0, 0.125, 0.125]
    assert [r.output_len for r in sent] == [20, 5, 7]
    assert sent[0].user == sent[1].user == "h1"


def test_sessions_with_a_common_preamble_split_by_their_own_block() -> None:
    spec = SessionTraceSpec(users=30, requests_per_user=2, shared_system_blocks=2)
    lines = [json.dumps(to_json(r)) for r in synthesize_sessions(spec, seed=1)]
    naive = trace_workload(lines, ["us", "eu", "asia"], seed=1, horizon_s=10)
    fixed = trace_workload(lines, ["us", "eu", "asia"], seed=1, horizon_s=10, user_block=2)

    def users_by_region(w: Workload) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for src in w.clients:
            pending = src.start(0.0)
            while pending:
                req = pending.pop(0)
                out.setdefault(src.region, set()).add(req.user)
                pending += src.on_sent(req, req.sent_at)
        return out

    assert len(users_by_region(naive)) == 1  # every session starts with hash id 0
    spread = users_by_region(fixed)
    assert len(spread) == 3 and sum(len(u) for u in spread.values()) == 30
