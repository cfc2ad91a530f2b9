"""Engine probes: vLLM and SGLang gauges, failures mark an engine down at once."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from mesh.config import EngineConfig
from mesh.engines import EngineMonitor, EngineState, parse_metrics

VLLM = """# HELP vllm:num_requests_waiting Number of requests waiting.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 3.0
vllm:num_requests_waiting{engine="1",model_name="m"} 1.0
vllm:num_requests_running{engine="0",model_name="m"} 7.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.42
vllm:time_to_first_token_seconds_bucket{le="0.1",model_name="m"} 12.0
"""


def test_vllm_gauges_are_summed_over_label_sets() -> None:
    load = parse_metrics(VLLM)
    assert load is not None
    assert (load.waiting, load.running, load.kv_usage) == (4.0, 7.0, 0.42)


def test_older_vllm_and_sglang_names_and_garbage() -> None:
    old = parse_metrics("vllm:gpu_cache_usage_perc 0.5\nvllm:num_requests_running 2\n")
    assert old is not None and old.kv_usage == 0.5 and old.running == 2
    sg = parse_metrics('sglang:num_queue_reqs{a="b"} 5\nsglang:num_running_reqs 1\n'
                       "sglang:token_usage 0.25\n")
    assert sg is not None and (sg.waiting, sg.running, sg.kv_usage) == (5, 1, 0.25)
    assert parse_metrics("process_cpu_seconds_total 3\n") is None
    broken = parse_metrics("vllm:num_requests_waiting{x} not-a-number\nvllm:num_requests_running 1")
    assert broken is not None and broken.waiting == 0 and broken.running == 1


@pytest.fixture
async def engine() -> AsyncIterator[tuple[str, dict[str, object]]]:
    state: dict[str, object] = {"health": 200, "metrics": VLLM}

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=int(state["health"]))  # type: ignore[call-overload]

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=str(state["metrics"]))

    app = web.Application()
    app.add_routes([web.get("/health", health), web.get("/metrics", metrics)])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", state
    await runner.cleanup()


async def test_probe_up_down_and_mark_down(engine: tuple[str, dict[str, object]]) -> None:
    url, state = engine
    seen: list[EngineState] = []
    async with aiohttp.ClientSession() as s:
        mon = EngineMonitor([EngineConfig(url)], s, on_update=seen.append, clock=lambda: 5.0)
        st = await mon.probe(url)
        assert st.healthy and st.load is not None and st.load.waiting == 4.0
        assert st.measured_at == 5.0
        state["health"] = 503
        st = await mon.probe(url)
        assert not st.healthy and "503" in st.reason and st.load is not None  # last load kept
        state["health"] = 200
        assert (await mon.probe(url)).healthy
        mon.mark_down(url, "connection refused")
        assert not mon.healthy(url) and mon.states[url].reason == "connection refused"
        state["metrics"] = "nothing useful 1\n"
        assert not (await mon.probe(url)).healthy
    assert [x.healthy for x in seen] == [True, False, True, False, False]


async def test_unreachable_engine_is_down() -> None:
    async with aiohttp.ClientSession() as s:
        mon = EngineMonitor([EngineConfig("http://127.0.0.1:9")], s, timeout=0.5)
        st = await mon.probe("http://127.0.0.1:9")
    assert not st.healthy and st.failures == 1
