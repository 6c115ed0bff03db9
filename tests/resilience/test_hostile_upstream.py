"""An engine that breaks HTTP/1.1, through the real proxy: what the client gets, what is logged.

The engine is `tests.fakes.scripted.ScriptedEngine`: exact bytes per completion request.
"""

from __future__ import annotations

import gzip
import logging
import time
import tracemalloc
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import orjson
import pytest

from proxy.telemetry.logs import LOGGERS
from tests.fakes.scripted import ScriptedEngine
from tests.fakes.shapes import SSE_DONE, stream_events
from tests.observability.helpers import wait_for
from tests.proxy.helpers import CHAT_PATH, chat, events
from tests.resilience.conftest import Gateway, GatewayFactory, config


def answer(text: str, *, head: bytes = b"") -> bytes:
    """A whole chat completion response (Content-Length framed) saying `text`."""
    body = orjson.dumps(
        {
            "id": "chatcmpl-x",
            "object": "chat.completion",
            "model": "tiny",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }
    )
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n" + head
        + b"content-length: %d\r\n\r\n" % len(body) + body
    )  # fmt: skip


def content(r: httpx.Response) -> Any:
    return r.json()["choices"][0]["message"]["content"]


def one_model(url: str, **resilience: Any) -> dict[str, Any]:
    return config({"tiny": {"upstreams": [url]}}, resilience)


# Out of step: an unasked response after the answer -------------------------------------------


@pytest.mark.parametrize("attempts", [1, 3], ids=["no-retries", "retries"])
def test_an_unasked_response_after_the_answer_never_reaches_the_next_client(
    gateway: GatewayFactory, attempts: int
) -> None:
    # The unasked response claims more body than it sent: a pooled connection would read the
    # next real answer as the rest of it.
    unasked = b'HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{"unasked"'

    def script(n: int) -> Sequence[bytes]:
        return [answer("first") + unasked] if n == 0 else [answer(f"answer {n}")]

    with ScriptedEngine(script) as engine:
        gw = gateway(one_model(engine.base_url, retry={"attempts": attempts}))
        with httpx.Client(base_url=gw.base_url, timeout=10) as client:
            first = client.post(CHAT_PATH, json=chat())
            assert first.status_code == 200
            assert content(first) == "first"
            second = client.post(CHAT_PATH, json=chat())
            assert second.status_code == 200, second.text
            assert content(second) == "answer 1"
            assert second.json()["usage"]["completion_tokens"] == 1
        assert len(engine.completions) == 2  # each request sent once
        assert engine.connections == 2  # the out-of-step connection was not reused
        assert gw.upstream().breaker.fail_counter == 0


# Protocol violations: a clean 502 and one log record each ------------------------------------

VIOLATIONS = {
    "101-websocket": b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n"
    b"connection: upgrade\r\n\r\n",
    "101-bare": b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    "invalid-status-line": b"HTTP/1.1 2000 OK\r\n\r\n",
    "http2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "http2-settings-frame": b"\x00\x00\x12\x04\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x64",
    "http2-version": b"HTTP/2.0 200 OK\r\ncontent-length: 2\r\n\r\n{}",
    "ssh-banner": b"SSH-2.0-OpenSSH_9.2\r\n",
    "rtsp-banner": b"RTSP/1.0 200 OK\r\ncontent-length: 2\r\n\r\n{}",
    "content-length-and-chunked": b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n"
    b"transfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    "negative-content-length": b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
    "oversized-content-length": b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
    "transfer-coding-gzip": b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n"
    b"2\r\n{}\r\n0\r\n\r\n",
    "head-too-large": b"HTTP/1.1 200 OK\r\nx-pad: " + b"a" * 70_000 + b"\r\n\r\n",
    "endless-interim-responses": b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n" * 3000,
}


