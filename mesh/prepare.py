"""Request preparation off the event loop: JSON parse, validation, template, tokens, keys.

Everything a request costs in CPU before routing grows with its body (64 MB of JSON, a
million-token prompt). Run on the event loop it stalls gossip, failure detection and every
other request. A thread does not fix it either: ``json.loads`` is one C call that holds the
interpreter lock for its whole run, and a body of many small arrays makes it run for seconds
(measured: 45 MB of ``[[1], [1], ...]`` takes 20 s, mostly garbage collection inside the
parse). So, by default, preparation runs in worker *processes*:

- a worker parses and validates the body (collector off during the parse), renders and
  tokenizes it with its own copy of the configured local tokenizer (``builtin``, ``hf:``),
  chains the block keys and hashes the body, and sends back only what routing needs: the
  fields, token ids and keys as packed arrays (a memory copy to receive, not a parse);
- with the ``engine:`` tokenizer a worker parses and validates, and the router then calls the
  engine's ``/tokenize`` asynchronously; if that fails it tokenizes with the builtin tokenizer
  in the worker instead (routing degrades, the request is served);
- bodies up to ``prepare_inline_bytes`` (256 KiB) are prepared in a thread of the router
  instead, and bodies up to 16 KiB on the event loop itself (what most requests are: their
  whole preparation takes 0.1-0.3 ms typically and under 8 ms for the worst 16 KiB measured,
  and a thread hop costs a busy loop milliseconds of waiting for the interpreter lock);
- ``prepare_in: thread`` keeps everything in a thread pool of the router's process (for a
  tokenizer object handed to the router in code, and for small deployments).

The pool is bounded twice: ``workers`` processes (or threads), and at most ``max_pending``
requests being prepared or waiting; beyond that the router answers 503 with ``Retry-After``.
A worker that dies is replaced; the request it held gets a 503. Workers start with the first
large body (a router that never sees one never pays their memory; that first body waits
about a second for the spawn).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import multiprocessing
import threading
import time
from array import array
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from kvevents.keys import request_keys
from kvevents.tokenizers.base import BuiltinTokenizer
from kvevents.tokenizers.engine import TokenizeError
from mesh.api import (
    ApiError,
    Inference,
    PromptTokenizer,
    chat_options,
    parse_fields,
    parse_inference,
    routing_prompt,
)
from mesh.forward_auth import body_digest

log = logging.getLogger("kvmesh.router")

_TOKEN = "I" if array("I").itemsize == 4 else "L"
_KEY = "Q"


@dataclass(frozen=True, slots=True)
class Prepared:
    """What a worker sends back: small fields, packed ids and keys, or an error."""

    kind: str
    path: str
    model: str = ""
    stream: bool = False
    session: str | None = None
    max_tokens: int = 0
    token_ids: bytes = b""
    keys: bytes = b""
    digest: str = ""
    pending: Any = None
    """For an asynchronous tokenizer: the prompt (str / ids) or messages to tokenize."""
    salt: str | None = None
    tier: str | None = None
    error: tuple[int, str, str | None, str | None] | None = None
    """(status, message, param, code) of an ``ApiError``; exceptions do not pickle well."""


# ---- the worker side (runs in a worker process, or in a thread in thread mode) ----------

_worker_tokenizer: Any = None
_worker_lock = threading.Lock()


def _init_worker(spec: str | None) -> None:
    """Worker process start: its own tokenizer (local specs) and a builtin fallback."""
    global _worker_tokenizer
    from kvevents.tokenizers.factory import make_tokenizer

    if spec is not None and not spec.startswith("engine:"):
        _worker_tokenizer = getattr(make_tokenizer(spec), "sync", None)


def encode_sync(sync: Any, inf: Inference) -> list[int]:
    """Token ids of ``inf``'s prompt with a synchronous tokenizer; ``ApiError`` 400."""
    return encode_body(sync, inf.kind, inf.body)


