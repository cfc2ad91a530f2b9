"""An engine's KV capacity: read from its /metrics (vLLM, SGLang) or the configuration,
published by its owner in the meta record, and in every router's view of the replica."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from mesh.config import ConfigError, EngineConfig, RouterConfig, build
from mesh.engines import EngineLoad, EngineMonitor, EngineState
from mesh.kv_capacity import capacity_of, parse_capacity
from mesh.state import MeshState, view_records
from mesh.view import Dispatches, ViewBuilder

# What vLLM 0.10's /metrics says of its cache config (an info gauge: the config in labels).
VLLM_INFO = (
    "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n"
    "# TYPE vllm:cache_config_info gauge\n"
    'vllm:cache_config_info{block_size="16",cache_dtype="auto",calculate_kv_scales="False",'
    'enable_prefix_caching="True",engine="0",gpu_memory_utilization="0.9",'
    'num_cpu_blocks="None",num_gpu_blocks="1990",prefix_caching_hash_algo="builtin",'
    'swap_space="4"} 1.0\n'
)
LOAD = ('vllm:num_requests_waiting{engine="0"} 1.0\nvllm:num_requests_running{engine="0"} 2.0\n'
        'vllm:kv_cache_usage_perc{engine="0"} 0.5\n')


def test_vllm_capacity_is_blocks_times_block_size() -> None:
    assert parse_capacity(LOAD + VLLM_INFO) == 1990 * 16


def test_data_parallel_ranks_are_summed_and_sglang_is_read() -> None:
    two = VLLM_INFO + VLLM_INFO.replace('engine="0"', 'engine="1"')
    assert parse_capacity(two) == 2 * 1990 * 16
    assert parse_capacity('sglang:max_total_num_tokens{model_name="m"} 123456.0\n') == 123456
    assert parse_capacity("sglang:max_total_num_tokens 5000\n") == 5000


@pytest.mark.parametrize("page", [
    LOAD,                                                          # not exported
    VLLM_INFO.replace('num_gpu_blocks="1990"', 'num_gpu_blocks="None"'),  # not profiled yet
    VLLM_INFO.replace('block_size="16",', ""),                     # half a figure
    VLLM_INFO.replace('"1990"', '"-4"'),                           # nonsense
    'vllm:cache_config_info{num_gpu_blocks="12" 1.0\n',            # broken label set
    "sglang:max_total_num_tokens NaN\n",
    "sglang:max_total_num_tokens_other 7\n",                       # another metric
    "",
])
def test_unknown_or_malformed_capacity_is_none(page: str) -> None:
    assert parse_capacity(page) is None


def test_the_engines_figure_wins_over_the_configured_one() -> None:
    assert capacity_of(31840, 1000) == 31840
    assert capacity_of(None, 1000) == 1000
    assert capacity_of(None, None) is None


def test_configured_capacity_is_a_positive_integer() -> None:
    cfg = build({"region": "us", "engines": [{"url": "http://e:1", "kv_capacity": 4096}]})
    assert cfg.engines[0].kv_capacity == 4096
    for bad in (0, -1, 1.5, "lots"):
        with pytest.raises(ConfigError) as info:
            build({"region": "us", "engines": [{"url": "http://e:1", "kv_capacity": bad}]})
        assert info.value.key == "engines[0].kv_capacity"


@pytest.fixture
async def engine() -> AsyncIterator[tuple[str, dict[str, str]]]:
    state = {"metrics": LOAD + VLLM_INFO}

    async def health(request: web.Request) -> web.Response:
        return web.Response()

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=state["metrics"])

    app = web.Application()
    app.add_routes([web.get("/health", health), web.get("/metrics", metrics)])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", state
    await runner.cleanup()


async def test_the_monitor_reads_the_capacity_with_the_models_and_falls_back_to_config(
        engine: tuple[str, dict[str, str]]) -> None:
    url, page = engine
    now = [0.0]
    async with aiohttp.ClientSession() as s:
        mon = EngineMonitor([EngineConfig(url, kv_capacity=1000)], s, clock=lambda: now[0],
                            models_every=5.0)
        assert (await mon.probe(url)).kv_capacity == 1990 * 16
        # Between model refreshes the page is not read for it again.
        page["metrics"] = LOAD + VLLM_INFO.replace('"1990"', '"2000"')
        now[0] = 1.0
        assert (await mon.probe(url)).kv_capacity == 1990 * 16
        now[0] = 6.0  # a restarted engine with another cache: read again
        assert (await mon.probe(url)).kv_capacity == 2000 * 16
        page["metrics"] = LOAD  # an engine (or proxy) that does not export it: configured
        now[0] = 12.0
        assert (await mon.probe(url)).kv_capacity == 1000
        unconfigured = EngineMonitor([EngineConfig(url)], s, clock=lambda: now[0])
        st = await unconfigured.probe(url)
        assert st.healthy and st.kv_capacity is None  # unknown: the cost model as before


def _state(region: str, engine: str) -> MeshState:
    config = RouterConfig(region=region, node_id=f"{region}-lb0",
                          advertise=f"http://{region}:8080", engines=(EngineConfig(url=engine),))
    return MeshState(config, clock=lambda: 100.0)


def _gossip(src: MeshState, dst: MeshState) -> None:
    dst.meta.merge(src.meta.delta_since(dst.meta.digest(), 100.0), 100.0)
    dst.loads.merge(src.loads.delta_since(dst.loads.digest(), 100.0), 100.0)


def test_the_owner_publishes_the_capacity_and_every_view_has_it() -> None:
    us, eu = _state("us", "http://us-e0"), _state("eu", "http://eu-e0")
    st = EngineState("http://us-e0", True, EngineLoad(1, 2, 0.3), 100.0, 0, "ok",
                     kv_capacity=31840)
    us.publish_engine(st, "us", 100.0)
    _gossip(us, eu)
    remote = {r.replica: r for r in eu.remote_records(100.0)}["http://us-e0"]
    assert remote.kv_capacity == 31840.0
    own = list(view_records([("http://us-e0", "us", st, None)], {"http://us-e0"}, us, 100.0))
    assert own[0].kv_capacity == 31840
    view = ViewBuilder("eu", Dispatches(), lambda now: [remote], lambda now: {}).build(100.0)
    assert view.replicas[0].kv_capacity == 31840.0
    # A new figure (a restarted engine) is published again; an unknown one keeps the last.
    us.publish_engine(EngineState("http://us-e0", True, EngineLoad(0, 0, 0.0), 100.0, 0, "ok",
                                  kv_capacity=16000), "us", 100.0)
    us.publish_engine(EngineState("http://us-e0", True, EngineLoad(0, 0, 0.0), 100.0, 0, "ok"),
                      "us", 100.0)
    _gossip(us, eu)
    assert {r.replica: r for r in eu.remote_records(100.0)}["http://us-e0"].kv_capacity == 16000


@pytest.mark.parametrize("raw", [None, 0, -5, "31840", True, float("nan"), float("inf")])
def test_a_bad_published_capacity_is_unknown(raw: object) -> None:
    us, eu = _state("us", "http://us-e0"), _state("eu", "http://eu-e0")
    us.publish_engine(EngineState("http://us-e0", True, EngineLoad(1, 2, 0.3), 100.0, 0, "ok"),
                      "us", 100.0)
    meta = dict(us.meta.get("us-lb0"))  # type: ignore[arg-type]
    meta["engines"] = {"http://us-e0": {"kv_capacity": raw}}
    us.meta.set("us-lb0", meta, us.versions.next(), 100.0)
    _gossip(us, eu)
    assert {r.replica: r for r in eu.remote_records(100.0)}["http://us-e0"].kv_capacity is None
