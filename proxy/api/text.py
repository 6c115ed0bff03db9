"""Cheap size measures of a request's text, without tokenizing anything.

`utf8_len` is exact; `chat_bytes` is the UTF-8 size of everything a chat template renders from
the messages, or None when a message carries something whose rendered size cannot be bounded
from its own bytes (images, tool calls the template pretty-prints).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def utf8_len(text: str) -> int:
    # ASCII (most prompts) needs no encoding pass: one byte per character.
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def content_bytes(content: Any) -> int | None:
    if content is None:
        return 0
    if isinstance(content, str):
        return utf8_len(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                return None
            text = part.get("text")
            if not isinstance(text, str):
                return None
            total += utf8_len(text)
        return total
    return None


def chat_bytes(messages: Sequence[Any], per_message: int) -> int | None:
    """UTF-8 bytes of every message's role, name and text, plus `per_message` each."""
    total = 0
    for m in messages:
        if not isinstance(m, dict):
            return None
        size = content_bytes(m.get("content"))
        if size is None or m.get("tool_calls"):
            return None
        role, name = m.get("role"), m.get("name")
        total += size + per_message + (utf8_len(role) if isinstance(role, str) else 0)
        if isinstance(name, str):
            total += utf8_len(name)
    return total


def estimate_tokens(body: dict[str, Any]) -> int:
    """A rough prompt size (about 4 bytes per token) for reservations that are reconciled later."""
    messages = body.get("messages")
    if isinstance(messages, list):
        size = chat_bytes(messages, 16)
        if size is None:
            size = sum(len(str(m)) for m in messages)
        return size // 4 + 1
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return utf8_len(prompt) // 4 + 1
    if isinstance(prompt, list):
        if all(isinstance(t, int) for t in prompt):
            return len(prompt)
        return sum(utf8_len(p) if isinstance(p, str) else len(p) for p in prompt) // 4 + 1
    return 1
