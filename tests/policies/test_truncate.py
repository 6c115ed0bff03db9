"""truncate through the real proxy, counting with the fake's /tokenize (a word = a token, plus 4
per message and 2 per conversation), on a fake with a 256-token window."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.datastructures import Headers

from policies import build_policies
from proxy.api.chat import ChatCompletions
from proxy.core.errors import ContextLengthExceeded
from proxy.core.pipeline import ProxyRequest, ProxyResponse
from tests.conftest import ProxyFactory
from tests.fakes.vllm import FakeVLLM, prompt_tokens
from tests.policies.conftest import make_services

WINDOW = 256
SYSTEM = {"role": "system", "content": "Be brief."}


@pytest.fixture(scope="module")
def small() -> Iterator[FakeVLLM]:
    with FakeVLLM(max_model_len=WINDOW) as fake:
        yield fake


@pytest.fixture
def upstream(small: FakeVLLM) -> FakeVLLM:
    small.reset()
    return small


def conversation(turns: int, words: int = 20, last: str = "final question here") -> list[Any]:
    messages: list[Any] = [SYSTEM]
    for i in range(turns):
        messages.append({"role": "user", "content": f"u{i} " + "w " * (words - 1)})
        messages.append({"role": "assistant", "content": f"a{i} " + "w " * (words - 1)})
    messages.append({"role": "user", "content": last})
    return messages


def start(proxy: ProxyFactory, upstream: FakeVLLM, **truncate: Any) -> str:
    return proxy(upstream, policies={"order": ["truncate"], "truncate": truncate})


def post(base: str, path: str = "/v1/chat/completions", **body: Any) -> httpx.Response:
    return httpx.post(base + path, json={"model": "tiny", **body}, timeout=10)


def tokenize_calls(fake: FakeVLLM) -> int:
    return len(fake.requests_to("/tokenize"))


def test_drop_oldest_keeps_system_and_last_turn_and_fits(
    proxy: ProxyFactory, upstream: FakeVLLM
) -> None:
    base = start(proxy, upstream, strategy="drop_oldest")
    messages = conversation(10)
    assert prompt_tokens({"messages": messages}) + 16 > WINDOW
    r = post(base, messages=messages, max_tokens=16)
    assert r.status_code == 200, r.text
    (sent,) = upstream.completions
    kept = sent.body["messages"]
    assert kept[0] == SYSTEM and kept[-1] == messages[-1]
    # Whole turns went, oldest first: what is left is the newest turns, still alternating.
    assert [m["content"].split()[0] for m in kept[1:-1]] == [
        f"{r}{i}" for i in range(6, 10) for r in ("u", "a")
    ]
    assert r.headers["x-vgate-truncated"] == str(len(messages) - len(kept)) == "12"
    assert prompt_tokens(sent.body) + 16 <= WINDOW
    # Full count, the template probe, then a binary search over 10 turns.
    assert tokenize_calls(upstream) <= 3 + math.ceil(math.log2(10))


def test_middle_out_keeps_the_start_and_the_end(proxy: ProxyFactory, upstream: FakeVLLM) -> None:
    base = start(proxy, upstream, strategy="middle_out")
    messages = conversation(10)
    r = post(base, messages=messages, max_tokens=16)
    assert r.status_code == 200, r.text
    kept = upstream.completions[0].body["messages"]
    firsts = [m["content"].split()[0] for m in kept[1:-1]]
    assert firsts[:2] == ["u0", "a0"] and firsts[-2:] == ["u9", "a9"]
    dropped = {f"{r}{i}" for i in range(10) for r in ("u", "a")} - set(firsts)
    indexes = sorted({int(d[1:]) for d in dropped})
    assert indexes == list(range(indexes[0], indexes[-1] + 1))  # one contiguous middle block
    assert r.headers["x-vgate-truncated"] == str(len(dropped))
    assert prompt_tokens(upstream.completions[0].body) + 16 <= WINDOW


def test_reject_answers_400_with_the_counts_and_sends_nothing(
    proxy: ProxyFactory, upstream: FakeVLLM
) -> None:
    # Per-model override: drop_oldest for everyone, reject for this model.
    base = proxy(
        upstream,
        policies={
            "order": ["truncate"],
            "truncate": {"strategy": "drop_oldest", "models": {"tiny": {"strategy": "reject"}}},
        },
    )
    messages = conversation(10)
    total = prompt_tokens({"messages": messages})
    r = post(base, messages=messages, max_tokens=16)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "messages"
    assert f"maximum context length is {WINDOW} tokens" in error["message"]
    assert (
        f"{total + 16} tokens ({total} in the messages, 16 for the completion)" in error["message"]
    )
    assert upstream.completions == []


def test_a_last_turn_too_long_alone_is_400(proxy: ProxyFactory, upstream: FakeVLLM) -> None:
    base = start(proxy, upstream, strategy="drop_oldest")
    r = post(base, messages=conversation(3, last="x " * 300), max_tokens=16)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert "even after dropping every earlier turn" in r.json()["error"]["message"]
    assert upstream.completions == []


def test_small_prompts_skip_counting(proxy: ProxyFactory, upstream: FakeVLLM) -> None:
    base = start(proxy, upstream)
    body = {"messages": [SYSTEM, {"role": "user", "content": "hello there"}], "max_tokens": 8}
    assert post(base, **body).status_code == 200
    first = tokenize_calls(upstream)
    assert first == 2  # the count, and the template's fixed size, measured once
    for _ in range(3):
        assert post(base, **body).status_code == 200
    assert tokenize_calls(upstream) == first
    assert len(upstream.completions) == 4


def test_clamp_lowers_max_tokens_before_dropping_turns(
    proxy: ProxyFactory, upstream: FakeVLLM
) -> None:
    base = start(proxy, upstream, clamp_max_tokens=True, min_output_tokens=16)
    messages = conversation(4)  # 2 + 6 + 4 * 48 + 7 = 207 tokens
    total = prompt_tokens({"messages": messages})
    r = post(base, messages=messages, max_tokens=100)
    assert r.status_code == 200, r.text
    sent = upstream.completions[0].body
    assert sent["messages"] == messages
    assert sent["max_tokens"] == WINDOW - total
    assert r.headers["x-vgate-max-tokens-clamped"] == str(WINDOW - total)
    assert "x-vgate-truncated" not in r.headers


def test_clamp_then_drop_when_even_the_minimum_does_not_fit(
    proxy: ProxyFactory, upstream: FakeVLLM
) -> None:
    base = start(proxy, upstream, clamp_max_tokens=True, min_output_tokens=16, margin=4)
    r = post(base, messages=conversation(10), max_tokens=100, max_completion_tokens=100)
    assert r.status_code == 200, r.text
    sent = upstream.completions[0].body
    assert "x-vgate-truncated" in r.headers
    assert prompt_tokens(sent) + sent["max_completion_tokens"] + 4 <= WINDOW
    assert sent["max_completion_tokens"] >= 16


def test_completions_prompt_is_rejected_or_clamped(proxy: ProxyFactory, upstream: FakeVLLM) -> None:
    base = start(proxy, upstream)
    long_prompt = "w " * 300
    r = post(base, "/v1/completions", prompt=long_prompt, max_tokens=8)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "prompt"
    assert "301 in the prompt" in r.json()["error"]["message"]
    ids = post(base, "/v1/completions", prompt=list(range(250)), max_tokens=8)
    assert ids.status_code == 400
    assert upstream.completions == []

    clamping = start(proxy, upstream, clamp_max_tokens=True)
    r = post(clamping, "/v1/completions", prompt="w " * 200, max_tokens=100)
    assert r.status_code == 200
    assert upstream.completions[0].body["max_tokens"] == WINDOW - 201


def test_a_conversation_that_fits_is_untouched(proxy: ProxyFactory, fake: FakeVLLM) -> None:
    # The shared fake's window is 2048: this conversation fits, so nothing changes.
    base = start(proxy, fake, strategy="reject")
    r = post(base, messages=conversation(10), max_tokens=16)
    assert r.status_code == 200
    assert "x-vgate-truncated" not in r.headers


async def test_the_window_from_tokenize_serves_when_monitors_know_none(
    upstream: FakeVLLM,
) -> None:
    async with httpx.AsyncClient() as client:
        policies = {"order": ["truncate"], "truncate": {"strategy": "reject"}}
        services = make_services(client, policies, upstream.base_url, None)
        (policy,) = build_policies(services.config, "tiny", services)

        async def forward(request: ProxyRequest) -> ProxyResponse:
            return ProxyResponse(200, "application/json", b"{}")

        def request(messages: list[Any]) -> ProxyRequest:
            body = {"model": "tiny", "messages": messages, "max_tokens": 16}
            return ProxyRequest(ChatCompletions(), "tiny", body, Headers(), "rid", False)

        small = [{"role": "user", "content": "hello"}]
        await policy(request(small), forward)
        assert tokenize_calls(upstream) == 2
        await policy(request(small), forward)
        assert tokenize_calls(upstream) == 2  # the window /tokenize reported is remembered
        with pytest.raises(ContextLengthExceeded):
            await policy(request(conversation(10)), forward)


@pytest.mark.parametrize("strategy", ["drop_oldest", "reject"])
def test_when_tokenize_fails_the_request_goes_unchanged_and_the_engine_decides(
    proxy: ProxyFactory, upstream: FakeVLLM, strategy: str
) -> None:
    # Counting is impossible: the cheap bound cannot prove the prompt fits, and /tokenize is
    # down. Guessing would cut or refuse a prompt that may fit; the engine's own answer wins.
    upstream.tokenize_status = 503
    base = start(proxy, upstream, strategy=strategy)
    messages = conversation(10)
    assert prompt_tokens({"messages": messages}) + 16 > WINDOW
    r = post(base, messages=messages, max_tokens=16)
    assert r.status_code == 200, r.text
    (sent,) = upstream.completions
    assert sent.body["messages"] == messages
    assert "x-vgate-truncated" not in r.headers
    assert tokenize_calls(upstream) >= 1
    # And once /tokenize answers again, the same request is cut (or refused) as usual.
    upstream.tokenize_status = 200
    again = post(base, messages=messages, max_tokens=16)
    if strategy == "reject":
        assert again.status_code == 400, again.text
        assert again.json()["error"]["code"] == "context_length_exceeded"
    else:
        assert again.status_code == 200, again.text
        assert int(again.headers["x-vgate-truncated"]) > 0


@pytest.mark.parametrize("where", ["engine", "entry"])
def test_tokenize_is_sent_the_engine_s_own_key(proxy: ProxyFactory, where: str) -> None:
    # An engine that requires its key on every path (vLLM behind an authenticating proxy), with
    # no [upstream] api_key at all: counting must use the key of the engine that counts.
    with FakeVLLM(max_model_len=WINDOW, api_key="engine-secret", guarded=("/v1/", "/tok")) as fake:
        data: dict[str, Any] = {
            "server": {"drain_timeout": 1.0},
            "upstream": {"health_interval": 30.0, "metrics_interval": 30.0},
            "policies": {"order": ["truncate"], "truncate": {"strategy": "reject"}},
        }
        if where == "engine":
            data["engines"] = {
                "tiny": {"model": "unused", "port": fake.port, "api_key": "engine-secret"}
            }
            data["models"] = {"tiny": {"upstreams": ["engine:tiny"]}}
        else:
            entry = {"url": fake.base_url, "api_key": "engine-secret"}
            data["models"] = {"tiny": {"upstreams": [entry]}}
        base = proxy(config=data)
        r = post(base, messages=conversation(20), max_tokens=8)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "context_length_exceeded"
        counted = fake.requests_to("/tokenize")
        assert counted
        assert {c.headers.get("authorization") for c in counted} == {"Bearer engine-secret"}
        assert fake.requests_to("/v1/chat/completions") == []  # refused before it was sent
