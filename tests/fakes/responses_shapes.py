"""vLLM's Responses API bodies and events (vLLM 0.32.0, key order included).

A stream is typed events (`event:` and `data:` lines) numbered by `sequence_number` from 0; it
ends with `response.completed` (also for an "incomplete" response) and has no `data: [DONE]`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tests.fakes.chat_tools import Call
from tests.fakes.shapes import messages_tokens, token_text, typed_sse


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


def input_tokens(body: dict[str, Any]) -> int:
    """The stand-in tokenizer over `instructions` + `input` (a string or a list of messages)."""
    given = body.get("input")
    turns = [m for m in given if isinstance(m, dict)] if isinstance(given, list) else []
    if isinstance(given, str):
        turns = [{"role": "user", "content": given}]
    if isinstance(body.get("instructions"), str):
        turns.insert(0, {"role": "system", "content": body["instructions"]})
    return messages_tokens(turns)


def _tools(tools: Any) -> list[Any]:
    out = []
    for tool in tools if isinstance(tools, list) else []:
        if isinstance(tool, dict) and tool.get("type") == "function":
            tool = {
                "name": tool.get("name"),
                "parameters": tool.get("parameters"),
                "strict": tool.get("strict"),
                "type": "function",
                "allowed_callers": None,
                "async": None,
                "defer_loading": None,
                "description": tool.get("description"),
                "output_schema": None,
            }
        out.append(tool)
    return out


def usage(inputs: int, outputs: int) -> dict[str, Any]:
    return {
        "input_tokens": inputs,
        "input_tokens_details": {
            "cached_tokens": 0,
            "cache_write_tokens": 0,
            "input_tokens_per_turn": [],
            "cached_tokens_per_turn": [],
        },
        "output_tokens": outputs,
        "output_tokens_details": {
            "reasoning_tokens": 0,
            "tool_output_tokens": 0,
            "output_tokens_per_turn": [],
            "tool_output_tokens_per_turn": [],
        },
        "total_tokens": inputs + outputs,
    }


def message_item(item_id: str, text: str | None, status: str = "completed") -> dict[str, Any]:
    content = [] if text is None else [_text_part(text, None)]
    return {
        "id": item_id,
        "content": content,
        "role": "assistant",
        "status": status,
        "type": "message",
        "phase": None,
    }


def call_item(call: Call, item_id: str, status: str = "completed") -> dict[str, Any]:
    arguments = call.arguments if status == "completed" else ""
    return {
        "arguments": arguments,
        "call_id": call.id,
        "name": call.name,
        "type": "function_call",
        "id": item_id,
        "async": None,
        "caller": None,
        "namespace": None,
        "status": status,
    }


def _text_part(text: str, logprobs: list[Any] | None) -> dict[str, Any]:
    return {"annotations": [], "text": text, "type": "output_text", "logprobs": logprobs}


@dataclass
class Answer:
    """One response being made: what the request asked, and what the fake generates for it."""

    body: dict[str, Any]
    tokens: int
    calls: list[Call]
    pad: str = ""
    prior_tokens: int = 0  # of the previous_response_id chain
    id: str = field(default_factory=lambda: new_id("resp"))
    created: int = field(default_factory=lambda: int(time.time()))
    item_ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # One output item per call, or the one message.
        self.item_ids = [new_id("fc") for _ in self.calls] or [new_id("msg")]

    @property
    def text(self) -> str:
        return "".join(token_text(i, self.pad) for i in range(self.tokens))

    @property
    def cut(self) -> bool:
        """Stopped by max_output_tokens (status "incomplete"), not by EOS."""
        limit = self.body.get("max_output_tokens")
        return not self.calls and isinstance(limit, int) and self.tokens >= limit

    def output(self) -> list[dict[str, Any]]:
        if self.calls:
            return [call_item(c, i) for c, i in zip(self.calls, self.item_ids, strict=True)]
        return [message_item(self.item_ids[0], self.text)]

    def response(self, status: str | None = None) -> dict[str, Any]:
        """The response object; `status` set: the in-progress/queued/cancelled form (no output)."""
        b = self.body
        tools = _tools(b.get("tools"))
        final = status is None
        status = status or ("incomplete" if self.cut else "completed")
        outputs = sum(len(c.pieces()) + 1 for c in self.calls) if self.calls else self.tokens
        return {
            "id": self.id,
            "created_at": self.created,
            "incomplete_details": {"reason": "max_output_tokens"} if final and self.cut else None,
            "instructions": b.get("instructions"),
            "metadata": b.get("metadata"),
            "model": b.get("model"),
            "object": "response",
            "output": self.output() if final else [],
            "parallel_tool_calls": b.get("parallel_tool_calls", True),
            "temperature": float(b.get("temperature", 1.0)),
            "tool_choice": b.get("tool_choice", "auto") if tools else "none",
            "tools": tools,
            "top_p": float(b.get("top_p", 1.0)),
            "background": bool(b.get("background", False)),
            "max_output_tokens": b.get("max_output_tokens"),
            "max_tool_calls": b.get("max_tool_calls"),
            "previous_response_id": b.get("previous_response_id"),
            "prompt": None,
            "reasoning": None,
            "service_tier": "auto",
            "status": status,
            "text": None,
            "top_logprobs": None,
            "truncation": "disabled",
            "usage": usage(self.prior_tokens + input_tokens(b), outputs) if final else None,
            "user": b.get("user"),
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "kv_transfer_params": None,
            "ec_transfer_params": None,
            "input_messages": None,
            "output_messages": None,
        }

    def events(self, final: Callable[[], dict[str, Any]] | None = None) -> Iterator[bytes]:
        """The stream; `final` gives the body of `response.completed` (default: `response()`)."""
        seq = 0

        def event(kind: str, data: dict[str, Any], **extra: Any) -> bytes:
            # OpenAI's event models keep their fields in alphabetical order; vLLM's own
            # additions (`name` on function_call_arguments.done) come after them.
            nonlocal seq
            fields = {**data, "sequence_number": seq, "type": kind}
            seq += 1
            return typed_sse(kind, {**dict(sorted(fields.items())), **extra})

        started = self.response("in_progress")
        yield event("response.created", {"response": started})
        yield event("response.in_progress", {"response": started})
        for index, call in enumerate(self.calls):
            at = {"item_id": self.item_ids[index], "output_index": index}
            added = call_item(call, self.item_ids[index], "in_progress")
            yield event("response.output_item.added", {"item": added, "output_index": index})
            for piece in call.pieces():
                yield event("response.function_call_arguments.delta", {"delta": piece, **at})
            done = {"arguments": call.arguments, **at}
            yield event("response.function_call_arguments.done", done, name=call.name)
            item = call_item(call, self.item_ids[index])
            yield event("response.output_item.done", {"item": item, "output_index": index})
        if not self.calls:
            part = {"content_index": 0, "item_id": self.item_ids[0], "output_index": 0}
            added = message_item(self.item_ids[0], None, "in_progress")
            yield event("response.output_item.added", {"item": added, "output_index": 0})
            yield event("response.content_part.added", {**part, "part": _text_part("", [])})
            for i in range(self.tokens):
                delta = {**part, "delta": token_text(i, self.pad), "logprobs": []}
                yield event("response.output_text.delta", delta)
            text = self.text
            done = {**part, "logprobs": [], "text": text}
            yield event("response.output_text.done", done)
            yield event("response.content_part.done", {**part, "part": _text_part(text, None)})
            item = message_item(self.item_ids[0], text)
            yield event("response.output_item.done", {"item": item, "output_index": 0})
        body = final() if final is not None else self.response()
        yield event("response.completed", {"response": body})
