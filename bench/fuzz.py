"""``kvmesh bench fuzz-http`` and ``kvmesh bench fuzz-decoders``: generated abuse in bulk.

- **fuzz-http** starts two meshed routers (``eu``, ``us``), each in front of a simulated
  engine, and sends ``--requests`` generated HTTP requests (valid, mutated and hostile bodies,
  headers, methods and paths; forged hop headers) with ``--concurrency`` clients, spread over
  both routers. An *unhandled exception* is a 500 answer, a ``Traceback`` or an
  "unexpected error" line in a router's log, or a router that stopped answering.
- **fuzz-decoders** feeds ``--inputs`` generated inputs to every decoder that reads bytes
  from the network: the gossip packet and envelope decoders, the whole gossip receive path
  (frames sealed with the mesh key, so the fuzz reaches past the HMAC), the CRDT delta
  decoders, and the vLLM/SGLang KV-event batch decoder. Each may raise only its one typed
  error; anything else is an unhandled exception.

Both print their counts and write ``results/fuzz_{http,decoders}.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgpack  # type: ignore[import-untyped,unused-ignore]

MODEL = "fuzz-model"
MESH_KEY = "fuzz mesh key of at least 32 bytes"

# ---- generated values ------------------------------------------------------------------

_WEIRD_STR = ["", " ", "a\nb", "\ud800", "\udfff x", "é", "\x00", "🙂" * 3, "a" * 300,
              "<|user|>", "{{ raise }}", "%s%n", "\r\nX-Injected: 1"]
_WEIRD_INT = [0, -1, 1, 2**31, 2**32, 2**32 - 1, 2**63, -(2**63), 2**64, 10**30]


def leaf(rng: random.Random) -> Any:
    k = rng.randrange(8)
    if k == 0:
        return None
    if k == 1:
        return rng.choice([True, False])
    if k == 2:
        return rng.choice(_WEIRD_INT)
    if k == 3:
        return rng.random() * rng.choice([1, 1e300, -1e-300])
    if k == 4:
        return rng.choice(_WEIRD_STR)
    if k == 5:
        return "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(12)))
    if k == 6:
        return rng.randrange(-5, 200_000)
    return f"w{rng.randrange(1000)}"


def tree(rng: random.Random, depth: int = 3) -> Any:
    if depth <= 0 or rng.random() < 0.4:
        return leaf(rng)
    if rng.random() < 0.5:
        return [tree(rng, depth - 1) for _ in range(rng.randrange(5))]
    return {str(leaf(rng)): tree(rng, depth - 1) for _ in range(rng.randrange(5))}


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randrange(1, 5)):
        op = rng.randrange(5)
        if op == 0 and b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            del b[rng.randrange(len(b)):]
        elif op == 2:
            i = rng.randrange(len(b) + 1)
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
        elif op == 3 and b:
            b[rng.randrange(len(b))] = rng.choice([0x00, 0xFF, 0x7F, 0x80, 0xC0, 0xDC, 0xDD])
        elif op == 4 and len(b) > 2:
            i, j = sorted(rng.sample(range(len(b)), 2))
            b[i:i] = b[i:j]
    return bytes(b)


# ---- HTTP cases ------------------------------------------------------------------------

_PATHS = ["/v1/completions", "/v1/chat/completions"] * 8 + [
    "/v1/models", "/health", "/ready", "/metrics", "/mesh/status", "/mesh/gossip",
    "/v1/embeddings", "/", "/v1/completions/../../etc/passwd", "/%ff", "/v1//completions",
]


def _valid_body(rng: random.Random, chat: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": rng.choice([1, 1, 2])}
    text = " ".join(f"w{rng.randrange(500)}" for _ in range(rng.randrange(1, 40)))
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    if rng.random() < 0.3:
        body["stream"] = True
    return body


def _hostile_value(rng: random.Random) -> Any:
    k = rng.randrange(6)
    if k == 0:
        n = rng.choice([50, 2000, 10_000])
        return json.loads("[" * min(n, 900) + "]" * min(n, 900)) if n < 900 else None
    if k == 1:
        return [rng.choice(_WEIRD_INT) for _ in range(rng.randrange(1, 40))]
    if k == 2:
        return [{"role": tree(rng, 1), "content": tree(rng, 2)} for _ in range(rng.randrange(3))]
    return tree(rng)


def http_case(rng: random.Random) -> tuple[str, str, dict[str, str], bytes]:
    """One generated request: (method, path, headers, body)."""
    path = rng.choice(_PATHS)
    method = "POST" if path.startswith("/v1/c") and rng.random() < 0.9 else rng.choice(
        ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
    headers: dict[str, str] = {"Content-Type": rng.choice(
        ["application/json"] * 6 + ["text/plain", "application/x-www-form-urlencoded", ""])}
    chat = "chat" in path
    kind = rng.randrange(10)
    if kind <= 2:
        body = json.dumps(_valid_body(rng, chat)).encode()
    elif kind <= 5:
        obj = _valid_body(rng, chat)
        for _ in range(rng.randrange(1, 3)):
            obj[rng.choice(["model", "prompt", "messages", "max_tokens", "stream", "cache_salt",
                            "user", "max_completion_tokens", "n"])] = _hostile_value(rng)
        try:
            body = json.dumps(obj).encode()
        except (TypeError, ValueError):
            body = b"{}"
    elif kind == 6:
        body = mutate_bytes(json.dumps(_valid_body(rng, chat)).encode(), rng)
    elif kind == 7:
        n = rng.choice([100, 5000, 20000])
        body = (b'{"model": "' + MODEL.encode() + b'", "prompt": ' + b"[" * n + b"]" * n
                + b"}")
    elif kind == 8:
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
    else:
        body = json.dumps(tree(rng)).encode()
    r = rng.random()
    if r < 0.1:
        headers["x-kvmesh-hop"] = rng.choice(["", "1", "2", "x"])
        headers["x-kvmesh-from"] = rng.choice(["router-eu", "evil", "é"])
        headers["x-kvmesh-target"] = rng.choice(["", "http://127.0.0.1:1", "x"])
        headers["x-kvmesh-sig"] = rng.choice(["", "00" * 32, "é" * 10])
        headers["x-kvmesh-ts"] = rng.choice(["", "0", str(int(time.time() * 1000)), "-5", "1e9"])
    elif r < 0.2:
        headers["Content-Encoding"] = rng.choice(["gzip", "deflate", "br", "identity", "x"])
    elif r < 0.35:
        headers[rng.choice(["x-request-id", "x-session-id", "x-user-id", "authorization"])] = \
            rng.choice(["dup", "é", "a" * 500, "k\tv", str(rng.random())])
    return method, path, headers, body


# ---- fuzz-http -------------------------------------------------------------------------


async def fuzz_http_run(requests: int, concurrency: int, seed: int) -> dict[str, Any]:
    from sim.procs import Proc, free_ports, kvmesh_argv, wait_http

    tmp = Path(tempfile.mkdtemp(prefix="kvmesh-fuzz-"))
    procs: list[Proc] = []
    logs: dict[str, Path] = {}
    rports = free_ports(2)
    peers = [f"http://127.0.0.1:{p}" for p in rports]
    try:
        async def start(name: str, argv: list[str]) -> Proc:
            logs[name] = tmp / f"{name}.log"
            p = Proc(name, kvmesh_argv(*argv), logs[name])
            procs.append(p)
            await p.start()
            return p

        routers = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            for region, rport in zip(("eu", "us"), rports, strict=True):
                (eport,) = free_ports(1)
                eng = await start(f"engine-{region}", [
                    "sim-engine", "--port", str(eport), "--model", MODEL, "--speedup", "200",
                    "--log-level", "WARNING"])
                cfg = tmp / f"router-{region}.yaml"
                cfg.write_text(json.dumps({
                    "region": region, "node_id": f"router-{region}",
                    "listen": f"127.0.0.1:{rport}", "peers": peers, "mesh_key": MESH_KEY,
                    "engines": [f"http://127.0.0.1:{eport}"], "log_level": "info",
                    "header_timeout": 5.0, "body_timeout": 10.0}))
                router = await start(f"router-{region}", ["router", "--config", str(cfg)])
                await wait_http(session, f"http://127.0.0.1:{eport}/health", eng, 60.0)
                await wait_http(session, f"http://127.0.0.1:{rport}/ready", router, 60.0)
                routers.append(f"http://127.0.0.1:{rport}")
            statuses: Counter[int] = Counter()
            client_errors: Counter[str] = Counter()
            five_hundreds: list[str] = []
            server_codes: Counter[str] = Counter()
            sent = 0
            rng = random.Random(seed)
            t0 = time.monotonic()

            async def worker(wid: int) -> None:
                nonlocal sent
                wrng = random.Random(rng.randrange(2**63) + wid)
                while sent < requests:
                    sent += 1
                    method, path, headers, body = http_case(wrng)
                    base = routers[sent % len(routers)]
                    try:
                        async with session.request(
                            method, base + path, data=body, headers=headers,
                            timeout=aiohttp.ClientTimeout(total=30),
                        ) as resp:
                            answer = await resp.read()
                            statuses[resp.status] += 1
                            if resp.status >= 500:
                                server_codes[f"{resp.status} {_error_code(answer)}"] += 1
                            if resp.status == 500:
                                five_hundreds.append(f"{method} {path} {body[:120]!r}")
                    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                        client_errors[type(exc).__name__] += 1

            await asyncio.gather(*(worker(i) for i in range(concurrency)))
            elapsed = time.monotonic() - t0
            alive = []
            for base in routers:
                try:
                    async with session.get(f"{base}/health",
                                           timeout=aiohttp.ClientTimeout(total=5)) as resp:
                        alive.append(resp.status == 200)
                except (aiohttp.ClientError, TimeoutError):
                    alive.append(False)
    finally:
        await asyncio.gather(*(p.stop(10.0) for p in procs))
    tracebacks = 0
    unexpected = 0
    for name, path in logs.items():
        if name.startswith("router"):
            text = path.read_text(errors="replace")
            tracebacks += text.count("Traceback")
            unexpected += text.count("unexpected error")
    unhandled = statuses.get(500, 0) + tracebacks + unexpected + alive.count(False)
    return {
        "requests": sum(statuses.values()) + sum(client_errors.values()),
        "answered": sum(statuses.values()),
        "seconds": round(elapsed, 1),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "client_errors": dict(client_errors),
        "server_error_codes": dict(server_codes),
        "five_hundreds": five_hundreds[:20],
        "router_log_tracebacks": tracebacks,
        "router_log_unexpected_errors": unexpected,
        "routers_alive": alive,
        "unhandled_exceptions": unhandled,
        "logs": str(tmp),
    }


def _error_code(answer: bytes) -> str:
    try:
        err = json.loads(answer)["error"]
        return str(err.get("code")) + ": " + str(err.get("message"))[:60]
    except (ValueError, KeyError, TypeError):
        return "?"


def fuzz_http(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="kvmesh bench fuzz-http",
                                 description="generated HTTP requests against two routers")
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    res = asyncio.run(fuzz_http_run(args.requests, args.concurrency, args.seed))
    res["command"] = "kvmesh bench fuzz-http " + " ".join(argv)
    return _report("fuzz_http", res, args.out)


# ---- fuzz-decoders ---------------------------------------------------------------------


Target = tuple[Callable[[bytes], object], tuple[type[Exception], ...], list[bytes]]


def _targets(seed: int) -> dict[str, Target]:
    """name -> (decode, allowed exceptions, valid seed inputs)."""
    from crdt.base import DecodeError
    from crdt.load_vector import LoadVector
    from crdt.lww_map import LWWMap
    from crdt.prefix_index import PrefixIndex
    from kvevents.decode import WireError, decode_batch
    from kvevents.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
    from kvevents.publisher import encode_batch
    from mesh.auth import Authenticator
    from mesh.gossip import MeshCore
    from mesh.messages import (
        Ack,
        Body,
        Envelope,
        MemberUpdate,
        Nack,
        NodeInfo,
        Notice,
        Ping,
        PingReq,
        Push,
        PushAck,
        Status,
        Sync,
        SyncReply,
        decode_envelope,
        encode_envelope,
        unpack,
    )
    from mesh.transport import pack_frames, unpack_frames

    rng = random.Random(seed)
    ix = PrefixIndex()
    ix.reset("http://e1", 1)
    for s in range(1, 6):
        ix.store("http://e1", (1, s), [rng.randrange(2**64) for _ in range(4)])
    loads = LoadVector(node_id="r1")
    loads.report("http://e1", "r1", (1, 1), waiting=1, running=2, kv_usage=0.5,
                 tokens_queued=0, healthy=True, now=0.0)
    meta = LWWMap()
    meta.set("r1", {"region": "eu", "queue": 1}, (1, 1), 0.0)
    states: dict[str, Any] = {"prefix": ix, "load": loads, "meta": meta}
    deltas = {name: st.delta_since({}, 0.0).to_wire() for name, st in states.items()}
    digests = {name: st.digest() for name, st in states.items()}
    me = NodeInfo("r2", "us", "http://127.0.0.1:2")
    sender = NodeInfo("r1", "eu", "http://127.0.0.1:1")
    member = MemberUpdate("r1", "eu", "http://127.0.0.1:1", 1, 0, Status.ALIVE)
    bodies: list[Body] = [Ping(1, "r2"), Ack(1), PingReq(1, "r3", "http://x"), Nack(1),
              Push(1, deltas, digests), PushAck(1, digests, {"prefix": ("x",)}),
              Sync((member,), digests), SyncReply((member,), digests, deltas), Notice()]
    envelopes = [encode_envelope(Envelope(sender, 1, 0, i + 1, int(time.time()), b, (member,),
                                          "r2")) for i, b in enumerate(bodies)]
    key = MESH_KEY.encode()
    auth = Authenticator([key])
    core = MeshCore(me, 1, {"prefix": PrefixIndex(), "load": LoadVector(node_id="r2"),
                            "meta": LWWMap()}, keys=[key], rng=random.Random(seed),
                    now=0.0, wall=time.time)
    clock = [0.0]

    class Refused(Exception):
        """The core refused the frame (counted by reason, as the node does)."""

    counter = [100]

    def receive(data: bytes) -> object:
        clock[0] += 0.001
        # A fresh counter and timestamp where the mutant still has them, so inputs get past
        # the replay window to the decoders and state merges behind it.
        with contextlib.suppress(Exception):
            f = msgpack.unpackb(data, raw=False, strict_map_key=False)
            if type(f) is list and len(f) >= 8 and rng.random() < 0.8:
                counter[0] += 1
                f[6], f[7] = counter[0], int(time.time())
                data = msgpack.packb(f, use_bin_type=True)
        out = core.receive(auth.seal(data), clock[0])
        if core.last_rejection is not None:
            raise Refused(core.last_rejection[0])
        return out

    events: list[KVEvent] = [BlockStored([rng.randrange(2**64) for _ in range(2)], None,
                          list(range(32)), 16, None, "GPU"),
              BlockRemoved([rng.randrange(2**64)], "GPU"), AllBlocksCleared()]
    batches = [encode_batch(events, 1.5, 0, "map"), encode_batch(events, 1.5, 0, "array")]

    def crdt_decoder(name: str) -> Callable[[bytes], object]:
        state = states[name]

        def decode(data: bytes) -> object:
            return state.delta_from_wire(unpack(data))  # unpack: DecodeError if not msgpack

        return decode

    return {
        "gossip.packet": (unpack_frames, (DecodeError,), [pack_frames(envelopes[:3])]),
        "gossip.envelope": (decode_envelope, (DecodeError,), envelopes),
        "gossip.receive(sealed)": (receive, (Refused,), envelopes),
        "crdt.prefix_delta": (crdt_decoder("prefix"), (DecodeError,),
                              [msgpack.packb(deltas["prefix"], use_bin_type=True)]),
        "crdt.load_delta": (crdt_decoder("load"), (DecodeError,),
                            [msgpack.packb(deltas["load"], use_bin_type=True)]),
        "crdt.lww_delta": (crdt_decoder("meta"), (DecodeError,),
                           [msgpack.packb(deltas["meta"], use_bin_type=True)]),
        "kvevents.batch": (decode_batch, (WireError,), batches),
    }


def fuzz_decoders_run(inputs: int, seed: int) -> dict[str, Any]:
    targets = _targets(seed)
    refusal = targets["gossip.receive(sealed)"][1][0]  # its reason is the counter label
    rng = random.Random(seed)
    per = inputs // len(targets) + 1
    out: dict[str, Any] = {}
    total = 0
    unhandled = 0
    t0 = time.monotonic()
    for name, (decode, allowed, seeds) in targets.items():
        tried = rejected = accepted = 0
        crashes: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        examples: list[str] = []
        for i in range(per):
            k = i % 10
            if k < 7:
                data = mutate_bytes(rng.choice(seeds), rng)
            elif k < 9:
                try:
                    data = msgpack.packb(tree(rng, 4), use_bin_type=True)
                except (TypeError, ValueError, OverflowError):
                    data = b"\xc1"
            else:
                data = bytes(rng.randrange(256) for _ in range(rng.randrange(48)))
            tried += 1
            try:
                decode(data)
                accepted += 1
            except allowed as exc:
                rejected += 1
                reasons[str(exc)[:40] if isinstance(exc, refusal) else type(exc).__name__] += 1
            except Exception as exc:  # what the fuzz looks for
                crashes[type(exc).__name__] += 1
                if len(examples) < 5:
                    examples.append(f"{type(exc).__name__}: {exc} <- {data[:80]!r}")
        total += tried
        unhandled += sum(crashes.values())
        out[name] = {"inputs": tried, "accepted": accepted, "rejected": rejected,
                     "rejected_by": dict(reasons.most_common(12)),
                     "unhandled": dict(crashes), "examples": examples}
        print(f"  {name:26s} {tried:>9,} inputs  {accepted:>8,} accepted  "
              f"{rejected:>9,} rejected  {sum(crashes.values())} unhandled", flush=True)
    return {"inputs": total, "seconds": round(time.monotonic() - t0, 1),
            "unhandled_exceptions": unhandled, "targets": out}


def fuzz_decoders(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="kvmesh bench fuzz-decoders",
                                 description="generated inputs to every network decoder")
    ap.add_argument("--inputs", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    res = fuzz_decoders_run(args.inputs, args.seed)
    res["command"] = "kvmesh bench fuzz-decoders " + " ".join(argv)
    return _report("fuzz_decoders", res, args.out)


def _report(name: str, res: dict[str, Any], out_dir: str) -> int:
    print(json.dumps({k: v for k, v in res.items() if k != "targets"}, indent=1))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(res, indent=1))
    print(f"written to {out / (name + '.json')}")
    return 0 if res["unhandled_exceptions"] == 0 else 1
