"""The fake vLLM's HTTP/1.1 side: one asyncio Protocol per client connection.

It parses requests one at a time (keep-alive, pipelining), finds the route, applies the faults
that act before an answer, and writes the route's reply: a whole body, or a stream event by event
with the stream faults. It is a bare Protocol rather than a framework app so that the fake stays
far cheaper than the proxy it tests and can serve as the benchmark's upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from tests.fakes import routes
from tests.fakes.record import Cancelled, Record, Seen
from tests.fakes.replies import Fault, Stream, Whole, pieces, planned
from tests.fakes.shapes import error_body

if TYPE_CHECKING:
    from tests.fakes.vllm import FakeVLLM

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    411: "Length Required",
    413: "Payload Too Large",
    422: "Unprocessable Entity",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}
_MAX_HEADER_BYTES = 64 * 1024


@dataclass
class Response:
    """State of the response in progress on one connection."""

    seen: Seen
    counted: bool  # an inference request: counted in inflight
    events_sent: int = 0
    bytes_sent: int = 0
    task: asyncio.Task[None] | None = None


class Connection(asyncio.Protocol):
    """One client connection: parse requests one at a time, answer, keep alive."""

    def __init__(self, fake: FakeVLLM) -> None:
        self.fake = fake
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.response: Response | None = None
        self.idle: asyncio.TimerHandle | None = None
        self.closed = False
        self.keep_alive = True
        self.writing_paused = False  # above the transport's high-water mark
        self._writable: asyncio.Future[None] | None = None

    # -- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports do not subclass asyncio's.
        self.transport = typing.cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.fake._protocols.add(self)

        def count(r: Record) -> None:
            r.connections += 1

        self.fake._update(count)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.fake._protocols.discard(self)
        if self.idle is not None:
            self.idle.cancel()
        response = self.response
        if response is not None:
            self.response = None
            rid = response.seen.headers.get("x-request-id")
            gone = Cancelled(response.seen.path, rid, response.events_sent, time.monotonic())

            def cancelled(r: Record) -> None:
                r.cancelled.append(gone)
                r.inflight -= response.counted

            self.fake._update(cancelled)
            if response.task is not None:
                response.task.cancel()

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        writable = self._writable
        if writable is not None and not writable.done():
            writable.set_result(None)

    async def _drain(self) -> None:
        """Wait until the transport is below its low-water mark (the `flow_control` fault)."""
        while self.writing_paused and not self.closed:
            self._writable = asyncio.get_running_loop().create_future()
            try:
                await self._writable
            finally:
                self._writable = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.response is None:
            self._next_request()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection at once (shutdown): a TLS transport's close() would wait for the
        peer's close_notify, past the end of the loop, and leave its socket unclosed."""
        if self.transport is not None and not self.closed:
            self.transport.abort()

    # -- requests -------------------------------------------------------------------------
    def _arm_idle(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
        loop = asyncio.get_running_loop()
        self.idle = loop.call_later(self.fake.keepalive_timeout, self.close)

    def _next_request(self) -> None:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > _MAX_HEADER_BYTES:
                self._simple(Whole(431, b""), close=True)
            return
        head = bytes(self.buffer[:end]).decode("latin-1")
        lines = head.split("\r\n")
        try:
            method, target, version = lines[0].split(" ")
        except ValueError:
            self._simple(Whole(400, b""), close=True)
            return
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "transfer-encoding" in headers:
            self._simple(Whole(411, b""), close=True)  # enough for the clients we test with
            return
        length = int(headers.get("content-length", "0") or 0)
        if len(self.buffer) < end + 4 + length:
            return
        raw = bytes(self.buffer[end + 4 : end + 4 + length])
        del self.buffer[: end + 4 + length]
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None
        self.keep_alive = version == "HTTP/1.1" and headers.get("connection", "") != "close"
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        seen = Seen(method, target, headers, body, raw, time.monotonic())
        route = routes.resolve(seen.route, self.fake)
        counted = route is not None and route.inference and method == route.method
        self.response = Response(seen, counted)

        def started(r: Record) -> None:
            if self.fake.record_requests:
                r.requests.append(seen)
            r.inflight += counted
            r.max_inflight = max(r.max_inflight, r.inflight)

        self.fake._update(started)
        self._dispatch(seen, route)

    def _done(self) -> None:
        """The response is complete: count it, then serve a pipelined request or wait."""
        response = self.response
        if response is None:
            return
        self.response = None

        def finished(r: Record) -> None:
            r.inflight -= response.counted

        self.fake._update(finished)
        if not self.keep_alive:
            self.close()
            return
        self._arm_idle()
        if self.buffer:
            self._next_request()

    def _abort(self, rst: bool) -> None:
        """End the connection mid-response on our own account (not a client cancellation):
        a TCP RST (`reset_after_events`), or a clean FIN without the chunked terminator
        (what uvicorn does when vLLM's stream generator raises)."""
        assert self.transport is not None
        self.keep_alive = False
        response = self.response
        if response is not None:
            self.response = None

            def finished(r: Record) -> None:
                r.inflight -= response.counted

            self.fake._update(finished)
        if not rst:
            self.transport.close()
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def _write_head(self, status: int, headers: Iterable[tuple[str, str]]) -> None:
        assert self.transport is not None
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
        lines += [f"{k}: {v}" for k, v in headers]
        if not self.keep_alive:
            lines.append("connection: close")
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if self.response is not None and self.response.counted:

            def sent(r: Record) -> None:
                r.heads_sent += 1

            self.fake._update(sent)

    def _simple(self, whole: Whole, close: bool = False) -> None:
        if close:
            self.keep_alive = False
        headers = [*whole.headers, ("content-length", str(len(whole.body)))]
        if whole.body:
            headers.insert(0, ("content-type", whole.ctype))
        self._write_head(whole.status, headers)
        assert self.transport is not None
        self.transport.write(whole.body)
        if self.response is None:
            if close:
                self.close()
            return
        self._done()

    def _dispatch(self, seen: Seen, route: routes.Route | None) -> None:
        if route is None:
            self._simple(routes.not_found())
            return
        if seen.method != route.method:
            self._simple(Whole(405, b'{"detail":"Method Not Allowed"}'))
            return
        key = self.fake.api_key
        guarded = seen.route.startswith(self.fake.guarded)
        if key and guarded and seen.headers.get("authorization") != f"Bearer {key}":
            self._simple(Whole(401, b'{"error":"Unauthorized"}'))
            return
        body = seen.body
        if route.json_body and not isinstance(body, dict):
            self._simple(Whole(400, error_body("Invalid JSON body", "Bad Request", 400)))
            return
        if not route.faults:
            reply = route.handler(self.fake, seen, body, {})
            assert isinstance(reply, Whole), "only the routes with faults stream"
            self._simple(reply)
            return
        assert self.response is not None
        task = asyncio.get_running_loop().create_task(self._answer(route, seen, body))
        self.response.task = task

    async def _answer(self, route: routes.Route, seen: Seen, body: Any) -> None:
        """Faults that act before any answer, then the route's own answer."""
        asked = body.get("fake") if isinstance(body, dict) else None
        fault: Fault = {**self.fake.defaults, **(asked or {})}
        if fault.get("fail_first"):
            rid = seen.headers.get("x-request-id", "")
            with self.fake._cond:
                count = self.fake._attempts[rid] = self.fake._attempts.get(rid, 0) + 1
            if count <= fault["fail_first"]:
                fault = {**fault, **fault.get("fail_with", {"status": 502})}
        if fault.get("never_answer"):
            await asyncio.Future()  # until the client goes away (connection_lost cancels us)
        delay = fault.get("first_byte_delay")
        if delay:
            await asyncio.sleep(delay)
        if "status" in fault:
            payload = fault.get("body", "")
            data = payload if isinstance(payload, bytes) else None
            if data is None:
                data = payload.encode() if isinstance(payload, str) else orjson.dumps(payload)
            self._simple(Whole(int(fault["status"]), data))
            return
        reply = route.handler(self.fake, seen, body, fault)
        if isinstance(reply, Whole):
            self._simple(reply)
        else:
            await self._stream(reply, fault)

    async def _stream(self, stream: Stream, fault: Fault) -> None:
        transport = self.transport
        response = self.response
        assert transport is not None and response is not None
        eof = fault.get("framing") == "eof"
        head = [("content-type", "text/event-stream; charset=utf-8")]
        self._write_head(200, head if eof else [*head, ("transfer-encoding", "chunked")])
        chunks, cut = planned(stream, fault)
        if fault.get("split") is not None:
            if fault.get("first_event_delay"):
                await asyncio.sleep(fault["first_event_delay"])
            split_delay = fault.get("split_delay", 0.0)
            for piece in pieces(b"".join(chunks), fault["split"]):
                transport.write(b"%x\r\n%b\r\n" % (len(piece), piece))
                await asyncio.sleep(split_delay)
            eof = False  # the pieces are always chunked
        elif not await self._events(chunks, fault, eof):
            return
        self._finish(stream, cut, eof)

    async def _events(self, chunks: Iterable[bytes], fault: Fault, eof: bool) -> bool:
        """Event by event with the stream faults; False if a fault ended the connection."""
        transport, response = self.transport, self.response
        assert transport is not None and response is not None
        token_delay = fault.get("token_delay", 0.0)
        reset_after = fault.get("reset_after_events")
        hang_after = fault.get("hang_after_events")
        flow_control = fault.get("flow_control")
        for i, event in enumerate(chunks):
            if i == 0 and fault.get("first_event_delay"):
                await asyncio.sleep(fault["first_event_delay"])
            elif i:
                # Each event is its own write on its own loop turn, as an engine produces them.
                await asyncio.sleep(token_delay)
            if reset_after is not None and i == reset_after:
                self._abort(rst=True)
                return False
            if hang_after is not None and i == hang_after:
                await asyncio.Future()
            if flow_control:
                await self._drain()
            chunk = event if eof else b"%x\r\n%b\r\n" % (len(event), event)
            transport.write(chunk)
            response.events_sent += 1
            response.bytes_sent += len(chunk)
        return True

    def _finish(self, stream: Stream, cut: bool, eof: bool) -> None:
        assert self.transport is not None
        if cut:
            self._abort(rst=False)
            return
        if stream.done is not None:
            stream.done()
        if eof:
            self.keep_alive = False  # the end of the body is the end of the connection
        else:
            self.transport.write(b"0\r\n\r\n")
        self._done()
