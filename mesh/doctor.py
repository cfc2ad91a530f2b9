"""``kvmesh doctor --config FILE``: check a router configuration against the live engines.

For each configured engine it asks the engine itself and prints every problem with its fix:

- the engine answers ``/health`` and ``/v1/models`` (and which models it serves; engines that
  serve different models are named);
- its KV events are on (vLLM's ``/kv_event_sources``), the replay endpoint answers, and the
  events carry a block size (the one the router will use; a configured ``block_size`` that
  disagrees is a problem);
- the router's tokenizer gives the same token ids as the engine's ``/tokenize`` on a sample
  completion prompt and a sample chat;
- with the probe (on by default; ``--no-probe`` to skip): one small completion to the engine
  checks that it reports ``usage.prompt_tokens_details.cached_tokens`` (the self-check needs
  ``--enable-prompt-tokens-details`` on vLLM, ``--enable-cache-report`` on SGLang), and that its
  store events arrive on the configured endpoint.

The checks are plain async functions returning :class:`Finding` lists; ``cli.doctor`` prints
them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp

from kvevents.decode import RawMessage, WireError, decode_batch_generic, split_message
from kvevents.events import BlockStored
from kvevents.tokenizers.factory import AsyncTokenizer, make_tokenizer
from mesh.config import EngineConfig, RouterConfig

OK, WARN, PROBLEM = "ok", "warning", "problem"

SAMPLE_PROMPT = ("kvmesh doctor checks that the router and the engine cut this sentence into "
                 "the same tokens, numbers 12345 and all.")
SAMPLE_CHAT = [{"role": "system", "content": "You are a careful assistant."},
               {"role": "user", "content": "Which engine holds my prefix? " + SAMPLE_PROMPT}]


@dataclass(frozen=True, slots=True)
class Finding:
    level: str
    engine: str
    what: str
    fix: str = ""

    def render(self) -> str:
        head = {OK: "  ok      ", WARN: "  warning ", PROBLEM: "  PROBLEM "}[self.level]
        line = f"{head}{self.engine}: {self.what}"
        return f"{line}\n            fix: {self.fix}" if self.fix else line


async def _get(s: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with s.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
        body = await resp.read()
        try:
            return resp.status, json.loads(body) if body else None
        except ValueError:
            return resp.status, None


async def _post(s: aiohttp.ClientSession, url: str, body: Any, timeout: float = 30) -> Any:
    async with s.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url} answered {resp.status}: {(await resp.text())[:200]}")
        return await resp.json(content_type=None)


def _stored_sizes(payload: bytes) -> list[int]:
    try:
        batch = decode_batch_generic(payload)
    except WireError:
        return []
    return [ev.block_size for ev in batch.events if isinstance(ev, BlockStored) and ev.token_ids]


async def _replay_sizes(endpoint: str, timeout: float) -> tuple[bool, list[int]]:
    """(the replay endpoint answered, block sizes in what it replayed)."""
    import zmq
    import zmq.asyncio

    from kvevents.replay import ReplayOutcome, replay_once

    ctx = zmq.asyncio.Context()
    sizes: list[int] = []

    def take(msg: RawMessage) -> bool:
        sizes.extend(_stored_sizes(msg.payload))
        return False

    try:
        outcome = await replay_once(ctx, endpoint, 0, take, lambda reason: None,
                                    idle_timeout=timeout, max_duration=timeout * 4)
    finally:
        ctx.term()
    return outcome is ReplayOutcome.END, sizes


class _Listener:
    """A SUB on the engine's event endpoint that collects block sizes while a probe runs."""

    def __init__(self, endpoint: str) -> None:
        import zmq
        import zmq.asyncio

        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)
        self.sizes: list[int] = []
        self.batches = 0

    async def collect(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if not await self.sock.poll(int(left * 1000)):
                break
            frames = await self.sock.recv_multipart()
            try:
                msg = split_message(frames)
            except WireError:
                continue
            self.batches += 1
            self.sizes.extend(_stored_sizes(msg.payload))
            if self.sizes:
                return

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


async def check_engine(s: aiohttp.ClientSession, eng: EngineConfig, config: RouterConfig,
                       tokenizer: AsyncTokenizer | None, probe: bool) -> tuple[list[Finding],
                                                                               tuple[str, ...]]:
    url = eng.url
    out: list[Finding] = []
    try:
        status, _ = await _get(s, f"{url}/health")
        if status != 200:
            raise RuntimeError(f"/health answered {status}")
    except (aiohttp.ClientError, TimeoutError, RuntimeError) as exc:
        out.append(Finding(PROBLEM, url, f"engine unreachable: {exc}",
                           "start the engine, or fix engines[].url"))
        return out, ()
    models: tuple[str, ...] = ()
    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
        _, body = await _get(s, f"{url}/v1/models")
        data = body.get("data") if isinstance(body, dict) else None
        if isinstance(data, list):
            models = tuple(str(m.get("id")) for m in data if isinstance(m, dict))
    out.append(Finding(OK if models else WARN, url,
                       f"serves {', '.join(models) or 'no model listed at /v1/models'}"))

    sizes: list[int] = []
    if eng.kv_events is None:
        out.append(Finding(PROBLEM, url, "no kv_events configured: routing to it is load-only "
                           "(cache-blind)", "start the engine with KV events and set "
                           "engines[].kv_events (and replay)"))
    else:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            code, src = await _get(s, f"{url}/kv_event_sources")
            if code == 200 and isinstance(src, dict):
                enabled = [v for v in src.values() if isinstance(v, dict)
                           and v.get("enable_kv_cache_events")]
                if not enabled:
                    out.append(Finding(PROBLEM, url, "the engine has KV events turned off",
                                       "start vLLM with --kv-events-config '{\"enable_kv_cache_"
                                       "events\": true, \"publisher\": \"zmq\", ...}'"))
                else:
                    ports = {str(v.get("endpoint", "")).rpartition(":")[2] for v in enabled}
                    mine = eng.kv_events.rpartition(":")[2]
                    if eng.kv_events.startswith("tcp://") and mine not in ports:
                        out.append(Finding(PROBLEM, url, f"kv_events port {mine} is not where "
                                           f"the engine publishes ({', '.join(sorted(ports))})",
                                           "set engines[].kv_events to the engine's endpoint"))
        if eng.replay is None:
            out.append(Finding(WARN, url, "no replay endpoint: a late or restarted router "
                               "starts partial", "give vLLM a replay_endpoint in "
                               "--kv-events-config and set engines[].replay"))
        elif eng.replay.startswith(("tcp://", "ipc://")):
            answered, replayed = await _replay_sizes(eng.replay, 2.0)
            sizes += replayed
            out.append(Finding(OK if answered else PROBLEM, url,
                               f"replay endpoint {'answers' if answered else 'is silent'}"
                               f" ({len(replayed)} stored blocks' sizes seen)",
                               "" if answered else "check engines[].replay against the "
                               "engine's replay_endpoint"))
    probe_usage: dict[str, Any] | None = None
    if probe:
        listener = _Listener(eng.kv_events) if eng.kv_events and eng.kv_events.startswith(
            ("tcp://", "ipc://")) else None
        try:
            await asyncio.sleep(0.3)  # let the SUB connect before the engine publishes
            prompt = f"kvmesh doctor probe {uuid.uuid4().hex} " + SAMPLE_PROMPT * 6
            req: dict[str, Any] = {"prompt": prompt, "max_tokens": 1}
            if models:
                req["model"] = models[0]
            answer = await _post(s, f"{url}/v1/completions", req)
            probe_usage = answer.get("usage") if isinstance(answer, dict) else None
            if listener is not None:
                await listener.collect(5.0)
                sizes += listener.sizes
                if not listener.batches:
                    out.append(Finding(PROBLEM, url, "the probe request produced no KV event on "
                                       f"{eng.kv_events}", "check that kv_events points at "
                                       "the engine's PUB endpoint and prefix caching is on"))
        except (aiohttp.ClientError, TimeoutError, RuntimeError, ValueError) as exc:
            out.append(Finding(WARN, url, f"probe request failed: {exc}"))
        finally:
            if listener is not None:
                listener.close()
        details = probe_usage.get("prompt_tokens_details") if probe_usage else None
        if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
            out.append(Finding(OK, url, "reports cached_tokens (the self-check can run)"))
        elif probe_usage is not None:
            out.append(Finding(PROBLEM, url, "answers carry no prompt_tokens_details."
                               "cached_tokens: the self-check cannot compare predictions",
                               "start vLLM with --enable-prompt-tokens-details (SGLang: "
                               "--enable-cache-report)"))
    if sizes:
        size = max(set(sizes), key=sizes.count)
        if config.block_size is not None and config.block_size != size:
            out.append(Finding(PROBLEM, url, f"publishes {size}-token blocks, block_size is "
                               f"configured as {config.block_size}", "remove block_size from "
                               "the config (each engine's size is learned from its events)"))
        else:
            out.append(Finding(OK, url, f"block size {size} (learned from its events)"))
    elif eng.kv_events is not None:
        out.append(Finding(WARN, url, "block size unknown: no stored block seen yet",
                           "send a request to the engine (or drop --no-probe) and run again"))
    if tokenizer is not None:
        out += await check_tokenizer(tokenizer, url, models[0] if models else None, s)
    return out, models


async def check_tokenizer(tokenizer: AsyncTokenizer, url: str, model: str | None,
                          s: aiohttp.ClientSession) -> list[Finding]:
    from kvevents.tokenizers.engine import EngineTokenizer

    if tokenizer.name == f"engine:{url}":
        return [Finding(OK, url, "router tokenizes through this engine's /tokenize")]
    engine = EngineTokenizer(url, model=model, session=s)
    out: list[Finding] = []
    for what in ("completion", "chat"):
        try:
            if what == "completion":
                a, b = await tokenizer.encode(SAMPLE_PROMPT), await engine.encode(SAMPLE_PROMPT)
            else:
                a = await tokenizer.encode_chat(SAMPLE_CHAT)
                b = await engine.encode_chat(SAMPLE_CHAT)
        except Exception as exc:
            out.append(Finding(WARN, url, f"cannot compare {what} tokenization: {exc}"))
            continue
        if a == b:
            out.append(Finding(OK, url, f"{what} tokenization agrees ({len(a)} tokens)"))
        else:
            first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                         min(len(a), len(b)))
            out.append(Finding(PROBLEM, url, f"{what} tokenization differs from the engine's "
                               f"(router {len(a)} tokens, engine {len(b)}, first difference "
                               f"at {first}): predictions will miss",
                               f"tokenizer: engine:{url}, or hf:<the engine's model folder>"))
    return out


async def run(config: RouterConfig, probe: bool = True) -> list[Finding]:
    findings: list[Finding] = []
    try:
        tokenizer: AsyncTokenizer | None = make_tokenizer(config.tokenizer)
    except (ValueError, ImportError) as exc:
        findings.append(Finding(PROBLEM, "router", f"tokenizer: {exc}",
                                "fix the tokenizer setting"))
        tokenizer = None
    if not config.engines:
        findings.append(Finding(PROBLEM, "router", "no engines configured", "add engines"))
    served: dict[str, tuple[str, ...]] = {}
    async with aiohttp.ClientSession() as s:
        for eng in config.engines:
            found, models = await check_engine(s, eng, config, tokenizer, probe)
            findings += found
            served[eng.url] = models
    if tokenizer is not None:
        await tokenizer.aclose()
    model_sets = {m for m in served.values() if m}
    if len(model_sets) > 1:
        findings.append(Finding(WARN, "router", "engines serve different models: "
                                + "; ".join(f"{u}: {', '.join(m)}" for u, m in served.items()),
                                "requests only go to engines serving their model; check that "
                                "this is intended"))
    return findings
