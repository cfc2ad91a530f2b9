"""``kvmesh bridge``: relay one engine's ZMQ KV events into a Redis Stream, until SIGINT/SIGTERM.

    kvmesh bridge --zmq tcp://ENGINE:5557 [--replay tcp://ENGINE:5558] \\
                  --redis redis://HOST:6379/0 [--stream NAME | --engine URL] [--maxlen N]

The stream is named ``--stream``, else ``kvmesh:kv:<--engine URL>`` (the name a router reads
by default for that engine), else ``kvmesh:kv:<zmq endpoint>``. Bad arguments print one line
and exit with status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

log = logging.getLogger("kvmesh.bridge")


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--zmq", required=True, metavar="ENDPOINT",
                        help="the engine's KV-event PUB endpoint (tcp://host:5557; * binds)")
    parser.add_argument("--replay", metavar="ENDPOINT",
                        help="the engine's replay ROUTER endpoint, used to fill gaps")
    parser.add_argument("--redis", required=True, metavar="URL", help="redis://host:port/db")
    parser.add_argument("--stream", help="stream name (default: from --engine or --zmq)")
    parser.add_argument("--engine", metavar="URL",
                        help="the engine's id in the mesh (its base URL), to name the stream")
    parser.add_argument("--maxlen", type=int, default=100_000,
                        help="approximate entries kept in the stream (XADD MAXLEN ~)")
    parser.add_argument("--topic", help="relay only this exact topic (default: all)")
    parser.add_argument("--bind", action="store_true",
                        help="bind the ZMQ endpoint (engines connect to the bridge)")
    parser.add_argument("--stats-interval", type=float, default=60.0, metavar="SECONDS",
                        help="log counters this often (0: never)")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    parser.set_defaults(func=run)


def stream_name(args: argparse.Namespace) -> str:
    from kvevents.redis_stream import default_stream

    if args.stream:
        return str(args.stream)
    if args.engine:
        return default_stream(args.engine)
    return default_stream(args.zmq.split("://", 1)[-1])


def run(args: argparse.Namespace) -> int:
    problems = []
    if not args.zmq.startswith(("tcp://", "ipc://", "inproc://")):
        problems.append(f"--zmq must be tcp://, ipc:// or inproc://, got {args.zmq!r}")
    if args.replay is not None and not args.replay.startswith(("tcp://", "ipc://", "inproc://")):
        problems.append(f"--replay must be a ZMQ endpoint, got {args.replay!r}")
    if not args.redis.startswith(("redis://", "rediss://", "unix://")):
        problems.append(f"--redis must be redis://, rediss:// or unix://, got {args.redis!r}")
    if args.maxlen < 1:
        problems.append(f"--maxlen must be >= 1, got {args.maxlen}")
    if problems:
        print(f"kvmesh bridge: {problems[0]}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run(serve(args))
    result: int = uvloop.run(serve(args))
    return result


async def serve(args: argparse.Namespace) -> int:
    from kvevents.redis_bridge import RedisBridge

    bridge = RedisBridge(
        args.zmq,
        args.redis,
        stream_name(args),
        replay_endpoint=args.replay,
        maxlen=args.maxlen,
        topic=args.topic,
        bind=True if args.bind else None,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(bridge.run())
    log.info("relaying %s -> %s stream %s", args.zmq, args.redis, bridge.stream)
    stopper = asyncio.create_task(stop.wait())
    try:
        while not task.done() and not stop.is_set():
            interval = args.stats_interval if args.stats_interval > 0 else None
            await asyncio.wait(
                {task, stopper}, timeout=interval, return_when=asyncio.FIRST_COMPLETED
            )
            if interval is not None and not task.done() and not stop.is_set():
                t = bridge.relay.tracker
                log.info(
                    "written=%d pending=%d dropped=%d gaps=%d replays=%d restarts=%d "
                    "malformed=%d redis_errors=%d",
                    bridge.written, bridge.pending, bridge.dropped, t.gaps, t.replays,
                    t.restarts, bridge.relay.malformed, bridge.redis_errors,
                )
    finally:
        stopper.cancel()
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if task.cancelled():
        return 0
    exc = task.exception()
    if exc is not None:
        log.error("bridge stopped: %s", exc)
        return 1
    return 0
