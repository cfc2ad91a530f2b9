"""A multi-region kvmesh deployment on Docker, built with testcontainers, for chaos tests.

Layout (one Docker bridge network per region, no network shared by all)::

    net-us:   router-us-1, router-us-2, engine-us-1, engine-us-2, gw-us (+ gw-eu, gw-asia)
    net-eu:   router-eu-1, ...                                     gw-eu (+ gw-us, gw-asia)

Every router has one address that works from every region, ``http://router-eu-1:8201``: on
its own region's network the alias is the router itself; on every other region's network the
same alias belongs to that region's gateway, a ``kvmesh netdelay`` container that forwards the
connection, holding each direction for half the inter-region round trip, to the real router
(the gateway is attached to the other regions' networks for that, without aliases). So
traffic between regions always crosses a delay proxy, traffic within a region never does,
and partitioning a region is ``docker network disconnect`` of the gateways between it and
the rest (``Mesh.partition``). Engines live only on their region's network.

The host reaches routers and engines through their ports published on 127.0.0.1
(``Node.url``); a killed container started again gets a new one, which ``Mesh.restart`` picks
up.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import yaml
from chaos_support import ContainerHealth, container_health, http_get, wait_until
from testcontainers.core.container import DockerContainer
from testcontainers.core.network import Network

LABEL = "kvmesh.chaos"
LABEL_PID = "kvmesh.chaos.pid"
ENGINE_HTTP, ENGINE_EVENTS, ENGINE_REPLAY = 8000, 5557, 5558


# Engines small and fast: a few hundred blocks so evictions (BlockRemoved) happen under the
# load, and simulated time 20x faster than real so 2 cores keep up.
ENGINE_ARGS = ("--speedup", "20", "--num-gpu-blocks", "256", "--block-size", "16")
# Failure detection tuned for a test: probes every 0.5 s, suspicion a few probe intervals.
ROUTER_CONFIG: dict[str, Any] = {
    "gossip": {"profile": "local", "probe_interval": 0.5, "gossip_interval": 0.2},
    "health_interval": 0.2,
    "health_timeout": 1.0,
    "connect_timeout": 1.0,
    "request_timeout": 10.0,
    "seed": 7,
}


@dataclass(frozen=True, slots=True)
class MeshSpec:
    """What to deploy. Defaults: 3 regions x (2 routers + 2 simulated engines)."""

    regions: tuple[str, ...] = ("us", "eu", "asia")
    routers_per_region: int = 2
    engines_per_region: int = 2
    rtt_ms: dict[frozenset[str], float] = field(
        default_factory=lambda: {
            frozenset({"us", "eu"}): 40.0,
            frozenset({"us", "asia"}): 80.0,
            frozenset({"eu", "asia"}): 60.0,
        }
    )
    mesh_key: str = field(default_factory=lambda: secrets.token_hex(16))
    router_config: dict[str, Any] = field(default_factory=lambda: dict(ROUTER_CONFIG))
    """Router configuration keys merged into every router's file (timings, ``gossip``)."""
    engine_args: tuple[str, ...] = ENGINE_ARGS
    """``kvmesh sim-engine`` flags for every engine (speedup, block count, ...)."""
    mem_limit: str = "384m"

    def rtt(self, a: str, b: str) -> float:
        return 0.0 if a == b else self.rtt_ms[frozenset({a, b})]

    def router_port(self, region: str, index: int) -> int:
        return 8000 + 100 * (self.regions.index(region) + 1) + index


@dataclass(slots=True)
class Node:
    """One container of the deployment, addressed by its alias (``router-us-1``)."""

    alias: str
    role: str  # "router" | "engine" | "gateway" | other helpers
    region: str
    port: int  # the container port the host talks to (0: none)
    container: DockerContainer
    starts: int = 0
    expect_running: bool = True
    """False while a scenario holds it down on purpose (killed, paused)."""
    started_at: str = ""
    """Docker's StartedAt of the start we caused; any other value means it restarted alone."""
    _host_port: int = 0

    def mark_started(self) -> None:
        self.starts += 1
        self._host_port = 0
        self.docker.reload()
        self.started_at = str(self.docker.attrs["State"]["StartedAt"])

    @property
    def docker(self) -> Any:
        return self.container.get_wrapped_container()

    @property
    def name(self) -> str:
        return str(self.docker.name)

    def host_port(self) -> int:
        """The published port, cached: it only changes when the container starts again."""
        if not self._host_port:
            self._host_port = self._read_host_port()
        return self._host_port

    def _read_host_port(self) -> int:
        self.docker.reload()
        bindings = self.docker.attrs["NetworkSettings"]["Ports"].get(f"{self.port}/tcp") or []
        for binding in bindings:
            if binding.get("HostIp") in ("0.0.0.0", "127.0.0.1", ""):
                return int(binding["HostPort"])
        raise RuntimeError(f"{self.alias}: port {self.port} is not published (is it running?)")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.host_port()}"

    def logs(self, tail: int = 60) -> str:
        try:
            return bytes(self.docker.logs(tail=tail)).decode(errors="replace")
        except Exception as exc:  # a removed container has no logs: say so, do not fail
            return f"<no logs: {exc}>"


