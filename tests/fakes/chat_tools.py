"""Tool calls: which ones the fake makes, and how vLLM's chat API answers them (hermes parser).

A request makes tool calls when it carries `tools` and either `tool_choice` is "required" or names
a function (vLLM then forces a call with a grammar), or `"fake": {"tool_call": ...}` asks for one
under "auto" (the default). `tool_call` is `true` (the first tool, arguments `{}`), a tool name,
`{"name": ..., "arguments": {...} or "json"}`, or a list of those (parallel calls).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tests.fakes.replies import Fault
from tests.fakes.shapes import FINGERPRINT, messages_tokens, sse, usage

_PIECE = 3  # argument characters per streamed delta (one "token")


@dataclass(frozen=True)
class Call:
    id: str  # vLLM's `chatcmpl-tool-<16 hex>`, also the Responses `call_id`
    name: str
    arguments: str  # JSON text, as the parser extracted it (json.dumps spacing)

    def pieces(self) -> list[str]:
        return [self.arguments[i : i + _PIECE] for i in range(0, len(self.arguments), _PIECE)]


def tool_names(tools: Any) -> list[str]:
    """Function names of a request's tools, in any of the three APIs' formats."""
    names = []
    for tool in tools if isinstance(tools, list) else []:
        if isinstance(tool, dict):
            function = tool.get("function")
            spec: dict[str, Any] = function if isinstance(function, dict) else tool
            if isinstance(spec.get("name"), str):
                names.append(spec["name"])
    return names


def forced_name(tool_choice: Any) -> str | None:
    """The function a named tool_choice forces (OpenAI chat, Responses, or Anthropic form)."""
    if not isinstance(tool_choice, dict):
        return None
    function = tool_choice.get("function")
    if isinstance(function, dict) and isinstance(function.get("name"), str):
        return str(function["name"])
    name = tool_choice.get("name")
    return name if isinstance(name, str) else None


def calls_for(body: dict[str, Any], fault: Fault) -> list[Call]:
    """The tool calls this request gets (empty: a text answer); `tool_choice` in OpenAI's form."""
    names = tool_names(body.get("tools"))
    choice = body.get("tool_choice")
    forced = forced_name(choice)
    if not names or choice == "none":
        return []
    spec = fault.get("tool_call")
    if not spec and forced is None and choice != "required":
        return []
    specs = spec if isinstance(spec, list) else [spec]
    calls = []
    for item in specs:
        name, arguments = names[0], {}
        if isinstance(item, str):
            name = item
        elif isinstance(item, dict):
            name, arguments = item.get("name", name), item.get("arguments", {})
        text = _json_text(arguments)
        calls.append(Call(f"chatcmpl-tool-{uuid.uuid4().hex[:16]}", forced or name, text))
    return calls


def _json_text(arguments: Any) -> str:
    # The hermes parser hands on the JSON as the model wrote it; json.dumps spacing is typical.
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def call_tokens(calls: list[Call]) -> int:
    return sum(len(c.pieces()) + 1 for c in calls)


def _finish(body: dict[str, Any]) -> str:
    # OpenAI's rule, which vLLM follows: a named tool_choice finishes "stop".
    return "stop" if forced_name(body.get("tool_choice")) else "tool_calls"


def whole_tool_answer(body: dict[str, Any], calls: list[Call], rid: str) -> dict[str, Any]:
    """The non-streaming chat completion carrying `calls`."""
    auto = forced_name(body.get("tool_choice")) is None and body.get("tool_choice") != "required"
    message = {
        "role": "assistant",
        "content": None if auto else "",
        "refusal": None,
        "annotations": None,
        "audio": None,
        "function_call": None,
        "tool_calls": [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in calls
        ],
        "reasoning": None,
    }
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": _finish(body)}
    choice.update(stop_reason=None, token_ids=None, routed_experts=None)
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model"),
        "choices": [choice],
        "service_tier": None,
        "system_fingerprint": FINGERPRINT,
        "usage": usage(messages_tokens(body.get("messages") or []), call_tokens(calls)),
        "prompt_logprobs": None,
        "prompt_token_ids": None,
        "prompt_text": None,
        "kv_transfer_params": None,
        "ec_transfer_params": None,
        "metrics": None,
    }


def tool_stream_events(body: dict[str, Any], calls: list[Call], rid: str) -> Iterator[bytes]:
    """The streamed chat completion carrying `calls` (without the final [DONE])."""
    head = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": body.get("model"),
    }

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        if finish is not None:
            choice["stop_reason"] = None
        choice["token_ids"] = None
        return {**head, "choices": [choice]}

    role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
    role["finish_reason"] = None
    yield sse({**head, "choices": [role], "prompt_token_ids": None, "prompt_text": None})
    for index, call in enumerate(calls):
        opening = {"id": call.id, "type": "function", "index": index}
        opening["function"] = {"name": call.name}
        yield sse(chunk({"content": None, "tool_calls": [opening]}))
        for piece in call.pieces():
            args = {"index": index, "function": {"arguments": piece}}
            yield sse(chunk({"content": None, "tool_calls": [args]}))
    options = body.get("stream_options")
    with_usage = isinstance(options, dict) and bool(options.get("include_usage"))
    yield sse(chunk({}, _finish(body)))  # (no fingerprint here: see shapes.stream_events)
    if with_usage:
        u = usage(messages_tokens(body.get("messages") or []), call_tokens(calls), details=False)
        yield sse({**head, "choices": [], "usage": u, "system_fingerprint": FINGERPRINT})
