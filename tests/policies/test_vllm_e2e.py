"""Policies in front of the real vLLM CPU engine (dev model, max_model_len 2048)."""

from __future__ import annotations

import time
from typing import Any

import httpx
import openai
import pytest

from engine.client import tokens
from tests.conftest import ProxyFactory
from tests.vllm_fixtures import VllmServer

pytestmark = pytest.mark.vllm

SYSTEM = {"role": "system", "content": "You answer in one word."}


def long_conversation(turns: int = 24) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [SYSTEM]
    for i in range(turns):
        text = f"turn {i}: " + "the quick brown fox jumps over the lazy dog " * 12
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": text}]
    messages.append({"role": "user", "content": "And now, the last question?"})
    return messages


async def count(server: VllmServer, messages: list[dict[str, Any]]) -> int:
    async with httpx.AsyncClient() as client:
        result = await tokens.count_chat(client, server.base_url, server.served_name, messages)
    return result.count


def start(proxy: ProxyFactory, server: VllmServer, policies: dict[str, Any]) -> str:
    return proxy(server.base_url, policies=policies)


async def test_a_conversation_longer_than_the_window(
    proxy: ProxyFactory, vllm_server: VllmServer
) -> None:
    messages = long_conversation()
    total = await count(vllm_server, messages)
    assert total > vllm_server.max_model_len
    body = {"model": "tiny", "messages": messages, "max_tokens": 4}
    async with httpx.AsyncClient(timeout=120) as client:
        # Without the policy the engine itself refuses it.
        direct = await client.post(f"{vllm_server.base_url}/v1/chat/completions", json=body)
        assert direct.status_code == 400

        dropping = start(proxy, vllm_server, {"order": ["truncate"]})
        answered = await client.post(f"{dropping}/v1/chat/completions", json=body)
        assert answered.status_code == 200, answered.text
        dropped = int(answered.headers["x-vgate-truncated"])
        assert 0 < dropped < len(messages) - 2
        assert answered.json()["usage"]["prompt_tokens"] + 4 <= vllm_server.max_model_len
        # Whole turns went: a pair count of messages.
        assert dropped % 2 == 0

        rejecting = start(
            proxy, vllm_server, {"order": ["truncate"], "truncate": {"strategy": "reject"}}
        )
        refused = await client.post(f"{rejecting}/v1/chat/completions", json=body)
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert f"maximum context length is {vllm_server.max_model_len} tokens" in error["message"]
    assert f"({total} in the messages, 4 for the completion)" in error["message"]


async def test_streams_are_truncated_too(proxy: ProxyFactory, vllm_server: VllmServer) -> None:
    base = start(
        proxy, vllm_server, {"order": ["truncate"], "truncate": {"strategy": "middle_out"}}
    )
    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="tiny",
            messages=long_conversation(),  # type: ignore[arg-type]
            max_tokens=3,
            stream=True,
        )
        assert int(raw.headers["x-vgate-truncated"]) > 0
        chunks = [c async for c in raw.parse()]
    assert chunks and all(not c.usage for c in chunks)


def test_limits_through_the_openai_sdk(proxy: ProxyFactory, vllm_server: VllmServer) -> None:
    base = start(
        proxy,
        vllm_server,
        {
            "order": ["ratelimit", "truncate"],
            "ratelimit": {
                "overall": {"requests_per_minute": 60, "tokens_per_minute": 600_000, "window": 1.0}
            },
        },
    )
    attempts: list[int] = []
    hooks = {"response": [lambda r: attempts.append(r.status_code)]}
    messages: Any = [{"role": "user", "content": "Hello there"}]
    with (
        httpx.Client(event_hooks=hooks, timeout=120) as http,
        openai.OpenAI(base_url=f"{base}/v1", api_key="k", max_retries=2, http_client=http) as c,
    ):
        first = c.chat.completions.with_raw_response.create(
            model="tiny", messages=messages, max_tokens=4
        )
        assert first.headers["x-ratelimit-limit-requests"] == "1"
        assert first.headers["x-ratelimit-limit-tokens"] == "10000"
        started = time.monotonic()
        second = c.chat.completions.create(model="tiny", messages=messages, max_tokens=4)
        waited = time.monotonic() - started
        assert second.usage is not None and second.usage.completion_tokens == 4
    assert attempts == [200, 429, 200]
    assert waited > 0.5
