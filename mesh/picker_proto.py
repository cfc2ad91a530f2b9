"""ext_proc protobuf messages <-> the picker's plain events and replies (``mesh.picker``).

The generated types come from ``xds-protos`` (``envoy.service.ext_proc.v3``); nothing
else in kvmesh touches protobuf. Pure functions, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.type.v3 import http_status_pb2
from google.protobuf import json_format, struct_pb2

from mesh.picker import (
    Body,
    BodyReply,
    Event,
    Headers,
    HeadersReply,
    ImmediateReply,
    Reply,
    Trailers,
    TrailersReply,
)

ATTRIBUTE_KEY = "envoy.filters.http.ext_proc"
"""Namespace under which Envoy sends the attributes it was asked for."""


def _headers(msg: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for h in msg.headers.headers:
        value = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
        key = h.key.lower()
        out[key] = f"{out[key]},{value}" if key in out else value
    return out


def _metadata(req: Any) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for ns, st in req.metadata_context.filter_metadata.items():
        out[ns] = json_format.MessageToDict(st)
    return out


def _attributes(req: Any) -> dict[str, Any]:
    st = req.attributes.get(ATTRIBUTE_KEY)
    if st is None:
        return {}
    value: dict[str, Any] = json_format.MessageToDict(st)
    return value


def to_event(req: Any) -> Event | None:
    """A ``ProcessingRequest`` as a picker event; None for a kind the picker ignores."""
    kind = req.WhichOneof("request")
    if kind in ("request_headers", "response_headers"):
        msg = getattr(req, kind)
        return Headers(kind.split("_")[0], _headers(msg), msg.end_of_stream, _metadata(req),
                       _attributes(req))
    if kind in ("request_body", "response_body"):
        msg = getattr(req, kind)
        return Body(kind.split("_")[0], bytes(msg.body), msg.end_of_stream)
    if kind in ("request_trailers", "response_trailers"):
        return Trailers(kind.split("_")[0])
    return None


def _mutation(set_headers: tuple[tuple[str, str], ...],
              remove: tuple[str, ...] = ()) -> Any:
    return ep.HeaderMutation(
        set_headers=[
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=k, raw_value=v.encode()),
                append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
            )
            for k, v in set_headers
        ],
        remove_headers=list(remove),
    )


def _struct(value: Mapping[str, Any]) -> Any:
    st = struct_pb2.Struct()
    st.update({k: dict(v) for k, v in value.items()})
    return st


def to_response(reply: Reply) -> Any:
    """A picker reply as a ``ProcessingResponse``."""
    if isinstance(reply, HeadersReply):
        common = ep.CommonResponse(
            header_mutation=_mutation(reply.set_headers, reply.remove_headers),
            clear_route_cache=reply.clear_route_cache,
        )
        kwargs: dict[str, Any] = {f"{reply.phase}_headers": ep.HeadersResponse(response=common)}
        if reply.dynamic_metadata is not None:
            kwargs["dynamic_metadata"] = _struct(reply.dynamic_metadata)
        return ep.ProcessingResponse(**kwargs)
    if isinstance(reply, BodyReply):
        common = ep.CommonResponse(body_mutation=ep.BodyMutation(
            streamed_response=ep.StreamedBodyResponse(body=reply.chunk,
                                                      end_of_stream=reply.end_of_stream)))
        return ep.ProcessingResponse(**{f"{reply.phase}_body": ep.BodyResponse(response=common)})
    if isinstance(reply, TrailersReply):
        return ep.ProcessingResponse(**{f"{reply.phase}_trailers": ep.TrailersResponse()})
    assert isinstance(reply, ImmediateReply)
    return ep.ProcessingResponse(immediate_response=ep.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=reply.status),
        headers=_mutation(reply.headers),
        body=reply.body,
        details=reply.details,
    ))
