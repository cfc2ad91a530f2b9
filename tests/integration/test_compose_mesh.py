"""deploy/compose/docker-compose.yml comes up, carries traffic across regions, and its
Prometheus scrapes every router with the alert rules loaded; then it goes away entirely.

Runs the locally built images (``KVMESH_IMAGE``, built by ``deploy/setup.sh --full``) with
Debian's docker-compose, under a project name of its own and ports picked free on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from router_support import ROOT, free_ports

pytestmark = pytest.mark.integration

COMPOSE = ROOT / "deploy" / "compose" / "docker-compose.yml"
IMAGE = os.environ.get("KVMESH_IMAGE", "kvmesh:dev")
GRAFANA_IMAGE = os.environ.get("KVMESH_GRAFANA_IMAGE", "grafana/grafana-oss:11.3.0")


def _have_image(name: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", name], capture_output=True,
                          timeout=60).returncode == 0


def _http(url: str, body: dict[str, Any] | None = None, timeout: float = 10.0,
          headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json",
                                                          **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, \
                json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        return exc.code, {}, exc.read().decode(errors="replace")


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if cond():
                return
        except (OSError, ValueError, KeyError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout:.0f}s")
        time.sleep(0.5)


class Compose:
    def __init__(self, project: str, env: dict[str, str], profiles: tuple[str, ...] = ()):
        self.project, self.env, self.profiles = project, env, profiles

    def run(self, *args: str, timeout: float = 600) -> str:
        argv = ["docker-compose", "-f", str(COMPOSE), "-p", self.project]
        for p in self.profiles:
            argv += ["--profile", p]
        done = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=timeout,
                              env=self.env, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise AssertionError(f"docker-compose {' '.join(args)} failed:\n"
                                 f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done.stdout


@pytest.fixture
def compose() -> Iterator[tuple[Compose, dict[str, int]]]:
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (deploy/setup.sh --full installs it)")
    if subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode != 0:
        pytest.skip("Docker is not running")
    if not _have_image(IMAGE):
        pytest.skip(f"image {IMAGE} is not built (deploy/setup.sh --full builds it)")
    us, eu, ap, prom, graf = free_ports(5)
    ports = {"us": us, "eu": eu, "ap": ap, "prometheus": prom, "grafana": graf}
    env = {**os.environ, "KVMESH_IMAGE": IMAGE, "KVMESH_PORT_US": str(us),
           "KVMESH_PORT_EU": str(eu), "KVMESH_PORT_AP": str(ap),
           "KVMESH_PORT_PROMETHEUS": str(prom), "KVMESH_PORT_GRAFANA": str(graf),
           "KVMESH_MESH_KEY": "compose test key, at least 32 bytes long"}
    profiles = ("grafana",) if _have_image(GRAFANA_IMAGE) else ()
    c = Compose(f"kvmesh-compose-test-{os.getpid()}", env, profiles)
    try:
        c.run("up", "-d", "--build", timeout=900)
        yield c, ports
    finally:
        try:
            c.run("logs", "--no-color", "--tail", "40", timeout=120)
        finally:
            c.run("down", "-v", "--remove-orphans", "--timeout", "5", timeout=300)


def chat(port: int, text: str) -> tuple[int, dict[str, str]]:
    status, headers, _ = _http(f"http://127.0.0.1:{port}/v1/chat/completions",
                               {"model": "sim", "max_tokens": 4,
                                "messages": [{"role": "user", "content": text}]}, timeout=30)
    return status, headers


def test_the_three_region_compose_mesh(compose: tuple[Compose, dict[str, int]]) -> None:
    c, ports = compose
    routers = {r: ports[r] for r in ("us", "eu", "ap")}
    for region, port in routers.items():
        _wait(lambda p=port: _http(f"http://127.0.0.1:{p}/ready")[0] == 200, 180,
              f"router {region} ready")
    for region, port in routers.items():
        def sees_four(p: int = port) -> bool:
            doc = _http(f"http://127.0.0.1:{p}/mesh/status")[2]
            return sum(r["healthy"] for r in doc["routing"]["replicas"]) == 4

        _wait(sees_four, 60, f"router {region} sees the 4 replicas")
    # Traffic into every region; then eu loses its only engine and its router sends eu's
    # requests one hop across the delay gateways into another region.
    prefix = "A shared system prompt of the compose test. " * 20
    for i in range(9):
        region = list(routers)[i % 3]
        status, headers = chat(routers[region], f"{prefix} question {i}")
        assert status == 200, headers
        assert headers["x-kvmesh-region"] == region  # idle and local: stays at home
    c.run("stop", "eu-engine-0", timeout=120)

    def eu_forwards() -> bool:
        status, headers = chat(routers["eu"], f"{prefix} after the failure")
        return status == 200 and headers["x-kvmesh-region"] in ("us", "ap")

    _wait(eu_forwards, 60, "eu's requests served in another region")
    status, headers = chat(routers["eu"], "one more after the failure")
    assert status == 200 and headers["x-kvmesh-region"] != "eu"
    assert "via" in headers["x-kvmesh-route"]

    # Prometheus scrapes all three routers and has the rules.
    api = f"http://127.0.0.1:{ports['prometheus']}/api/v1"

    def query(expr: str) -> list[Any]:
        url = f"{api}/query?" + urllib.parse.urlencode({"query": expr})
        result: list[Any] = _http(url)[2]["data"]["result"]
        return result

    _wait(lambda: len(query('kvmesh_router_warm{job="kvmesh"} == 1')) == 3, 90,
          "prometheus sees 3 warm routers")
    _wait(lambda: bool(query('sum(kvmesh_router_forwards_total{job="kvmesh"}) > 0')), 60,
          "prometheus sees the forwards")
    _wait(lambda: len(query('kvmesh_mesh_peers{job="kvmesh",state="alive"} == 1')) == 6, 60,
          "every router sees both peers alive")
    rules = _http(f"{api}/rules")[2]["data"]["groups"]
    assert any(g["name"] == "kvmesh" and len(g["rules"]) >= 8 for g in rules)

    if "grafana" in c.profiles:
        _check_grafana(ports["grafana"])


def _check_grafana(port: int) -> None:
    """Grafana's HTTP API: the provisioned dashboard, and a panel query answered by the
    provisioned Prometheus data source. Runs only where the Grafana image is present."""
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": "Basic YWRtaW46a3ZtZXNo"}  # admin:kvmesh (the compose default)
    _wait(lambda: _http(f"{base}/api/health")[0] == 200, 120, "grafana up")
    _wait(lambda: _http(f"{base}/api/dashboards/uid/kvmesh-mesh", headers=auth)[0] == 200, 60,
          "dashboard provisioned")
    board = _http(f"{base}/api/dashboards/uid/kvmesh-mesh", headers=auth)[2]["dashboard"]
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    body = {"from": "now-5m", "to": "now", "queries": [
        {"refId": "A", "datasource": {"uid": "prometheus"}, "expr": "sum(kvmesh_router_warm)",
         "instant": True}]}
    status, _, answer = _http(f"{base}/api/ds/query", body, headers=auth)
    assert status == 200, answer
    frames = answer["results"]["A"]["frames"]
    assert frames and frames[0]["data"]["values"][-1][-1] == 3
