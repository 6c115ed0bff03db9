"""truncate on every route whose prompt is a conversation: Responses `input` items and Anthropic
`messages` are fitted the way chat is, rejected in the route's own error shape, and left to the
engine where the proxy cannot see the whole prompt. Counting is the fake's /tokenize (a word =
a token, plus 4 per message and 2 per conversation) on a fake with a 256-token window."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import ProxyFactory
from tests.fakes.vllm import FakeVLLM, prompt_tokens

WINDOW = 256


@pytest.fixture(scope="module")
def small() -> Iterator[FakeVLLM]:
    with FakeVLLM(max_model_len=WINDOW) as fake:
        yield fake


@pytest.fixture
def upstream(small: FakeVLLM) -> FakeVLLM:
    small.reset()
    return small


def turns(count: int, words: int = 20, last: str = "final question here") -> list[Any]:
    """Chat-shaped turns (user, assistant) and a last user message."""
    out: list[Any] = []
    for i in range(count):
        out.append({"role": "user", "content": f"u{i} " + "w " * (words - 1)})
        out.append({"role": "assistant", "content": f"a{i} " + "w " * (words - 1)})
    out.append({"role": "user", "content": last})
    return out


def as_input(messages: list[Any]) -> list[Any]:
    """The same turns as Responses input items (typed content parts)."""
    kinds = {"user": "input_text", "assistant": "output_text"}
    return [
        {
            "type": "message",
            "role": m["role"],
            "content": [{"type": kinds[m["role"]], "text": m["content"]}],
        }
        for m in messages
    ]


def as_messages(messages: list[Any]) -> list[Any]:
    """The same turns as Anthropic messages (text blocks)."""
    return [
        {"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages
    ]


def first_words(items: list[Any]) -> list[str]:
    return [item["content"][0]["text"].split()[0] for item in items]


def start(proxy: ProxyFactory, upstream: FakeVLLM, **truncate: Any) -> str:
    return proxy(upstream, policies={"order": ["truncate"], "truncate": truncate})


def post(base: str, path: str, **body: Any) -> httpx.Response:
    return httpx.post(base + path, json={"model": "tiny", **body}, timeout=10)


def counted(fake: FakeVLLM, path: str) -> int:
    """What the fake's tokenizer makes of the prompt that reached `path`."""
    (sent,) = fake.requests_to(path)
    body = sent.body
    if path == "/v1/responses":
        messages = (
            [{"role": "system", "content": body["instructions"]}] if "instructions" in body else []
        )
        messages += [{"role": i["role"], "content": i["content"]} for i in body["input"]]
    else:
        messages = [{"role": "system", "content": body["system"]}] if "system" in body else []
        messages += body["messages"]
    return prompt_tokens({"messages": messages})


