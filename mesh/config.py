"""Router configuration: a YAML file, then ``KVMESH_<KEY>`` variables, then flags.

Every problem is one :class:`ConfigError` that names the offending key, so
``kvmesh router`` can print one line and exit with status 2. ``${NAME}`` in a string
value of the file is replaced by the environment variable ``NAME`` (a missing variable
is an error naming the key). Policy parameters are checked by building the policy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

import yaml

from mesh.auth import MIN_KEY_LEN, parse_key
from mesh.client_auth import ApiKey
from mesh.picker_config import PickerConfig, PickerConfigError
from mesh.picker_config import parse as parse_picker
from mesh.policies import DEFAULT_POLICY, PolicyError, make_policy
from mesh.tier_config import TierConfigError, tier_name
from mesh.tier_config import parse as parse_tiers
from mesh.tiers import TierConfig


class ConfigError(ValueError):
    """Invalid configuration; the message starts with the key at fault."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key


@dataclass(frozen=True, slots=True)
class EngineConfig:
    url: str
    """The engine's OpenAI-compatible base URL; also the replica's id across the mesh."""
    kv_events: str | None = None
    """ZMQ endpoint (``tcp://host:5557``) or Redis stream URL (``redis://host:6379/0#stream``)."""
    replay: str | None = None
    """ZMQ replay (ROUTER) endpoint for gap recovery, if the engine offers one."""
    prefill_rate: float | None = None
    """Prefill tokens/s of the engine's profile (the kvmesh cost model); None: policy default."""
    first_byte_timeout: float | None = None
    """This engine's own time-to-first-byte limit (else the router's ``first_byte_timeout``)."""
    data_parallel_size: int = 1
    """Data-parallel ranks: rank r publishes on the ``kv_events`` and ``replay`` ports + r."""


