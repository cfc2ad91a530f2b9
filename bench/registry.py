"""Benchmark and evaluation entry points behind ``kvmesh bench NAME``.

name -> (module, one-line help). The module exposes ``main(argv: list[str]) -> int``,
prints its figures and writes them (JSON + markdown) under ``results/`` unless
told otherwise with ``--out``.
"""

from __future__ import annotations

BENCHES: dict[str, tuple[str, str]] = {
    "crdt": ("bench.crdt_bench", "PrefixIndex apply/merge/wire rates, query p99, bytes per pair"),
    "diurnal-cycle": ("bench.scenarios:diurnal_cycle", "sim: one day, local vs shared capacity"),
    "diurnal-skew": ("bench.scenarios:diurnal_skew", "sim: SkyLB diurnal skew, 9 shared vs 12"),
    "emulate": ("sim.emulation", "a scenario on real processes vs the simulator (emulate --list)"),
    "fuzz-decoders": ("bench.fuzz:fuzz_decoders", "1M generated inputs to every network decoder"),
    "fuzz-http": ("bench.fuzz:fuzz_http", "100k generated HTTP requests against two routers"),
    "gorgo": ("bench.scenarios:gorgo", "sim: GORGO setup, 26-40/90-130/260-466 ms"),
    "intelligent-router": ("bench.scenarios:intelligent_router",
                           "sim: Intelligent Router five-task mix, e2e latency"),
    "intelligent-router-overload": ("bench.scenarios:intelligent_router_overload",
                                    "sim: the five-task mix past capacity (50 req/s)"),
    "gossip": ("bench.gossip_convergence", "mesh gossip: convergence p50/p99 and bytes/router/s"),
    "kvevents": ("bench.kvevents_bench", "KV-event ingestion: decode, keys, index apply"),
    "lengths": ("bench.lengths_bench", "response-length prediction and e2e decide cost per call"),
    "overhead": ("bench.overhead", "added latency and req/s beside sglang-router, vllm-router"),
    "paired": ("bench.paired", "two sets of scenario runs compared run by run (seeds x "
               "tie-break streams): gap to the oracle, paired differences"),
    "picker": ("bench.picker_bench", "endpoint picker behind Envoy: added TTFT, hit rate vs proxy"),
    "plan-diurnal": ("plan.validate", "sim: capacity plan vs region-local/reactive, 3 seeds"),
    "plan-solver": ("plan.solver_bench", "capacity MILP solve time at 3/10/30 regions"),
    "region-sweep": ("sim.region_sweep", "3 regions, skewed load, light -> overloaded: mesh vs "
                     "no peers, processes beside the simulator"),
    "router": ("bench.router_bench", "router decision time, added TTFT and req/s"),
    "sageserve-tiers": ("bench.scenarios:sageserve_tiers",
                        "sim: SageServe tiers, siloed vs shared FCFS vs tiers (replica-hours)"),
    "scale": ("bench.scenarios:scale", "sim: 10 regions x 100 replicas x 20 routers"),
    "sim-profiles": ("bench.sim_profiles", "sim-engine profiles: TTFT cached/uncached, saturation"),
    "skylb-arena-332": ("bench.scenarios:skylb_arena_332", "sim: SkyLB Arena-like, 3/3/2"),
    "skylb-arena-444": ("bench.scenarios:skylb_arena_444", "sim: SkyLB Arena-like, 4/4/4"),
    "skylb-mixed-tree": ("bench.scenarios:skylb_mixed_tree", "sim: SkyLB Mixed Tree"),
    "skylb-tot": ("bench.scenarios:skylb_tot", "sim: SkyLB Tree-of-Thoughts"),
    "skylb-wildchat-332": ("bench.scenarios:skylb_wildchat_332", "sim: SkyLB WildChat-like, 3/3/2"),
    "skylb-wildchat-444": ("bench.scenarios:skylb_wildchat_444", "sim: SkyLB WildChat-like, 4/4/4"),
    "worker-link": ("bench.worker_link_bench",
                    "a worker's place hop to its primary vs deciding locally"),
}
