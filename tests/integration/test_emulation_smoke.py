"""``kvmesh bench emulate``, tiny: real engines and routers, every request answered, the
side-by-side report written, and no process left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sim.emulation import PLANS

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ARGS = {"--replicas": "us=1,eu=1", "--load": "2", "--horizon": "3", "--warmup": "0.5",
        "--drain": "20", "--speedup": "20", "--variants": "kvmesh", "--seed": "3"}  # fmt: skip


def _live_cmdlines() -> list[str]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
            except OSError:
                continue
    return out


@pytest.mark.timeout(180)
def test_tiny_emulation_answers_everything_and_reports_both_sides(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    argv = [a for kv in ARGS.items() for a in kv]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "bench", "emulate", "skylb-arena-332", *argv,
         "--out", str(out), "--workdir", str(work), "--no-plots"],
        capture_output=True, text=True, timeout=170, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "TTFT p50 (s) emu / sim" in proc.stdout

    report = json.loads((out / "results.json").read_text())
    assert report["scenario"] == "skylb-arena-332"
    assert report["params"]["replicas"] == {"us": 1, "eu": 1}
    assert report["params"]["speedup"] == 20
    [variant] = report["variants"]
    assert variant["label"] == "kvmesh"
    assert set(variant) >= {"difference", "decomposition", "paired", "emulated", "simulated"}
    emu, sim = variant["emulated"]["summary"], variant["simulated"]["summary"]
    for side in (emu, sim):
        assert side["sent"] > 0 and side["unfinished"] == 0
        assert 0 < side["ttft_p50"] <= side["ttft_p90"] <= side["ttft_p99"]
    assert variant["emulated"]["config"]["failed"] == 0
    pace = variant["emulated"]["config"]["engine_pace"]  # the engines' own clocks, read back
    assert pace["steps"] > 0 and pace["busy_s"] > 0 and 0 <= pace["late_share"] <= 1
    assert variant["paired"]["requests"] > 0
    assert variant["difference"]["ttft_p50"] is not None
    assert (out / "results.md").read_text().startswith("# Emulation vs simulation")

    rows = [json.loads(line) for line in (out / "requests-kvmesh.jsonl").read_text().splitlines()]
    assert rows, "no request was recorded"
    for r in rows:
        assert r["status"] == 200 and r["error"] == "", r
        assert 0 < r["ttft"] <= r["e2e"]
        assert r["output_tokens"] == r["max_tokens"]
        assert r["replica"] in {"us-e0", "eu-e0"} and r["route"].startswith("kvmesh")
        assert r["router"] == f"{r['region']}-lb0"
    # The engines saw the workload's own prompts: each client's first turn, token for token.
    plan = PLANS["skylb-arena-332"]
    workload = plan.workload(3, 3.0, 20.0, 2, ("us", "eu"))
    by_rid = {r["rid"]: r for r in rows}
    for client in workload.clients:
        [first] = client.start(0.5)
        assert by_rid[first.rid]["prompt_tokens"] == first.prompt_len
        assert by_rid[first.rid]["max_tokens"] == first.output_len

    # Every process the emulation started has exited.
    ports = set()
    for conf in work.glob("router-*.yaml"):
        for eng in yaml.safe_load(conf.read_text())["engines"]:
            ports.add(eng["url"].rsplit(":", 1)[1])
    assert len(ports) == 2
    leftovers = [
        c for c in _live_cmdlines()
        if str(work) in c or any(f"--port {p} " in c or f"={p}" in c for p in ports)
    ]  # fmt: skip
    assert leftovers == []