class Records(logging.Handler):
    """Every record of every logger from now on (vgate's loggers do not propagate to root)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.loggers = [logging.getLogger(name) for name in ("", *LOGGERS)]

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> Records:
        for logger in self.loggers:
            logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        for logger in self.loggers:
            logger.removeHandler(self)


def until(check: Callable[[], bool], within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "not within the deadline"
        time.sleep(0.01)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("bytes_", list(VIOLATIONS.values()), ids=list(VIOLATIONS))
def test_protocol_violations_are_a_clean_502_and_one_log_record(
    gateway: GatewayFactory, bytes_: bytes, stream: bool
) -> None:
    def script(n: int) -> Sequence[bytes]:
        return [bytes_]  # then it waits for another request: the proxy must close it

    with ScriptedEngine(script) as engine:
        gw = gateway(
            config(
                {"tiny": {"upstreams": [engine.base_url]}},
                {"retry": {"attempts": 1}},
                logging={"requests": True},
            )
        )
        with Records() as logs:
            r = httpx.post(gw.base_url + CHAT_PATH, json=chat(stream=stream), timeout=10)
            assert r.status_code == 502, r.text
            assert r.json()["error"]["code"] == "upstream_error"
            until(lambda: engine.closed == 1)
            time.sleep(0.1)  # request lines are written in batches
        assert [(x.name, x.levelname) for x in logs.records] == [("vgate.request", "INFO")]
        [line] = logs.records
        assert line.exc_info is None
        assert line.fields["status"] == 502  # type: ignore[attr-defined]
        assert gw.upstream().breaker.fail_counter == 1  # the engine's fault


# Content codings the proxy did not ask for ---------------------------------------------------

BODY = {"model": "tiny", "messages": [{"role": "user", "content": "Say hello"}]}
STREAM_BODY = {**BODY, "stream_options": {"include_usage": True}}
EVENTS = [*stream_events(STREAM_BODY, True, 4, "chatcmpl-x"), SSE_DONE]


def encode(data: bytes, coding: str) -> bytes:
    if coding in ("gzip", "x-gzip"):
        return gzip.compress(data)
    if coding == "deflate":
        return zlib.compress(data)
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)  # "deflate" sent raw, as some servers do
    return packer.compress(data) + packer.flush()


def coded(
    body: bytes, coding: str, *, chunked: bool = False, kind: bytes = b"application/json"
) -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ncontent-encoding: %s\r\n" % (
        kind,
        coding.encode(),
    )
    if not chunked:
        return head + b"content-length: %d\r\n\r\n" % len(body) + body
    return head + b"transfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


def whole_body() -> bytes:
    return answer("decoded").partition(b"\r\n\r\n")[2]


def one_shot(bytes_: bytes) -> Callable[[int], Sequence[bytes]]:
    return lambda n: [bytes_]


def gateway_for(gateway: GatewayFactory, engine: ScriptedEngine, **upstream: Any) -> Gateway:
    return gateway(
        config(
            {"tiny": {"upstreams": [engine.base_url]}},
            {"retry": {"attempts": 1}},
            upstream=upstream,
            admin={"enabled": True, "port": 0},
            logging={"requests": True},
        )
    )


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("coding", ["gzip", "x-gzip", "deflate", "raw-deflate", "GZip"])
def test_a_gzip_or_deflate_body_is_decoded_and_its_usage_counted(
    gateway: GatewayFactory, coding: str, chunked: bool
) -> None:
    body = whole_body()
    name = "deflate" if coding == "raw-deflate" else coding
    with ScriptedEngine(one_shot(coded(encode(body, coding.lower()), name, chunked=chunked))) as e:
        gw = gateway_for(gateway, e)
        r = httpx.post(gw.base_url + CHAT_PATH, json=chat(), timeout=10)
        assert r.status_code == 200, r.text
        assert "content-encoding" not in r.headers
        assert r.content == body
        assert content(r) == "decoded"
        tokens = wait_for(gw.server, "vgate_prompt_tokens_total", key="none", model="tiny")
        assert tokens == 3


def test_a_gzip_stream_is_decoded_as_it_arrives(gateway: GatewayFactory) -> None:
    packer = zlib.compressobj(wbits=zlib.MAX_WBITS | 16)
    pieces = [packer.compress(event) + packer.flush(zlib.Z_SYNC_FLUSH) for event in EVENTS]
    pieces[-1] += packer.flush()
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-encoding: gzip\r\n"
        b"transfer-encoding: chunked\r\n\r\n"
    )
    writes: list[bytes | float] = [head]
    for piece in pieces:
        writes += [b"%x\r\n%s\r\n" % (len(piece), piece), 0.05]
    writes.append(b"0\r\n\r\n")
    with ScriptedEngine(lambda n: writes) as engine:
        gw = gateway_for(gateway, engine)
        got: list[tuple[float, bytes]] = []
        body = {**chat(stream=True), "stream_options": {"include_usage": True}}
        with httpx.stream("POST", gw.base_url + CHAT_PATH, json=body, timeout=10) as r:
            assert r.status_code == 200
            for raw in r.iter_raw():
                got.append((time.monotonic(), raw))
        data = b"".join(raw for _, raw in got)
        assert events(data) == events(b"".join(EVENTS))
        # Decoded piece by piece: the first event came long before the last.
        assert got[-1][0] - got[0][0] > 0.15
        tokens = wait_for(gw.server, "vgate_completion_tokens_total", key="none", model="tiny")
        assert tokens == 4


UNDECODABLE = {
    "br": coded(b"\x1b\x00\x00", "br"),
    "zstd": coded(b"\x28\xb5\x2f\xfd", "zstd"),
    "compress": coded(b"\x1f\x9d", "compress"),
    "two-codings": coded(gzip.compress(gzip.compress(b"{}")), "gzip, gzip"),
    "gzip-then-br": coded(b"x", "gzip, br"),
    "unknown": coded(b"{}", "x-vgate-unknown"),
    "gzip-that-is-not": coded(b'{"plain": "json"}', "gzip"),
    "gzip-cut-short": coded(gzip.compress(b'{"a": 1}' * 100)[:30], "gzip"),
    "deflate-with-garbage-after": coded(zlib.compress(b"{}") + b"junk", "deflate"),
}


# Refused at the head, before a byte reaches the client (a stream decoded as it arrives relays
# what decoded before a fault, then ends with an error event).
REFUSED = ("br", "zstd", "compress", "two-codings", "gzip-then-br", "unknown", "gzip-that-is-not")
CASES = [(name, False) for name in UNDECODABLE] + [(name, True) for name in REFUSED]
IDS = [f"{name}-{'stream' if stream else 'whole'}" for name, stream in CASES]


@pytest.mark.parametrize(("name", "stream"), CASES, ids=IDS)
def test_a_body_the_proxy_cannot_decode_is_a_clean_502(
    gateway: GatewayFactory, name: str, stream: bool
) -> None:
    bytes_ = UNDECODABLE[name]
    if stream:
        bytes_ = bytes_.replace(b"application/json", b"text/event-stream")
    with ScriptedEngine(one_shot(bytes_)) as engine:
        gw = gateway_for(gateway, engine)
        with Records() as logs:
            r = httpx.post(gw.base_url + CHAT_PATH, json=chat(stream=stream), timeout=10)
            time.sleep(0.1)
        assert r.status_code == 502, r.text
        assert r.json()["error"]["code"] == "upstream_error"
        assert [(x.name, x.exc_info) for x in logs.records] == [("vgate.request", None)]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_decompression_bomb_is_refused_within_bounded_memory(
    gateway: GatewayFactory, stream: bool
) -> None:
    # 64 MiB that compress to about 64 KiB: zeros, or for a stream one SSE event over and over.
    packer = zlib.compressobj(wbits=zlib.MAX_WBITS | 16)
    unit = b'data: {"choices":[]}\n\n' * 40_000 if stream else b"\0" * 800_000
    bomb = b"".join(packer.compress(unit) for _ in range(80)) + packer.flush()
    assert len(bomb) < 1 << 20
    kind = b"text/event-stream" if stream else b"application/json"
    with ScriptedEngine(one_shot(coded(bomb, "gzip", kind=kind))) as engine:
        gw = gateway_for(gateway, engine, max_decoded_bytes=1 << 20)
        tracemalloc.start()
        try:
            if stream:
                # A stream has no total bound: it is decoded in pieces at the client's pace.
                # This client stops after 4 MiB of it.
                got = 0
                body = chat(stream=True)
                with httpx.stream("POST", gw.base_url + CHAT_PATH, json=body, timeout=10) as r:
                    assert r.status_code == 200
                    for raw in r.iter_raw():
                        got += len(raw)
                        if got > 4 << 20:
                            break
                assert got > 4 << 20
            else:
                r = httpx.post(gw.base_url + CHAT_PATH, json=chat(), timeout=10)
                assert r.status_code == 502, r.text
                assert r.json()["error"]["code"] == "upstream_error"
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 16 << 20, peak


def test_an_encoded_stream_cut_short_ends_with_an_error_event(gateway: GatewayFactory) -> None:
    whole = gzip.compress(b"".join(EVENTS))
    cut = whole[: len(whole) // 2]  # the first events decode, the rest is lost
    bytes_ = coded(cut, "gzip", chunked=True, kind=b"text/event-stream")
    with ScriptedEngine(one_shot(bytes_)) as engine:
        gw = gateway_for(gateway, engine)
        r = httpx.post(gw.base_url + CHAT_PATH, json=chat(stream=True), timeout=10)
        assert r.status_code == 200
        last = orjson.loads(events(r.content)[-1])
        assert last["error"]["code"] == "upstream_stream_broken"
        assert b"[DONE]" not in r.content