class Mesh:
    """Builds, inspects, breaks and repairs one deployment. ``close()`` removes everything."""

    def __init__(self, spec: MeshSpec, image: str, docker_client: Any) -> None:
        self.spec = spec
        self.image = image
        self.client = docker_client
        self.run_id = f"kvc{secrets.token_hex(3)}"
        self.nodes: dict[str, Node] = {}
        self.networks: dict[str, Network] = {}
        self._workdir: Path | None = None
        self._partitioned: set[str] = set()
        self._lock = threading.Lock()

    @property
    def workdir(self) -> Path:
        """Host folder mounted read-only at ``/etc/kvmesh`` in every container (configs)."""
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix=f"{self.run_id}-"))
            self._workdir.chmod(0o755)
        return self._workdir

    # ---- naming ---------------------------------------------------------------------
    def container_name(self, alias: str) -> str:
        return f"{self.run_id}-{alias}"

    def router_alias(self, region: str, index: int) -> str:
        return f"router-{region}-{index}"

    def engine_alias(self, region: str, index: int) -> str:
        return f"engine-{region}-{index}"

    def engine_replica_id(self, alias: str) -> str:
        """The replica id the mesh uses for an engine: the URL routers reach it at."""
        return f"http://{alias}:{ENGINE_HTTP}"

    def router_address(self, region: str, index: int) -> str:
        return f"http://{self.router_alias(region, index)}:{self.spec.router_port(region, index)}"

    def routers(self, region: str | None = None) -> list[Node]:
        return [n for n in self.nodes.values() if n.role == "router" and region in (None, n.region)]

    def engines(self, region: str | None = None) -> list[Node]:
        return [n for n in self.nodes.values() if n.role == "engine" and region in (None, n.region)]

    # ---- building -------------------------------------------------------------------
    def _labels(self) -> dict[str, str]:
        return {LABEL: self.run_id, LABEL_PID: str(os.getpid())}

    def add_network(self, region: str) -> Network:
        net = Network(docker_network_kw={"labels": self._labels()})
        net.name = f"{self.run_id}-net-{region}"
        net.create()
        self.networks[region] = net
        return net

    def add_node(
        self,
        alias: str,
        role: str,
        region: str,
        command: list[str],
        *,
        port: int = 0,
        env: dict[str, str] | None = None,
        aliases: tuple[str, ...] = (),
        start: bool = True,
    ) -> Node:
        """Create (and start) one container on ``region``'s network, known there as ``alias``.

        ``command`` is the whole argv, program first (``["kvmesh", "router", ...]``).
        """
        container = DockerContainer(
            self.image,
            command=shlex.join(command[1:]),
            entrypoint=command[0],
            labels=self._labels(),
            mem_limit=self.spec.mem_limit,
            hostname=alias,
            env=env or {},
            name=self.container_name(alias),
            network=self.networks[region],
            network_aliases=[alias, *aliases],
            volumes=[(str(self.workdir), "/etc/kvmesh", "ro")],
        )
        if port:
            # Published on the loopback interface only, at a port Docker picks.
            container.ports[str(port)] = ("127.0.0.1",)  # type: ignore[assignment]
        node = Node(alias=alias, role=role, region=region, port=port, container=container)
        with self._lock:
            self.nodes[alias] = node
        if start:
            container.start()
            node.mark_started()
        return node

    def run_job(self, alias: str, region: str, command: list[str], timeout: float = 60) -> str:
        """Run a one-off container on ``region``'s network to completion; return its output.

        The container is removed afterwards; a non-zero exit raises with the output.
        """
        node = self.add_node(alias, "job", region, command)
        node.expect_running = False
        try:
            result = node.docker.wait(timeout=timeout)
            output = bytes(node.docker.logs()).decode(errors="replace")
            if result.get("StatusCode") != 0:
                raise RuntimeError(f"{alias} exited with {result}: {output[-2000:]}")
            return output
        finally:
            _remove(node)
            with self._lock:
                del self.nodes[alias]

    def write_file(self, name: str, text: str) -> str:
        """Write a file every container sees under ``/etc/kvmesh``; returns its path there."""
        path = self.workdir / name
        path.write_text(text)
        path.chmod(0o644)
        return f"/etc/kvmesh/{name}"

    def router_config(self, region: str, index: int) -> dict[str, Any]:
        """The YAML mapping of one router: its engines, every other router as a seed peer."""
        spec = self.spec
        config: dict[str, Any] = {
            "region": region,
            "node_id": self.router_alias(region, index),
            "listen": f"0.0.0.0:{spec.router_port(region, index)}",
            "advertise": self.router_address(region, index),
            "engines": [
                {
                    "url": self.engine_replica_id(self.engine_alias(region, e)),
                    "kv_events": f"tcp://{self.engine_alias(region, e)}:{ENGINE_EVENTS}",
                    "replay": f"tcp://{self.engine_alias(region, e)}:{ENGINE_REPLAY}",
                }
                for e in range(1, spec.engines_per_region + 1)
            ],
            "peers": [
                self.router_address(r, i)
                for r in spec.regions
                for i in range(1, spec.routers_per_region + 1)
                if (r, i) != (region, index)
            ],
            "mesh_key": "${KVMESH_MESH_KEY}",
            "rtt": {r: spec.rtt(region, r) / 1000.0 for r in spec.regions if r != region},
        }
        config.update(spec.router_config)
        return config

    def engine_command(self, alias: str) -> list[str]:
        return [
            "kvmesh", "sim-engine",
            "--host", "0.0.0.0",
            "--port", str(ENGINE_HTTP),
            "--model", "sim",
            "--kv-events-endpoint", f"tcp://*:{ENGINE_EVENTS}",
            "--replay-endpoint", f"tcp://*:{ENGINE_REPLAY}",
            *self.spec.engine_args,
        ]  # fmt: skip

    def router_command(self, region: str, index: int) -> list[str]:
        alias = self.router_alias(region, index)
        path = self.write_file(f"{alias}.yaml", yaml.safe_dump(self.router_config(region, index)))
        return ["kvmesh", "router", "--config", path]

    def start(self, *, ready_timeout: float = 120.0) -> None:
        """Networks, then engines, gateways and routers (created in parallel: each docker
        create+start takes a second or more on a busy machine); then wait until ready."""
        spec = self.spec
        for region in spec.regions:
            self.add_network(region)
        jobs: list[Callable[[], object]] = []
        for region in spec.regions:
            for e in range(1, spec.engines_per_region + 1):
                alias = self.engine_alias(region, e)
                command = self.engine_command(alias)
                jobs.append(
                    partial(self.add_node, alias, "engine", region, command, port=ENGINE_HTTP)
                )
            jobs.append(partial(self._add_gateway, region))
            for i in range(1, spec.routers_per_region + 1):
                jobs.append(
                    partial(
                        self.add_node,
                        self.router_alias(region, i),
                        "router",
                        region,
                        self.router_command(region, i),
                        port=spec.router_port(region, i),
                        env={"KVMESH_MESH_KEY": spec.mesh_key},
                    )
                )
        _in_parallel(jobs)
        self.wait_ready(self.engines(), "/health", ready_timeout)
        self.wait_ready(self.routers(), "/ready", ready_timeout)

    def _add_gateway(self, region: str) -> None:
        """``gw-<region>``: aliases of every remote router on ``region``'s network."""
        routes, aliases = [], []
        for remote in self.spec.regions:
            if remote == region:
                continue
            for i in range(1, self.spec.routers_per_region + 1):
                port = self.spec.router_port(remote, i)
                target = self.container_name(self.router_alias(remote, i))
                routes += ["--route", f"{port}={target}:{port}@{self.spec.rtt(region, remote):g}"]
                aliases.append(self.router_alias(remote, i))
        alias = f"gw-{region}"
        command = ["kvmesh", "netdelay", *routes]
        node = self.add_node(alias, "gateway", region, command, aliases=tuple(aliases))
        for remote in self.spec.regions:
            if remote != region:
                self.networks[remote].connect(node.docker.id)

    def wait_ready(self, nodes: list[Node], path: str, timeout: float) -> None:
        for node in nodes:
            wait_until(
                partial(_answers, node, path),
                timeout=timeout,
                interval=0.2,
                what=f"{node.alias} {path} == 200",
                describe=partial(_logs, node),
            )

    # ---- faults ---------------------------------------------------------------------
    def kill(self, node: Node) -> None:
        node.expect_running = False
        node.docker.kill()

    def restart(self, node: Node) -> None:
        """Start a killed container again (same name, config and networks; new process)."""
        node.docker.start()
        node.mark_started()
        node.expect_running = True

    def pause(self, node: Node, timeout: float = 20.0) -> None:
        """``docker pause``; retried while the cgroup freezer gives up ("unable to freeze"),
        which it does now and then on a busy machine while a task is in the kernel."""
        import docker.errors

        node.expect_running = False
        deadline = time.monotonic() + timeout
        while True:
            try:
                node.docker.pause()
                return
            except docker.errors.APIError as exc:
                if "unable to freeze" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def unpause(self, node: Node) -> None:
        node.docker.unpause()
        node.expect_running = True

    def gateway(self, region: str) -> Node:
        return self.nodes[f"gw-{region}"]

    def partition(self, region: str) -> None:
        """Cut ``region`` off from every other region (both directions), keep it whole inside."""
        for other in self.spec.regions:
            if other == region:
                continue
            self._docker_network(other).disconnect(self.gateway(region).docker.id)
            self._docker_network(region).disconnect(self.gateway(other).docker.id)
        self._partitioned.add(region)

    def _docker_network(self, region: str) -> Any:
        return self.client.networks.get(self.networks[region].name)

    def heal(self, region: str) -> None:
        for other in self.spec.regions:
            if other == region:
                continue
            self.networks[other].connect(self.gateway(region).docker.id)
            self.networks[region].connect(self.gateway(other).docker.id)
        self._partitioned.discard(region)

    def restore(self, timeout: float = 90.0) -> None:
        """Undo whatever a scenario left broken: heal, unpause, start; wait until ready."""
        for region in list(self._partitioned):
            self.heal(region)
        for node in list(self.nodes.values()):
            node.docker.reload()
            state = node.docker.attrs["State"]
            if state.get("Paused"):
                self.unpause(node)
            elif not state.get("Running"):
                self.restart(node)
            node.expect_running = True
        self.wait_ready(self.engines(), "/health", timeout)
        self.wait_ready(self.routers(), "/ready", timeout)

    # ---- observation ----------------------------------------------------------------
    def targets(self, region: str) -> list[tuple[str, str]]:
        """The load generator's view: ``[(alias, host URL)]`` of ``region``'s routers."""
        return [(n.alias, n.url) for n in self.routers(region)]

    def health(self) -> list[tuple[Node, ContainerHealth]]:
        return [(node, container_health(node.docker)) for node in list(self.nodes.values())]

    def close(self) -> None:
        """Remove every container and network of this run, whatever state they are in."""
        for region in list(self._partitioned):
            with contextlib.suppress(Exception):
                self.heal(region)
        _in_parallel([partial(_remove, node) for node in list(self.nodes.values())])
        for net in self.networks.values():
            with contextlib.suppress(Exception):
                net.remove()
        sweep(self.client, run_id=self.run_id)
        if self._workdir is not None:
            for path in sorted(self._workdir.rglob("*"), reverse=True):
                with contextlib.suppress(OSError):
                    path.unlink() if path.is_file() else path.rmdir()
            with contextlib.suppress(OSError):
                self._workdir.rmdir()


