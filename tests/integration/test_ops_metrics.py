"""The Grafana dashboard and the Prometheus alert rules read only what routers export.

A 2-region mesh on loopback with traffic flowing (forwards, KV events, gossip); every
``kvmesh_*`` series named in ``deploy/grafana/*.json`` and ``deploy/prometheus/*-alerts.yml``
must be in a running router's ``/metrics``. Where Debian's ``prometheus`` is installed
(``deploy/setup.sh --full``), a real Prometheus scrapes the routers and every dashboard panel
query must return data, and ``promtool`` must accept the rules.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from router_support import (
    ROOT,
    Procs,
    chat,
    free_ports,
    healthy,
    mesh_of,
    sees_replicas,
    wait_until,
)

pytestmark = pytest.mark.integration

DASHBOARDS = sorted((ROOT / "deploy" / "grafana").glob("*.json"))
RULES = sorted((ROOT / "deploy" / "prometheus").glob("*-alerts.yml"))
METRIC = re.compile(r"\b(kvmesh_[a-z0-9_]+)\b")
VARIABLES = {"$job": "kvmesh", "$slo": "1.0"}
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def dashboard_exprs() -> list[tuple[str, str]]:
    out = []
    for path in DASHBOARDS:
        doc = json.loads(path.read_text())
        for panel in doc["panels"]:
            for target in panel.get("targets", []):
                out.append((f"{path.name}: {panel['title']}", target["expr"]))
    return out


def rule_exprs() -> list[tuple[str, str]]:
    out = []
    for path in RULES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                out.append((f"{path.name}: {rule['alert']}", rule["expr"]))
    return out


def names_in(expr: str) -> set[str]:
    return set(METRIC.findall(expr))


def test_the_files_name_metrics_at_all() -> None:
    assert DASHBOARDS and RULES
    assert len(dashboard_exprs()) >= 20 and len(rule_exprs()) >= 8
    assert all(names_in(e) or "up{" in e for _, e in dashboard_exprs() + rule_exprs())


async def _traffic(routers: list[str], n: int) -> None:
    prefix = "You are a helpful assistant for the kvmesh operations test. " * 10
    async with aiohttp.ClientSession() as s:
        for i in range(n):
            status, _, _ = await chat(s, routers[i % len(routers)],
                                      [{"role": "user", "content": f"{prefix} q{i % 5}"}],
                                      max_tokens=4)
            assert status == 200


def _exported(text: str) -> set[str]:
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


async def test_every_metric_the_dashboard_and_rules_use_is_exported(
    procs: Procs, tmp_path: Path
) -> None:
    # round_robin: requests cross regions, so forwards and remote decisions exist too.
    _, routers = mesh_of(procs, {"us": 1, "eu": 1}, policy="round_robin")
    urls = list(routers.values())
    async with aiohttp.ClientSession() as s:
        for r in urls:
            await wait_until(partial(healthy, s, r), 30, f"{r} up")
        for r in urls:
            await wait_until(partial(sees_replicas, s, r, 2), 40, f"{r} sees 2 replicas")
    await _traffic(urls, 20)
    wanted = set().union(*(names_in(e) for _, e in dashboard_exprs() + rule_exprs()))

    async def all_exported() -> bool:
        async with aiohttp.ClientSession() as s, s.get(f"{routers['us']}/metrics") as resp:
            return wanted <= _exported(await resp.text())

    try:
        await wait_until(all_exported, 30, "every metric exported")
    except AssertionError:
        async with aiohttp.ClientSession() as s, s.get(f"{routers['us']}/metrics") as resp:
            missing = wanted - _exported(await resp.text())
        raise AssertionError(f"not exported by a running router: {sorted(missing)}") from None

    promtool, prometheus = shutil.which("promtool"), shutil.which("prometheus")
    if promtool is None or prometheus is None:
        if IN_CI:
            raise AssertionError("prometheus/promtool missing (deploy/setup.sh --full installs)")
        pytest.skip("Debian's prometheus is not installed")
    for path in RULES:
        check = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                               text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
    await _panels_return_data(procs, prometheus, urls, tmp_path)


async def _panels_return_data(procs: Procs, prometheus: str, routers: list[str],
                              workdir: Path) -> None:
    """A real Prometheus scrapes the routers; every panel query must return data."""
    (port,) = free_ports(1)
    targets = [u.removeprefix("http://") for u in routers]
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "rule_files": [str(p) for p in RULES],
              "scrape_configs": [{"job_name": "kvmesh", "static_configs": [{"targets": targets}]}]}
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen(
        [prometheus, f"--config.file={workdir / 'prometheus.yml'}",
         f"--storage.tsdb.path={workdir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    procs.procs.append(("prometheus", proc))
    api = f"http://127.0.0.1:{port}/api/v1"
    traffic = asyncio.create_task(_traffic(routers, 60))
    empty: list[str] = []
    try:
        async with aiohttp.ClientSession() as s:
            async def query(expr: str) -> list[Any]:
                for k, v in VARIABLES.items():
                    expr = expr.replace(k, v)
                async with s.get(f"{api}/query", params={"query": expr}) as resp:
                    doc = await resp.json()
                assert doc["status"] == "success", (expr, doc)
                result: list[Any] = doc["data"]["result"]
                return result

            async def scraped_twice() -> bool:
                return bool(await query("count_over_time(kvmesh_router_warm[1m]) >= 3"))

            await wait_until(scraped_twice, 60, "prometheus scraped the routers")
            await traffic
            for title, expr in dashboard_exprs():
                async def has_data(expr: str = expr) -> bool:
                    return bool(await query(expr))

                try:
                    await wait_until(has_data, 15, title)
                except AssertionError:
                    empty.append(f"{title}: {expr}")
    finally:
        traffic.cancel()
    assert not empty, "panels without data:\n" + "\n".join(empty)
