"""The fake's Anthropic Messages API, with raw HTTP and with the real `anthropic` SDK."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest

from tests.fakes.sse_read import typed_events
from tests.fakes.vllm import FakeVLLM, answer_text

PATH = "/v1/messages"
HELLO = [{"role": "user", "content": "Hello"}]
WEATHER = {
    "name": "get_weather",
    "description": "Weather",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}
TEXT_EVENTS = [
    "message_start",
    "content_block_start",
    *["content_block_delta"] * 3,
    "content_block_stop",
    "message_delta",
    "message_stop",
]


@pytest.fixture
def client(fake: FakeVLLM) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake.base_url, timeout=10) as c:
        yield c


@pytest.fixture
def sdk(fake: FakeVLLM) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=fake.base_url, api_key="k", max_retries=0) as c:
        yield c


def ask(tokens: int = 3, **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "max_tokens": tokens, "messages": HELLO, **extra}


def test_message_like_vllm(client: httpx.Client) -> None:
    body = client.post(PATH, json=ask(3)).json()
    # vLLM dumps without nulls: no stop_sequence unless one matched.
    assert list(body) == ["id", "type", "role", "content", "model", "stop_reason", "usage"]
    assert body["id"].startswith("chatcmpl-")
    assert body["content"] == [{"type": "text", "text": answer_text(3)}]
    assert body["stop_reason"] == "max_tokens"
    assert body["usage"]["output_tokens"] == 3
    assert client.post(PATH, json=ask(5, fake={"tokens": 2})).json()["stop_reason"] == "end_turn"
    counted = client.post(f"{PATH}/count_tokens", json={"model": "tiny", "messages": HELLO})
    count = body["usage"]["input_tokens"]
    assert counted.json() == {
        "input_tokens": count,
        "context_management": {"original_input_tokens": count},
    }


def test_stream_events_like_vllm(client: httpx.Client) -> None:
    r = client.post(PATH, json=ask(3, stream=True))
    assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
    got = typed_events(r.content)
    assert [name for name, _ in got] == TEXT_EVENTS
    assert all(data["type"] == name for name, data in got)
    start = got[0][1]["message"]
    assert (start["content"], start["stop_reason"], start["usage"]["output_tokens"]) == (
        [],
        None,
        0,
    )
    text = "".join(d["delta"]["text"] for n, d in got if n == "content_block_delta")
    assert text == answer_text(3)
    assert got[-2][1]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert b"[DONE]" not in r.content and b"ping" not in r.content


def test_errors_like_vllm(client: httpx.Client) -> None:
    for path, body in ((PATH, ask(2)), (f"{PATH}/count_tokens", {"messages": HELLO})):
        missing = client.post(path, json={**body, "model": "gpt-4"})
        assert missing.status_code == 404
        assert missing.json() == {
            "type": "error",
            "error": {
                "type": "NotFoundError",
                "message": "The model `gpt-4` does not exist. Valid aliases: tiny.",
            },
        }
    # Request validation stays OpenAI-shaped, as in vLLM.
    invalid = client.post(PATH, json={"model": "tiny", "messages": HELLO})
    assert (invalid.status_code, invalid.json()["error"]["param"]) == (400, "body.max_tokens")
    big = client.post(PATH, json=ask(5000))
    assert big.json()["error"]["type"] == "BadRequestError"
    assert big.json()["error"]["message"].startswith("max_completion_tokens=5000 cannot be")


def test_error_event_ends_the_stream(client: httpx.Client) -> None:
    r = client.post(PATH, json=ask(3, stream=True, fake={"error_event_after": 3}))
    got = typed_events(r.content)
    assert [name for name, _ in got] == [*TEXT_EVENTS[:3], "error"]
    assert got[-1][1] == {
        "type": "error",
        "error": {"type": "internal_error", "message": "fake engine error"},
    }


def test_tool_use(client: httpx.Client) -> None:
    forced = ask(50, tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather"})
    forced["fake"] = {"tool_call": {"arguments": {"city": "Paris"}}}
    body = client.post(PATH, json=forced).json()
    (block,) = body["content"]
    assert (block["type"], block["name"], block["input"]) == (
        "tool_use",
        "get_weather",
        {"city": "Paris"},
    )
    assert block["id"].startswith("chatcmpl-tool-")
    assert body["stop_reason"] == "tool_use"
    got = typed_events(client.post(PATH, json={**forced, "stream": True}).content)
    assert got[1][1]["content_block"] == {
        "type": "tool_use",
        "id": got[1][1]["content_block"]["id"],
        "name": "get_weather",
        "input": {},
    }
    pieces = [d["delta"]["partial_json"] for n, d in got if n == "content_block_delta"]
    assert "".join(pieces) == '{"city": "Paris"}'
    assert got[-2][1]["delta"]["stop_reason"] == "tool_use"
    # "auto" without the fault, and "none": plain text.
    for choice in ({"type": "auto"}, {"type": "none"}):
        plain = client.post(PATH, json=ask(2, tools=[WEATHER], tool_choice=choice)).json()
        assert plain["content"] == [{"type": "text", "text": answer_text(2)}]


def test_anthropic_sdk(sdk: anthropic.Anthropic) -> None:
    message = sdk.messages.create(model="tiny", max_tokens=4, messages=HELLO)
    assert message.content[0].type == "text" and message.content[0].text == answer_text(4)
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 4
    with sdk.messages.stream(model="tiny", max_tokens=5, messages=HELLO) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == answer_text(5)
    assert final.usage.output_tokens == 5 and final.stop_reason == "max_tokens"
    count = sdk.messages.count_tokens(model="tiny", messages=HELLO)
    assert count.input_tokens == message.usage.input_tokens
    used = sdk.messages.create(
        model="tiny",
        max_tokens=50,
        messages=HELLO,
        tools=[WEATHER],
        tool_choice={"type": "any"},
        extra_body={"fake": {"tool_call": {"arguments": {"city": "Paris"}}}},
    )
    assert used.content[0].type == "tool_use" and used.content[0].input == {"city": "Paris"}
    with pytest.raises(anthropic.NotFoundError, match="Valid aliases: tiny"):
        sdk.messages.create(model="gpt-4", max_tokens=2, messages=HELLO)


def test_anthropic_sdk_sees_the_mid_stream_error(sdk: anthropic.Anthropic) -> None:
    with (
        pytest.raises(anthropic.APIStatusError, match="fake engine error"),
        sdk.messages.stream(
            model="tiny",
            max_tokens=5,
            messages=HELLO,
            extra_body={"fake": {"error_event_after": 3}},
        ) as stream,
    ):
        stream.get_final_message()


def test_only_bearer_authenticates() -> None:
    # vLLM's --api-key checks `Authorization: Bearer` only. The anthropic SDK (2.x) sends its
    # api_key that way; clients that send Anthropic's `x-api-key` header are refused.
    with FakeVLLM(api_key="sekrit") as fake:
        headers = {"x-api-key": "sekrit", "anthropic-version": "2023-06-01"}
        refused = httpx.post(f"{fake.base_url}{PATH}", json=ask(2), headers=headers)
        assert (refused.status_code, refused.json()) == (401, {"error": "Unauthorized"})
        with anthropic.Anthropic(base_url=fake.base_url, api_key="sekrit", max_retries=0) as c:
            reply = c.messages.create(model="tiny", max_tokens=2, messages=HELLO)
            assert reply.stop_reason == "max_tokens"
        with (
            anthropic.Anthropic(base_url=fake.base_url, api_key="wrong", max_retries=0) as c,
            pytest.raises(anthropic.AuthenticationError),
        ):
            c.messages.create(model="tiny", max_tokens=2, messages=HELLO)