def _answers(node: Node, path: str) -> bool:
    return http_get(node.url + path, timeout=1.0)[0] == 200


def _logs(node: Node) -> str:
    return f"logs of {node.alias}:\n{node.logs()}"


def _remove(node: Node) -> None:
    with contextlib.suppress(Exception):
        node.container.stop()


def _in_parallel(jobs: list[Callable[[], object]], workers: int = 6) -> None:
    """Run docker calls side by side; the first failure is raised after all have finished."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(job) for job in jobs]
    for future in futures:
        future.result()


def sweep(client: Any, *, run_id: str | None = None) -> int:
    """Remove chaos containers and networks of ``run_id``, or of test processes that are gone.

    Another test session may be running its own chaos suite on this machine, so only objects
    labelled with this run, or with the pid of a process that no longer exists, are removed.
    """
    removed = 0

    def mine(labels: dict[str, str] | None) -> bool:
        labels = labels or {}
        if LABEL not in labels:
            return False
        if run_id is not None:
            return labels[LABEL] == run_id
        pid = labels.get(LABEL_PID, "")
        return not (pid.isdigit() and _pid_alive(int(pid)))

    for container in client.containers.list(all=True, filters={"label": LABEL}):
        if mine(container.labels):
            with contextlib.suppress(Exception):
                container.remove(force=True)
                removed += 1
    for net in client.networks.list(filters={"label": LABEL}):
        if mine(net.attrs.get("Labels")):
            with contextlib.suppress(Exception):
                net.remove()
                removed += 1
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def deployed(spec: MeshSpec, image: str, docker_client: Any) -> Iterator[Mesh]:
    mesh = Mesh(spec, image, docker_client)
    try:
        mesh.start()
        yield mesh
    finally:
        mesh.close()
