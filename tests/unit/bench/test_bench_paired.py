"""``kvmesh bench paired``: runs paired by path, gaps and paired differences, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.paired import main, pairs_of, summarize


def write(root: Path, run: str, **p90: float) -> None:
    d = root / run
    d.mkdir(parents=True)
    doc = {"runs": [{"variant": v, "summary": {"ttft_p90": x}} for v, x in p90.items()]}
    (d / "results.json").write_text(json.dumps(doc))


def test_runs_are_paired_by_path_and_the_reference_moving_is_told_apart(tmp_path: Path) -> None:
    base, new = tmp_path / "base", tmp_path / "new"
    write(base, "s7-t0", kvmesh=0.50, oracle=0.50)
    write(base, "s7-t1", kvmesh=0.60, oracle=0.50)   # +20% gap
    write(base, "s8-t0", kvmesh=0.40, oracle=0.40)   # no NEW run: left out
    write(new, "s7-t0", kvmesh=0.50, oracle=0.55)    # the oracle got worse, kvmesh did not
    write(new, "s7-t1", kvmesh=0.55, oracle=0.50)
    pairs, notes = pairs_of(base, new, "ttft_p90", "kvmesh", "oracle", "kvmesh", "oracle")
    assert [p.run for p in pairs] == ["s7-t0", "s7-t1"] and notes == ["s8-t0: no run under NEW"]
    s = summarize(pairs)
    assert s.runs == 2 and (s.base_within, s.new_within) == (1, 1)
    assert s.base_gap[0] == pytest.approx(0.10) and s.base_gap[1] == pytest.approx(0.10)
    assert s.new_gap[0] == pytest.approx((0.5 / 0.55 - 1 + 0.1) / 2)
    assert s.paired_gap[0] == pytest.approx(s.new_gap[0] - s.base_gap[0])
    assert s.target_change[0] == pytest.approx((0.0 + 0.55 / 0.6 - 1) / 2)
    assert s.reference_change[0] == pytest.approx(0.05)
    assert (s.target_lower, s.target_higher) == (1, 0)


def test_one_set_compares_two_of_its_variants(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, "a", kvmesh=0.5, oracle=0.5, **{"kvmesh+live-own": 0.45})
    write(tmp_path, "b", kvmesh=0.5, oracle=0.5)  # without the variant: left out
    assert main([str(tmp_path), "--new-target", "kvmesh+live-own"]) == 0
    out = capsys.readouterr().out
    assert "| a | 0.500 / 0.500 | +0.0% | 0.450 / 0.500 | -10.0% | -10.0% |" in out
    assert "1 runs" in out and "left out: b: no variant NEW kvmesh+live-own" in out


def test_bad_input_is_refused_with_a_reason(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):  # one set and nothing to compare in it
        main([str(tmp_path)])
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nowhere"), str(tmp_path)])
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "results.json").write_text("{not json")
    assert main([str(tmp_path), str(tmp_path), "--new-reference", "skylb"]) == 1
    assert "x/results.json: not a scenario result" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty), str(empty), "--new-target", "skylb"]) == 1
    assert "no runs to compare" in capsys.readouterr().out
