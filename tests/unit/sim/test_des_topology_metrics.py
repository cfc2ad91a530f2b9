"""The network delay model and the metrics/report layer of the simulator."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from sim.metrics import RequestRecord, RunCounters, percentile, summarize
from sim.report import RunResult, ScenarioReport, write_report
from sim.topology import Topology, mesh_topology


def test_one_way_delay_is_half_an_rtt_drawn_from_the_link_range() -> None:
    topo = Topology.build(["us", "eu"], {("us", "eu"): (90, 130)}, intra_ms=2)
    rng = random.Random(1)
    delays = [topo.one_way_s("eu", "us", rng) for _ in range(2000)]
    assert min(delays) >= 0.045 and max(delays) <= 0.065
    assert abs(sum(delays) / len(delays) - 0.055) < 0.002
    assert topo.one_way_s("us", "us", rng) == 0.001
    assert topo.mean_rtt_s("us", "eu") == pytest.approx(0.110)


def test_topology_refuses_a_missing_pair() -> None:
    with pytest.raises(ValueError, match="no RTT given between 'eu' and 'us'"):
        Topology.build(["us", "eu"], {})


def test_ring_topology_grows_with_distance() -> None:
    topo = mesh_topology(10)
    assert len(topo.regions) == 10
    near = topo.rtt("r00", "r01").mean_ms
    far = topo.rtt("r00", "r05").mean_ms
    assert far > near
    assert topo.rtt("r00", "r09").mean_ms == near  # a ring: 9 steps one way is 1 the other
    assert topo.nearest("r03", ["r00", "r04", "r07"]) == "r04"


def test_percentile_matches_linear_interpolation() -> None:
    xs = [1.0, 2.0, 3.0, 4.0]
    assert percentile(xs, 50) == 2.5
    assert percentile(xs, 0) == 1.0
    assert percentile(xs, 100) == 4.0
    assert percentile([1.0, 2.0, math.inf], 99) == math.inf
    assert math.isnan(percentile([], 50))


def _rec(
    rid: int, sent: float, first: float | None, done: float | None, **kw: object
) -> RequestRecord:
    base = dict(
        rid=rid,
        client="c",
        region="us",
        user="u",
        kind="chat",
        sent=sent,
        prompt_tokens=100,
        output_tokens=10,
        replica="e",
        replica_region="us",
        cached_tokens=50,
    )
    base.update(kw)
    r = RequestRecord(**base)  # type: ignore[arg-type]
    r.first_token, r.done = first, done
    return r


def test_summary_windows_and_unfinished_requests() -> None:
    recs = [
        _rec(1, 0.5, 0.7, 1.0),  # before warmup: ignored for latency, but finishes in window
        _rec(2, 2.0, 2.5, 3.0, replica_region="eu"),
        _rec(3, 3.0, 3.1, 4.0, cached_tokens=0),
        _rec(4, 5.0, None, None, cached_tokens=None),  # never finished
        _rec(5, 20.0, 20.1, 21.0),  # after the horizon
    ]
    s = summarize("x", recs, RunCounters(gossip_bytes=900), warmup=1.0, horizon=10.0)
    assert (s.sent, s.finished, s.unfinished) == (3, 2, 1)
    assert s.throughput_rps == pytest.approx(3 / 9)  # rids 1, 2 and 3 finished in [1, 10)
    assert s.ttft_p50 == pytest.approx(0.5)
    assert s.ttft_p99 == math.inf
    assert s.hit_rate == pytest.approx(50 / 200)  # rid 4 was never scheduled
    assert s.cross_region_share == pytest.approx(1 / 3)  # rid 4 was routed, to "us"
    assert s.gossip_bytes_per_s == pytest.approx(100.0)
    assert s.to_dict()["ttft_p99"] == "inf"


def test_report_writes_json_markdown_and_plots(tmp_path: Path) -> None:
    recs = [_rec(i, 1.0 + i, 1.2 + i, 2.0 + i) for i in range(5)]
    s = summarize("p", recs, RunCounters(), warmup=0.0, horizon=10.0)
    rep = ScenarioReport(
        scenario="demo",
        title="Demo",
        command="kvmesh bench demo",
        description="d",
        runs=[RunResult("p", s, [r.ttft for r in recs], wall_s=0.1, events=10)],
    )
    md = write_report(rep, tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["runs"][0]["summary"]["sent"] == 5
    text = md.read_text()
    assert "| p | 0.50 |" in text and "kvmesh bench demo" in text
    assert (tmp_path / "ttft_cdf.png").stat().st_size > 1000
    assert (tmp_path / "throughput.png").stat().st_size > 1000
