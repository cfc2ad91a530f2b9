"""Session fixtures for the real-engine tests: one tiny model, two vLLM engines started once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vllm_support import (
    LORA,
    SAMPLES,
    START_TIMEOUT,
    Engines,
    Routers,
    VllmEngine,
    free_ports,
    make_model,
    vllm_python,
)


@pytest.fixture(scope="session")
def vllm_py() -> str:
    return vllm_python()


@pytest.fixture(scope="session")
def real_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("real")


@pytest.fixture(scope="session")
def tiny_model(vllm_py: str, real_workdir: Path) -> Path:
    return make_model(vllm_py, real_workdir / "tiny-llama")


@pytest.fixture(scope="session")
def engines(vllm_py: str, tiny_model: Path, real_workdir: Path) -> Iterator[Engines]:
    pa = free_ports(3)
    pb = free_ports(3)
    a = VllmEngine("engine-a", vllm_py, tiny_model, real_workdir, *pa, cpu="0",
                   extra=["--enable-lora", "--max-lora-rank", "8", "--lora-modules",
                          f"{LORA}={tiny_model / 'lora-sql'}"])
    b = VllmEngine("engine-b", vllm_py, tiny_model, real_workdir, *pb, cpu="1",
                   extra=["--num-gpu-blocks-override", "80"])
    started = time.monotonic()
    try:
        a.start()
        b.start()
        deadline = time.monotonic() + START_TIMEOUT
        a.wait_healthy(deadline)
        b.wait_healthy(deadline)
        print(f"\nreal engines healthy after {time.monotonic() - started:.1f}s")
        yield Engines(a, b)
    finally:
        a.stop()
        b.stop()


@pytest.fixture
def routers(tmp_path: Path) -> Iterator[Routers]:
    rs = Routers(tmp_path)
    try:
        yield rs
    finally:
        rs.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The prediction accuracy over every answer the real-engine tests checked."""
    if not SAMPLES:
        return
    exact = sum(1 for _, p, c in SAMPLES if p == c)
    by_test: dict[str, list[int]] = {}
    for name, p, c in SAMPLES:
        counts = by_test.setdefault(name, [0, 0])
        counts[0] += p == c
        counts[1] += 1
    terminalreporter.write_line(
        f"prediction accuracy on real vLLM: {exact}/{len(SAMPLES)} answers exact "
        f"({exact / len(SAMPLES):.1%}): "
        + ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in by_test.items()))