@dataclass(frozen=True, slots=True)
class RouterConfig:
    region: str
    listen: str = "0.0.0.0:8000"
    node_id: str = ""
    advertise: str = ""
    engines: tuple[EngineConfig, ...] = ()
    peers: tuple[str, ...] = ()
    mesh_key: str | None = None
    """The key that signs this router's gossip and forwards (the first of ``mesh_keys``)."""
    mesh_keys: tuple[str, ...] = ()
    """Every key accepted from peers: during a rotation, the new key first, then the old."""
    policy: str = DEFAULT_POLICY
    policy_params: Mapping[str, object] = field(default_factory=dict)
    tokenizer: str = "builtin"
    block_size: int | None = None
    """Expected KV block size; None (the default): learned per engine from its events."""
    health_interval: float = 0.1
    """Seconds between engine /health + /metrics scrapes."""
    health_timeout: float = 1.0
    connect_timeout: float = 2.0
    request_timeout: float = 600.0
    max_attempts: int = 3
    """Dispatch attempts per request (retries before the first byte on the next-best target)."""
    max_queue: int = 10_000
    """Requests allowed to wait in this router's FCFS queue (selective pushing); then 503."""
    warm_timeout: float = 30.0
    """Longest ``/ready`` waits for a warm index (engines covered, a peer's snapshot), seconds."""
    rtt: Mapping[str, float] = field(default_factory=dict)
    """Static round-trip estimates to other regions, seconds (used until measured)."""
    emulate_rtt: Mapping[str, float] = field(default_factory=dict)
    """User-space emulated round trip added to forwards into each region, seconds (demo)."""
    gossip: Mapping[str, object] = field(default_factory=dict)
    """Options handed to the gossip node as they are."""
    seed: int | None = None
    log_level: str = "info"
    endpoint_picker: PickerConfig | None = None
    """Serve the gateway endpoint-picker protocol (ext_proc over gRPC) too; docs/gateway.md."""
    # -- the client-facing edge (mesh.http_guard, mesh.prepare, mesh.forward_auth) --
    max_body_bytes: int = 64 * 1024 * 1024
    """Larger request bodies are refused with 413 (a declared Content-Length at once)."""
    header_timeout: float = 10.0
    """Seconds from a request's first byte to its complete headers; then the connection closes."""
    body_timeout: float = 60.0
    """Seconds to receive a whole request body; then 408 and the connection closes."""
    idle_timeout: float = 75.0
    """Seconds a keep-alive connection may sit idle between requests."""
    prepare_workers: int = 1
    """Worker processes (threads with ``prepare_in: thread``) for large request bodies."""
    max_preparing: int = 64
    """Requests being prepared (or waiting for a worker) at once; beyond that 503."""
    prepare_in: str = "process"
    """``process``: worker processes parse and tokenize bodies over ``prepare_inline_bytes``
    (the event loop never waits on the interpreter lock for them); ``thread``: threads of
    the router's process for every body."""
    prepare_inline_bytes: int = 256 * 1024
    """Bodies up to this size are prepared in a thread of the router, not a worker process."""
    forward_window: float = 30.0
    """A signed forward is accepted this many seconds around its timestamp, once."""
    first_byte_timeout: float = 120.0
    """Seconds a dispatch may wait for its first body byte; then the next-best target."""
    outlier_consecutive_failures: int = 5
    """Failed dispatches in a row (5xx, no first byte, reset) that eject a replica here."""
    outlier_ejection: float = 10.0
    """First ejection, seconds; doubles on each repeat up to ``outlier_max_ejection``."""
    outlier_max_ejection: float = 300.0
    api_keys: tuple[ApiKey, ...] = ()
    """Client keys for ``/v1/`` (``Authorization: Bearer``), each with an optional rate limit;
    none: the API is open."""
    tls_cert: str | None = None
    """PEM certificate chain: the listener serves HTTPS (clients and peers) when set."""
    tls_key: str | None = None
    tls_ca: str | None = None
    """PEM CA bundle that peers' certificates are verified against (and engines', with the
    system's)."""
    tls_peer_mtls: bool = False
    """Peers authenticate with a certificate from ``tls_ca``: gossip and forwards without
    one are refused (clients need none)."""
    plan_file: str | None = None
    """A ``kvmesh plan`` JSON whose targets the router exports (``kvmesh_plan_target_replicas``)."""
    workers: int = 1
    """Processes serving the listening port (SO_REUSEPORT); 1: one process, as always.
    With more, the primary holds the mesh state and decides; see ``mesh/workers.py``."""
    tiers: TierConfig = field(default_factory=TierConfig)
    """Service tiers: SLOs, shedding, per-key defaults (``mesh.tier_config``)."""

    @property
    def host(self) -> str:
        return split_hostport(self.listen, "listen")[0]

    @property
    def port(self) -> int:
        return split_hostport(self.listen, "listen")[1]


KEYS = tuple(f.name for f in fields(RouterConfig))
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_LOG_LEVELS = {"debug", "info", "warning", "error"}


