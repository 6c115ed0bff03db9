"""Conversations as the truncate policy sees them: chat messages grouped into droppable turns."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from proxy.core.api import Conversation


def turns(messages: Sequence[dict[str, Any]]) -> list[list[int]]:
    """Indexes of droppable messages grouped in turns, oldest first.

    Protected: system messages, and everything from the last user message on. A turn starts at
    a user message and holds what follows it up to the next one (assistant replies, tool calls
    and their results stay together).
    """
    last_user = max(
        (i for i, m in enumerate(messages) if m.get("role") == "user"), default=len(messages) - 1
    )
    units: list[list[int]] = []
    for i in range(last_user):
        role = messages[i].get("role")
        if role in ("system", "developer"):
            continue
        if role == "user" or not units:
            units.append([])
        units[-1].append(i)
    return units


class ListConversation(Conversation):
    """A body whose `field` holds the messages themselves (chat's `messages`)."""

    def __init__(self, body: dict[str, Any], field: str) -> None:
        messages = body[field]
        tools = body.get("tools")
        super().__init__(
            messages, turns(messages), tools=tools if isinstance(tools, list) else None
        )
        self._body = body
        self._field = field

    def keep(self, indexes: list[int]) -> None:
        messages = self.messages
        self._body[self._field] = [messages[i] for i in indexes]


def chat_tool(name: Any, description: Any, parameters: Any) -> dict[str, Any] | None:
    """A function tool in chat's shape (what the chat template renders), or None if malformed."""
    if not isinstance(name, str):
        return None
    function: dict[str, Any] = {"name": name}
    if isinstance(description, str):
        function["description"] = description
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}
