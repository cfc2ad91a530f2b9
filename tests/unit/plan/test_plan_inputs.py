"""Demand readers: CSV, the simulator's trace format, a Prometheus dump; errors name the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from plan.inputs import read_csv, read_prom, read_samples, read_spec
from plan.spec import PlanInputError


def test_csv_total_and_split_columns(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_text("timestamp,region,model,tokens_per_s\n0,us,m,10\n1970-01-01T00:01:00Z,eu,m,5\n")
    got = list(read_csv(p, step_s=60.0))
    assert [(s.t, s.region, s.tokens, s.duration) for s in got] == [
        (0.0, "us", 600.0, 60.0),
        (60.0, "eu", 300.0, 60.0),
    ]
    q = tmp_path / "split.csv"
    q.write_text("timestamp,region,model,tokens_in_per_s,tokens_out_per_s\n0,us,m,7,3\n")
    assert next(read_csv(q, 60.0)).tokens == 600.0


def test_csv_bad_row_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_text("timestamp,region,model,tokens_per_s\n0,us,m,10\n60,us,m,-4\n")
    with pytest.raises(PlanInputError, match=r"d.csv:3: tokens_per_s must be .* >= 0"):
        list(read_csv(p))
    p.write_text("time,region\n")
    with pytest.raises(PlanInputError, match="needs columns"):
        list(read_csv(p))


def test_prom_dump_counter_differences(tmp_path: Path) -> None:
    p = tmp_path / "m.prom"
    p.write_text(
        "# HELP kvmesh_demand_tokens_total x\n"
        "# TYPE kvmesh_demand_tokens_total counter\n"
        'kvmesh_demand_tokens_total{region="us",model="m",direction="in"} 100 0\n'
        'kvmesh_demand_tokens_total{region="us",model="m",direction="out"} 50 0\n'
        'kvmesh_router_requests_total{route="x",code="200"} 3 0\n'
        'kvmesh_demand_tokens_total{region="us",model="m",direction="in"} 700 60000\n'
        'kvmesh_demand_tokens_total{region="us",model="m",direction="out"} 80 60000\n'
        'kvmesh_demand_tokens_total{region="us",model="m",direction="in"} 30 120000\n'
    )
    got = sorted((s.t, s.tokens, s.duration) for s in read_prom(p))
    # in: +600 over the first minute, a reset then 30; out: +30.
    assert got == [(0.0, 30.0, 60.0), (0.0, 600.0, 60.0), (60.0, 30.0, 60.0)]


def test_prom_dump_without_timestamps_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "m.prom"
    p.write_text('kvmesh_demand_tokens_total{region="us",model="m",direction="in"} 100\n')
    with pytest.raises(PlanInputError, match=r"m.prom:1: .* without a timestamp"):
        list(read_prom(p))


def test_trace_needs_regions_and_model(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    p.write_text('{"timestamp": 1000, "input_length": 100, "output_length": 20, "hash_ids": [1]}\n')
    with pytest.raises(PlanInputError, match="regions"):
        read_samples(p)
    got = read_samples(p, regions=["us", "eu"], model="m")
    assert len(got) == 1 and got[0].tokens == 120.0 and got[0].t == 1.0
    p.write_text('{"timestamp": "x"}\n')
    with pytest.raises(PlanInputError, match=r"t\.jsonl:1"):
        read_samples(p, regions=["us"], model="m")


def test_spec_file_errors(tmp_path: Path) -> None:
    p = tmp_path / "s.yaml"
    p.write_text("gpus: {A: {throughput: {m: 100}}}\nregions: {a: {prices: {A: {reserved: 1}}}}\n")
    with pytest.raises(PlanInputError, match="needs 'reserved' and 'on_demand'"):
        read_spec(p)
    p.write_text("gpus: [1, 2]\n")
    with pytest.raises(PlanInputError, match="gpus must be a mapping"):
        read_spec(p)
