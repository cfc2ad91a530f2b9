"""The simulated engine's HTTP server: vLLM's OpenAI-compatible API over ``EngineModel``.

Routes (as vLLM serves them): ``POST /v1/completions``, ``POST /v1/chat/completions`` (stream
and not), ``GET /v1/models``, ``GET /health``, ``GET /metrics``, ``POST /tokenize``,
``POST /reset_prefix_cache``, ``GET /version``. Debug routes for tests: ``GET /debug/kv_cache``
(the true cache contents as published hashes), ``GET /debug/engine`` (engine and publisher
counters), ``GET|POST /debug/fault`` (fail or delay the next requests, stall the engine, fail
health checks, lose KV-event batches, restart the engine).

A request whose client goes away is aborted in the engine, freeing its blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from kvevents.publisher import ZmqEventPublisher
from kvevents.tokenizers.base import BuiltinTokenizer
from sim.engine_model import EngineConfig, EngineModel, RequestOutput
from sim.engine_runner import EngineRunner, Finished
from sim.openai_api import (
    SSE_DONE,
    ApiError,
    Choice,
    GenerationRequest,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    dumps,
    parse_generation,
    parse_tokenize,
    sse,
    usage,
    usage_chunk,
)
from sim.vllm_metrics import CONTENT_TYPE, EngineMetrics

log = logging.getLogger(__name__)

VERSION = "kvmesh-sim"


@dataclass(slots=True)
class Faults:
    """Injected failures, consumed request by request."""

    fail_next: int = 0
    fail_status: int = 500
    delay_next: int = 0
    delay_s: float = 0.0
    unhealthy: bool = False


def _json(payload: object, status: int = 200) -> web.Response:
    return web.json_response(payload, status=status, dumps=dumps)


def _error(err: ApiError) -> web.Response:
    return _json(err.body(), status=err.status)


async def _read_json(request: web.Request) -> object:
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(f"Invalid JSON body: {exc}") from None


class SimEngineServer:
    """The HTTP shell. Owns the runner and, when given one, the publisher (closed on stop)."""

    def __init__(
        self,
        engine: EngineModel,
        model: str,
        publisher: ZmqEventPublisher | None = None,
        speedup: float = 1.0,
        tokenizer: BuiltinTokenizer | None = None,
    ) -> None:
        self.engine = engine
        self.model = model
        self.publisher = publisher
        self.tokenizer = tokenizer or BuiltinTokenizer()
        self.metrics = EngineMetrics(model, lambda: self.engine.stats())
        self.runner = EngineRunner(engine, publisher, speedup, on_output=self.metrics.observe)
        self.faults = Faults()
        self.bad_requests = 0
        self.aborted_requests = 0
        self.created = int(time.time())
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        self.app.add_routes(
            [
                web.post("/v1/completions", self._completions),
                web.post("/v1/chat/completions", self._chat),
                web.get("/v1/models", self._models),
                web.get("/health", self._health),
                web.get("/ping", self._health),
                web.get("/version", self._version),
                web.get("/metrics", self._metrics),
                web.post("/tokenize", self._tokenize),
                web.post("/reset_prefix_cache", self._reset_prefix_cache),
                web.get("/debug/kv_cache", self._debug_kv_cache),
                web.get("/debug/engine", self._debug_engine),
                web.get("/debug/fault", self._get_fault),
                web.post("/debug/fault", self._set_fault),
            ]
        )
        self._site_runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve on ``host:port`` (0 = any free port); returns the bound port."""
        await self.runner.start()
        self._site_runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await self._site_runner.setup()
        await web.TCPSite(self._site_runner, host, port).start()
        address = self._site_runner.addresses[0]
        self.port = int(address[1])
        return self.port

    async def stop(self) -> None:
        if self._site_runner is not None:
            await self._site_runner.cleanup()
            self._site_runner = None
        await self.runner.stop()
        if self.publisher is not None:
            await asyncio.to_thread(self.publisher.close)

    # -- generation --------------------------------------------------------------------------

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completion")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def _generate(self, request: web.Request, kind: str) -> web.StreamResponse:
        try:
            gen = parse_generation(
                "chat" if kind == "chat" else "completion",
                await _read_json(request),
                self.model,
                self.tokenizer,
            )
        except ApiError as err:
            self.bad_requests += 1
            return _error(err)
        injected = await self._apply_faults()
        if injected is not None:
            return injected
        prefix = "chatcmpl" if gen.kind == "chat" else "cmpl"
        rid = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        rid = f"{prefix}-{rid}"
        ids = [f"{rid}-{i}" for i in range(len(gen.prompts))]
        queue: asyncio.Queue[RequestOutput | Finished] = asyncio.Queue()
        live: set[str] = set()
        try:
            for req_id, prompt in zip(ids, gen.prompts, strict=True):
                try:
                    self.runner.submit(req_id, prompt, gen.max_tokens, gen.cache_salt, queue)
                except ValueError as exc:
                    self.bad_requests += 1
                    return _error(ApiError(str(exc)))
                live.add(req_id)
            if gen.stream:
                return await self._stream(request, gen, rid, ids, queue, live)
            return await self._collect(gen, rid, ids, queue, live)
        finally:
            for req_id in live:
                if self.runner.abort(req_id):
                    self.aborted_requests += 1

    async def _apply_faults(self) -> web.Response | None:
        f = self.faults
        if f.fail_next > 0:
            f.fail_next -= 1
            return _error(ApiError("injected fault", status=f.fail_status))
        if f.delay_next > 0:
            f.delay_next -= 1
            await asyncio.sleep(f.delay_s)
        return None

    async def _collect(
        self,
        gen: GenerationRequest,
        rid: str,
        ids: list[str],
        queue: asyncio.Queue[RequestOutput | Finished],
        live: set[str],
    ) -> web.Response:
        tokens: dict[str, list[int]] = {i: [] for i in ids}
        reasons: dict[str, str | None] = {}
        last: dict[str, RequestOutput] = {}
        while live:
            out = await queue.get()
            if isinstance(out, Finished):
                return _error(ApiError(f"the engine dropped the request ({out.reason})", 500))
            tokens[out.req_id].extend(out.new_token_ids)
            last[out.req_id] = out
            if out.finished:
                reasons[out.req_id] = out.finish_reason
                live.discard(out.req_id)
        choices = [
            Choice(i, self.engine.textgen.text(tokens[req_id]), reasons[req_id])
            for i, req_id in enumerate(ids)
        ]
        use = usage(
            sum(last[i].num_prompt_tokens for i in ids),
            sum(len(tokens[i]) for i in ids),
            sum(last[i].num_cached_tokens for i in ids),
        )
        created = int(time.time())
        if gen.kind == "chat":
            return _json(chat_response(rid, created, gen.model, choices[0], use))
        return _json(completion_response(rid, created, gen.model, choices, use))

    async def _stream(
        self,
        request: web.Request,
        gen: GenerationRequest,
        rid: str,
        ids: list[str],
        queue: asyncio.Queue[RequestOutput | Finished],
        live: set[str],
    ) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream; charset=utf-8"},
        )
        await resp.prepare(request)
        created = int(time.time())
        index = {req_id: i for i, req_id in enumerate(ids)}
        counts = dict.fromkeys(ids, 0)
        last: dict[str, RequestOutput] = {}
        try:
            if gen.kind == "chat":
                first_use = usage_plain(len(gen.prompts[0]), 0) if gen.continuous_usage else None
                await resp.write(
                    sse(
                        chat_chunk(
                            rid,
                            created,
                            gen.model,
                            0,
                            {"role": "assistant", "content": ""},
                            None,
                            first_use,
                        )
                    )
                )
            while live:
                out = await queue.get()
                if isinstance(out, Finished):  # an error event, as vLLM streams one
                    err = ApiError(f"the engine dropped the request ({out.reason})", 500)
                    await resp.write(sse(err.body()))
                    break
                counts[out.req_id] += len(out.new_token_ids)
                last[out.req_id] = out
                if out.finished:
                    live.discard(out.req_id)
                text = self.engine.textgen.text(out.new_token_ids)
                use = (
                    usage_plain(out.num_prompt_tokens, counts[out.req_id])
                    if gen.continuous_usage
                    else None
                )
                if gen.kind == "chat":
                    chunk = chat_chunk(
                        rid, created, gen.model, 0, {"content": text}, out.finish_reason, use
                    )
                else:
                    choice = Choice(index[out.req_id], text, out.finish_reason)
                    chunk = completion_chunk(rid, created, gen.model, choice, use)
                await resp.write(sse(chunk))
            if gen.include_usage and len(last) == len(ids):
                total = usage(
                    sum(o.num_prompt_tokens for o in last.values()),
                    sum(counts.values()),
                    sum(o.num_cached_tokens for o in last.values()),
                )
                await resp.write(sse(usage_chunk(gen.kind, rid, created, gen.model, total)))
            await resp.write(SSE_DONE)
            await resp.write_eof()
        except ConnectionResetError:
            log.debug("client of %s went away; aborting", rid)
        return resp

    # -- other API ---------------------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.Response:
        card = {
            "id": self.model,
            "object": "model",
            "created": self.created,
            "owned_by": "vllm",
            "root": self.model,
            "parent": None,
            "max_model_len": self.engine.config.max_model_len,
            "permission": [
                {
                    "id": f"modelperm-{self.model}",
                    "object": "model_permission",
                    "created": self.created,
                    "allow_create_engine": False,
                    "allow_sampling": True,
                    "allow_logprobs": True,
                    "allow_search_indices": False,
                    "allow_view": True,
                    "allow_fine_tuning": False,
                    "organization": "*",
                    "group": None,
                    "is_blocking": False,
                }
            ],
        }
        return _json({"object": "list", "data": [card]})

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=503 if self.faults.unhealthy else 200)

    async def _version(self, request: web.Request) -> web.Response:
        return _json({"version": VERSION})

    async def _metrics(self, request: web.Request) -> web.Response:
        body = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def _tokenize(self, request: web.Request) -> web.Response:
        try:
            tokens = parse_tokenize(await _read_json(request), self.model, self.tokenizer)
        except ApiError as err:
            self.bad_requests += 1
            return _error(err)
        return _json(
            {
                "count": len(tokens),
                "max_model_len": self.engine.config.max_model_len,
                "tokens": list(tokens),
                "token_strs": None,
            }
        )

    async def _reset_prefix_cache(self, request: web.Request) -> web.Response:
        flag = request.query.get("reset_running_requests", "false").lower()
        if self.runner.reset_prefix_cache(reset_running_requests=flag in {"1", "true", "yes"}):
            return web.Response(status=200)
        err = ApiError(
            "Failed to reset the prefix cache: some blocks are in use by running requests "
            "(pass reset_running_requests=true to preempt them).",
            status=409,
        )
        return _error(err)

    # -- debug -------------------------------------------------------------------------------

    async def _debug_kv_cache(self, request: web.Request) -> web.Response:
        counts = self.engine.cached_hashes()
        pub = self.publisher
        return _json(
            {
                "block_size": self.engine.config.block_size,
                "num_gpu_blocks": self.engine.kv.num_blocks,
                "num_free_blocks": self.engine.kv.num_free,
                "num_cached_blocks": sum(counts.values()),
                "num_unique_hashes": len(counts),
                "block_hashes": sorted(counts),
                "duplicate_hashes": sorted([h, n] for h, n in counts.items() if n > 1),
                "last_seq": None if pub is None else pub.last_seq,
            }
        )

    async def _debug_engine(self, request: web.Request) -> web.Response:
        pub = self.publisher
        return _json(
            {
                "engine": dataclasses.asdict(self.engine.stats()),
                "config": dataclasses.asdict(self.engine.config),
                "profile": self.engine.profile.name,
                "virtual_time": self.runner.now(),
                "bad_requests": self.bad_requests,
                "aborted_requests": self.aborted_requests,
                "publisher": None
                if pub is None
                else {
                    "endpoint": pub.endpoint,
                    "replay_endpoint": pub.replay_endpoint,
                    "topic": pub.topic,
                    "last_seq": pub.last_seq,
                    **dataclasses.asdict(pub.stats),
                },
                "publish_errors": self.runner.publish_errors,
                "pace": dataclasses.asdict(self.runner.pace),
            }
        )

    async def _get_fault(self, request: web.Request) -> web.Response:
        return _json(dataclasses.asdict(self.faults))

    async def _set_fault(self, request: web.Request) -> web.Response:
        try:
            body = await _read_json(request)
            if not isinstance(body, Mapping):
                raise ApiError("The request body must be a JSON object.")
            self._update_faults(body)
        except ApiError as err:
            self.bad_requests += 1
            return _error(err)
        return _json(dataclasses.asdict(self.faults))

    def _update_faults(self, body: Mapping[str, Any]) -> None:
        known = {"fail_next", "fail_status", "delay_next", "delay_s", "pause_s", "unhealthy"}
        known |= {"clear", "drop_events", "restart_engine"}
        unknown = sorted(set(body) - known)
        if unknown:
            raise ApiError(f"unknown fault knobs: {', '.join(unknown)}")

        def number(key: str, kind: type, lo: float, hi: float) -> Any:
            value = body[key]
            ok = isinstance(value, kind) or (kind is float and isinstance(value, int))
            if isinstance(value, bool) or not ok or not lo <= value <= hi:
                raise ApiError(f"'{key}' must be a {kind.__name__} in [{lo}, {hi}]", param=key)
            return value

        if body.get("clear"):
            self.faults = Faults()
            self.runner.resume()
        f = dataclasses.replace(self.faults)
        if "fail_next" in body:
            f.fail_next = number("fail_next", int, 0, 1_000_000)
        if "fail_status" in body:
            f.fail_status = number("fail_status", int, 400, 599)
        if "delay_next" in body:
            f.delay_next = number("delay_next", int, 0, 1_000_000)
        if "delay_s" in body:
            f.delay_s = float(number("delay_s", float, 0, 3600))
        if "unhealthy" in body:
            if not isinstance(body["unhealthy"], bool):
                raise ApiError("'unhealthy' must be a boolean", param="unhealthy")
            f.unhealthy = body["unhealthy"]
        pause = float(number("pause_s", float, 0, 3600)) if "pause_s" in body else 0.0
        drop = number("drop_events", int, 0, 1_000_000) if "drop_events" in body else 0
        restart = body.get("restart_engine", False)
        if not isinstance(restart, bool):
            raise ApiError("'restart_engine' must be a boolean", param="restart_engine")
        if (drop or restart) and self.publisher is None:
            raise ApiError("no KV-event publisher is configured", param="drop_events")
        self.faults = f
        if pause:
            self.runner.pause(pause)
        if restart:
            self.restart_engine()
        if drop and self.publisher is not None:
            self.publisher.drop_next(drop)

    def restart_engine(self) -> None:
        """Behave like a crashed and restarted engine process: in-flight requests fail, the
        cache and counters start empty, KV-event seqs start from 0 again (no AllBlocksCleared
        is sent: a dead process says nothing)."""
        old = self.engine
        self.runner.abort_all()
        self.runner.resume()
        config = EngineConfig(**dataclasses.asdict(old.config))
        self.engine = EngineModel(old.profile, config, old.seed, old.textgen)
        self.runner.engine = self.engine
        if self.publisher is not None:
            self.publisher.restart()


def usage_plain(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """Per-chunk usage (continuous_usage_stats): no details, as vLLM sends it."""
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }


async def serve_forever(server: SimEngineServer, host: str, port: int, stop: asyncio.Event) -> None:
    """Run until ``stop`` is set, then shut down cleanly."""
    await server.start(host, port)
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await server.stop()
