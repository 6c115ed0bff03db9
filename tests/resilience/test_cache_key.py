"""What makes two requests the same answer for the response cache, and which requests fix their
own answer."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.datastructures import Headers

from proxy.api.chat import ChatCompletions
from proxy.api.messages import CountTokens, Messages
from proxy.api.pooling import Embeddings
from proxy.api.responses import Responses
from proxy.core.errors import InvalidRequest
from proxy.core.pipeline import KeyInfo, ProxyRequest
from proxy.runtime.cache.key import key_of, mode_of

CHAT = ChatCompletions()


def request(body: dict[str, Any], key: str | None = None, model: str = "tiny") -> ProxyRequest:
    stream = body.get("stream") is True
    owner = KeyInfo(key) if key is not None else None
    return ProxyRequest(CHAT, model, body, Headers(), "rid", stream, key=owner)


def key(body: dict[str, Any], **kw: Any) -> str | None:
    identity = kw.pop("identity", b"tiny")
    shared = kw.pop("shared", False)
    return key_of(request(body, **kw), identity, shared)


BODY: dict[str, Any] = {
    "model": "tiny",
    "messages": [{"role": "user", "content": "hi"}],
    "temperature": 0,
    "max_tokens": 8,
}


def test_top_level_order_does_not_matter_but_order_inside_a_value_does() -> None:
    assert key(BODY) == key(dict(reversed(list(BODY.items()))))
    a = {**BODY, "response_format": {"schema": {"properties": {"x": {}, "y": {}}}}}
    b = {**BODY, "response_format": {"schema": {"properties": {"y": {}, "x": {}}}}}
    assert key(a) != key(b)  # a schema's property order is the order the engine writes


def test_stream_absent_or_false_is_one_key_a_stream_another() -> None:
    assert key(BODY) == key({**BODY, "stream": False})
    assert key(BODY) != key({**BODY, "stream": True})
    streamed = {**BODY, "stream": True}
    assert key(streamed) != key({**streamed, "stream_options": {"include_usage": True}})


def test_fields_that_do_not_change_the_answer_are_left_out() -> None:
    assert key(BODY) == key({**BODY, "priority": 5})
    assert key(BODY) == key({**BODY, "model": "tiny-alias"})  # the model is keyed on its own


@pytest.mark.parametrize(
    "change",
    [
        {"max_tokens": 9},
        {"temperature": 0.0001},
        {"seed": 1},
        {"user": "end-user-2"},
        {"messages": [{"role": "user", "content": "hi!"}]},
    ],
)
def test_what_may_change_the_answer_is_in_the_key(change: dict[str, Any]) -> None:
    assert key(BODY) != key({**BODY, **change})


def test_the_model_its_identity_and_the_owner_are_in_the_key() -> None:
    assert key(BODY) != key(BODY, model="other")
    assert key(BODY) != key(BODY, identity=b"other weights")
    assert key(BODY, key="alice") != key(BODY, key="bob")
    assert key(BODY, key="alice", shared=True) == key(BODY, key="bob", shared=True)
    assert key(BODY, shared=True) == key(BODY, key="alice", shared=True)


def test_a_body_too_deep_to_write_has_no_key() -> None:
    deep: Any = []
    for _ in range(300):
        deep = [deep]
    assert key({**BODY, "extra": deep}) is None


@pytest.mark.parametrize(
    "fields, fixed",
    [
        ({}, False),
        ({"temperature": 0}, True),
        ({"temperature": 0.0}, True),
        ({"temperature": 0.7}, False),
        ({"temperature": False}, False),
        ({"top_k": 1}, True),
        ({"top_k": 2}, False),
        ({"temperature": 0.9, "seed": 3}, True),
        ({"seed": True}, False),
        ({"seed": "3"}, False),
    ],
)
def test_which_requests_fix_their_answer(fields: dict[str, Any], fixed: bool) -> None:
    assert CHAT.deterministic(fields) is fixed
    assert Messages().deterministic(fields) is fixed


def test_pooling_always_fixes_its_answer_and_stateful_routes_never_do() -> None:
    assert Embeddings().deterministic({}) is True
    assert Responses().deterministic({"temperature": 0}) is False
    assert "cache" not in Responses.stages and "cache" not in CountTokens.stages


def test_the_header_is_allow_off_or_a_400() -> None:
    assert mode_of(Headers()) is None
    assert mode_of(Headers({"x-vgate-cache": " Allow "})) == "allow"
    assert mode_of(Headers({"x-vgate-cache": "off"})) == "off"
    with pytest.raises(InvalidRequest) as info:
        mode_of(Headers({"x-vgate-cache": "fallback"}))
    assert info.value.status == 400
