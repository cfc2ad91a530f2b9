"""The router's HTTP surface: OpenAI-compatible inference routes plus probes and metrics.

Requests are parsed and validated here, before any routing: a body that is not a JSON
object, a missing ``model``, empty ``messages`` or a malformed ``prompt`` is a 400 in
OpenAI's error format (``{"error": {"message", "type", "param", "code"}}``), counted, and
never reaches an engine. Every other error the router produces (404, 405, 503 when no
replica can serve, 502 when every attempt failed) uses the same format.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

from kvevents.tokenizers.factory import AsyncTokenizer
from mesh import json_body
from mesh.front import FAST_HANDLERS, FrontRequest
from mesh.http_guard import BodyRefused, HttpLimits, read_body
from mesh.limits import field_label
from mesh.tiers import TierError, requested_tier

log = logging.getLogger("kvmesh.api")

MAX_BODY = 64 * 1024 * 1024
SESSION_HEADERS = ("x-session-id", "x-kvmesh-session", "x-hash-key", "x-user-id")
"""Headers a session (affinity) key is read from, in this order; then the body's ``user``."""


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def response(self, headers: Mapping[str, str] | None = None) -> web.Response:
        return error_response(self.status, self.message, type=self.type, param=self.param,
                              code=self.code, headers=headers)


def error_response(
    status: int,
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


@dataclass(frozen=True, slots=True)
class Inference:
    """A validated inference request, with the prompt tokens the engine will see."""

    kind: str
    """``chat`` or ``completion``."""
    path: str
    body: dict[str, Any]
    raw: bytes
    model: str
    stream: bool
    token_ids: Sequence[int]
    session: str | None
    max_tokens: int
    parse_seconds: float = 0.0
    """Time spent validating, rendering and tokenizing the prompt."""
    keys: list[int] = dataclasses.field(default_factory=list)
    """The prompt's chained block keys (``kvevents.keys.request_keys``)."""
    digest: str = ""
    """SHA-256 of ``raw`` (hex): what a forward's signature covers."""
    tier: str | None = None
    """The service tier the request asks for itself (``mesh.tiers``); None: the default."""


def _require_model(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "you must provide a model parameter", param="model")
    return model


MAX_TOKEN_ID = 2**32 - 1
"""Token ids travel as u32 (``kvevents.keys``); no vocabulary comes near."""


def _int_list(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= MAX_TOKEN_ID for t in value
    )


def parse_inference(
    kind: str, path: str, raw: bytes, headers: Mapping[str, str]
) -> Inference:
    """Validate a body; ``token_ids`` stay empty until :func:`tokenize` fills them."""
    body, model, stream, session, max_tokens, tier = parse_fields(kind, raw, headers)
    return Inference(kind, path, body, raw, model, stream, [], session, max_tokens, tier=tier)


def parse_fields(kind: str, raw: bytes, headers: Mapping[str, str]
                 ) -> tuple[dict[str, Any], str, bool, str | None, int, str | None]:
    """:func:`parse_inference`'s checks and fields: (body, model, stream, session,
    max_tokens, tier), for a caller that builds its ``Inference`` once, with the tokens."""
    try:
        body = json_body.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    model = _require_model(body)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", param="stream")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
    ):
        raise ApiError(400, "'max_tokens' must be a positive integer", param="max_tokens")
    if kind == "chat":
        _check_messages(body)
    else:
        routing_prompt(body)
    salt = body.get("cache_salt")
    if salt is not None and not isinstance(salt, str):
        raise ApiError(400, "'cache_salt' must be a string", param="cache_salt")
    session = None
    for h in SESSION_HEADERS:
        if headers.get(h):
            session = session_key(headers[h])
            break
    user = body.get("user")
    if session is None and isinstance(user, str) and user:
        session = session_key(user)
    try:
        tier = requested_tier(body, headers)
    except TierError as exc:
        raise ApiError(400, exc.message, param=exc.param, code="invalid_service_tier") from None
    return body, model, stream, session, max_tokens or 0, tier


_HEADER_SAFE = re.compile(r"[!-~][ -~]{0,254}")


def session_key(value: str) -> str:
    """The session as this router uses and forwards it (an HTTP header value): printable
    ASCII up to 255 characters as it is, anything else as a stable digest of it."""
    if _HEADER_SAFE.fullmatch(value):
        return value
    data = value.encode("utf-8", "surrogatepass")
    return "h:" + hashlib.sha256(data).hexdigest()[:32]


def header_safe(value: str | None) -> str | None:
    """``value`` if it can be echoed in a response header, else None."""
    return value if value is not None and _HEADER_SAFE.fullmatch(value) else None


PromptTokenizer = AsyncTokenizer
"""The tokenizer interface the router uses: ``kvevents.tokenizers.factory``'s."""


async def tokenize(inf: Inference, tokenizer: PromptTokenizer) -> list[int]:
    """The prompt's token ids as the engine will see them; ``ApiError`` (400) if it cannot
    be rendered."""
    if inf.kind == "chat":
        try:
            return await tokenizer.encode_chat(inf.body["messages"], **chat_options(inf.body))
        except ValueError as exc:
            raise ApiError(400, f"cannot render messages: {exc}", param="messages") from None
    prompt = routing_prompt(inf.body)
    if isinstance(prompt, str):
        return await tokenizer.encode(prompt)
    return list(prompt)


