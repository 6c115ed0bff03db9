"""The Responses API: POST /v1/responses, and GET /v1/responses/{id} and its /cancel.

vLLM keeps the responses it made (with `VLLM_ENABLE_RESPONSES_API_STORE=1`, which vgate's
engines set) in the engine process that made them, so an id leads back to one engine: the
`response_ids` stage (proxy.runtime.response_ids) renames ids on the way out and pins a request
that names one (a retrieval, a cancellation, `previous_response_id`) to its engine. A stream is
typed events ending with `response.completed` (or `.failed`, `.incomplete`); no `[DONE]`.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from proxy.api.events import count, event_data, usage_object
from proxy.api.fields import (
    bounded_list,
    constraints,
    model_of,
    optional_list,
    positive_int,
    stream_of,
)
from proxy.api.text import content_bytes, utf8_len
from proxy.api.turns import chat_tool, turns
from proxy.core.api import Api, Bounds, Constraint, Conversation, StreamState, Usage
from proxy.core.errors import InvalidRequest

_TERMINAL = (b"response.completed", b"response.failed", b"response.incomplete")
_ID = re.compile(rb'"id"\s*:\s*"(resp_[A-Za-z0-9_-]{1,200})"')


def _peek(first: bytes, state: StreamState) -> None:
    found = _ID.search(first)  # response.created: the response's own id comes first
    if found is not None:
        state.answer_id = found.group(1)


def _inspect(block: bytes, state: StreamState) -> bytes:
    for name in _TERMINAL:
        if b"event: " + name in block:
            data = event_data(block, name)
            if type(data) is dict:
                state.usage = _usage(data.get("response"))
            state.finished = True
            break
    return block


def _usage(data: Any) -> Usage | None:
    usage = data.get("usage") if type(data) is dict else None
    if type(usage) is not dict:
        return None
    return Usage(count(usage, "input_tokens"), count(usage, "output_tokens"))


class Responses(Api):
    name: ClassVar[str] = "responses"
    upstream_path: ClassVar[str] = "/v1/responses"
    errors: ClassVar = "responses"
    stages: ClassVar[tuple[str, ...]] = ("response_ids",)
    prompt_field: ClassVar[str] = "input"
    cache_salt: ClassVar[bool] = True
    priority: ClassVar[bool] = True

    def read(self, body: dict[str, Any], bounds: Bounds) -> tuple[str, bool]:
        model = model_of(body)
        items = body.get("input")
        if not isinstance(items, str):
            items = bounded_list(items, "input", bounds.max_items)
            for i, item in enumerate(items):
                if not isinstance(item, dict):
                    raise InvalidRequest(f"input[{i}] must be an object", param=f"input.[{i}]")
                content = item.get("content")
                if isinstance(content, list):
                    bounded_list(content, f"input.[{i}].content", bounds.max_items, empty=True)
        instructions = body.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            raise InvalidRequest("'instructions' must be a string", param="instructions")
        previous = body.get("previous_response_id")
        if previous is not None and (not isinstance(previous, str) or not previous):
            raise InvalidRequest(
                "'previous_response_id' must be a response id", param="previous_response_id"
            )
        positive_int(body, "max_output_tokens")
        optional_list(body, "tools", bounds.max_items)
        return model, stream_of(body)

    def max_tokens(self, body: dict[str, Any]) -> int | None:
        value = body.get("max_output_tokens")
        return value if type(value) is int else None

    def output_field(self, body: dict[str, Any]) -> str:
        return "max_output_tokens"

    def prompt_estimate(self, body: dict[str, Any]) -> int:
        items = body.get("input")
        size = utf8_len(items) if isinstance(items, str) else 0
        if isinstance(items, list):
            for item in items:
                if isinstance(item, dict):
                    size += content_bytes(_text_parts(item.get("content"))) or 0
        instructions = body.get("instructions")
        if isinstance(instructions, str):
            size += utf8_len(instructions)
        return size // 4 + 1

    def usage(self, content: bytes) -> Usage | None:
        usage = usage_object(content)
        if usage is None:
            return None
        return Usage(count(usage, "input_tokens"), count(usage, "output_tokens"))

    def peek(self, first: bytes, state: StreamState) -> None:
        _peek(first, state)

    def inspect(self, block: bytes, state: StreamState) -> bytes:
        return _inspect(block, state)

    def conversation(self, body: dict[str, Any]) -> Conversation | None:
        return _ResponsesConversation.of(body)

    def constraints(self, body: dict[str, Any]) -> tuple[Constraint, ...]:
        text = body.get("text")
        fmt = text.get("format") if isinstance(text, dict) else None
        return constraints(body.get("tools"), fmt, structured=body.get("structured_outputs"))


def _text_parts(content: Any) -> Any:
    """Responses content parts (`input_text`, `output_text`) as chat's text parts."""
    if not isinstance(content, list):
        return content
    return [
        {"type": "text", "text": p.get("text")}
        if isinstance(p, dict) and p.get("type") in ("input_text", "output_text", "text")
        else p
        for p in content
    ]


