"""What chat completions and completions share: OpenAI's usage object and its SSE stream.

The usage of a whole answer is its top-level `usage` object; a stream carries it in a last
chunk with `"choices": []` just before `data: [DONE]`, when the request asks with
`stream_options.include_usage`. The proxy always asks (token limits and metrics need it) and
drops that chunk again when the client did not ask. Only blocks that mention `"usage"` are
looked into, and only the events around a usage object are parsed.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import orjson

from proxy.api.fields import constraints, fixed_sampling, is_int
from proxy.core.api import NO_STREAM, Api, Constraint, StreamState, Usage

_BOUNDARIES = (b"\n\n", b"\r\n\r\n", b"\r\r")
# A usage *object* (not `"usage": null`): found by one C-level scan per block.
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
_EMPTY_CHOICES = b'"choices":[]'
# The usage object with at most one level of nesting (`prompt_tokens_details`): parsing it
# alone is a fraction of parsing a whole completion.
_USAGE_VALUE = re.compile(rb'"usage"\s*:\s*(\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\})')


def usage_from(data: Any) -> Usage | None:
    """OpenAI's usage object (`prompt_tokens`, `completion_tokens`) as a Usage."""
    if type(data) is not dict:
        return None
    prompt, completion = data.get("prompt_tokens"), data.get("completion_tokens")
    # `type(...) is int`: booleans are not counts (and this runs for every answer).
    return Usage(
        prompt if type(prompt) is int else None, completion if type(completion) is int else None
    )


def usage_of(body: bytes) -> Usage | None:
    """The `usage` object of a whole (non-streaming) answer, if any.

    The last match is the top-level one: vLLM writes `usage` after `choices`, and a `"usage"`
    inside generated text is escaped (`\\"usage\\"`), so it cannot match.
    """
    matches = _USAGE_VALUE.findall(body)
    if matches:
        try:
            found = usage_from(orjson.loads(matches[-1]))
        except orjson.JSONDecodeError:
            found = None
        if found is not None:
            return found
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return usage_from(payload.get("usage")) if isinstance(payload, dict) else None


def _event_around(block: bytes, at: int) -> tuple[int, int]:
    """The bounds of the event containing index `at` of `block` (which ends at a boundary)."""
    start, end = 0, len(block)
    for sep in _BOUNDARIES:
        i = block.rfind(sep, 0, at)
        if i >= 0:
            start = max(start, i + len(sep))
        j = block.find(sep, at)
        if j >= 0:
            end = min(end, j + len(sep))
    return start, end


def _event_data(event: bytes) -> bytes:
    data = event.strip()
    return data[5:].lstrip() if data.startswith(b"data:") else b""


def take_usage(block: bytes, state: StreamState) -> bytes:
    """Capture the final usage event of `block` into `state` (and drop it if asked)."""
    # Linear in the block whatever its size (a slow reader can batch a whole stream): only
    # the events around a usage object are looked at, the last one first.
    for match in reversed(list(_USAGE_OBJECT.finditer(block))):
        start, end = _event_around(block, match.start())
        event = block[start:end]
        if _EMPTY_CHOICES not in event.replace(b" ", b""):
            continue  # per-chunk usage stats on a token event: not the final usage
        try:
            payload = orjson.loads(_event_data(event))
        except orjson.JSONDecodeError:
            continue
        usage = usage_from(payload.get("usage")) if isinstance(payload, dict) else None
        if usage is not None:
            state.usage = usage
            return block[:start] + block[end:] if state.strip_usage else block
    return block


class OpenAICompletion(Api):
    """Chat completions and completions: `n`, `max_tokens`, usage and `[DONE]` streams."""

    stages: ClassVar[tuple[str, ...]] = ("cache",)
    cache_salt: ClassVar[bool] = True
    priority: ClassVar[bool] = True

    def constraints(self, body: dict[str, Any]) -> tuple[Constraint, ...]:
        return constraints(
            body.get("tools"),
            body.get("response_format"),
            structured=body.get("structured_outputs"),
        )

    def max_tokens(self, body: dict[str, Any]) -> int | None:
        return _max_tokens(body)

    def output_field(self, body: dict[str, Any]) -> str:
        return "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"

    def prepare(self, body: dict[str, Any], stream: bool) -> StreamState:
        if not stream:
            return NO_STREAM
        options = body.get("stream_options")
        # Decided once: a retry must not mistake our own include_usage for the client's.
        state = StreamState(
            strip_usage=not (isinstance(options, dict) and options.get("include_usage") is True)
        )
        # A new dict: the client's stays as sent, for a fallback that starts over from it.
        body["stream_options"] = {
            **(options if isinstance(options, dict) else {}),
            "include_usage": True,
        }
        return state

    def usage(self, content: bytes) -> Usage | None:
        return usage_of(content)

    def deterministic(self, body: dict[str, Any]) -> bool:
        return fixed_sampling(body)

    def inspect(self, block: bytes, state: StreamState) -> bytes:
        if b'"usage"' in block:
            block = take_usage(block, state)
        # [DONE] is the last event: only the block's tail can hold it (constant cost).
        if block.endswith(b"data: [DONE]\n\n"):
            state.finished = True
        else:
            tail = block[-24:]
            if b"[DONE]" in tail and tail.rstrip().endswith(b"[DONE]"):
                state.finished = True
        return block


def _max_tokens(body: dict[str, Any]) -> int | None:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    return value if is_int(value) else None
