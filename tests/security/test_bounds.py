"""Every list and every multiplier a route reads has a bound: above it, a 400 naming the field,
before anything reaches an engine (contract 33; issue: 200,000 prompts x n=16 in 1 MB)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import ProxyFactory
from tests.fakes.vllm import FakeVLLM

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = {"role": "user", "content": "hi"}


def post(base: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(base + path, json={"model": "tiny", "max_tokens": 4, **body}, timeout=10)


CASES = [
    (COMPLETIONS, {"prompt": ["p"] * 257}, "prompt", "257 items; the limit is 256"),
    (COMPLETIONS, {"prompt": ["p"] * 200, "n": 16}, "prompt", "3200 sequences"),
    (COMPLETIONS, {"prompt": [[1, 2]] * 100, "n": 11}, "prompt", "1100 sequences"),
    (COMPLETIONS, {"prompt": "p", "best_of": 17}, "best_of", "at most 16"),
    (COMPLETIONS, {"prompt": "p", "n": 17}, "n", "at most 16"),
    (COMPLETIONS, {"prompt": "p", "stop": ["x"] * 2049}, "stop", "the limit is 2048"),
    (COMPLETIONS, {"prompt": ["p", 3]}, "prompt.[1]", "string or an array of token ids"),
    (CHAT, {"messages": [USER], "n": 17}, "n", "at most 16"),
    (CHAT, {"messages": [USER] * 10_001}, "messages", "the limit is 10000"),
    (CHAT, {"messages": [USER], "tools": [{}] * 2049}, "tools", "the limit is 2048"),
    (CHAT, {"messages": [USER], "stop": ["x"] * 2049}, "stop", "the limit is 2048"),
    (
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 2049}]},
        "messages.[0].content",
        "the limit is 2048",
    ),
]


@pytest.mark.parametrize(("path", "body", "param", "says"), CASES)
def test_over_a_bound_is_400_naming_the_field_and_nothing_is_sent(
    proxy: ProxyFactory, fake: FakeVLLM, path: str, body: dict[str, Any], param: str, says: str
) -> None:
    base = proxy()
    r = post(base, path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert says in error["message"]
    assert fake.requests_to(path) == []


def test_at_the_bounds_the_request_goes_through(proxy: ProxyFactory, fake: FakeVLLM) -> None:
    base = proxy()
    assert post(base, COMPLETIONS, {"prompt": ["p"] * 64, "n": 16}).status_code == 200
    assert post(base, COMPLETIONS, {"prompt": ["p"] * 256, "n": 4}).status_code == 200
    assert post(base, CHAT, {"messages": [USER], "n": 16, "stop": ["x"] * 4}).status_code == 200


def test_the_bounds_are_configured(proxy: ProxyFactory, fake: FakeVLLM) -> None:
    base = proxy(server={"max_prompts": 2, "max_sequences": 4, "max_items": 3, "max_n": 2})
    assert post(base, COMPLETIONS, {"prompt": ["a", "b", "c"]}).json()["error"]["param"] == "prompt"
    r = post(base, COMPLETIONS, {"prompt": ["a", "b"], "n": 2})
    assert r.status_code == 200
    r = post(base, COMPLETIONS, {"prompt": ["a", "b"], "n": 3})
    assert r.json()["error"]["param"] == "n"
    assert post(base, CHAT, {"messages": [USER], "stop": ["x"] * 4}).status_code == 400
