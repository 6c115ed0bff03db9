"""Exact token counts from the engine's own tokenizer and chat template (`POST /tokenize`).

Counting locally would need the model's tokenizer and template in the proxy, and would drift
from what the engine actually runs; one small request to the engine is exact by construction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from proxy.core.errors import UpstreamError
from proxy.core.transport import upstream_errors


@dataclass(frozen=True)
class TokenCount:
    count: int
    max_model_len: int | None  # the engine's window, when it says


class TokenizeFailed(UpstreamError):
    """The engine answered /tokenize with an error; its status and body are kept for the caller.

    A 4xx here usually means the request itself is invalid (the engine would reject it the same
    way), so a caller may prefer forwarding the request and letting the engine's own error through.
    """

    def __init__(self, message: str, *, upstream_status: int, upstream_body: bytes) -> None:
        super().__init__(message)
        self.upstream_status = upstream_status
        self.upstream_body = upstream_body


async def count_chat(
    client: httpx.AsyncClient,
    base_url: str,
    model: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    api_key: str | None = None,
    request_timeout: float = 10.0,
) -> TokenCount:
    """Tokens of `messages` with the chat template and the generation prompt applied."""
    body: dict[str, Any] = {
        "model": model,
        "messages": list(messages),
        "add_generation_prompt": True,
    }
    if tools:
        body["tools"] = list(tools)
    if chat_template_kwargs:
        body["chat_template_kwargs"] = dict(chat_template_kwargs)
    return await _tokenize(client, base_url, body, api_key, request_timeout)


async def count_prompt(
    client: httpx.AsyncClient,
    base_url: str,
    model: str,
    prompt: str,
    *,
    api_key: str | None = None,
    request_timeout: float = 10.0,
) -> TokenCount:
    """Tokens of a completions prompt, special tokens (BOS) included as the engine adds them."""
    return await _tokenize(
        client, base_url, {"model": model, "prompt": prompt}, api_key, request_timeout
    )


async def _tokenize(
    client: httpx.AsyncClient,
    base_url: str,
    body: dict[str, Any],
    api_key: str | None,
    request_timeout: float,
) -> TokenCount:
    url = base_url.rstrip("/") + "/tokenize"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with upstream_errors(base_url):
        response = await client.post(url, json=body, headers=headers, timeout=request_timeout)
        raw = await response.aread()
    if response.status_code != 200:
        raise TokenizeFailed(
            f"Upstream {base_url} could not tokenize ({response.status_code}): "
            f"{_error_message(response)}",
            upstream_status=response.status_code,
            upstream_body=raw,
        )
    try:
        data = response.json()
        count = data["count"]
        window = data.get("max_model_len")
    except (ValueError, KeyError, TypeError) as exc:
        raise UpstreamError(f"Upstream {base_url} sent an unreadable /tokenize answer.") from exc
    if not isinstance(count, int) or isinstance(count, bool):
        raise UpstreamError(f"Upstream {base_url} sent a /tokenize count that is not an integer.")
    return TokenCount(count, window if isinstance(window, int) else None)


def _error_message(response: httpx.Response) -> str:
    # vLLM's errors are OpenAI-shaped; --api-key's 401 is {"error": "Unauthorized"}.
    try:
        data = response.json()
    except ValueError:
        return response.text[:200]
    error = data.get("error") if isinstance(data, dict) else data
    if isinstance(error, dict):
        return str(error.get("message", ""))[:500]
    return str(error)[:200]
