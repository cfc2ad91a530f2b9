"""The chaos infrastructure itself: a container from the local base image on a
testcontainers network, reachable, paused (unreachable), unpaused (reachable)."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from testcontainers.core.container import DockerContainer
from testcontainers.core.network import Network

pytestmark = pytest.mark.chaos


def _wait_ping(client: redis.Redis[bytes], deadline_s: float) -> bool:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            if client.ping():
                return True
        except redis.RedisError:
            time.sleep(0.05)
    return False


def test_redis_container_pause_and_unpause(base_image: str, docker_client: Any) -> None:
    with Network() as network:
        container = (
            DockerContainer(base_image)
            .with_command("redis-server --bind 0.0.0.0 --port 6379 --save '' --protected-mode no")
            .with_exposed_ports(6379)
            .with_network(network)
            .with_network_aliases("redis")
        )
        with container:
            host = container.get_container_host_ip()
            port = int(container.get_exposed_port(6379))
            # No client-side retries: a paused server must fail the ping at once, not after
            # redis-py's default backoff (seconds of it).
            client = redis.Redis(
                host=host,
                port=port,
                socket_timeout=0.5,
                socket_connect_timeout=0.5,
                retry=Retry(NoBackoff(), 0),
            )
            try:
                assert _wait_ping(client, 20.0), "redis in the container never answered"
                client.set("k", "v")

                docker_client.containers.get(container.get_wrapped_container().id).pause()
                with pytest.raises(redis.RedisError):
                    client.ping()

                docker_client.containers.get(container.get_wrapped_container().id).unpause()
                assert _wait_ping(client, 10.0), "redis did not answer after unpause"
                assert client.get("k") == b"v"

                inspected = docker_client.containers.get(container.get_wrapped_container().id)
                assert network.name in inspected.attrs["NetworkSettings"]["Networks"]
            finally:
                client.close()
