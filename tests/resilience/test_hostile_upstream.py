"""An engine that breaks HTTP/1.1, through the real proxy: what the client gets, what is logged.

The engine is `tests.fakes.scripted.ScriptedEngine`: exact bytes per completion request.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx
import orjson
import pytest

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
