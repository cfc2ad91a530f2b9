"""``kvmesh doctor`` against a simulated vLLM engine: what it finds and the fixes it names."""

from __future__ import annotations

import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from router_support import ROOT, free_ports, healthy, processes, wait_until

pytestmark = pytest.mark.integration


def doctor(tmp_path: Path, config: dict[str, Any], *flags: str) -> tuple[int, str]:
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump({"region": "us", **config}))
    p = subprocess.run([sys.executable, "-m", "cli", "doctor", "--config", str(path),
                        *flags], capture_output=True, text=True, cwd=ROOT, timeout=120)
    return p.returncode, p.stdout + p.stderr


async def test_doctor_reports_problems_with_fixes(tmp_path: Path) -> None:
    with processes(tmp_path) as procs:
        eng = procs.engine("engine")
        async with aiohttp.ClientSession() as s:
            await wait_until(partial(healthy, s, eng.url), what="engine up")
        entry = {"url": eng.url, "kv_events": eng.kv_events, "replay": eng.replay}
        rc, out = doctor(tmp_path, {"engines": [entry]})
        assert rc == 0, out
        assert "block size 16 (learned from its events)" in out
        assert "chat tokenization agrees" in out and "reports cached_tokens" in out

        rc, out = doctor(tmp_path, {"engines": [entry], "block_size": 32})
        assert rc == 1 and "publishes 16-token blocks, block_size is configured as 32" in out
        assert "fix: remove block_size from the config" in out

        rc, out = doctor(tmp_path, {"engines": [{"url": eng.url}]})
        assert rc == 1 and "no kv_events configured" in out and "cache-blind" in out

        wrong = f"tcp://127.0.0.1:{free_ports(1)[0]}"
        rc, out = doctor(tmp_path, {"engines": [{**entry, "kv_events": wrong,
                                                 "replay": wrong}]})
        assert rc == 1 and "produced no KV event" in out and "replay endpoint is silent" in out

        dead = f"http://127.0.0.1:{free_ports(1)[0]}"
        rc, out = doctor(tmp_path, {"engines": [{"url": dead}]}, "--no-probe")
        assert rc == 1 and "engine unreachable" in out