class _ResponsesConversation(Conversation):
    """`instructions` as a system message, then the message items of `input`."""

    def __init__(
        self,
        body: dict[str, Any],
        messages: list[dict[str, Any]],
        system: int,
        tools: list[Any] | None,
    ) -> None:
        super().__init__(messages, turns(messages), tools=tools)
        self._body = body
        self._system = system  # messages before the input's (the instructions)

    @classmethod
    def of(cls, body: dict[str, Any]) -> _ResponsesConversation | None:
        if body.get("previous_response_id") is not None:
            return None  # the engine prepends a conversation the proxy never saw
        items: Any = body.get("input")
        if isinstance(items, str):
            items = [{"type": "message", "role": "user", "content": items}]
        elif not isinstance(items, list):
            return None
        tools: list[Any] | None = None
        if body.get("tools"):
            tools = [
                chat_tool(t.get("name"), t.get("description"), t.get("parameters"))
                if isinstance(t, dict) and t.get("type") == "function"
                else None
                for t in body["tools"]
            ]
            if None in tools:
                return None  # built-in tools (web search, MCP ...): not counted as chat tools
        messages: list[dict[str, Any]] = []
        instructions = body.get("instructions")
        if isinstance(instructions, str):
            messages.append({"role": "system", "content": instructions})
        system = len(messages)
        for item in items:
            kind = item.get("type", "message")
            if kind != "message" or not isinstance(item.get("role"), str):
                return None  # tool calls and their outputs: not counted as chat text
            messages.append({"role": item["role"], "content": _text_parts(item.get("content"))})
        return cls(body, messages, system, tools)

    def keep(self, indexes: list[int]) -> None:
        items = self._body["input"]
        if isinstance(items, str):
            return  # one user turn: always kept whole
        self._body["input"] = [items[i - self._system] for i in indexes if i >= self._system]


class ResponseRetrieve(Api):
    """GET /v1/responses/{id}: a stored response (`?stream=true` replays a background one)."""

    name: ClassVar[str] = "responses/retrieve"
    upstream_path: ClassVar[str] = "/v1/responses/{id}"
    method: ClassVar[str] = "GET"
    errors: ClassVar = "responses"
    policies: ClassVar[frozenset[str] | None] = frozenset({"auth", "ratelimit"})
    generates: ClassVar[bool] = False
    stages: ClassVar[tuple[str, ...]] = ("response_ids",)
    query: ClassVar[frozenset[str]] = frozenset({"stream", "starting_after", "include"})
    by_id: ClassVar[bool] = True

    def read(self, body: dict[str, Any], bounds: Bounds) -> tuple[str, bool]:
        return "", False  # the model is the response's; `stream` comes from the query

    def peek(self, first: bytes, state: StreamState) -> None:
        _peek(first, state)

    def inspect(self, block: bytes, state: StreamState) -> bytes:
        return _inspect(block, state)


class ResponseCancel(ResponseRetrieve):
    """POST /v1/responses/{id}/cancel: a background response stopped."""

    name: ClassVar[str] = "responses/cancel"
    upstream_path: ClassVar[str] = "/v1/responses/{id}/cancel"
    method: ClassVar[str] = "POST"
    query: ClassVar[frozenset[str]] = frozenset()
