"""Anthropic's Messages API: POST /v1/messages and /v1/messages/count_tokens.

Errors go out in Anthropic's shape, and after a stream started as an `event: error` (the
Anthropic SDK raises on it). A stream ends with `message_stop`; its usage is in `message_delta`
(output tokens, and vLLM adds the input tokens) after `message_start` (input tokens). Clients
authenticate with `x-api-key` as well as `Authorization: Bearer` (policies.auth) and send
`anthropic-version`, which is accepted and not forwarded.
"""

from __future__ import annotations

from typing import Any, ClassVar

from proxy.api.events import count, event_data, usage_object
from proxy.api.fields import (
    bounded_list,
    constraints,
    fixed_sampling,
    model_of,
    optional_list,
    stream_of,
)
from proxy.api.text import content_bytes, utf8_len
from proxy.api.turns import chat_tool, turns
from proxy.core.api import Api, Bounds, Constraint, Conversation, StreamState, Usage
from proxy.core.errors import InvalidRequest


def _messages(body: dict[str, Any], bounds: Bounds) -> list[Any]:
    messages = bounded_list(body.get("messages"), "messages", bounds.max_messages)
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise InvalidRequest(
                f"messages.{i}: an object with role 'user' or 'assistant'", param=f"messages.{i}"
            )
        content = m.get("content")
        if isinstance(content, list):
            bounded_list(content, f"messages.{i}.content", bounds.max_items, empty=True)
    system = body.get("system")
    if isinstance(system, list):
        bounded_list(system, "system", bounds.max_items, empty=True)
    elif system is not None and not isinstance(system, str):
        raise InvalidRequest("system: a string or a list of text blocks", param="system")
    optional_list(body, "tools", bounds.max_items)
    return messages


def _usage(data: Any) -> Usage | None:
    if type(data) is not dict:
        return None
    return Usage(count(data, "input_tokens"), count(data, "output_tokens"))


class Messages(Api):
    name: ClassVar[str] = "messages"
    upstream_path: ClassVar[str] = "/v1/messages"
    errors: ClassVar = "anthropic"
    stages: ClassVar[tuple[str, ...]] = ("cache",)
    # vLLM's Messages request has `cache_salt` but no `priority` (0.32): it would be dropped.
    cache_salt: ClassVar[bool] = True

    def read(self, body: dict[str, Any], bounds: Bounds) -> tuple[str, bool]:
        model = model_of(body)
        _messages(body, bounds)
        limit = body.get("max_tokens")
        if type(limit) is not int or limit < 1:
            raise InvalidRequest("max_tokens: a positive integer is required", param="max_tokens")
        optional_list(body, "stop_sequences", bounds.max_items)
        return model, stream_of(body)

    def max_tokens(self, body: dict[str, Any]) -> int | None:
        value = body.get("max_tokens")
        return value if type(value) is int else None

    def prompt_estimate(self, body: dict[str, Any]) -> int:
        return _estimate(body)

    def usage(self, content: bytes) -> Usage | None:
        return _usage(usage_object(content))

    def deterministic(self, body: dict[str, Any]) -> bool:
        return fixed_sampling(body)

    def inspect(self, block: bytes, state: StreamState) -> bytes:
        if b"message_start" in block and state.usage is None:
            start = event_data(block, b"message_start")
            if type(start) is dict:
                state.usage = _usage(start.get("message", {}).get("usage"))
        if b"message_delta" in block:
            delta = event_data(block, b"message_delta")
            if type(delta) is dict:
                found = _usage(delta.get("usage"))
                if found is not None:
                    before = state.usage.prompt_tokens if state.usage is not None else None
                    prompt = found.prompt_tokens if found.prompt_tokens is not None else before
                    state.usage = Usage(prompt, found.completion_tokens)
        if b"event: message_stop" in block:
            state.finished = True
        return block

    def conversation(self, body: dict[str, Any]) -> Conversation | None:
        return _MessagesConversation.of(body)

    def constraints(self, body: dict[str, Any]) -> tuple[Constraint, ...]:
        # Structured outputs: `output_config.format` (GA), `output_format` (the beta's name).
        config = body.get("output_config")
        fmt = config.get("format") if isinstance(config, dict) else None
        return constraints(body.get("tools"), fmt, body.get("output_format"))


class CountTokens(Api):
    """POST /v1/messages/count_tokens: how many tokens a Messages request would take."""

    name: ClassVar[str] = "messages/count_tokens"
    upstream_path: ClassVar[str] = "/v1/messages/count_tokens"
    errors: ClassVar = "anthropic"
    policies: ClassVar[frozenset[str] | None] = frozenset({"auth", "ratelimit"})
    generates: ClassVar[bool] = False

    def read(self, body: dict[str, Any], bounds: Bounds) -> tuple[str, bool]:
        model = model_of(body)
        _messages(body, bounds)
        if body.get("stream"):
            raise InvalidRequest("count_tokens does not stream", param="stream")
        return model, False

    def prompt_estimate(self, body: dict[str, Any]) -> int:
        return 0  # counting runs no model: request budgets apply, token budgets do not


def _estimate(body: dict[str, Any]) -> int:
    size = 0
    for m in body.get("messages") or []:
        if isinstance(m, dict):
            size += content_bytes(_text(m.get("content"))) or len(str(m.get("content")))
    system = body.get("system")
    if isinstance(system, str):
        size += utf8_len(system)
    return size // 4 + 1


def _text(content: Any) -> Any:
    """Anthropic content blocks as chat's text parts (other blocks left as they are)."""
    if not isinstance(content, list):
        return content
    return [
        {"type": "text", "text": b.get("text")}
        if isinstance(b, dict) and b.get("type") == "text"
        else b
        for b in content
    ]


class _MessagesConversation(Conversation):
    """`system` as a system message, then `messages` (text blocks only)."""

    def __init__(
        self,
        body: dict[str, Any],
        messages: list[dict[str, Any]],
        system: int,
        tools: list[Any] | None,
    ) -> None:
        super().__init__(messages, turns(messages), tools=tools)
        self._body = body
        self._system = system

    @classmethod
    def of(cls, body: dict[str, Any]) -> _MessagesConversation | None:
        tools: list[Any] | None = None
        if body.get("tools"):
            # Anthropic's tools as the chat template sees them (vLLM converts them the same way).
            tools = [
                chat_tool(t.get("name"), t.get("description"), t.get("input_schema"))
                if isinstance(t, dict)
                else None
                for t in body["tools"]
            ]
            if None in tools:
                return None  # server tools (web search ...): not counted as chat tools
        messages: list[dict[str, Any]] = []
        system = body.get("system")
        if isinstance(system, list):
            texts = [b.get("text") for b in system if isinstance(b, dict)]
            if not all(isinstance(t, str) for t in texts):
                return None
            system = "\n".join(t for t in texts if isinstance(t, str))
        if isinstance(system, str):
            messages.append({"role": "system", "content": system})
        offset = len(messages)
        for m in body["messages"]:
            content = _text(m.get("content"))
            if isinstance(content, list) and any(p.get("type") != "text" for p in content):
                return None  # tool use and results, images: not counted as chat text
            messages.append({"role": m["role"], "content": content})
        return cls(body, messages, offset, tools)

    def keep(self, indexes: list[int]) -> None:
        source = self._body["messages"]
        self._body["messages"] = [source[i - self._system] for i in indexes if i >= self._system]