@pytest.mark.parametrize("strategy", ["drop_oldest", "middle_out"])
def test_responses_input_is_fitted_by_whole_turns(
    proxy: ProxyFactory, upstream: FakeVLLM, strategy: str
) -> None:
    base = start(proxy, upstream, strategy=strategy)
    items = as_input(turns(10))
    r = post(base, "/v1/responses", input=items, instructions="Be brief.", max_output_tokens=16)
    assert r.status_code == 200, r.text
    (sent,) = upstream.requests_to("/v1/responses")
    kept = sent.body["input"]
    assert sent.body["instructions"] == "Be brief."  # never dropped
    assert kept[-1] == items[-1]  # the last user turn stays
    words = first_words(kept[:-1])
    assert [w[0] for w in words] == ["u", "a"] * (len(words) // 2)  # roles still alternate
    if strategy == "drop_oldest":
        assert words[-2:] == ["u9", "a9"] and "u0" not in words
    else:
        assert words[:2] == ["u0", "a0"] and words[-2:] == ["u9", "a9"]
    assert r.headers["x-vgate-truncated"] == str(len(items) - len(kept))
    assert counted(upstream, "/v1/responses") + 16 <= WINDOW


def test_anthropic_messages_are_fitted_and_the_system_prompt_kept(
    proxy: ProxyFactory, upstream: FakeVLLM
) -> None:
    base = start(proxy, upstream, strategy="drop_oldest")
    messages = as_messages(turns(10))
    r = post(base, "/v1/messages", messages=messages, system="Be brief.", max_tokens=16)
    assert r.status_code == 200, r.text
    (sent,) = upstream.requests_to("/v1/messages")
    kept = sent.body["messages"]
    assert sent.body["system"] == "Be brief."
    assert kept[-1] == messages[-1] and kept[0]["role"] == "user"
    assert first_words(kept[:-1])[-2:] == ["u9", "a9"]
    assert int(r.headers["x-vgate-truncated"]) == len(messages) - len(kept) > 0
    assert counted(upstream, "/v1/messages") + 16 <= WINDOW


def test_reject_is_in_each_route_s_own_error_shape(proxy: ProxyFactory, upstream: FakeVLLM) -> None:
    base = start(proxy, upstream, strategy="reject")
    r = post(base, "/v1/responses", input=as_input(turns(10)), max_output_tokens=16)
    assert r.status_code == 400
    error = r.json()["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", "input")
    assert f"maximum context length is {WINDOW} tokens" in error["message"]
    assert "in the input" in error["message"]
    r = post(base, "/v1/messages", messages=as_messages(turns(10)), max_tokens=16)
    assert r.status_code == 400
    assert r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert f"maximum context length is {WINDOW} tokens" in r.json()["error"]["message"]
    assert upstream.requests_to("/v1/responses") == upstream.requests_to("/v1/messages") == []


def test_a_string_input_too_long_is_rejected_not_cut(
    proxy: ProxyFactory, upstream: FakeVLLM
) -> None:
    base = start(proxy, upstream, strategy="drop_oldest")
    r = post(base, "/v1/responses", input="x " * 300, max_output_tokens=16)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert "even after dropping every earlier turn" in r.json()["error"]["message"]


def test_clamp_lowers_max_output_tokens(proxy: ProxyFactory, upstream: FakeVLLM) -> None:
    base = start(proxy, upstream, strategy="reject", clamp_max_tokens=True, min_output_tokens=8)
    items = as_input(turns(4))  # ~190 tokens: fits with 8 to spare, not with 200
    r = post(base, "/v1/responses", input=items, max_output_tokens=200)
    assert r.status_code == 200, r.text
    (sent,) = upstream.requests_to("/v1/responses")
    clamped = sent.body["max_output_tokens"]
    assert 8 <= clamped < 200
    assert r.headers["x-vgate-max-tokens-clamped"] == str(clamped)
    assert "max_tokens" not in sent.body  # the route's own field, not chat's


@pytest.mark.parametrize(
    ("path", "body"),
    [
        # Tool use blocks: no chat text to count.
        (
            "/v1/messages",
            {
                "max_tokens": 4,
                "messages": [
                    *as_messages(turns(10)),
                    {
                        "role": "assistant",
                        "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}],
                    },
                    {
                        "role": "user",
                        "content": [{"type": "tool_result", "tool_use_id": "t", "content": "1"}],
                    },
                ],
            },
        ),
        # A built-in tool the chat template does not render.
        (
            "/v1/responses",
            {
                "input": as_input(turns(10)),
                "tools": [{"type": "web_search"}],
                "max_output_tokens": 4,
            },
        ),
    ],
    ids=["tool-blocks", "builtin-tool"],
)
def test_a_prompt_the_proxy_cannot_see_whole_is_left_to_the_engine(
    proxy: ProxyFactory, upstream: FakeVLLM, path: str, body: dict[str, Any]
) -> None:
    base = proxy(
        upstream,
        policies={"order": ["truncate"], "truncate": {"strategy": "drop_oldest"}},
        upstream={"health_interval": 30.0},
    )
    post(base, path, **body)
    (sent,) = upstream.requests_to(path)
    sent_body = {k: v for k, v in sent.body.items() if k != "model"}
    assert sent_body == body  # untouched: the engine's own 400 is better than a guess
    assert upstream.requests_to("/tokenize") == []


def test_tools_are_always_counted_exactly(proxy: ProxyFactory, upstream: FakeVLLM) -> None:
    base = start(proxy, upstream)
    short = [{"role": "user", "content": "hi"}]
    assert post(base, "/v1/chat/completions", messages=short, max_tokens=4).status_code == 200
    calls = len(upstream.requests_to("/tokenize"))  # the first counts, and measures the template
    assert post(base, "/v1/chat/completions", messages=short, max_tokens=4).status_code == 200
    assert len(upstream.requests_to("/tokenize")) == calls  # small: the byte bound suffices
    tools = [{"type": "function", "function": {"name": "f", "description": "w " * 300}}]
    r = post(base, "/v1/chat/completions", messages=short, tools=tools, max_tokens=4)
    # The tools alone overflow the window: counted (with them), not waved through.
    last = upstream.requests_to("/tokenize")[-1]
    assert last.body["tools"] == tools
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    # Anthropic's and the Responses API's tools are counted in chat's shape.
    anthropic_tools = [{"name": "f", "description": "d", "input_schema": {"type": "object"}}]
    before = len(upstream.requests_to("/tokenize"))
    post(base, "/v1/messages", messages=as_messages(short), tools=anthropic_tools, max_tokens=4)
    sent = [s.body.get("tools") for s in upstream.requests_to("/tokenize")[before:]]
    as_chat = {"name": "f", "description": "d", "parameters": {"type": "object"}}
    assert [tools for tools in sent if tools] == [[{"type": "function", "function": as_chat}]]
    # The Responses API's flat function tools likewise.
    before = len(upstream.requests_to("/tokenize"))
    flat = [{"type": "function", **as_chat}]
    post(base, "/v1/responses", input=as_input(short), tools=flat, max_output_tokens=4)
    sent = [s.body.get("tools") for s in upstream.requests_to("/tokenize")[before:]]
    assert [tools for tools in sent if tools] == [[{"type": "function", "function": as_chat}]]


def test_a_response_continuing_a_stored_one_is_left_to_the_engine(
    proxy: ProxyFactory, upstream: FakeVLLM
) -> None:
    base = start(proxy, upstream, strategy="drop_oldest")
    first = post(base, "/v1/responses", input="hi", max_output_tokens=4).json()
    calls = len(upstream.requests_to("/tokenize"))
    # The engine prepends the stored conversation, which the proxy never sees.
    body = {
        "previous_response_id": first["id"],
        "input": as_input(turns(10)),
        "max_output_tokens": 4,
    }
    post(base, "/v1/responses", **body)
    sent = upstream.requests_to("/v1/responses")[-1].body
    assert sent["input"] == body["input"]
    assert len(upstream.requests_to("/tokenize")) == calls
