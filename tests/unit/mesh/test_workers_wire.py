"""What crosses the primary <-> worker link: a placement call and its answer, and the
counters a worker reports, merged into the node's totals."""

from __future__ import annotations

import msgpack  # type: ignore[import-untyped,unused-ignore]
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kvevents.block_sizes import sized_request_keys
from mesh.dispatch import Ask, Placement, Target
from mesh.policies.base import Decision, Request
from mesh.workers import (
    KeyConfig,
    WorkerKeys,
    add_samples,
    ask_wire,
    merged,
    placement_of,
    placement_wire,
    requests_served,
    samples_wire,
    tokens_of,
    worker_keys,
)


def test_an_ask_crosses_with_its_tokens_keys_namespace_and_filters() -> None:
    ids = [*range(40), 70000, 2**32 - 1]
    sized = sized_request_keys(ids, (8, 16), lora_name="adapter-a", salt="salt")
    keys = WorkerKeys(sized, (8, 16), "adapter-a", "adapter-a", "salt")
    req = Request("r1", ids, keys, keys.unit, "s", 9, 12.5, "m", tier="batch", deadline=99.5)
    ask = Ask(req, True, "http://e1", "node-b", frozenset({"x", "a"}), frozenset({"eu"}), 2)
    wire = msgpack.unpackb(msgpack.packb(ask_wire(ask)), strict_map_key=True)
    (rid, tok, session, max_tokens, arrival, model, sent, lora_path, salt, given,
     forwarded, pinned, origin, ex_r, ex_g, attempt, tier, deadline) = wire
    assert (tier, deadline) == ("batch", 99.5)
    assert list(tokens_of(tok)) == ids
    back, sizes, lora = worker_keys(sent, len(ids))
    assert list(back) == list(sized) and back.unit == 8 and back.by_size == sized.by_size
    assert back.num_tokens == len(ids) and (sizes, lora) == ((8, 16), "adapter-a")
    assert (rid, session, max_tokens, arrival, model, lora_path, salt, given) == (
        "r1", "s", 9, 12.5, "m", "adapter-a", "salt", None)
    assert (forwarded, pinned, origin, ex_r, ex_g, attempt) == (
        True, "http://e1", "node-b", ["a", "x"], ["eu"], 2)


def test_a_key_configuration_crosses() -> None:
    cfg = KeyConfig((16, 32), frozenset({"lora-b", "lora-a"}))
    assert KeyConfig.of(msgpack.unpackb(msgpack.packb(cfg.wire()))) == cfg


def test_a_placement_crosses_with_matched_blocks_in_the_workers_unit() -> None:
    d = Decision("http://e1", "us", "best ttft", "kvmesh", matched_blocks=3, total_blocks=8)
    p = Placement(d, Target("http://e1", "http://e1", "us", True), "local", 0.25)
    cfg = KeyConfig((32,))
    back, predicted, ticket, config = placement_of(
        placement_wire(p, 32, 16, (96, 2, True), 7, cfg))
    assert back.target == p.target and back.outcome == "local" and back.load_age == 0.25
    assert back.decision.matched_blocks == 6  # 3 blocks of 32 = 6 of the worker's 16
    assert (back.decision.replica, back.decision.reason, back.decision.total_blocks) == (
        "http://e1", "best ttft", 8)
    assert predicted == [96, 2, True] and ticket == 7 and config == cfg
    none = Placement(Decision(None, None, "no replica", "kvmesh"), None, "none")
    back, predicted, ticket, config = placement_of(placement_wire(none, 16, 16, None))
    assert back.target is None and not back.decision.routed
    assert (predicted, ticket, config) == (None, None, None)


def _registry(served: int, seconds: list[float]) -> CollectorRegistry:
    r = CollectorRegistry()
    c = Counter("kvmesh_router_requests", "answers", ["route", "code"], registry=r)
    c.labels("/v1/chat/completions", "200").inc(served)
    h = Histogram("kvmesh_router_tokenize_seconds", "prep", buckets=(0.001, 0.01), registry=r)
    for s in seconds:
        h.observe(s)
    return r


def _values(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text.decode())
            for s in fam.samples if not s.name.endswith("_created")}


def test_workers_counters_and_histograms_add_into_the_nodes() -> None:
    primary = _registry(3, [0.0005])
    w1, w2 = _registry(4, [0.005, 0.05]), _registry(0, [])
    others: dict = {}
    for w in (w1, w2):
        add_samples(others, samples_wire(w.collect()))
    out = CollectorRegistry(auto_describe=False)

    class Fams:
        def collect(self):  # type: ignore[no-untyped-def]
            return merged(list(primary.collect()), others)

    out.register(Fams())  # type: ignore[arg-type]
    v = _values(generate_latest(out))
    route = (("code", "200"), ("route", "/v1/chat/completions"))
    assert v[("kvmesh_router_requests_total", route)] == 7
    assert v[("kvmesh_router_tokenize_seconds_count", ())] == 3
    assert v[("kvmesh_router_tokenize_seconds_bucket", (("le", "0.001"),))] == 1
    assert v[("kvmesh_router_tokenize_seconds_bucket", (("le", "0.01"),))] == 2
    assert v[("kvmesh_router_tokenize_seconds_bucket", (("le", "+Inf"),))] == 3
    assert abs(v[("kvmesh_router_tokenize_seconds_sum", ())] - 0.0555) < 1e-9
    assert requests_served(samples_wire(w1.collect())) == 4


def test_a_family_only_a_worker_has_is_kept_and_gauges_stay_the_primarys() -> None:
    w = CollectorRegistry()
    Counter("kvmesh_router_retries", "retries", ["kind"], registry=w).labels("connect").inc(2)
    Gauge("kvmesh_router_queue_length", "queue", registry=w).set(5)
    others: dict = {}
    add_samples(others, samples_wire(w.collect()))
    assert "kvmesh_router_queue_length" not in others
    fams = {f.name: f for f in merged([], others)}
    assert [(s.name, s.labels, s.value) for s in fams["kvmesh_router_retries"].samples] == [
        ("kvmesh_router_retries_total", {"kind": "connect"}, 2.0)]
