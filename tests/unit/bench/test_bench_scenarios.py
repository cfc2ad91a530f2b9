"""``kvmesh bench <scenario>`` options reach the run and its results file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.scenarios import run


def test_tie_stream_is_run_and_recorded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = {}
    for stream in (0, 3):
        folder = tmp_path / f"t{stream}"
        argv = ["--horizon", "30", "--warmup", "5", "--drain", "10", "--variants", "kvmesh",
                "--no-plots", "--no-progress", "--tie-stream", str(stream), "--out", str(folder)]
        assert run("skylb-wildchat-332", argv) == 0
        out[stream] = json.loads((folder / "results.json").read_text())
    capsys.readouterr()
    assert out[0]["params"]["tie_stream"] == 0 and out[3]["params"]["tie_stream"] == 3
    # Another path: the routers drew other near-tie choices.
    a, b = (out[s]["runs"][0]["summary"] for s in (0, 3))
    assert a["ttft_p90"] != b["ttft_p90"]


def test_probe_interval_is_recorded_and_a_bad_one_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--horizon", "10", "--warmup", "2", "--drain", "5", "--variants", "kvmesh",
            "--no-plots", "--no-progress", "--out", str(tmp_path)]
    assert run("skylb-wildchat-332", [*argv, "--probe-interval", "0.05"]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["params"][
        "probe_interval_s"] == 0.05
    assert run("skylb-wildchat-332", [*argv, "--probe-interval", "0"]) == 2
    assert "probe interval must be positive" in capsys.readouterr().err


def test_regret_is_scored_recorded_and_noted(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--horizon", "30", "--warmup", "5", "--drain", "10", "--variants",
            "kvmesh,kvmesh+live-load,oracle", "--no-plots", "--no-progress", "--regret",
            "--out", str(tmp_path)]
    assert run("skylb-wildchat-332", argv) == 0
    out = capsys.readouterr().out
    runs = {r["variant"]: r["config"] for r in
            json.loads((tmp_path / "results.json").read_text())["runs"]}
    assert runs["kvmesh"]["regret"]["decisions"] > 0
    assert runs["kvmesh+live-load"]["regret"]["mean_ms"] == 0.0
    assert "regret" not in runs["oracle"]  # the oracle's view is the live state
    assert "- kvmesh decisions priced on the engines' live state: mean regret" in out
