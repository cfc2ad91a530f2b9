"""Endpoint-picker protocol, sans-I/O: one ext_proc stream as a state machine.

A gateway (Envoy) streams each HTTP request through ``ext_proc`` in full-duplex mode:
request headers, request body chunks, then, once the upstream answers, response headers
and response body chunks. :class:`PickerStream` takes those as plain events and returns
the replies to send, plus three notes for the shell: :class:`NeedPick` (the whole body is
here: tokenize and decide), :class:`Served` (the response started: which endpoint served
it, with what status) and :class:`Finished` (the response stream ended: release the
in-flight count). The shell (``mesh.picker_server``) does the gRPC and protobuf side and
runs the router's decision core; this module knows neither.

The protocol (Gateway API Inference Extension, "endpoint picker protocol"): the chosen
endpoints, ``ip:port`` comma-separated with the primary first, go into the
``x-gateway-destination-endpoint`` request header and, with the same value, into the
``envoy.lb`` dynamic metadata; ``x-gateway-destination-endpoint-subset`` in the
``envoy.lb.subset_hint`` filter metadata limits the choice; no endpoint is a 503, a shed
request a 429; the endpoint that actually served comes back as
``x-gateway-destination-endpoint-served`` in the ``envoy.lb`` metadata.
"""

from __future__ import annotations

import ipaddress
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from mesh.tiers import TierError, picker_priority

DEST_HEADER = "x-gateway-destination-endpoint"
DEST_NAMESPACE = "envoy.lb"
SERVED_KEY = "x-gateway-destination-endpoint-served"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
UPSTREAM_ATTRIBUTE = "upstream.address"
"""The ext_proc response attribute naming the upstream that served (a fallback when the
proxy does not fill ``x-gateway-destination-endpoint-served``)."""

MAX_BODY = 64 * 1024 * 1024
INFERENCE_PATHS = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}


class PickerError(Exception):
    """A stream the picker must answer with an error reply (bad body, protocol misuse)."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


# -- events in ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Headers:
    """Request or response headers (``phase``), lower-case names, with the proxy's metadata."""

    phase: str
    headers: Mapping[str, str]
    end_of_stream: bool = False
    metadata: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    attributes: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Body:
    phase: str
    chunk: bytes
    end_of_stream: bool = False


@dataclass(frozen=True, slots=True)
class Trailers:
    phase: str


Event = Headers | Body | Trailers


# -- replies out (translated to ProcessingResponse by the shell) ---------------------------
@dataclass(frozen=True, slots=True)
class HeadersReply:
    phase: str
    set_headers: tuple[tuple[str, str], ...] = ()
    remove_headers: tuple[str, ...] = ()
    clear_route_cache: bool = False
    dynamic_metadata: Mapping[str, Mapping[str, Any]] | None = None


@dataclass(frozen=True, slots=True)
class BodyReply:
    """A body chunk sent on (full-duplex mode: the proxy forwards only what it gets back)."""

    phase: str
    chunk: bytes
    end_of_stream: bool


@dataclass(frozen=True, slots=True)
class TrailersReply:
    phase: str


@dataclass(frozen=True, slots=True)
class ImmediateReply:
    """Answer the client now, without an upstream (400, 429, 503)."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    details: str = ""


Reply = HeadersReply | BodyReply | TrailersReply | ImmediateReply


# -- notes for the shell ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Ask:
    """What the decision core needs: the request as the proxy saw it, body complete."""

    path: str
    kind: str | None
    """``chat``, ``completion``, or None for other routes (routed on load alone)."""
    body: bytes
    headers: Mapping[str, str]
    subset: frozenset[str] | None
    """Endpoints (``ip:port``) the proxy allows; None: the whole pool."""
    priority: int
    sheddable: bool
    tier: str | None = None
    """The service tier the priority header names (an integer maps by sign: > 0
    interactive, 0 standard, < 0 batch); None: no header, the router's default applies."""


@dataclass(frozen=True, slots=True)
class NeedPick:
    ask: Ask


@dataclass(frozen=True, slots=True)
class Served:
    endpoint: str | None
    """The endpoint that answered, as the proxy reports it (None: not reported)."""
    picked: tuple[str, ...]
    status: int


