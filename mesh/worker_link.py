"""The link between a router's primary process and its worker processes.

Wire: length-prefixed msgpack frames over a Unix stream socket, each ``[op, call_id, body]``
(``call_id`` -1: a one-way note; op ``reply``: the answer to a call, ``["ok", body]`` or
``["error", message]``). Both ends may call the other (a worker asks for placements, the
primary asks a worker for its metrics), so one :class:`Link` class serves both: the frame
codec (:class:`FrameReader`) and the pending-call table (:class:`Calls`) are sans-I/O; the
link only moves bytes. Frames of one link arrive in the order sent, which the in-flight
accounting relies on (a ``start`` note is seen before the next ``place`` call).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack  # type: ignore[import-untyped,unused-ignore]

log = logging.getLogger("kvmesh.workers")

MAX_FRAME = 8 << 20
"""A placement call carries a prompt's token ids and a few fields: far below this."""
_LEN = struct.Struct(">I")


class LinkError(ConnectionError):
    """The link is closed, or the peer sent something that is not a frame of this protocol."""


def encode_frame(op: str, call_id: int, body: Any) -> bytes:
    payload: bytes = msgpack.packb([op, call_id, body], use_bin_type=True)
    if len(payload) > MAX_FRAME:
        raise LinkError(f"frame of {len(payload)} bytes over the {MAX_FRAME}-byte limit")
    return _LEN.pack(len(payload)) + payload


@dataclass(slots=True)
class FrameReader:
    """Bytes in, ``(op, call_id, body)`` frames out; ``LinkError`` on a malformed stream."""

    _buf: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> list[tuple[str, int, Any]]:
        self._buf += data
        out = []
        at = 0
        buf = self._buf
        while len(buf) - at >= 4:
            (size,) = _LEN.unpack_from(buf, at)
            if size > MAX_FRAME:
                raise LinkError(f"frame of {size} bytes over the {MAX_FRAME}-byte limit")
            if len(buf) - at < 4 + size:
                break
            raw = bytes(buf[at + 4: at + 4 + size])
            at += 4 + size
            try:
                frame = msgpack.unpackb(raw, raw=False, strict_map_key=True)
            except (ValueError, msgpack.UnpackException) as exc:
                raise LinkError(f"undecodable frame: {exc}") from None
            if (not isinstance(frame, list) or len(frame) != 3 or not isinstance(frame[0], str)
                    or not isinstance(frame[1], int)):
                raise LinkError("a frame is not [op, call_id, body]")
            out.append((frame[0], frame[1], frame[2]))
        if at:
            del buf[:at]
        return out


@dataclass(slots=True)
class Calls:
    """Pending calls by id (sans-I/O): ``open`` a call, ``settle`` it from a reply frame."""

    _next: int = 0
    _pending: dict[int, asyncio.Future[Any]] = field(default_factory=dict)

    def open(self, future: asyncio.Future[Any]) -> int:
        call_id = self._next
        self._next += 1
        self._pending[call_id] = future
        return call_id

    def settle(self, call_id: int, body: Any) -> None:
        fut = self._pending.pop(call_id, None)
        if fut is None or fut.done():
            return
        if isinstance(body, list) and len(body) == 2 and body[0] == "ok":
            fut.set_result(body[1])
        elif isinstance(body, list) and len(body) == 2 and body[0] == "error":
            fut.set_exception(ValueError(str(body[1])))
        else:
            fut.set_exception(LinkError(f"malformed reply to call {call_id}"))

    def fail_all(self, exc: BaseException) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self._pending.clear()

    def __len__(self) -> int:
        return len(self._pending)


Handler = Callable[["Link", str, Any], Awaitable[Any]]
"""``(link, op, body) -> reply body``; raising ``ValueError`` answers the call with an error."""
Note = Callable[["Link", str, Any], None]
"""``(link, op, body)`` for a one-way note, handled at once, in order."""


class Link:
    """One end of a connected link: calls and notes out, the handlers' answers in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 handler: Handler | None = None, note: Note | None = None) -> None:
        self._reader = reader
        self._writer = writer
        self.handler = handler
        self.note = note
        self._calls = Calls()
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = asyncio.Event()
        self.info: dict[str, Any] = {}
        """What the other end said about itself (a worker's index and pid)."""
        self._loop_task = asyncio.create_task(self._read(), name="worker link")

    async def _read(self) -> None:
        frames = FrameReader()
        why: BaseException = LinkError("the other end closed the link")
        try:
            while data := await self._reader.read(1 << 16):
                for op, call_id, body in frames.feed(data):
                    if op == "reply":
                        self._calls.settle(call_id, body)
                    elif call_id < 0:
                        self._note(op, body)
                    else:
                        t = asyncio.create_task(self._call(op, call_id, body))
                        self._tasks.add(t)
                        t.add_done_callback(self._tasks.discard)
        except LinkError as exc:
            log.warning("worker link closed: %s", exc)
            why = exc
        except ConnectionError as exc:
            why = LinkError(str(exc))
        finally:
            self._calls.fail_all(why)
            self._writer.close()
            self.closed.set()

    def _note(self, op: str, body: Any) -> None:
        if self.note is None:
            return
        try:
            self.note(self, op, body)
        except Exception:  # a bad note never takes the link down
            log.exception("worker note %s failed", op)

    async def _call(self, op: str, call_id: int, body: Any) -> None:
        try:
            if self.handler is None:
                raise ValueError(f"no handler for {op}")
            reply = ["ok", await self.handler(self, op, body)]
        except ValueError as exc:
            reply = ["error", str(exc)]
        except Exception as exc:  # a failing call never takes the link down
            log.exception("link call %s failed", op)
            reply = ["error", f"{type(exc).__name__}: {exc}"]
        if not self._writer.is_closing():
            self._writer.write(encode_frame("reply", call_id, reply))

    async def call(self, op: str, body: Any) -> Any:
        if self.closed.is_set() or self._writer.is_closing():
            raise LinkError("the link is closed")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._writer.write(encode_frame(op, self._calls.open(fut), body))
        return await fut

    def notify(self, op: str, body: Any) -> None:
        if self.closed.is_set() or self._writer.is_closing():
            raise LinkError("the link is closed")
        self._writer.write(encode_frame(op, -1, body))

    async def close(self) -> None:
        self._writer.close()
        for t in list(self._tasks):
            t.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._loop_task


async def connect(path: str, handler: Handler | None = None, note: Note | None = None) -> Link:
    reader, writer = await asyncio.open_unix_connection(path)
    return Link(reader, writer, handler, note)


class LinkServer:
    """The primary's end: a :class:`Link` per connected worker."""

    def __init__(self, path: str, handler: Handler, note: Note | None = None,
                 on_close: Callable[[Link], None] | None = None) -> None:
        self.path = path
        self.handler = handler
        self.note = note
        self.on_close = on_close
        self.links: set[Link] = set()
        self._server: asyncio.AbstractServer | None = None
        self._stopping = False

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=self.path)
        os.chmod(self.path, 0o600)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._stopping:  # accepted while stopping
            writer.close()
            return
        link = Link(reader, writer, self.handler, self.note)
        self.links.add(link)
        try:
            await link.closed.wait()
        finally:
            self.links.discard(link)
            await link.close()
            if self.on_close is not None:
                try:
                    self.on_close(link)
                except Exception:
                    log.exception("releasing a worker's link failed")

    async def stop(self) -> None:
        """Stop accepting, close every worker's link (their pending calls fail), wait."""
        self._stopping = True
        if self._server is not None:
            self._server.close()
        for link in list(self.links):
            await link.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)
