"""``kvmesh router --config FILE``: run one router node (on uvloop) until SIGINT/SIGTERM.

Precedence: the YAML file, then ``KVMESH_<KEY>`` variables, then these flags. A bad
configuration prints one line naming the key and exits with status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence

import yaml

from mesh.config import ConfigError, RouterConfig, load
from mesh.heap import settle

log = logging.getLogger("kvmesh.router")


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML configuration file")
    parser.add_argument("--region", help="this router's region")
    parser.add_argument("--listen", help="host:port to serve on")
    parser.add_argument("--advertise", help="URL peers use to reach this router")
    parser.add_argument("--node-id", dest="node_id", help="unique router id")
    parser.add_argument(
        "--engine", action="append", metavar="URL[,KV_EVENTS[,REPLAY]]",
        help="a local engine (repeatable; replaces the file's list)",
    )
    parser.add_argument("--peer", action="append", metavar="URL",
                        help="a seed router URL (repeatable; replaces the file's list)")
    parser.add_argument("--mesh-key", dest="mesh_key", help="shared key that signs mesh traffic")
    parser.add_argument("--policy", help="routing policy name")
    parser.add_argument("--policy-param", action="append", metavar="KEY=VALUE",
                        help="a policy parameter (repeatable; YAML value)")
    parser.add_argument("--tokenizer", help="'builtin', 'hf:<path>' or 'engine:<engine URL>'")
    parser.add_argument("--block-size", dest="block_size", type=int, help="KV block size")
    parser.add_argument("--rtt", action="append", metavar="REGION=SECONDS",
                        help="static round trip to a region (repeatable)")
    parser.add_argument("--emulate-rtt", dest="emulate_rtt", action="append",
                        metavar="REGION=SECONDS",
                        help="add this round trip to forwards into REGION (demo; repeatable)")
    parser.add_argument("--seed", type=int, help="seed for the router's RNG")
    parser.add_argument("--workers", type=int,
                        help="processes serving the port (SO_REUSEPORT); 1: one process")
    parser.add_argument("--log-level", dest="log_level",
                        choices=["debug", "info", "warning", "error"])
    parser.set_defaults(func=run)


def _pairs(items: Sequence[str] | None, key: str) -> dict[str, object] | None:
    if not items:
        return None
    out: dict[str, object] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(key, f"expected NAME=VALUE, got {item!r}")
        try:
            out[name] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[name] = value
    return out


def overrides(args: argparse.Namespace) -> dict[str, object]:
    out: dict[str, object] = {}
    for key in ("region", "listen", "advertise", "node_id", "mesh_key", "policy", "tokenizer",
                "block_size", "seed", "log_level", "workers"):
        value = getattr(args, key, None)
        if value is not None:
            out[key] = value
    if args.engine:
        engines = []
        for spec in args.engine:
            parts = spec.split(",")
            eng: dict[str, object] = {"url": parts[0]}
            if len(parts) > 1 and parts[1]:
                eng["kv_events"] = parts[1]
            if len(parts) > 2 and parts[2]:
                eng["replay"] = parts[2]
            engines.append(eng)
        out["engines"] = engines
    if args.peer:
        out["peers"] = list(args.peer)
    params = _pairs(args.policy_param, "policy_params")
    if params is not None:
        out["policy_params"] = params
    for key in ("rtt", "emulate_rtt"):
        pairs = _pairs(getattr(args, key), key)
        if pairs is not None:
            out[key] = pairs
    return out


def run(args: argparse.Namespace) -> int:
    try:
        config = load(args.config, overrides(args))
    except ConfigError as exc:
        print(f"kvmesh router: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run(serve(config))
    result: int = uvloop.run(serve(config))
    return result


async def serve(config: RouterConfig) -> int:
    from mesh.router import build_router

    try:
        router = build_router(config)
    except ValueError as exc:
        print(f"kvmesh router: configuration error: {exc}", file=sys.stderr)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    picker = None
    if config.endpoint_picker is not None:
        from mesh.picker_server import PickerServer

        picker = PickerServer(router, config.endpoint_picker)
    pool = None
    try:
        await router.start()
        if picker is not None:
            await picker.start()
        if config.workers > 1:
            from mesh.workers import WorkerPool

            pool = WorkerPool(router)
            await pool.start()
    except OSError as exc:
        log.error("cannot start: %s", exc)
        if pool is not None:
            await pool.stop()
        if picker is not None:
            await picker.stop()
        await router.stop()
        return 1
    log.debug("%d startup objects set aside from garbage collection", settle())
    await stop.wait()
    log.info("shutting down")
    if pool is not None:
        await pool.stop()
    if picker is not None:
        await picker.stop()
    await router.stop()
    return 0
