"""What pooling engines serve: POST /v1/embeddings, /v1/rerank and /v1/score.

Nothing is generated: no streams, no output budget in token reservations (their usage is prompt
tokens only), and no context window to fit (an input too long is the engine's 400). Every list
they read is bounded by `server.max_items`. An embedding asked as `encoding_format: "bytes"`
comes back as binary with its JSON in a `metadata` header, relayed too.
"""

from __future__ import annotations

from typing import Any, ClassVar

from proxy.api.events import count, usage_object
from proxy.api.fields import bounded_list, is_int, model_of, positive_int
from proxy.api.text import utf8_len
from proxy.core.api import Api, Bounds, Usage
from proxy.core.errors import InvalidRequest

_POLICIES = frozenset({"auth", "ratelimit"})


def _texts(value: Any, name: str, bounds: Bounds) -> int:
    """Check one input field (a string, token ids, or a list of either); returns its bytes."""
    if isinstance(value, str):
        return utf8_len(value)
    items = bounded_list(value, name, bounds.max_items)
    if all(is_int(t) for t in items):
        return len(items) * 4  # one prompt as token ids
    size = 0
    for i, item in enumerate(items):
        if isinstance(item, str):
            size += utf8_len(item)
        elif isinstance(item, list) and item and all(is_int(t) for t in item):
            size += len(item) * 4
        elif not isinstance(item, dict):  # multimodal items are the engine's to check
            raise InvalidRequest(
                f"{name}[{i}] must be a string or an array of token ids", param=f"{name}.[{i}]"
            )
    return size


def _no_stream(body: dict[str, Any]) -> None:
    if body.get("stream"):
        raise InvalidRequest("this route does not stream", param="stream")


class Pooling(Api):
    """What the three have in common."""

    policies: ClassVar[frozenset[str] | None] = _POLICIES
    generates: ClassVar[bool] = False
    stages: ClassVar[tuple[str, ...]] = ("cache",)
    # vLLM 0.32's pooling requests take both (an embedding model may cache prefixes too).
    cache_salt: ClassVar[bool] = True
    priority: ClassVar[bool] = True
    prompt_field: ClassVar[str] = "input"
    fields: ClassVar[tuple[str, ...]]

    def read(self, body: dict[str, Any], bounds: Bounds) -> tuple[str, bool]:
        model = model_of(body)
        _no_stream(body)
        present = [name for name in self.fields if name in body]
        if not present:
            raise InvalidRequest(f"'{self.fields[0]}' is required", param=self.fields[0])
        for name in present:
            _texts(body[name], name, bounds)
        return model, False

    def prompt_estimate(self, body: dict[str, Any]) -> int:
        size = 0
        for name in self.fields:
            value = body.get(name)
            if isinstance(value, str):
                size += utf8_len(value)
            elif isinstance(value, list):
                size += sum(utf8_len(v) if isinstance(v, str) else 4 for v in value)
        return size // 4 + 1

    def usage(self, content: bytes) -> Usage | None:
        usage = usage_object(content)
        return None if usage is None else Usage(count(usage, "prompt_tokens"), None)

    def deterministic(self, body: dict[str, Any]) -> bool:
        return True  # nothing is sampled: the same input, the same vectors and scores


class Embeddings(Pooling):
    name: ClassVar[str] = "embeddings"
    upstream_path: ClassVar[str] = "/v1/embeddings"
    relay_headers: ClassVar[tuple[str, ...]] = ("metadata",)
    fields: ClassVar[tuple[str, ...]] = ("input", "messages")

    def read(self, body: dict[str, Any], bounds: Bounds) -> tuple[str, bool]:
        model, stream = super().read(body, bounds)
        positive_int(body, "dimensions")
        return model, stream


class Rerank(Pooling):
    name: ClassVar[str] = "rerank"
    upstream_path: ClassVar[str] = "/v1/rerank"
    fields: ClassVar[tuple[str, ...]] = ("documents",)
    prompt_field: ClassVar[str] = "documents"

    def read(self, body: dict[str, Any], bounds: Bounds) -> tuple[str, bool]:
        model, stream = super().read(body, bounds)
        if not isinstance(body.get("query"), str | dict):
            raise InvalidRequest("'query' is required", param="query")
        top_n = body.get("top_n")
        if top_n is not None and (not is_int(top_n) or top_n < 0):
            raise InvalidRequest("'top_n' must be an integer of 0 or more", param="top_n")
        return model, stream


class Score(Pooling):
    name: ClassVar[str] = "score"
    upstream_path: ClassVar[str] = "/v1/score"
    # vLLM takes any of these pairs; each side is a string or a list.
    fields: ClassVar[tuple[str, ...]] = (
        "text_1",
        "text_2",
        "queries",
        "documents",
        "items",
        "data_1",
        "data_2",
    )
