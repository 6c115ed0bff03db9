"""A fake vLLM OpenAI server: a small real HTTP/1.1 server with fault injection.

It speaks the shapes vLLM answers with (`/health`, `/v1/models`, `/metrics`, `/tokenize`,
`/v1/chat/completions`, `/v1/completions`, stream and not, SSE framed exactly like vLLM) over
real sockets, so streaming, disconnect and keep-alive behaviour of the proxy is tested for real.
It is a bare asyncio Protocol rather than a framework app so that it stays far cheaper than the
proxy and can serve as the benchmark's upstream.

Faults are chosen per request by a `"fake"` object in the JSON body (the proxy forwards unknown
fields untouched), merged over the server-wide `FakeVLLM.defaults`:

    status, body            answer with this status and body (str, or an object sent as JSON)
    first_byte_delay        seconds before anything is sent (status line included)
    first_event_delay       stream: headers at once, the first event after this many seconds
    token_delay             seconds between two events
    tokens                  content tokens to generate (default: max_tokens, else 8)
    reset_after_events      stream: after N events, reset the connection (RST)
    hang_after_events       stream: after N events, send nothing more and keep the socket open
    never_answer            read the request, send nothing
    error_event_after       stream: after N events, an error event then [DONE] (as vLLM does)
    split                   stream: "every_byte", a piece size, or a list of byte offsets;
    split_delay             the body is sent in those pieces with this delay between them
    end_after_events        stream: after N events, end the response cleanly without [DONE]
    framing                 stream: "chunked" (default) or "eof" (no Transfer-Encoding: the
                            body ends when the connection closes, as HTTP/1.0 servers do)
    endless_event           stream: after the first event, an event of this many bytes with
                            no blank line (then the response ends)
    token_padding           stream: each generated token's text is followed by this many "."
                            (large events: a stream of many MiB in a few thousand events)
    flow_control            stream: write no event while the socket's send buffer is above its
                            high-water mark, as vLLM's server (uvicorn) does; a client that stops
                            reading then stalls the stream instead of piling it up in the fake
    fail_first, fail_with   the first `fail_first` requests with the same X-Request-ID get the
                            faults in `fail_with` (default {"status": 502}) merged in: an
                            upstream that fails once, then works (what retries are for)

What it saw is recorded for assertions (thread-safe): `connections`, `requests`, `cancelled`
(responses the client abandoned before they were complete), `inflight` and `max_inflight`.
`streams()` is a snapshot of the streams in progress: how far each got, and its backlog.

In-process: `with FakeVLLM() as fake: ... fake.base_url` runs it on a background thread with its
own loop. As a process: `python -m tests.fakes.vllm --port 8000` (the benchmark's upstream).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import socket
import ssl
import struct
import threading
import time
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from tests.fakes.shapes import (
    SSE_DONE,
    answer_text,
    error_body,
    prompt_tokens,
    sse,
    stream_events,
    token_text,
    whole_answer,
)

__all__ = [
    "SSE_DONE",
    "Cancelled",
    "FakeVLLM",
    "Record",
    "Seen",
    "Streaming",
    "answer_text",
    "prompt_tokens",
    "sse",
    "stream_events",
    "token_text",
    "whole_answer",
]

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
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
_COMPLETIONS = ("/v1/chat/completions", "/v1/completions")


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: Any  # parsed JSON, or None
    raw: bytes
    at: float  # time.monotonic()


@dataclass(frozen=True)
class Cancelled:
    """A response the client closed the connection on before it was complete."""

    path: str
    request_id: str | None
    events_sent: int
    at: float  # time.monotonic()


@dataclass(frozen=True)
class Streaming:
    """A stream in progress (`FakeVLLM.streams()`)."""

    path: str
    request_id: str | None
    events_sent: int
    bytes_sent: int  # the events written to the transport, chunk framing included
    buffered: int  # of those, still in the transport's buffer: not yet taken by the kernel
    writing_paused: bool  # the transport is above its high-water mark


@dataclass
class _Response:
    """State of the response in progress on one connection."""

    seen: Seen
    counted: bool  # a completion: counted in inflight (what /metrics reports as running)
    events_sent: int = 0
    bytes_sent: int = 0
    task: asyncio.Task[None] | None = None


@dataclass
class Record:
    connections: int = 0
    requests: list[Seen] = field(default_factory=list)
    cancelled: list[Cancelled] = field(default_factory=list)
    inflight: int = 0
    max_inflight: int = 0
    heads_sent: int = 0  # completion responses whose status line and headers were sent


class FakeVLLM:
    """The fake server. Thread mode: `start()`/`stop()` or a `with` block."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        model: str = "tiny",
        max_model_len: int = 2048,
        api_key: str | None = None,
        keepalive_timeout: float = 5.0,
        defaults: dict[str, Any] | None = None,
        record: bool = True,
        ssl_context: ssl.SSLContext | None = None,
        guarded: tuple[str, ...] = ("/v1/",),
    ) -> None:
        self.host = host
        # Serve https:// with this context (an engine behind TLS).
        self.ssl_context = ssl_context
        self.port = port
        self.model = model
        self.max_model_len = max_model_len
        self.api_key = api_key
        # The paths `api_key` guards: vLLM's --api-key guards /v1/ only; an engine behind an
        # authenticating proxy may guard everything but /health.
        self.guarded = guarded
        # Like uvicorn (vLLM's server): an idle keep-alive connection is closed after 5 s.
        self.keepalive_timeout = keepalive_timeout
        self.defaults: dict[str, Any] = dict(defaults or {})
        # What /metrics reports as KV-cache usage (0..1): set it to exercise load shedding.
        self.kv_cache_usage = 0.0
        # What /tokenize answers with: anything but 200 makes it fail (the engine's tokenizer
        # endpoint down or disabled) with an error body of that status.
        self.tokenize_status = 200
        self.record_requests = record
        self.seen = Record()
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._protocols: set[_Connection] = set()
        self._created = int(time.time())
        self._attempts: dict[str, int] = {}  # X-Request-ID -> requests seen (fail_first)

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    async def listen(self) -> asyncio.Server:
        """Start listening on the running loop (process mode, or from `start`)."""
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(
            lambda: _Connection(self), self.host, self.port, backlog=1024, ssl=self.ssl_context
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self._server

    def start(self) -> FakeVLLM:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self.listen())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._shutdown())
                loop.close()

        self._thread = threading.Thread(target=run, name="fake-vllm", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        return self

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for proto in list(self._protocols):
            proto.close()
        tasks = [p.response.task for p in self._protocols if p.response and p.response.task]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._thread = None

    def __enter__(self) -> FakeVLLM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what it saw ----------------------------------------------------------------------
    def _update(self, fn: Callable[[Record], None]) -> None:
        with self._cond:
            fn(self.seen)
            self._cond.notify_all()

    def wait(self, predicate: Callable[[Record], bool], timeout: float = 5.0) -> bool:
        """Block until `predicate(record)` holds; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.seen), timeout)

    async def wait_async(self, predicate: Callable[[Record], bool], within: float = 5.0) -> bool:
        """`wait` for async tests: the blocking wait runs on a worker thread."""
        return await asyncio.to_thread(self.wait, predicate, within)

    def streams(self) -> list[Streaming]:
        """The streams in progress (event by event, not `split`), read on the fake's own loop."""
        loop = self._loop
        assert loop is not None and self._thread is not None, "thread mode only"

        async def snapshot() -> list[Streaming]:
            out = []
            for proto in self._protocols:
                response, transport = proto.response, proto.transport
                if response is None or transport is None or not response.bytes_sent:
                    continue
                out.append(
                    Streaming(
                        response.seen.path,
                        response.seen.headers.get("x-request-id"),
                        response.events_sent,
                        response.bytes_sent,
                        transport.get_write_buffer_size(),
                        proto.writing_paused,
                    )
                )
            return out

        return asyncio.run_coroutine_threadsafe(snapshot(), loop).result(5.0)

    def requests_to(self, path: str) -> list[Seen]:
        with self._cond:
            return [r for r in self.seen.requests if r.path == path]

    @property
    def completions(self) -> list[Seen]:
        """Completion requests seen (the engine monitors' probes left out)."""
        with self._cond:
            return [r for r in self.seen.requests if r.path in _COMPLETIONS]

    def reset(self) -> None:
        with self._cond:
            self.seen = Record(inflight=self.seen.inflight)
            self.defaults = {}
            self._attempts = {}
            self.kv_cache_usage = 0.0
            self.tokenize_status = 200

    # -- answers --------------------------------------------------------------------------
    def models_body(self) -> bytes:
        return orjson.dumps(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.model,
                        "object": "model",
                        "created": self._created,
                        "owned_by": "vllm",
                        "root": self.model,
                        "parent": None,
                        "max_model_len": self.max_model_len,
                        "permission": [],
                    }
                ],
            }
        )

    def metrics_body(self) -> bytes:
        with self._cond:
            running = self.seen.inflight
        labels = f'engine="0",model_name="{self.model}"'
        lines = [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{{{labels}}} {float(running)}",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{{{labels}}} 0.0",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{{{labels}}} {self.kv_cache_usage}",
            "# TYPE vllm:prompt_tokens_total counter",
            f"vllm:prompt_tokens_total{{{labels}}} 0.0",
            "# TYPE vllm:generation_tokens_total counter",
            f"vllm:generation_tokens_total{{{labels}}} 0.0",
            "",
        ]
        return "\n".join(lines).encode()


