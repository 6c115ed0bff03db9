"""An engine that breaks HTTP/1.1, through the real proxy: what the client gets, what is logged.

The engine is `tests.fakes.scripted.ScriptedEngine`: exact bytes per completion request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import orjson
import pytest

from proxy.logs import LOGGERS
from tests.fakes.scripted import ScriptedEngine
from tests.proxy.helpers import CHAT_PATH, chat
from tests.resilience.conftest import GatewayFactory, config


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


# 1. Out of step: an unasked response after the answer -------------------------------------------


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


# 7. Protocol violations: a clean 502 and one log record each ------------------------------------

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