def encode_body(sync: Any, kind: str, body: Mapping[str, Any]) -> list[int]:
    """:func:`encode_sync` of a parsed body."""
    param = "messages" if kind == "chat" else "prompt"
    try:
        if kind == "chat":
            messages = body["messages"]
            encode_chat = getattr(sync, "encode_chat", None)
            options = chat_options(body)  # tools, chat_template_kwargs: as the engine
            if encode_chat is not None and options and hasattr(sync, "template"):
                return _as_list(encode_chat(messages, **options))
            if encode_chat is not None:
                return _as_list(encode_chat(messages))
            return _as_list(sync.encode(sync.apply_chat_template(messages)))
        prompt = routing_prompt(body)
        return _as_list(sync.encode(prompt)) if isinstance(prompt, str) else list(prompt)
    except UnicodeError as exc:
        raise ApiError(400, f"the prompt is not valid Unicode text ({type(exc).__name__})",
                       param=param) from None
    except RecursionError:
        raise ApiError(400, "the prompt is nested too deeply", param=param) from None
    except ValueError as exc:
        raise ApiError(400, f"cannot render messages: {exc}", param="messages") from None


def _as_list(ids: Sequence[int]) -> list[int]:
    """A tokenizer's ids as a list: the list itself when it is one (each call returns a
    new one; nothing here changes it), no copy of every id."""
    return ids if type(ids) is list else list(ids)


def block_keys(ids: Sequence[int], salt: str | None, block_size: int) -> list[int]:
    try:
        return request_keys(ids, block_size, salt=salt)
    except UnicodeError:
        raise ApiError(400, "'cache_salt' is not valid Unicode text", param="cache_salt") from None
    except ValueError as exc:  # WireError: a token id outside [0, 2**32)
        raise ApiError(400, f"bad token ids: {exc}", param="prompt") from None


def prepare_body(kind: str, path: str, raw: bytes, headers: Mapping[str, str],
                 block_size: int, tokenize: bool, fallback: bool = False) -> Prepared:
    """Parse, validate and (``tokenize``) tokenize one body; never raises for bad input."""
    try:
        collecting = gc.isenabled()
        gc.disable()  # a parse allocates nothing cyclic; the collector would only slow it
        try:
            inf = parse_inference(kind, path, raw, headers)
        finally:
            if collecting:
                gc.enable()
        salt = inf.body.get("cache_salt")
        base = Prepared(kind, path, inf.model, inf.stream, inf.session, inf.max_tokens,
                        digest=body_digest(raw), salt=salt, tier=inf.tier)
        sync = BuiltinTokenizer() if fallback else _worker_tokenizer
        if not tokenize or sync is None:
            pending = inf.body["messages"] if kind == "chat" else routing_prompt(inf.body)
            return dataclasses.replace(base, pending=pending)
        with _worker_lock:
            ids = encode_sync(sync, inf)
        keys = block_keys(ids, salt, block_size)
        return dataclasses.replace(base, token_ids=array(_TOKEN, ids).tobytes(),
                                   keys=array(_KEY, keys).tobytes())
    except ApiError as exc:
        return Prepared(kind, path, error=(exc.status, exc.message, exc.param, exc.code))


def tokenize_fallback(kind: str, pending: Any, salt: str | None, block_size: int) -> Prepared:
    """Builtin-tokenizer ids and keys for a prompt an asynchronous tokenizer failed on."""
    try:
        body = {"messages": pending} if kind == "chat" else {"prompt": pending}
        inf = Inference(kind, "", body, b"", "", False, [], None, 0)
        ids = encode_sync(BuiltinTokenizer(), inf)
        keys = block_keys(ids, salt, block_size)
        return Prepared(kind, "", token_ids=array(_TOKEN, ids).tobytes(),
                        keys=array(_KEY, keys).tobytes())
    except ApiError as exc:
        return Prepared(kind, "", error=(exc.status, exc.message, exc.param, exc.code))


# ---- the router side ---------------------------------------------------------------------