@dataclass(frozen=True, slots=True)
class Finished:
    complete: bool
    """True when the response reached its end; False when the stream broke off."""


Note = NeedPick | Served | Finished
Out = Reply | Note


# -- the decision, as the core hands it back ------------------------------------------------
@dataclass(frozen=True, slots=True)
class Pick:
    """Endpoints chosen, primary first; ``headers`` go to the upstream with the request."""

    endpoints: tuple[str, ...]
    replica: str
    region: str
    reason: str
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    message: str
    code: str
    retry_after: float | None = None
    """Seconds for a 429's ``Retry-After``."""


# -- helpers ---------------------------------------------------------------------------------
def endpoint_of(url: str) -> str:
    """``ip:port`` of an http(s) URL (the form the protocol speaks)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


def parse_endpoints(value: object) -> frozenset[str]:
    """A subset hint: a list of ``ip:port`` strings, or one comma-separated string."""
    items: Sequence[object]
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, list | tuple):
        items = value
    else:
        raise PickerError(400, f"endpoint subset must be a list of ip:port, got {value!r}",
                          "bad_subset")
    out = set()
    for item in items:
        if not isinstance(item, str):
            raise PickerError(400, f"endpoint subset entry {item!r} is not a string",
                              "bad_subset")
        item = item.strip()
        if item:
            out.add(item)
    return frozenset(out)


def header_value(text: str, limit: int = 200) -> str:
    """Text safe as an HTTP header value: printable ASCII, at most ``limit`` characters
    (a proxy rejects a mutation with control characters)."""
    return "".join(c if " " <= c <= "~" else "?" for c in text[:limit])


def error_body(status: int, message: str, code: str) -> bytes:
    kind = "invalid_request_error" if status < 500 and status != 429 else "server_error"
    if status == 429:
        kind = "rate_limit_error"
    return json.dumps({"error": {"message": message, "type": kind, "param": None,
                                 "code": code}}).encode()


@dataclass(frozen=True, slots=True)
class StreamSettings:
    priority_header: str = "x-kvmesh-priority"
    shed_below: int = 0
    """Requests with a priority below this are sheddable: 429 rather than waiting."""
    dest_namespace: str = DEST_NAMESPACE
    subset_namespace: str = SUBSET_NAMESPACE
    max_body: int = MAX_BODY


class PickerStream:
    """One request's ext_proc exchange; ``feed`` an event, send back what it returns.

    Order of the replies follows the full-duplex contract: the request headers' reply
    (carrying the pick) is sent once the body is complete, then the body itself.
    """

    def __init__(self, settings: StreamSettings | None = None) -> None:
        self.settings = settings or StreamSettings()
        self.request_headers: Headers | None = None
        self._body = bytearray()
        self.ask: Ask | None = None
        self.pick: Pick | None = None
        self.refused: Refusal | None = None
        self.served: Served | None = None
        self.finished = False
        self._trailers = False

    # -- request side ----------------------------------------------------------------------
    def feed(self, ev: Event) -> list[Out]:
        if self.finished:
            return []
        if isinstance(ev, Headers):
            return self._headers(ev)
        if isinstance(ev, Body):
            return self._body_chunk(ev)
        if ev.phase == "request" and self.request_headers is not None and self.ask is None:
            # Trailers end a request body that never said end_of_stream: pick now, and
            # acknowledge them after the body is sent on.
            self._trailers = True
            return self._ready()
        return [TrailersReply(ev.phase)]

    def _headers(self, ev: Headers) -> list[Out]:
        if ev.phase == "request":
            if self.request_headers is not None:
                return self._fail(PickerError(400, "request headers twice", "protocol"))
            self.request_headers = ev
            if ev.end_of_stream:
                return self._ready()
            return []
        return self._response_headers(ev)

    def _body_chunk(self, ev: Body) -> list[Out]:
        if ev.phase == "response":
            # At the response's end the request leaves the books first, then the last chunk
            # goes out (the proxy may end the RPC as soon as it has that chunk).
            last = BodyReply("response", ev.chunk, ev.end_of_stream)
            return [self._finish(True), last] if ev.end_of_stream else [last]
        if self.request_headers is None:
            return self._fail(PickerError(400, "request body before its headers", "protocol"))
        if self.ask is not None:
            return []
        self._body += ev.chunk
        if len(self._body) > self.settings.max_body:
            return self._fail(PickerError(413, f"request body is larger than "
                                               f"{self.settings.max_body} bytes", "too_large"))
        if ev.end_of_stream:
            return self._ready()
        return []

    def _ready(self) -> list[Out]:
        assert self.request_headers is not None
        try:
            self.ask = self._ask(self.request_headers)
        except PickerError as exc:
            return self._fail(exc)
        return [NeedPick(self.ask)]

    def _ask(self, h: Headers) -> Ask:
        path = h.headers.get(":path", "").split("?", 1)[0]
        subset = None
        hint = h.metadata.get(self.settings.subset_namespace)
        if isinstance(hint, Mapping) and SUBSET_KEY in hint:
            subset = parse_endpoints(hint[SUBSET_KEY])
        raw = h.headers.get(self.settings.priority_header, "").strip()
        priority, tier = 0, None
        if raw:
            try:
                priority, tier = picker_priority(raw)
            except TierError:
                raise PickerError(400, f"{self.settings.priority_header} must be an integer "
                                       "or interactive, standard or batch, got "
                                       f"{raw[:40]!r}", "bad_priority") from None
        return Ask(path, INFERENCE_PATHS.get(path), bytes(self._body), h.headers, subset,
                   priority, priority < self.settings.shed_below, tier)

    def decided(self, result: Pick | Refusal | PickerError) -> list[Out]:
        """The core's answer to :class:`NeedPick`: the request headers' reply and the body."""
        if self.finished:
            return []
        if isinstance(result, PickerError):
            return self._fail(result)
        if isinstance(result, Refusal):
            self.refused = result
            extra = (() if result.retry_after is None else
                     (("retry-after", str(max(1, math.ceil(result.retry_after)))),))
            return self._fail(PickerError(result.status, result.message, result.code), extra)
        self.pick = result
        value = ",".join(result.endpoints)
        reply = HeadersReply(
            "request",
            set_headers=((DEST_HEADER, value), *result.headers),
            clear_route_cache=True,
            dynamic_metadata={self.settings.dest_namespace: {DEST_HEADER: value}},
        )
        out: list[Out] = [reply]
        assert self.request_headers is not None
        if not self.request_headers.end_of_stream:
            out.append(BodyReply("request", bytes(self._body), not self._trailers))
        if self._trailers:
            out.append(TrailersReply("request"))
        self._body = bytearray()
        return out

    # -- response side ---------------------------------------------------------------------
    def _response_headers(self, ev: Headers) -> list[Out]:
        status_text = ev.headers.get(":status", "0")
        status = int(status_text) if status_text.isdigit() else 0
        served = None
        md = ev.metadata.get(self.settings.dest_namespace)
        if isinstance(md, Mapping) and isinstance(md.get(SERVED_KEY), str):
            served = str(md[SERVED_KEY]) or None
        if served is None:
            addr = ev.attributes.get(UPSTREAM_ATTRIBUTE)
            served = addr if isinstance(addr, str) and addr else None
        picked = self.pick.endpoints if self.pick else ()
        self.served = Served(served, picked, status)
        extra: tuple[tuple[str, str], ...] = ()
        if self.pick is not None:
            extra = (("x-kvmesh-replica", self.pick.replica),
                     ("x-kvmesh-region", self.pick.region),
                     ("x-kvmesh-route", header_value(self.pick.reason)))
        # Notes before the reply: the shell acts on them before the proxy hears back.
        out: list[Out] = [self.served]
        if ev.end_of_stream:
            out.append(self._finish(True))
        out.append(HeadersReply("response", set_headers=extra))
        return out

    def close(self) -> list[Out]:
        """The gRPC stream ended (the proxy is done, or gave up)."""
        if self.finished:
            return []
        return [self._finish(False)]

    def _finish(self, complete: bool) -> Finished:
        self.finished = True
        return Finished(complete)

    def _fail(self, exc: PickerError,
              extra: tuple[tuple[str, str], ...] = ()) -> list[Out]:
        self.finished = True
        return [ImmediateReply(exc.status, error_body(exc.status, exc.message, exc.code),
                               (("content-type", "application/json"),
                                ("x-kvmesh-route", header_value(exc.message)), *extra),
                               details=exc.code),
                Finished(False)]
