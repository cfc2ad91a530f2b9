"""Fixtures for chaos tests: a Docker engine and the locally built images.

``deploy/setup.sh --full`` starts dockerd and builds ``kvmesh-base:bookworm``
(debootstrap + docker import: no registry is reachable) and ``kvmesh:dev``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")

BASE_IMAGE = os.environ.get("KVMESH_BASE_IMAGE", "kvmesh-base:bookworm")
KVMESH_IMAGE = os.environ.get("KVMESH_IMAGE", "kvmesh:dev")


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