def chat_options(body: Mapping[str, Any]) -> dict[str, Any]:
    """What besides the messages the engine renders into a chat prompt: ``tools`` (vLLM renders
    them even with ``tool_choice: none`` unless started to exclude them) and
    ``chat_template_kwargs``."""
    out: dict[str, Any] = {}
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        out["tools"] = tools
    kwargs = body.get("chat_template_kwargs")
    if isinstance(kwargs, dict) and kwargs:
        out["template_kwargs"] = kwargs
    return out


def _check_messages(body: Mapping[str, Any]) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array of messages", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object", param=f"messages[{i}]")
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise ApiError(400, f"messages[{i}].role must be a non-empty string",
                           param=f"messages[{i}].role")
        content = m.get("content")
        if content is not None and not isinstance(content, str | list):
            raise ApiError(400, f"messages[{i}].content must be a string or an array of parts",
                           param=f"messages[{i}].content")


def routing_prompt(body: Mapping[str, Any]) -> str | list[int]:
    """The prompt routing looks at: the prompt, or the first of a batch."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if _int_list(prompt) and prompt:
        return list(prompt)
    if isinstance(prompt, list) and prompt:
        # A batch: route on its first prompt, the engine serves them all.
        first = prompt[0]
        if all(isinstance(p, str) for p in prompt):
            return str(first)
        if all(_int_list(p) and p for p in prompt):
            return list(first)
    raise ApiError(
        400,
        "'prompt' must be a string, an array of strings, an array of token ids, "
        "or an array of token-id arrays",
        param="prompt",
    )


class Preparing(Protocol):
    async def prepare(self, kind: str, path: str, raw: bytes,
                      headers: Mapping[str, str]) -> Inference: ...


class Service(Protocol):
    """What the HTTP layer needs from the router."""

    tokenizer: PromptTokenizer

    @property
    def preparer(self) -> Preparing: ...

    @property
    def http_limits(self) -> HttpLimits: ...

    async def infer(self, request: web.Request | FrontRequest,
                    inference: Inference) -> web.StreamResponse: ...

    async def models_page(self, request: web.Request) -> web.Response: ...

    async def health_page(self, request: web.Request) -> web.Response: ...

    async def ready_page(self, request: web.Request) -> web.Response: ...

    async def metrics_page(self, request: web.Request) -> web.Response: ...

    async def status_page(self, request: web.Request) -> web.Response: ...

    def count_rejected(self, path: str, reason: str, status: str = "400") -> None: ...


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """404/405/413 and unexpected failures as OpenAI error JSON, never HTML or a trace."""
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = "invalid_request_error" if exc.status < 500 else "server_error"
        message = exc.reason
        headers = None
        if exc.status == 404:
            message = f"no route for {request.method} {request.path}"
        elif exc.status == 405:
            allow = exc.headers.get("Allow", "")
            message = f"method {request.method} not allowed on {request.path} (allowed: {allow})"
            headers = {"Allow": allow}
        elif exc.status == 413:
            message = f"request body is larger than {MAX_BODY} bytes"
        return error_response(exc.status, message, type=kind, headers=headers)
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return error_response(500, "internal router error (see the router's log)",
                              type="server_error", code="internal_error")


def build_app(
    service: Service, extra_routes: Iterable[web.AbstractRouteDef] = ()
) -> web.Application:
    app = web.Application(middlewares=[openai_errors], client_max_size=MAX_BODY)

    def inference(kind: str) -> Handler:
        async def handle(request: web.Request | FrontRequest) -> web.StreamResponse:
            try:
                if isinstance(request, FrontRequest):  # read by mesh.front, same limits
                    got = request.body_now()
                    raw = (got if got is not None
                           else await request.read_limited(service.http_limits))
                else:
                    raw = await read_body(request, service.http_limits)
                parsed = await service.preparer.prepare(kind, request.path, raw,
                                                        request.headers)
            except BodyRefused as refused:
                service.count_rejected(request.path, refused.code, str(refused.status))
                log.info("refused %s: %s", request.path, refused.message)
                resp = error_response(refused.status, refused.message, code=refused.code)
                if refused.close:
                    resp.force_close()
                return resp
            except ApiError as exc:
                service.count_rejected(request.path, field_label(exc.param),
                                       str(exc.status))
                log.info("rejected %s: %s", request.path, exc.message)
                headers = {"Retry-After": "1"} if exc.status == 503 else None
                return exc.response(headers)
            return await service.infer(request, parsed)

        return handle

    completion, chat = inference("completion"), inference("chat")
    # The same handlers serve these paths on mesh.front's lean protocol.
    app[FAST_HANDLERS] = {"/v1/completions": completion, "/v1/chat/completions": chat}
    app.add_routes([
        web.post("/v1/completions", completion),
        web.post("/v1/chat/completions", chat),
        web.get("/v1/models", service.models_page),
        web.get("/health", service.health_page),
        web.get("/ready", service.ready_page),
        web.get("/metrics", service.metrics_page),
        web.get("/mesh/status", service.status_page),
    ])
    app.add_routes(list(extra_routes))
    return app