def split_hostport(value: str, key: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(key, f"expected host:port, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _http_url(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"expected an http(s) URL, got {value!r}")
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ConfigError(key, f"expected an http(s) URL, got {value!r}")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise ConfigError(key, f"bad port in {value!r}") from None
    return value.rstrip("/")


def _event_source(value: object, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"expected a ZMQ endpoint or a Redis URL, got {value!r}")
    scheme = value.split("://", 1)[0] if "://" in value else ""
    if scheme not in {"tcp", "ipc", "inproc", "redis", "rediss", "unix"}:
        raise ConfigError(key, f"expected tcp://, ipc:// or redis:// endpoint, got {value!r}")
    return value


def _mesh_keys(value: object) -> tuple[str, ...]:
    """``mesh_key``: one key, or a list for rotation (the first signs, all are accepted)."""
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ConfigError("mesh_key", "an empty list; give at least one key")
    keys = []
    for i, item in enumerate(items):
        where = "mesh_key" if not isinstance(value, list) else f"mesh_key[{i}]"
        key = _string(item, where)
        try:
            key_bytes = parse_key(key)
        except ValueError as exc:
            raise ConfigError(where, f"cannot decode: {exc}") from None
        if len(key_bytes) < MIN_KEY_LEN:
            raise ConfigError(where, f"must be at least {MIN_KEY_LEN} bytes long")
        keys.append(key)
    return tuple(keys)


def _string(value: object, key: str, *, allow_empty: bool = False) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or (not value and not allow_empty):
        raise ConfigError(key, f"expected a non-empty string, got {value!r}")
    return value


def _number(value: object, key: str, *, integer: bool = False, minimum: float = 0) -> Any:
    if isinstance(value, str):
        with contextlib.suppress(yaml.YAMLError):
            value = yaml.safe_load(value)
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(key, f"expected {kind} >= {minimum:g}, got {value!r}")
    if (integer and not isinstance(value, int)) or value < minimum or value != value:
        raise ConfigError(key, f"expected {kind} >= {minimum:g}, got {value!r}")
    return int(value) if integer else float(value)


def _mapping(value: object, key: str) -> dict[str, object]:
    if value is None:
        return {}
    if isinstance(value, str):
        value = _parse_structured(value, key)
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ConfigError(key, f"expected a mapping, got {value!r}")
    return dict(value)


def _region_seconds(value: object, key: str) -> dict[str, float]:
    return {k: _number(v, f"{key}.{k}") for k, v in _mapping(value, key).items()}


def _parse_structured(text: str, key: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(key, f"not valid YAML or JSON: {exc}") from None


def _engines(value: object) -> tuple[EngineConfig, ...]:
    if isinstance(value, str):
        value = _parse_structured(value, "engines")
    if value is None:
        return ()
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise ConfigError("engines", f"expected a list of engines, got {value!r}")
    out = []
    seen = set()
    for i, item in enumerate(value):
        key = f"engines[{i}]"
        if isinstance(item, str):
            item = {"url": item}
        if not isinstance(item, Mapping):
            raise ConfigError(key, f"expected a mapping with 'url', got {item!r}")
        unknown = set(item) - {"url", "kv_events", "replay", "prefill_rate",
                               "first_byte_timeout", "data_parallel_size"}
        if unknown:
            raise ConfigError(f"{key}.{sorted(unknown)[0]}", "unknown engine key "
                              "(known: url, kv_events, replay, prefill_rate, "
                              "first_byte_timeout, data_parallel_size)")
        if "url" not in item:
            raise ConfigError(f"{key}.url", "missing")
        url = _http_url(item["url"], f"{key}.url")
        if url in seen:
            raise ConfigError(f"{key}.url", f"engine {url} is listed twice")
        seen.add(url)
        ev = item.get("kv_events")
        rp = item.get("replay")
        rate = item.get("prefill_rate")
        ttfb = item.get("first_byte_timeout")
        out.append(
            EngineConfig(
                url=url,
                kv_events=_event_source(ev, f"{key}.kv_events") if ev is not None else None,
                replay=_event_source(rp, f"{key}.replay") if rp is not None else None,
                prefill_rate=(
                    _number(rate, f"{key}.prefill_rate", minimum=1e-9)
                    if rate is not None else None
                ),
                first_byte_timeout=(
                    _number(ttfb, f"{key}.first_byte_timeout", minimum=0.001)
                    if ttfb is not None else None
                ),
                data_parallel_size=_number(item.get("data_parallel_size", 1),
                                           f"{key}.data_parallel_size", integer=True, minimum=1),
            )
        )
    return tuple(out)


def _peers(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [p for p in value.replace(",", " ").split() if p]
    if value is None:
        return ()
    if not isinstance(value, Sequence):
        raise ConfigError("peers", f"expected a list of router URLs, got {value!r}")
    return tuple(_http_url(p, f"peers[{i}]") for i, p in enumerate(value))


def _expand(value: object, key: str, env: Mapping[str, str]) -> object:
    if isinstance(value, str):
        def sub(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in env:
                raise ConfigError(key, f"environment variable {name} is not set")
            return env[name]

        return _ENV_REF.sub(sub, value)
    if isinstance(value, list):
        return [_expand(v, f"{key}[{i}]", env) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _expand(v, f"{key}.{k}", env) for k, v in value.items()}
    return value


def read_file(path: str, env: Mapping[str, str] | None = None) -> dict[str, object]:
    env = os.environ if env is None else env
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError("config", f"{path} is not valid YAML: {exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError("config", f"{path} must hold a mapping of keys")
    return {str(k): _expand(v, str(k), env) for k, v in raw.items()}


def from_env(env: Mapping[str, str]) -> dict[str, object]:
    """``KVMESH_<KEY>`` for every key (``KVMESH_MESH_KEY``, ``KVMESH_PEERS``=a,b ...)."""
    out: dict[str, object] = {}
    for key in KEYS:
        name = f"KVMESH_{key.upper()}"
        if name in env:
            out[key] = env[name]
    return out


def build(raw: Mapping[str, object]) -> RouterConfig:
    """Validate merged raw values into a ``RouterConfig``."""
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise ConfigError(unknown[0], f"unknown key (known: {', '.join(KEYS)})")
    if raw.get("region") in (None, ""):
        raise ConfigError("region", "missing: every router belongs to a region")
    region = _string(raw["region"], "region")
    listen = _string(raw.get("listen", "0.0.0.0:8000"), "listen")
    host, port = split_hostport(listen, "listen")
    policy = raw.get("policy", DEFAULT_POLICY)
    params = _mapping(raw.get("policy_params"), "policy_params")
    if isinstance(policy, Mapping):
        # policy: {name: kvmesh, prefill_rate: 4000} is the same as policy + policy_params.
        policy = dict(policy)
        name = policy.pop("name", None)
        params = {**policy, **params}
        policy = name
    policy = _string(policy, "policy")
    try:
        make_policy(policy, params)
    except PolicyError as exc:
        msg = str(exc)
        key, _, problem = msg.partition(": ")
        raise ConfigError(key, problem) from None
    advertise = raw.get("advertise") or ""
    if advertise:
        advertise = _http_url(advertise, "advertise")
    else:
        adv_host = host if host not in {"0.0.0.0", "::", ""} else "127.0.0.1"
        advertise = f"http://{adv_host}:{port}"
    node_id = _string(raw.get("node_id") or f"{region}-{socket.gethostname()}-{port}", "node_id")
    mesh_keys = _mesh_keys(raw.get("mesh_key"))
    mesh_key = mesh_keys[0] if mesh_keys else None
    if raw.get("peers") and mesh_key is None:
        raise ConfigError("mesh_key", "required when peers are set (it signs mesh traffic)")
    log_level = _string(raw.get("log_level", "info"), "log_level").lower()
    if log_level not in _LOG_LEVELS:
        raise ConfigError("log_level", f"expected one of {sorted(_LOG_LEVELS)}, got {log_level!r}")
    seed = raw.get("seed")
    tokenizer = _string(raw.get("tokenizer", "builtin"), "tokenizer")
    if not (tokenizer == "builtin" or (tokenizer.startswith("hf:") and len(tokenizer) > 3)
            or tokenizer.startswith(("engine:http://", "engine:https://"))):
        raise ConfigError(
            "tokenizer",
            f"expected 'builtin', 'hf:<path>' or 'engine:<engine URL>', got {tokenizer!r}",
        )
    picker_raw = raw.get("endpoint_picker")
    if isinstance(picker_raw, str):
        picker_raw = _parse_structured(picker_raw, "endpoint_picker")
    try:
        picker = parse_picker(picker_raw)
    except PickerConfigError as exc:
        raise ConfigError(exc.key, str(exc).partition(": ")[2]) from None
    d = RouterConfig(region="x")
    config = RouterConfig(
        region=region,
        listen=listen,
        node_id=node_id,
        advertise=advertise,
        engines=_engines(raw.get("engines")),
        peers=_peers(raw.get("peers")),
        mesh_key=mesh_key,
        mesh_keys=mesh_keys,
        policy=policy,
        policy_params=params,
        tokenizer=tokenizer,
        block_size=(None if raw.get("block_size") is None else
                    _number(raw.get("block_size"), "block_size", integer=True, minimum=1)),
        health_interval=_number(raw.get("health_interval", d.health_interval),
                                "health_interval", minimum=0.001),
        health_timeout=_number(raw.get("health_timeout", d.health_timeout), "health_timeout",
                               minimum=0.001),
        connect_timeout=_number(raw.get("connect_timeout", d.connect_timeout),
                                "connect_timeout", minimum=0.001),
        request_timeout=_number(raw.get("request_timeout", d.request_timeout),
                                "request_timeout", minimum=0.001),
        max_attempts=_number(raw.get("max_attempts", d.max_attempts), "max_attempts",
                             integer=True, minimum=1),
        max_queue=_number(raw.get("max_queue", d.max_queue), "max_queue", integer=True),
        warm_timeout=_number(raw.get("warm_timeout", d.warm_timeout), "warm_timeout"),
        rtt=_region_seconds(raw.get("rtt"), "rtt"),
        emulate_rtt=_region_seconds(raw.get("emulate_rtt"), "emulate_rtt"),
        gossip=_mapping(raw.get("gossip"), "gossip"),
        seed=None if seed is None else _number(seed, "seed", integer=True),
        log_level=log_level,
        endpoint_picker=picker,
        **_edge(raw, d),
        plan_file=_plan_file(raw.get("plan_file")),
        workers=_workers(raw.get("workers", d.workers)),
    )
    return _with_tiers(config, raw)


def _with_tiers(config: RouterConfig, raw: Mapping[str, object]) -> RouterConfig:
    """``config`` with its ``tiers`` section parsed (API keys' ``tier`` fields included)."""
    value = raw.get("tiers")
    if isinstance(value, str):
        value = _parse_structured(value, "tiers")
    names = {k.name for k in config.api_keys}
    by_key = {k.name: k.tier for k in config.api_keys if k.tier is not None}
    try:
        tiers = parse_tiers(value, by_key)
    except TierConfigError as exc:
        raise ConfigError(exc.key, str(exc).partition(": ")[2]) from None
    unknown = sorted(set(tiers.keys) - names)
    if unknown:
        raise ConfigError(f"tiers.keys.{unknown[0]}", "no API key has this name")
    return dataclasses.replace(config, tiers=tiers)


MAX_WORKERS = 64


def _workers(value: object) -> int:
    n: int = _number(value, "workers", integer=True, minimum=1)
    if n > MAX_WORKERS:
        raise ConfigError("workers", f"at most {MAX_WORKERS}, got {n}")
    return n


def _edge(raw: Mapping[str, object], d: RouterConfig) -> dict[str, Any]:
    """The client-facing edge's limits and timeouts."""
    out: dict[str, Any] = {}
    for key in ("header_timeout", "body_timeout", "idle_timeout", "forward_window",
                "first_byte_timeout", "outlier_ejection", "outlier_max_ejection"):
        out[key] = _number(raw.get(key, getattr(d, key)), key, minimum=0.001)
    for key in ("max_body_bytes", "prepare_workers", "max_preparing",
                "outlier_consecutive_failures", "prepare_inline_bytes"):
        out[key] = _number(raw.get(key, getattr(d, key)), key, integer=True, minimum=1)
    out["api_keys"] = _api_keys(raw.get("api_keys"))
    prepare_in = _string(raw.get("prepare_in", d.prepare_in), "prepare_in")
    if prepare_in not in {"process", "thread"}:
        raise ConfigError("prepare_in", f"expected process or thread, got {prepare_in!r}")
    out["prepare_in"] = prepare_in
    for key in ("tls_cert", "tls_key", "tls_ca"):
        value = raw.get(key)
        if value is not None:
            path = _string(value, key)
            if not os.path.isfile(path):
                raise ConfigError(key, f"no such file: {path}")
            out[key] = path
    mtls = raw.get("tls_peer_mtls", False)
    if isinstance(mtls, str):
        mtls = mtls.strip().lower() in {"1", "true", "yes", "on"}
    if not isinstance(mtls, bool):
        raise ConfigError("tls_peer_mtls", f"expected true or false, got {mtls!r}")
    out["tls_peer_mtls"] = mtls
    if ("tls_cert" in out) != ("tls_key" in out):
        raise ConfigError("tls_key" if "tls_cert" in out else "tls_cert",
                          "tls_cert and tls_key go together")
    if mtls and ("tls_cert" not in out or "tls_ca" not in out):
        raise ConfigError("tls_peer_mtls", "needs tls_cert, tls_key and tls_ca")
    return out


def _api_keys(value: object) -> tuple[ApiKey, ...]:
    """``api_keys``: a list of keys, or of ``{key, name, rate, burst}``."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = _parse_structured(value, "api_keys")
        if isinstance(value, str):
            value = [k for k in value.replace(",", " ").split() if k]
    if not isinstance(value, list):
        raise ConfigError("api_keys", f"expected a list of keys, got {value!r}")
    out = []
    names = set()
    for i, item in enumerate(value):
        where = f"api_keys[{i}]"
        if isinstance(item, str):
            item = {"key": item}
        if not isinstance(item, Mapping):
            raise ConfigError(where, f"expected a key or a mapping with 'key', got {item!r}")
        unknown = set(item) - {"key", "name", "rate", "burst", "tier"}
        if unknown:
            raise ConfigError(f"{where}.{sorted(unknown)[0]}",
                              "unknown key (known: key, name, rate, burst, tier)")
        tier = item.get("tier")
        if tier is not None:
            try:
                tier = tier_name(tier, f"{where}.tier")
            except TierConfigError as exc:
                raise ConfigError(exc.key, str(exc).partition(": ")[2]) from None
        key = _string(item.get("key"), f"{where}.key")
        if len(key) < 16:
            raise ConfigError(f"{where}.key", "must be at least 16 characters")
        name = _string(item.get("name", f"key{i}"), f"{where}.name")
        if name in names:
            raise ConfigError(f"{where}.name", f"{name!r} is used twice")
        names.add(name)
        rate, burst = item.get("rate"), item.get("burst")
        out.append(ApiKey(
            key, name,
            None if rate is None else _number(rate, f"{where}.rate", minimum=1e-6),
            None if burst is None else _number(burst, f"{where}.burst", minimum=1),
            tier,
        ))
    return tuple(out)


def _plan_file(value: object) -> str | None:
    if value in (None, ""):
        return None
    path = _string(value, "plan_file")
    from mesh.demand import PlanFileError, PlanTargets

    try:
        PlanTargets.from_file(path)
    except PlanFileError as exc:
        raise ConfigError("plan_file", str(exc)) from None
    return path


def load(
    path: str | None = None,
    overrides: Mapping[str, object] | None = None,
    env: Mapping[str, str] | None = None,
) -> RouterConfig:
    """File, then ``KVMESH_*`` variables, then ``overrides`` (the command-line flags)."""
    env = os.environ if env is None else env
    raw: dict[str, object] = read_file(path, env) if path else {}
    raw.update(from_env(env))
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return build(raw)
