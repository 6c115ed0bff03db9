"""The engine client side (monitor, /tokenize counting) against the real vLLM CPU server."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from engine.client import tokens
from engine.client.monitor import EngineMonitor
from tests.vllm_fixtures import VllmServer

pytestmark = pytest.mark.vllm

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three prime numbers."},
]


async def test_monitor_reads_the_real_engine(vllm_server: VllmServer) -> None:
    async with httpx.AsyncClient() as client:
        mon = EngineMonitor(client, vllm_server.base_url, vllm_server.served_name)
        await mon.refresh()
    assert mon.healthy is True, mon.last_error
    assert mon.max_model_len == vllm_server.max_model_len
    assert mon.metrics_error is None
    assert mon.running == 0.0 and mon.waiting == 0.0
    assert mon.kv_cache_usage is not None and 0.0 <= mon.kv_cache_usage <= 1.0


async def test_monitor_sees_a_running_request(vllm_server: VllmServer) -> None:
    body = {
        "model": vllm_server.served_name,
        "prompt": "count:",
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
    }
    async with httpx.AsyncClient(timeout=60) as client:
        mon = EngineMonitor(client, vllm_server.base_url, vllm_server.served_name)
        url = vllm_server.base_url + "/v1/completions"
        async with client.stream("POST", url, json=body) as response:
            assert response.status_code == 200
            chunks = response.aiter_lines()
            for _ in range(5):  # generation is under way
                await anext(chunks)
            await mon.scrape_metrics()
            assert mon.running == 1.0
            assert mon.kv_cache_usage is not None and mon.kv_cache_usage > 0.0
        # Closing the stream aborts the request in vLLM.
        for _ in range(50):
            await mon.scrape_metrics()
            if mon.running == 0.0:
                break
            await asyncio.sleep(0.1)
        assert mon.running == 0.0


async def test_token_counts_match_what_generation_reports(vllm_server: VllmServer) -> None:
    base, model = vllm_server.base_url, vllm_server.served_name
    async with httpx.AsyncClient(timeout=60) as client:
        chat = await tokens.count_chat(client, base, model, MESSAGES)
        prompt = await tokens.count_prompt(client, base, model, "def main():\n    return 0")
        chat_usage = (
            await client.post(
                base + "/v1/chat/completions",
                json={"model": model, "messages": MESSAGES, "max_tokens": 1},
            )
        ).json()["usage"]
        completion_usage = (
            await client.post(
                base + "/v1/completions",
                json={"model": model, "prompt": "def main():\n    return 0", "max_tokens": 1},
            )
        ).json()["usage"]
    assert chat.count == chat_usage["prompt_tokens"]
    assert prompt.count == completion_usage["prompt_tokens"]
    assert chat.max_model_len == prompt.max_model_len == vllm_server.max_model_len
    # The template and generation prompt are counted: more than the bare text's tokens.
    bare = 0
    async with httpx.AsyncClient(timeout=60) as client:
        for m in MESSAGES:
            bare += (await tokens.count_prompt(client, base, model, m["content"])).count
    assert chat.count > bare


async def test_tokenize_errors_keep_vllms_answer(vllm_server: VllmServer) -> None:
    async with httpx.AsyncClient(timeout=60) as client:
        with pytest.raises(tokens.TokenizeFailed) as info:
            await tokens.count_prompt(client, vllm_server.base_url, "gpt-4", "hi")
    assert info.value.upstream_status == 404
    assert "gpt-4" in info.value.message
    assert json.loads(info.value.upstream_body)["error"]["type"] == "NotFoundError"
