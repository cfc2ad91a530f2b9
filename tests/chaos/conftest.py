"""Fixtures for chaos tests: a Docker engine, the locally built images, and one shared
3-region deployment that scenarios break and restore.

``deploy/setup.sh --full`` starts dockerd and builds ``kvmesh-base:bookworm``
(debootstrap + docker import: no registry is reachable) and ``kvmesh:dev``.

The deployment (``mesh``) is session-scoped: starting 15 containers costs more than most
scenarios, so every scenario leaves it as it found it, and ``restored_mesh`` checks that
(and repairs what a failed scenario left behind) before the next one runs. Each scenario
fills a ``record``; the session-finish hook writes the records to
``results/chaos/reliability.md`` (``chaos_record.py publish`` copies it to docs/).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

# Before testcontainers is imported (below, through chaos_topology): Ryuk's image cannot be
# pulled here, and every container and network is removed by the fixtures themselves.
os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")

from chaos_load import LoadGenerator
from chaos_record import RECORDS, ScenarioRecord, write
from chaos_topology import Mesh, MeshSpec, sweep

BASE_IMAGE = os.environ.get("KVMESH_BASE_IMAGE", "kvmesh-base:bookworm")
KVMESH_IMAGE = os.environ.get("KVMESH_IMAGE", "kvmesh:dev")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def docker_client() -> Iterator[Any]:
    try:
        import docker

        client = docker.from_env()
        client.ping()
    except Exception as exc:  # any failure to reach the engine means: cannot run here
        pytest.skip(f"Docker engine unavailable ({exc}); run deploy/setup.sh --full")
    yield client
    client.close()


@pytest.fixture(scope="session")
def base_image(docker_client: Any) -> str:
    import docker.errors

    try:
        docker_client.images.get(BASE_IMAGE)
    except docker.errors.ImageNotFound:
        pytest.skip(f"image {BASE_IMAGE} missing; run deploy/setup.sh --full")
    return BASE_IMAGE


@pytest.fixture(scope="session")
def kvmesh_image(docker_client: Any) -> str:
    import docker.errors

    try:
        docker_client.images.get(KVMESH_IMAGE)
    except docker.errors.ImageNotFound:
        pytest.skip(f"image {KVMESH_IMAGE} missing; run deploy/setup.sh --full")
    return KVMESH_IMAGE


@pytest.fixture(scope="session")
def mesh(kvmesh_image: str, docker_client: Any) -> Iterator[Mesh]:
    """3 regions x (2 routers + 2 simulated engines) + 3 delay gateways, ready to serve."""
    _started.append(time.monotonic())
    sweep(docker_client)  # containers left by test sessions that died without cleaning up
    spec = MeshSpec()
    deployment = Mesh(spec, kvmesh_image, docker_client)
    try:
        deployment.start()
        yield deployment
    finally:
        deployment.close()


@pytest.fixture
def restored_mesh(mesh: Mesh) -> Iterator[Mesh]:
    """The shared deployment, whole: checked before the scenario, repaired after it."""
    mesh.restore()
    yield mesh
    mesh.restore()


@pytest.fixture
def load(restored_mesh: Mesh) -> Iterator[Callable[..., LoadGenerator]]:
    """``load(**options)`` -> a started generator on the mesh's routers; stopped at teardown."""
    started: list[LoadGenerator] = []

    def make(**options: Any) -> LoadGenerator:
        generator = LoadGenerator(restored_mesh.targets, restored_mesh.spec.regions, **options)
        started.append(generator.start())
        return generator

    yield make
    for generator in started:
        with contextlib.suppress(Exception):
            generator.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined,unused-ignore]
    if report.when == "call" or report.failed:
        item.stash[_RESULT] = report.outcome


_RESULT = pytest.StashKey[str]()


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Iterator[ScenarioRecord]:
    """This scenario's row in the reliability page (result filled in at teardown)."""
    doc = (request.function.__doc__ or "").strip().splitlines()
    _started.append(time.monotonic())
    rec = ScenarioRecord(scenario=doc[0].rstrip(".") if doc else request.node.name)
    RECORDS.append(rec)
    yield rec
    rec.result = request.node.stash.get(_RESULT, "error")


_started: list[float] = []
"""When the first scenario began: the doc reports the chaos suite's own wall time."""


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not RECORDS:
        return
    path = write(RECORDS, _command(session), time.monotonic() - _started[0], ROOT, _setup())
    print(f"\nchaos: wrote {path}", file=sys.stderr)


def _command(session: pytest.Session) -> str:
    """The command that ran this session, as a reader would type it."""
    args = list(session.config.invocation_params.args)
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")
    except OSError:
        parent = []
    if any(part.endswith(b"deploy/test.sh") for part in parent):
        return shlex.join(["bash", "deploy/test.sh", *args])
    pytest_cmd = shlex.join([".venv/bin/python", "-m", "pytest", *args])
    return f"TESTCONTAINERS_RYUK_DISABLED=true {pytest_cmd}"


def _setup() -> str:
    """The deployment the figures come from, described from the settings the suite used."""
    spec = MeshSpec()
    order = {r: i for i, r in enumerate(spec.regions)}
    pairs = [(sorted(pair, key=order.__getitem__), ms) for pair, ms in spec.rtt_ms.items()]
    pairs.sort(key=lambda item: [order[r] for r in item[0]])
    rtts = ", ".join(f"{a}-{b} {ms:g} ms" for (a, b), ms in pairs)
    gossip = ", ".join(f"{k} {v}" for k, v in spec.router_config["gossip"].items())
    return (
        f"**Setup.** {len(spec.regions)} regions ({', '.join(spec.regions)}), each with "
        f"{spec.routers_per_region} routers and {spec.engines_per_region} simulated engines "
        f"(`kvmesh sim-engine {' '.join(spec.engine_args)}`) in containers of the `kvmesh:dev` "
        "image, one Docker network per region. Traffic between regions crosses a "
        f"`kvmesh netdelay` gateway per region (user-space round trips: {rtts}; the kernel has "
        f"no netem). Router gossip settings: {gossip}. Two host-side asyncio clients per "
        "region send a steady, bounded stream of completions to their region's routers "
        "(published ports) and retry on the region's other router after a refused connection, "
        "a timeout or a 5xx. The Redis scenario runs its own one-region deployment (Redis with "
        "an append-only file, one engine, `kvmesh bridge`, two routers)."
    )
