"""Property fuzz of the HTTP API against a live router (hypothesis; small for CI).

The bulk run is ``kvmesh bench fuzz-http`` (100k requests); this keeps a few hundred
generated requests in every test run. Oracle: no 500, every API error in OpenAI's format,
no traceback in the router's log, the router still healthy afterwards.
"""

from __future__ import annotations

import asyncio
import http.client
import json
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from router_support import MESH_KEY, MODEL, Procs, healthy, processes, sees_replicas, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Procs, str]]:
    with processes(tmp_path_factory.mktemp("fuzz")) as procs:
        eng = procs.engine("engine", 200.0)
        url = procs.router("router", {"region": "eu", "engines": [eng.url],
                                      "mesh_key": MESH_KEY, "header_timeout": 5.0})

        async def ready() -> None:
            async with aiohttp.ClientSession() as s:
                await wait_until(partial(healthy, s, url), what="router up")
                await wait_until(partial(sees_replicas, s, url, 1), what="engine up")

        asyncio.run(ready())
        yield procs, url


_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False), st.text(max_size=20),
)
_json = st.recursive(_scalar, lambda inner: st.lists(inner, max_size=5)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=5), max_leaves=25)
_text = st.text(max_size=60)
_message = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["user", "system", "assistant"]), _json),
     "content": st.one_of(_text, _json)})
_body = st.fixed_dictionaries(
    {},
    optional={
        "model": st.one_of(st.just(MODEL), _json),
        "prompt": st.one_of(_text, st.lists(st.integers(-5, 2**40), max_size=40), _json),
        "messages": st.one_of(st.lists(_message, max_size=3), _json),
        "max_tokens": st.one_of(st.integers(-2, 3), _json),
        "stream": st.one_of(st.booleans(), _json),
        "cache_salt": st.one_of(_text, _json),
        "user": _text,
    },
)
_header_value = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=40)
_headers = st.dictionaries(
    st.sampled_from(["x-kvmesh-hop", "x-kvmesh-from", "x-kvmesh-target", "x-kvmesh-sig",
                     "x-kvmesh-ts", "x-request-id", "x-session-id", "content-encoding",
                     "authorization"]),
    _header_value, max_size=4)
_raw = st.one_of(_body.map(lambda b: json.dumps(b).encode()),
                 _json.map(lambda b: json.dumps(b).encode()), st.binary(max_size=80))
_path = st.sampled_from(["/v1/completions", "/v1/chat/completions"] * 4
                        + ["/v1/models", "/health", "/mesh/status", "/nope"])
_method = st.sampled_from(["POST"] * 6 + ["GET", "PUT", "DELETE"])


def send(url: str, method: str, path: str, headers: dict[str, str],
         body: bytes) -> tuple[int, dict[str, str], bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        hdrs = {k: v.encode("latin-1").decode("latin-1") for k, v in headers.items()}
        conn.request(method, path, body=body,
                     headers={"Content-Type": "application/json", **hdrs})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@settings(max_examples=250, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(method=_method, path=_path, headers=_headers, body=_raw)
def test_generated_requests_never_crash_the_router(
    router: tuple[Procs, str], method: str, path: str, headers: dict[str, str], body: bytes,
) -> None:
    _, url = router
    status, hdrs, answer = send(url, method, path, headers, body)
    assert status != 500, answer[:300]
    assert status < 600
    if path.startswith("/v1/") and status >= 400:
        assert hdrs.get("content-type", "").startswith("application/json"), (status, answer)
        err: dict[str, Any] = json.loads(answer)["error"]
        assert isinstance(err["message"], str) and err["message"]


def test_after_the_fuzz_the_log_is_clean_and_the_router_healthy(
    router: tuple[Procs, str],
) -> None:
    procs, url = router
    status, _, _ = send(url, "GET", "/health", {}, b"")
    assert status == 200
    log = procs.log("router")
    assert "Traceback" not in log
    assert "unexpected error" not in log
    assert Path(procs.workdir / "router.log").exists()