class Preparer:
    """``prepare(kind, path, raw, headers) -> Inference`` with token ids and block keys."""

    def __init__(self, tokenizer: PromptTokenizer, block_size: int, *, workers: int = 2,
                 max_pending: int = 64, spec: str | None = None,
                 inline_bytes: int = 256 * 1024, loop_bytes: int = 16 * 1024) -> None:
        """``spec``: the configured tokenizer spec; with one, bodies larger than
        ``inline_bytes`` go to worker processes (each builds its own tokenizer from it);
        smaller ones, and all without a spec, to threads using ``tokenizer``."""
        self.inline_bytes = inline_bytes
        self.loop_bytes = loop_bytes
        """Bodies up to this size are prepared on the event loop itself (0.1-0.3 ms typical,
        under 8 ms measured at worst; a thread hop costs a busy loop waiting for the GIL more)."""
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.workers = max(1, workers)
        self.max_pending = max_pending
        self.spec = spec
        self.pending = 0
        self.refused = 0
        self.fallbacks = 0
        self.worker_deaths = 0
        self._warned_at = float("-inf")
        self._pool: Executor | None = None
        self._threads: ThreadPoolExecutor | None = None
        self._local = getattr(tokenizer, "sync", None)
        """Thread mode: the tokenizer the threads use."""

    @property
    def in_processes(self) -> bool:
        return self.spec is not None

    def _executor(self) -> Executor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker, initargs=(self.spec,))
        return self._pool

    def _thread_pool(self) -> ThreadPoolExecutor:
        if self._threads is None:
            self._threads = ThreadPoolExecutor(2 if self.in_processes else self.workers,
                                               thread_name_prefix="kvmesh-prepare")
        return self._threads

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)
            self._threads = None

    async def _run(self, fn: Any, *args: Any) -> Prepared:
        loop = asyncio.get_running_loop()
        try:
            result: Prepared = await loop.run_in_executor(self._executor(), fn, *args)
        except BrokenProcessPool:
            # A worker died (out of memory, killed): replace the pool; this request is lost.
            self.worker_deaths += 1
            log.error("a request-preparation worker died; starting new ones")
            self.close()
            raise ApiError(503, "request preparation failed; retry", type="server_error",
                           code="worker_failed") from None
        return result

    async def prepare(self, kind: str, path: str, raw: bytes,
                      headers: Mapping[str, str]) -> Inference:
        if self.pending >= self.max_pending:
            self.refused += 1
            raise ApiError(503, f"router busy: {self.pending} requests already being prepared",
                           type="server_error", code="busy")
        self.pending += 1
        started = time.perf_counter()
        try:
            hdrs = {k.lower(): v for k, v in headers.items() if k.lower().startswith("x-")}
            if (len(raw) <= self.loop_bytes and self._local is not None
                    and _worker_lock.acquire(blocking=False)):
                try:  # a small body, on the loop (no coroutine below this one)
                    return self._prepare_local(kind, path, raw, hdrs, locked=True,
                                               started=started)
                finally:
                    _worker_lock.release()
            return await self._prepare(kind, path, raw, hdrs, started)
        finally:
            self.pending -= 1

    async def _prepare(self, kind: str, path: str, raw: bytes, headers: dict[str, str],
                       started: float) -> Inference:
        if not self.in_processes or len(raw) <= self.inline_bytes:
            # Mid-size bodies: a thread, no process hop (their parse is short).
            return await self._prepare_in_threads(kind, path, raw, headers, started)
        local = self.spec is not None and not self.spec.startswith("engine:")
        p = await self._run(prepare_body, kind, path, raw, headers, self.block_size, local)
        if p.error is None and p.pending is not None:
            try:
                ids = await _encode_async(self.tokenizer, kind, p.pending)
                keys = await asyncio.to_thread(block_keys, ids, p.salt, self.block_size)
                p = dataclasses.replace(p, token_ids=array(_TOKEN, ids).tobytes(),
                                        keys=array(_KEY, keys).tobytes(), pending=None)
            except TokenizeError as exc:
                self._note_fallback(exc)
                fb = await self._run(tokenize_fallback, kind, p.pending, p.salt,
                                     self.block_size)
                p = dataclasses.replace(p, token_ids=fb.token_ids, keys=fb.keys,
                                        error=fb.error, pending=None)
        if p.error is not None:
            status, message, param, code = p.error
            raise ApiError(status, message, param=param, code=code)
        token_arr = array(_TOKEN)
        token_arr.frombytes(p.token_ids)
        key_arr = array(_KEY)
        key_arr.frombytes(p.keys)
        return Inference(kind, path, {}, raw, p.model, p.stream, token_arr, p.session,
                         p.max_tokens, time.perf_counter() - started, key_arr.tolist(),
                         p.digest, tier=p.tier)

    async def _prepare_in_threads(self, kind: str, path: str, raw: bytes,
                                  headers: dict[str, str], started: float) -> Inference:
        loop = asyncio.get_running_loop()
        pool = self._thread_pool()
        if self._local is not None:  # one hop to the thread for the whole preparation
            inf = await loop.run_in_executor(pool, self._prepare_local, kind, path, raw,
                                             headers)
            return dataclasses.replace(inf, parse_seconds=time.perf_counter() - started)
        inf = await loop.run_in_executor(pool, parse_inference, kind, path, raw, headers)
        pending = inf.body["messages"] if kind == "chat" else routing_prompt(inf.body)
        try:
            ids = await _encode_async(self.tokenizer, kind, pending, chat_options(inf.body))
        except TokenizeError as exc:
            self._note_fallback(exc)
            ids = await loop.run_in_executor(pool, encode_sync, BuiltinTokenizer(), inf)
        salt = inf.body.get("cache_salt")
        keys, digest = await loop.run_in_executor(pool, _keys_and_digest, ids, salt,
                                                  self.block_size, raw)
        return dataclasses.replace(inf, token_ids=ids, keys=keys, digest=digest,
                                   parse_seconds=time.perf_counter() - started)

    def _prepare_local(self, kind: str, path: str, raw: bytes, headers: dict[str, str],
                       locked: bool = False, started: float | None = None) -> Inference:
        """``started``: when the request's preparation began (fills ``parse_seconds``)."""
        body, model, stream, session, max_tokens, tier = parse_fields(kind, raw, headers)
        ids = (encode_body(self._local, kind, body) if locked
               else self._encode_locked(kind, body))
        keys = block_keys(ids, body.get("cache_salt"), self.block_size)
        # A small body is hashed only if a forward needs it (on the loop, microseconds).
        digest = body_digest(raw) if len(raw) > self.loop_bytes else ""
        took = 0.0 if started is None else time.perf_counter() - started
        # Built once, directly: this runs for nearly every request.
        return Inference(kind, path, body, raw, model, stream, ids, session, max_tokens, took,
                         keys, digest, tier)

    def _encode_locked(self, kind: str, body: Mapping[str, Any]) -> list[int]:
        with _worker_lock:  # local tokenizers' caches are not thread-safe
            return encode_body(self._local, kind, body)

    def _note_fallback(self, exc: Exception) -> None:
        # The engine's /tokenize is down or refuses: route on the builtin tokenizer's ids
        # (prefix matches degrade; the request is still served).
        self.fallbacks += 1
        if time.monotonic() - self._warned_at > 10.0:
            self._warned_at = time.monotonic()
            log.warning("tokenizer %s failed (%s): using the builtin tokenizer",
                        self.tokenizer.name, exc)


def _keys_and_digest(ids: Sequence[int], salt: str | None, block_size: int,
                     raw: bytes) -> tuple[list[int], str]:
    return block_keys(ids, salt, block_size), body_digest(raw)


async def _encode_async(tokenizer: PromptTokenizer, kind: str, pending: Any,
                        options: Mapping[str, Any] | None = None) -> list[int]:
    try:
        if kind == "chat":
            try:
                return await tokenizer.encode_chat(pending, **(options or {}))
            except ValueError as exc:
                raise ApiError(400, f"cannot render messages: {exc}",
                               param="messages") from None
        if isinstance(pending, str):
            return await tokenizer.encode(pending)
        return list(pending)
    except UnicodeError as exc:
        raise ApiError(400, f"the prompt is not valid Unicode text ({type(exc).__name__})",
                       param="prompt") from None
