"""``kvmesh sim-engine``: a simulated vLLM engine (OpenAI HTTP API + ZMQ KV events)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal

import zmq

from kvevents.publisher import ZmqEventPublisher
from sim.engine_model import EngineConfig, EngineModel
from sim.profiles import DEFAULT_PROFILE, PROFILES, get_profile
from sim.server import SimEngineServer, serve_forever

log = logging.getLogger("kvmesh.sim-engine")


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def register(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--host", default="127.0.0.1", help="HTTP listen address (default 127.0.0.1)")
    a("--port", type=int, default=8000, help="HTTP port (default 8000; 0 = any free port)")
    a("--model", default="meta-llama/Llama-3.1-8B-Instruct", help="served model name")
    a("--profile", default=DEFAULT_PROFILE, choices=sorted(PROFILES), help="hardware profile")
    a("--speedup", type=_positive_float, default=1.0, help="divide every duration by X")
    a("--seed", type=int, default=0, help="seed of the generated text")
    a("--hash-seed", default=os.environ.get("PYTHONHASHSEED", "0"),
      help="seed string of the block hash chain, like vLLM's PYTHONHASHSEED "
      "(default: $PYTHONHASHSEED or '0')")  # fmt: skip
    a("--num-gpu-blocks", type=_positive_int, help="KV cache capacity in blocks")
    a("--block-size", type=_positive_int, default=16, help="tokens per KV block")
    a("--max-num-seqs", type=_positive_int, help="max running sequences")
    a("--max-num-batched-tokens", type=_positive_int, help="token budget per step")
    a("--max-model-len", type=_positive_int, help="max prompt + output tokens")
    a("--no-chunked-prefill", action="store_true", help="disable chunked prefill")
    ev = parser.add_argument_group("KV events (vLLM's --kv-events-config)")
    ev.add_argument("--kv-events-endpoint", help="PUB endpoint, e.g. tcp://*:5557 (off if unset)")
    ev.add_argument("--replay-endpoint", help="ROUTER endpoint for replay, e.g. tcp://*:5558")
    ev.add_argument("--kv-events-mode", choices=["auto", "bind", "connect"], default="auto",
                    help="bind or connect the PUB socket; auto = vLLM's rule (bind if the "
                    "endpoint has '*' or '::' or is ipc/inproc)")  # fmt: skip
    ev.add_argument("--event-format", choices=["map", "array"], default="map",
                    help="events as maps (vLLM after #42892) or arrays (<= v0.23)")  # fmt: skip
    ev.add_argument("--hash-bytes", action="store_true",
                    help="send hashes as 32-byte bin instead of uint64")  # fmt: skip
    ev.add_argument("--topic", default="", help="frame 0 of every message (default '')")
    ev.add_argument("--buffer-steps", type=_positive_int, default=10_000,
                    help="batches kept for replay")  # fmt: skip
    ev.add_argument("--hwm", type=_positive_int, default=100_000, help="PUB high-water mark")
    ev.add_argument("--replay-without-topic", action="store_true",
                    help="replay frames without the topic (vLLM before #45177)")  # fmt: skip
    a("--log-level", default="INFO", help="logging level")
    parser.set_defaults(func=run)


def build(args: argparse.Namespace) -> SimEngineServer:
    profile = get_profile(args.profile)
    config = EngineConfig(
        num_gpu_blocks=args.num_gpu_blocks,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        enable_chunked_prefill=not args.no_chunked_prefill,
        hash_seed=args.hash_seed,
    )
    engine = EngineModel(profile, config, seed=args.seed)
    publisher = None
    if args.kv_events_endpoint:
        publisher = ZmqEventPublisher(
            args.kv_events_endpoint,
            replay_endpoint=args.replay_endpoint,
            topic=args.topic,
            buffer_steps=args.buffer_steps,
            hwm=args.hwm,
            event_format=args.event_format,
            hash_bytes=args.hash_bytes,
            replay_with_topic=not args.replay_without_topic,
            mode=args.kv_events_mode,
        )
    elif args.replay_endpoint:
        raise ValueError("--replay-endpoint needs --kv-events-endpoint")
    return SimEngineServer(engine, args.model, publisher, speedup=args.speedup)


async def _main(args: argparse.Namespace) -> None:
    server = build(args)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(serve_forever(server, args.host, args.port, stop))
    while server.port is None and not task.done():
        await asyncio.sleep(0.01)
    if server.port is not None:
        pub = server.publisher
        log.info(
            "sim-engine %s (%s) serving http://%s:%d; kv events %s replay %s",
            args.model,
            args.profile,
            args.host,
            server.port,
            pub.endpoint if pub else "off",
            pub.replay_endpoint if pub else "off",
        )
    await task
    log.info("sim-engine stopped")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        import uvloop

        uvloop.run(_main(args))
    except (ValueError, OSError, zmq.ZMQError) as exc:
        log.error("%s", exc)
        return 2
    return 0
