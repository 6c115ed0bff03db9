"""POST /v1/chat/completions."""

from __future__ import annotations

from typing import Any, ClassVar

from proxy.api.fields import (
    bounded_int,
    bounded_list,
    model_of,
    optional_list,
    positive_int,
    stream_of,
)
from proxy.api.openai import OpenAICompletion
from proxy.api.text import estimate_tokens
from proxy.api.turns import ListConversation
from proxy.core.api import Bounds, Conversation
from proxy.core.errors import InvalidRequest

_LISTS = ("tools", "stop")
_POSITIVE = ("max_tokens", "max_completion_tokens")


class ChatCompletions(OpenAICompletion):
    name: ClassVar[str] = "chat/completions"
    upstream_path: ClassVar[str] = "/v1/chat/completions"

    def read(self, body: dict[str, Any], bounds: Bounds) -> tuple[str, bool]:
        # The common fields are checked inline (`type(...) is`: orjson makes exact dicts and
        # lists); this runs for every request and every message.
        model = body.get("model")
        if type(model) is not str or not model:
            model = model_of(body)  # raises, naming the field
        messages: Any = body.get("messages")
        if type(messages) is not list or not messages or len(messages) > bounds.max_messages:
            bounded_list(messages, "messages", bounds.max_messages)  # raises
        max_items = bounds.max_items
        for i, m in enumerate(messages):
            if type(m) is not dict or type(m.get("role")) is not str:
                raise InvalidRequest(
                    f"messages[{i}] must be an object with a 'role'", param=f"messages.[{i}]"
                )
            content = m.get("content")
            if type(content) is list and len(content) > max_items:
                bounded_list(content, f"messages.[{i}].content", max_items, empty=True)
        stream = body.get("stream", False)
        if stream is not False and stream is not True:
            stream = stream_of(body)
        # The rarer fields are looked at only when present.
        for name in _POSITIVE:
            value = body.get(name)
            if value is not None and (type(value) is not int or value < 1):
                positive_int(body, name)  # raises
        if "n" in body:
            bounded_int(body, "n", bounds.max_n)
        for name in _LISTS:
            if name in body:
                optional_list(body, name, max_items)
        return model, stream

    def prompt_estimate(self, body: dict[str, Any]) -> int:
        return estimate_tokens(body)

    def conversation(self, body: dict[str, Any]) -> Conversation | None:
        return ListConversation(body, "messages")
