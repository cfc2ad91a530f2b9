"""``kvmesh demo`` end to end, shortened: it runs, prints its table and leaves nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _live_cmdlines() -> list[str]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
            except OSError:
                continue
    return out


def test_demo_runs_two_policies_and_cleans_up(tmp_path: Path) -> None:
    env = {**os.environ, "KVMESH_RESULTS": str(tmp_path / "results"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "demo", "--duration", "3", "--policies",
         "round_robin,kvmesh", "--clients", "us=3,eu=1,asia=1", "--no-progress",
         "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=240, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "round_robin" in proc.stdout and "kvmesh" in proc.stdout
    assert "TTFT p50" in proc.stdout
    import json

    results = json.loads((tmp_path / "results" / "demo.json").read_text())["results"]
    assert [r["policy"] for r in results] == ["round_robin", "kvmesh"]
    assert all(r["requests"] > 0 and r["errors"] == 0 for r in results)
    # round_robin over six replicas in three regions forwards most requests; kvmesh is the
    # one that keeps conversations on the replica holding their prefix.
    rr, kv = results
    assert rr["cross_region_forwards"] > 0
    assert kv["prefix_hit_rate"] > rr["prefix_hit_rate"]
    # Every engine and router process the demo started has exited.
    work = tmp_path / "work"
    assert len(list(work.glob("*.log"))) == 6 + 2 * 3
    engine_ports = set()
    for conf in work.glob("router-*.yaml"):
        for eng in yaml.safe_load(conf.read_text())["engines"]:
            engine_ports.add(eng["url"].rsplit(":", 1)[1])
    assert len(engine_ports) == 6
    leftovers = [c for c in _live_cmdlines()
                 if str(work) in c or ("sim-engine" in c and any(
                     f"--port {p} " in c for p in engine_ports))]
    assert leftovers == []
