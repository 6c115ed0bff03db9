"""A fake vLLM OpenAI server: a small real HTTP/1.1 server with fault injection.

It speaks the shapes vLLM 0.32.0 answers with over real sockets, so streaming, disconnect and
keep-alive behaviour of the proxy is tested for real:

    GET  /health /v1/models /metrics          POST /tokenize
    POST /v1/chat/completions /v1/completions (stream and not; tool calls: tests.fakes.chat_tools)
    POST /v1/responses  GET /v1/responses/{id}  POST /v1/responses/{id}/cancel
         (stream and not, background, previous_response_id: tests.fakes.responses_api)
    POST /v1/messages /v1/messages/count_tokens (Anthropic: tests.fakes.messages_api)
    POST /v1/embeddings /v1/score /score /v1/rerank /rerank /v2/rerank (tests.fakes.pooling)

Each stream is framed as its route's is in vLLM: `data:` events ending `data: [DONE]` on chat and
completions; typed `event:` lines ending with `response.completed` (no [DONE]) on Responses;
Anthropic's `event:` lines ending with `message_stop` on Messages. `runner="generate"` or
`"pooling"` serves only that engine kind's routes (the others 404), as a real engine does.

Faults are chosen per request by a `"fake"` object in the JSON body (the proxy forwards unknown
fields untouched), merged over the server-wide `FakeVLLM.defaults`. They apply to every inference
route (and to Responses retrieve/cancel, through the defaults):

    status, body            answer with this status and body (str, or an object sent as JSON)
    first_byte_delay        seconds before anything is sent (status line included)
    first_event_delay       stream: headers at once, the first event after this many seconds
    token_delay             seconds between two events (and per token of a background response)
    tokens                  content tokens to generate (default: max_tokens, else 8)
    reset_after_events      stream: after N events, reset the connection (RST)
    hang_after_events       stream: after N events, send nothing more and keep the socket open
    never_answer            read the request, send nothing
    error_event_after       stream: after N events, what vLLM sends when generation fails: an
                            error event then [DONE] (chat, completions), an `event: error`
                            (Messages), or a dropped connection without the chunked terminator
                            (Responses: vLLM's stream generator raises)
    split                   stream: "every_byte", a piece size, or a list of byte offsets;
    split_delay             the body is sent in those pieces with this delay between them
    end_after_events        stream: after N events, end the response cleanly without its
                            terminal event ([DONE] on chat and completions)
    framing                 stream: "chunked" (default) or "eof" (no Transfer-Encoding: the
                            body ends when the connection closes, as HTTP/1.0 servers do)
    endless_event           stream: after the first event, an event of this many bytes with
                            no blank line (then the response ends)
    token_padding           each generated token's text is followed by this many "."
                            (large events: a stream of many MiB in a few thousand events)
    flow_control            stream: write no event while the socket's send buffer is above its
                            high-water mark, as vLLM's server (uvicorn) does; a client that stops
                            reading then stalls the stream instead of piling it up in the fake
    fail_first, fail_with   the first `fail_first` requests with the same X-Request-ID get the
                            faults in `fail_with` (default {"status": 502}) merged in: an
                            upstream that fails once, then works (what retries are for)
    tool_call               with `tools` in the request: answer tool call(s) instead of text
                            (see tests.fakes.chat_tools; "required"/named tool_choice always do)

What it saw is recorded for assertions (thread-safe): `connections`, `requests`, `cancelled`
(responses the client abandoned before they were complete), `inflight` and `max_inflight`.
`streams()` is a snapshot of the streams in progress: how far each got, and its backlog.
`responses` is the Responses store (what `GET /v1/responses/{id}` answers from).

In-process: `with FakeVLLM() as fake: ... fake.base_url` runs it on a background thread with its
own loop. As a process: `python -m tests.fakes.vllm --port 8000` (the benchmark's upstream).
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson

from tests.fakes.record import Cancelled, Record, Seen, Streaming
from tests.fakes.responses_api import ResponseStore
from tests.fakes.routes import INFERENCE
from tests.fakes.shapes import (
    SSE_DONE,
    answer_text,
    prompt_tokens,
    sse,
    stream_events,
    token_text,
    whole_answer,
)
from tests.fakes.wire import Connection

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
        guarded: tuple[str, ...] = ("/v1", "/v2", "/inference"),
        runner: str | None = None,
        tool_parser: str | None = "hermes",
        responses_store: bool = True,
        embedding_dims: int = 128,
    ) -> None:
        self.host = host
        # Serve https:// with this context (an engine behind TLS).
        self.ssl_context = ssl_context
        self.port = port
        self.model = model
        self.max_model_len = max_model_len
        self.api_key = api_key
        # The path prefixes `api_key` guards: vLLM's --api-key guards /v1, /v2 and /inference
        # only; an engine behind an authenticating proxy may guard everything but /health.
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
        if runner not in (None, "generate", "pooling"):
            raise ValueError(f"runner must be None, 'generate' or 'pooling', not {runner!r}")
        # None: every route; "generate" or "pooling": only that engine kind's (vLLM's --runner).
        self.runner = runner
        # None: as vLLM without --enable-auto-tool-choice --tool-call-parser (tools get a 400).
        self.tool_parser = tool_parser
        # False: vLLM's default (no VLLM_ENABLE_RESPONSES_API_STORE): nothing is kept.
        self.responses = ResponseStore(responses_store)
        self.embedding_dims = embedding_dims  # the tiny dev model's hidden size
        self.seen = Record()
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._protocols: set[Connection] = set()
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
            lambda: Connection(self), self.host, self.port, backlog=1024, ssl=self.ssl_context
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
        # A connection accepted just before gets its protocol on the next turn: close it too.
        await asyncio.sleep(0)
        for proto in list(self._protocols):
            # TLS: no close_notify exchange the loop would not live to finish.
            proto.abort() if self.ssl_context is not None else proto.close()
        tasks = [p.response.task for p in self._protocols if p.response and p.response.task]
        tasks += self.responses.take_tasks()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()
        # A transport closes its socket a loop turn after close(): let that happen before the
        # loop is closed, or the socket is left to the garbage collector (a ResourceWarning in
        # whatever test runs then).
        for _ in range(3):
            await asyncio.sleep(0)

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
        """Inference requests seen, any API (the engine monitors' probes left out)."""
        with self._cond:
            return [r for r in self.seen.requests if r.route in INFERENCE]

    def reset(self) -> None:
        with self._cond:
            self.seen = Record(inflight=self.seen.inflight)
            self.defaults = {}
            self._attempts = {}
            self.kv_cache_usage = 0.0
            self.tokenize_status = 200
        self.responses.clear()

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
