"""Tool calls in the fake's chat completions, checked with raw HTTP and the real `openai` SDK."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.fakes.vllm import FakeVLLM, answer_text
from tests.proxy.helpers import CHAT_PATH, chat, events

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    },
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
]
PARIS = {"tool_call": {"arguments": {"city": "Paris"}}}
NAMED = {"type": "function", "function": {"name": "get_time"}}


@pytest.fixture
def client(fake: FakeVLLM) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake.base_url, timeout=10) as c:
        yield c


def message(client: httpx.Client, **extra: Any) -> tuple[dict[str, Any], str]:
    choice = client.post(CHAT_PATH, json=chat(tokens=30, tools=TOOLS, **extra)).json()["choices"][0]
    return choice["message"], choice["finish_reason"]


def test_whole_tool_call_like_vllm(client: httpx.Client) -> None:
    got, finish = message(client, fake=PARIS)  # tool_choice "auto" (the default)
    assert list(got) == [
        "role",
        "content",
        "refusal",
        "annotations",
        "audio",
        "function_call",
        "tool_calls",
        "reasoning",
    ]
    (call,) = got["tool_calls"]
    assert call["id"].startswith("chatcmpl-tool-") and len(call["id"]) == len("chatcmpl-tool-") + 16
    assert (call["type"], call["function"]) == (
        "function",
        {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    )
    assert (got["content"], finish) == (None, "tool_calls")
    required, finish = message(client, tool_choice="required")  # forced: no fault needed
    assert (required["content"], finish) == ("", "tool_calls")
    assert required["tool_calls"][0]["function"]["arguments"] == "{}"
    named, finish = message(client, tool_choice=NAMED)
    assert (named["tool_calls"][0]["function"]["name"], finish) == ("get_time", "stop")
    two, _ = message(client, fake={"tool_call": ["get_time", {"name": "get_weather"}]})
    assert [c["function"]["name"] for c in two["tool_calls"]] == ["get_time", "get_weather"]


def test_no_tool_call_without_tools_or_with_none(client: httpx.Client) -> None:
    for extra in ({"tool_choice": "none", "tools": TOOLS}, {}):
        body = client.post(CHAT_PATH, json=chat(tokens=3, fake=PARIS, **extra)).json()
        msg = body["choices"][0]["message"]
        assert "tool_calls" not in msg  # vLLM leaves the key out, not `[]`
        assert msg["content"] == answer_text(3)


def test_streamed_tool_call_like_vllm(client: httpx.Client) -> None:
    body = chat(tokens=30, stream=True, tools=TOOLS, fake=PARIS)
    body["stream_options"] = {"include_usage": True}
    got = [orjson.loads(e) for e in events(client.post(CHAT_PATH, json=body).content)[:-1]]
    assert got[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    opening = got[1]["choices"][0]["delta"]
    assert opening["content"] is None
    (call,) = opening["tool_calls"]
    assert list(call) == ["id", "type", "index", "function"]
    assert call["function"] == {"name": "get_weather"}
    pieces = [c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"] for c in got[2:-2]]
    assert "".join(pieces) == '{"city": "Paris"}'
    finish = got[-2]["choices"][0]
    assert (finish["delta"], finish["finish_reason"], finish["stop_reason"]) == (
        {},
        "tool_calls",
        None,
    )
    assert got[-1]["choices"] == [] and got[-1]["usage"]["completion_tokens"] > 0


def test_openai_sdk_tool_calls(fake: FakeVLLM) -> None:
    messages = [{"role": "user", "content": "weather in Paris?"}]
    with openai.OpenAI(base_url=f"{fake.base_url}/v1", api_key="k", max_retries=0) as sdk:
        reply = sdk.chat.completions.create(
            model="tiny",
            messages=messages,
            tools=TOOLS,
            max_tokens=30,
            extra_body={"fake": PARIS},
        )
        stream = sdk.chat.completions.create(
            model="tiny",
            messages=messages,
            tools=TOOLS,
            tool_choice="required",
            max_tokens=30,
            stream=True,
            extra_body={"fake": PARIS},
        )
        deltas = [c.choices[0].delta for c in stream if c.choices]
    (call,) = reply.choices[0].message.tool_calls or []
    assert call.type == "function"
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "get_weather",
        {"city": "Paris"},
    )
    assert reply.choices[0].finish_reason == "tool_calls"
    streamed = [tc for d in deltas for tc in d.tool_calls or []]
    assert streamed[0].function is not None and streamed[0].function.name == "get_weather"
    assert "".join(tc.function.arguments or "" for tc in streamed if tc.function) == (
        '{"city": "Paris"}'
    )


def test_without_a_tool_parser_like_vllm() -> None:
    with FakeVLLM(tool_parser=None) as fake, httpx.Client(base_url=fake.base_url) as c:
        auto = c.post(CHAT_PATH, json=chat(tools=TOOLS, tool_choice="auto"))
        assert auto.status_code == 400
        assert auto.json()["error"]["message"] == (
            '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
        )
        named = c.post(CHAT_PATH, json=chat(tools=TOOLS, tool_choice=NAMED))
        assert named.json()["error"]["message"] == (
            'tool_choice=function "get_time" requires --tool-call-parser to be set'
        )
        # No tool_choice at all is not checked by vLLM: a plain answer.
        assert c.post(CHAT_PATH, json=chat(tools=TOOLS)).status_code == 200