def _pieces(data: bytes, split: Any) -> list[bytes]:
    if split == "every_byte":
        return [data[i : i + 1] for i in range(len(data))]
    if isinstance(split, int) and split > 0:
        return [data[i : i + split] for i in range(0, len(data), split)]
    if isinstance(split, list):
        cuts = [0, *sorted(c for c in split if 0 < c < len(data)), len(data)]
        return [data[a:b] for a, b in itertools.pairwise(cuts) if b > a]
    return [data]


def _padded(event: bytes, dots: bytes) -> bytes:
    """A token event with its text followed by `dots` (other events unchanged).

    Spliced into the serialized event: re-serializing multi-byte text with tens of KiB of padding
    costs far more, and dots need no escaping.
    """
    if not event.startswith(b"data: {"):
        return event  # [DONE]
    data = orjson.loads(event[len(b"data: ") :])
    for choice in data.get("choices", []):
        delta = choice.get("delta")
        key, text = ("content", delta.get("content")) if isinstance(delta, dict) else ("", None)
        if not text:
            key, text = "text", choice.get("text")
        if text:
            field = b'"%b":%b' % (key.encode(), orjson.dumps(text))
            event = event.replace(field, field[:-1] + dots + b'"', 1)
    return event


class _Connection(asyncio.Protocol):
    """One client connection: parse requests one at a time, answer, keep alive."""

    def __init__(self, fake: FakeVLLM) -> None:
        self.fake = fake
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.response: _Response | None = None
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
                self._simple(431, b"", close=True)
            return
        head = bytes(self.buffer[:end]).decode("latin-1")
        lines = head.split("\r\n")
        try:
            method, target, version = lines[0].split(" ")
        except ValueError:
            self._simple(400, b"", close=True)
            return
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "transfer-encoding" in headers:
            self._simple(411, b"", close=True)  # enough for the clients we test with
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
        counted = method == "POST" and target in _COMPLETIONS
        self.response = _Response(seen, counted)

        def started(r: Record) -> None:
            if self.fake.record_requests:
                r.requests.append(seen)
            r.inflight += counted
            r.max_inflight = max(r.max_inflight, r.inflight)

        self.fake._update(started)
        self._dispatch(seen)

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

    def _reset(self) -> None:
        """Abort the connection with a TCP RST (our own fault, not a client cancellation)."""
        assert self.transport is not None
        self.keep_alive = False
        response = self.response
        if response is not None:
            self.response = None

            def finished(r: Record) -> None:
                r.inflight -= response.counted

            self.fake._update(finished)
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def _write_head(self, status: int, headers: list[tuple[str, str]]) -> None:
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

    def _simple(
        self, status: int, body: bytes, ctype: str = "application/json", close: bool = False
    ) -> None:
        if close:
            self.keep_alive = False
        headers = [("content-length", str(len(body)))]
        if body:
            headers.insert(0, ("content-type", ctype))
        self._write_head(status, headers)
        assert self.transport is not None
        self.transport.write(body)
        if self.response is None:
            if close:
                self.close()
            return
        self._done()

    def _dispatch(self, seen: Seen) -> None:
        fake = self.fake
        path = seen.path
        known = {
            "/health": "GET",
            "/v1/models": "GET",
            "/metrics": "GET",
            "/tokenize": "POST",
            "/v1/chat/completions": "POST",
            "/v1/completions": "POST",
        }
        if path not in known:
            self._simple(404, b'{"detail":"Not Found"}')
            return
        if seen.method != known[path]:
            self._simple(405, b'{"detail":"Method Not Allowed"}')
            return
        authorization = seen.headers.get("authorization")
        guarded = path.startswith(fake.guarded)
        if fake.api_key and guarded and authorization != f"Bearer {fake.api_key}":
            self._simple(401, b'{"error":"Unauthorized"}')
            return
        if path == "/health":
            self._simple(200, b"")
        elif path == "/v1/models":
            self._simple(200, fake.models_body())
        elif path == "/metrics":
            self._simple(200, fake.metrics_body(), "text/plain; version=0.0.4; charset=utf-8")
        else:
            body = seen.body
            if not isinstance(body, dict):
                self._simple(400, error_body("Invalid JSON body", "Bad Request", 400))
                return
            if path == "/tokenize":
                if fake.tokenize_status != 200:
                    status = fake.tokenize_status
                    self._simple(status, error_body("tokenizer unavailable", "Error", status))
                    return
                count = prompt_tokens(body)
                self._simple(
                    200,
                    orjson.dumps(
                        {
                            "count": count,
                            "max_model_len": fake.max_model_len,
                            "tokens": list(range(count)),
                        }
                    ),
                )
                return
            assert self.response is not None
            self.response.task = asyncio.get_running_loop().create_task(self._complete(seen, body))

    async def _complete(self, seen: Seen, body: dict[str, Any]) -> None:
        fault = {**self.fake.defaults, **(body.get("fake") or {})}
        chat = seen.path == "/v1/chat/completions"
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
            self._simple(int(fault["status"]), data)
            return
        if body.get("model") != self.fake.model:
            message = f"The model `{body.get('model')}` does not exist."
            self._simple(404, error_body(message, "NotFoundError", 404, "model"))
            return
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        tokens = int(fault.get("tokens", max_tokens or 8))
        rid = ("chatcmpl-" if chat else "cmpl-") + (seen.headers.get("x-request-id") or "fake")
        if not body.get("stream"):
            self._simple(200, orjson.dumps(whole_answer(body, chat, tokens, rid)))
            return
        await self._stream(body, chat, tokens, rid, fault)

    async def _stream(
        self, body: dict[str, Any], chat: bool, tokens: int, rid: str, fault: dict[str, Any]
    ) -> None:
        transport = self.transport
        response = self.response
        assert transport is not None and response is not None
        eof = fault.get("framing") == "eof"
        head = [("content-type", "text/event-stream; charset=utf-8")]
        self._write_head(200, head if eof else [*head, ("transfer-encoding", "chunked")])
        events = list(stream_events(body, chat, tokens, rid))
        endless = fault.get("endless_event")
        if endless:
            # An event that never ends: the proxy must bound what it holds of it.
            events[1:] = [b"data: " + b"x" * (64 * 1024)] * (int(endless) // (64 * 1024))
        error_after = fault.get("error_event_after")
        if error_after is not None:
            events = events[:error_after]
            events.append(
                sse(
                    {
                        "error": {
                            "message": "fake engine error",
                            "type": "InternalServerError",
                            "param": None,
                            "code": 500,
                        }
                    }
                )
            )
        end_after = fault.get("end_after_events")
        if end_after is not None:
            events = events[:end_after]
        elif not endless:
            events.append(SSE_DONE)
        stream: Iterable[bytes] = events
        padding = fault.get("token_padding")
        if padding:
            # Padded as they are written: a stalled stream never builds what it did not send.
            dots = b"." * int(padding)
            stream = (_padded(event, dots) for event in events)
        if fault.get("split") is not None:
            if fault.get("first_event_delay"):
                await asyncio.sleep(fault["first_event_delay"])
            split_delay = fault.get("split_delay", 0.0)
            for piece in _pieces(b"".join(stream), fault["split"]):
                transport.write(b"%x\r\n%b\r\n" % (len(piece), piece))
                await asyncio.sleep(split_delay)
            transport.write(b"0\r\n\r\n")
            self._done()
            return
        token_delay = fault.get("token_delay", 0.0)
        reset_after = fault.get("reset_after_events")
        hang_after = fault.get("hang_after_events")
        flow_control = fault.get("flow_control")
        for i, event in enumerate(stream):
            if i == 0 and fault.get("first_event_delay"):
                await asyncio.sleep(fault["first_event_delay"])
            elif i:
                # Each event is its own write on its own loop turn, as an engine produces them.
                await asyncio.sleep(token_delay)
            if reset_after is not None and i == reset_after:
                self._reset()
                return
            if hang_after is not None and i == hang_after:
                await asyncio.Future()
            if flow_control:
                await self._drain()
            chunk = event if eof else b"%x\r\n%b\r\n" % (len(event), event)
            transport.write(chunk)
            response.events_sent += 1
            response.bytes_sent += len(chunk)
        if eof:
            self.keep_alive = False  # the end of the body is the end of the connection
            self._done()
            return
        transport.write(b"0\r\n\r\n")
        self._done()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="fake vLLM OpenAI server (tests and benchmarks)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", default="tiny")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--token-delay", type=float, default=0.0)
    p.add_argument(
        "--keepalive-timeout", type=float, default=5.0, help="idle keep-alive seconds (uvicorn: 5)"
    )
    args = p.parse_args(argv)
    defaults = {"token_delay": args.token_delay} if args.token_delay else {}
    fake = FakeVLLM(
        args.host,
        args.port,
        model=args.model,
        max_model_len=args.max_model_len,
        keepalive_timeout=args.keepalive_timeout,
        defaults=defaults,
        record=False,  # a long benchmark must not grow a list of every request
    )

    async def run() -> None:
        server = await fake.listen()
        print(f"fake-vllm listening on {fake.base_url}", flush=True)
        async with server:
            await server.serve_forever()

    try:
        import uvloop

        uvloop.run(run())
    except ImportError:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
