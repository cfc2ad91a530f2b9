"""Real vLLM (CPU build) engines for the real-engine tests: find the venv, start, stop.

The venv is made by ``deploy/setup.sh --full`` (``ensure_vllm`` in ``deploy/lib.sh``); the test
script exports its interpreter as ``KVMESH_VLLM_PYTHON``. Without it the tests skip, except under
``CI=true``, where a missing vLLM is a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from sim.procs import free_ports

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
LORA = "sql-lora"
MODEL_NAME = "tiny"
BLOCK_SIZE = 32
SAMPLES: list[tuple[str, int, int]] = []
"""(test, predicted, reported) for every answer the tests checked: the accuracy printed at the
end of the session (``pytest_terminal_summary`` in conftest)."""
START_TIMEOUT = 420.0
"""Seconds an engine may take to answer /health (two start at once on two busy cores)."""


def vllm_python() -> str:
    """The vLLM venv's interpreter, or skip (fail under CI=true) with the fix."""
    cache = Path(os.environ.get("KVMESH_CACHE") or Path.home() / ".cache" / "kvmesh")
    candidates = [os.environ.get("KVMESH_VLLM_PYTHON"), str(cache / "vllm-venv/bin/python")]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    why = ("no vLLM venv (KVMESH_VLLM_PYTHON unset and none under "
           f"{cache}/vllm-venv); run `bash deploy/setup.sh --full` to install it")
    if os.environ.get("CI") == "true":
        pytest.fail(why)
    pytest.skip(why)


def make_model(python: str, out: Path) -> Path:
    subprocess.run([python, str(HERE / "make_model.py"), str(out)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
    return out


def http_json(method: str, url: str, body: Any = None, timeout: float = 10.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


def http_text(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return str(resp.read().decode())


def is_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2.0) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError, TimeoutError):
        return False


@dataclass
class VllmEngine:
    """One ``vllm.entrypoints.openai.api_server`` process on loopback."""

    name: str
    python: str
    model: Path
    workdir: Path
    port: int
    events_port: int
    replay_port: int
    cpu: str
    kv_events: bool = True
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def events(self) -> str:
        return f"tcp://127.0.0.1:{self.events_port}"

    @property
    def replay(self) -> str:
        return f"tcp://127.0.0.1:{self.replay_port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.{self.starts}.log"

    def argv(self) -> list[str]:
        args = [self.python, "-m", "vllm.entrypoints.openai.api_server",
                "--model", str(self.model), "--served-model-name", MODEL_NAME,
                "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32",
                "--block-size", str(BLOCK_SIZE), "--enable-prefix-caching", "--enforce-eager",
                "--max-model-len", "2048", "--enable-prompt-tokens-details",
                "--disable-uvicorn-access-log", *self.extra]
        if self.kv_events:
            args += ["--kv-events-config", json.dumps({
                "enable_kv_cache_events": True, "publisher": "zmq",
                "endpoint": f"tcp://*:{self.events_port}",
                "replay_endpoint": f"tcp://*:{self.replay_port}", "topic": "kv"})]
        return args

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        self.starts += 1
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
               "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": self.cpu,
               "VLLM_SERVER_DEV_MODE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("PYTHONPATH", None)
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, cwd=self.workdir,
                                     start_new_session=True)
        log.close()

    def wait_healthy(self, deadline: float) -> None:
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"engine {self.name} exited ({self.proc.returncode}):\n"
                                     + self.log_tail())
            if is_healthy(self.url):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"engine {self.name} not healthy in time:\n"
                                     + self.log_tail())
            time.sleep(0.5)

    def stop(self) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
        # The process group may hold children (engine core) that outlive the server.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    def metric(self, name: str) -> float:
        """Sum of a Prometheus counter/gauge over its label sets."""
        total = 0.0
        for line in http_text(f"{self.url}/metrics").splitlines():
            if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " "):
                total += float(line.rsplit(" ", 1)[1])
        return total


@dataclass
class Engines:
    a: VllmEngine
    """Big cache (1 GiB), LoRA adapter ``sql-lora``: multi-turn, tokenizer and LoRA tests."""
    b: VllmEngine
    """80 blocks (``--num-gpu-blocks-override``): evictions, reset, restart."""


@dataclass
class Router:
    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = http_json("GET", f"{self.url}/mesh/status", timeout=5)
        return doc

    def engine_stats(self, engine: str) -> dict[str, Any]:
        stats: dict[str, Any] = self.status()["precision"]["decoders"].get(engine, {})
        return stats

    def metrics(self) -> str:
        return http_text(f"{self.url}/metrics")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Wait until the router itself sees every engine healthy (its probe, not the
        engine's own ``/health``, decides whether it routes there)."""
        deadline = time.monotonic() + timeout
        while True:
            engines = self.status()["router"]["engines"]
            if engines and all(e["healthy"] for e in engines):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: engines not healthy: {engines}")
            time.sleep(0.1)

    def settle(self, engine: str, before: int, timeout: float = 30.0) -> int:
        """Wait until the router has ingested events from ``engine`` beyond ``before`` and
        no more arrive for a moment (the engine's events for the last answer are in)."""
        deadline = time.monotonic() + timeout
        last, since = -1, time.monotonic()
        while True:
            n = int(self.engine_stats(engine).get("events", 0))
            now = time.monotonic()
            if n != last:
                last, since = n, now
            elif n > before and now - since >= 0.3:
                return n
            if now > deadline:
                raise AssertionError(f"{self.name}: events from {engine} did not settle "
                                     f"(before {before}, now {n})")
            time.sleep(0.05)


@dataclass
class Routers:
    workdir: Path
    started: list[Router] = field(default_factory=list)

    def start(self, name: str, config: dict[str, Any]) -> Router:
        port = free_ports(1)[0]
        conf = {"region": "us", "node_id": name, "listen": f"127.0.0.1:{port}",
                "health_interval": 0.1, "seed": 1, "log_level": "info", **config}
        path = self.workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(conf))
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "cli", "router", "--config", str(path)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
        router = Router(name, f"http://127.0.0.1:{port}", proc, log_path)
        self.started.append(router)
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"router {name} exited:\n{router.log()[-3000:]}")
            with contextlib.suppress(OSError, ValueError):
                doc = router.status()
                engines = doc["router"]["engines"]
                if engines and all(e["healthy"] for e in engines):
                    return router
            if time.monotonic() > deadline:
                raise AssertionError(f"router {name} not ready:\n{router.log()[-3000:]}")
            time.sleep(0.1)

    def close(self) -> None:
        for r in self.started:
            if r.proc.poll() is None:
                r.proc.send_signal(signal.SIGTERM)
        for r in self.started:
            try:
                r.proc.wait(10)
            except subprocess.TimeoutExpired:
                r.proc.kill()
                r.proc.wait()


def engine_entry(e: VllmEngine, events: bool = True) -> dict[str, Any]:
    entry: dict[str, Any] = {"url": e.url}
    if events:
        entry.update(kv_events=e.events, replay=e.replay)
    return entry
