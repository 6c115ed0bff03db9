"""Fit the prompt into the model's context window before the request leaves the proxy.

The budget is `max_model_len - margin - max_tokens` (`min_output_tokens` when the request sets
no max_tokens). Counting is exact: the engine's own `/tokenize` with its chat template. Most
requests skip counting: with byte-level BPE every token covers at least one byte of text
except special tokens, so `UTF-8 bytes of the messages + a per-message overhead + the template's
fixed tokens` (measured once per model by tokenizing an empty conversation) is an upper
bound, and a prompt under it fits.

Every family whose prompt is a conversation (chat, Responses, Anthropic Messages: the family
gives its messages as chat messages, `proxy.core.api.Conversation`) is fitted the same way; a
completion's single prompt can only be rejected or get a smaller max_tokens; other families
(embeddings, a batch of prompts, a Responses request that continues a stored one) are left to
the engine. Requests with tools or template switches are always counted exactly.

A prompt that does not fit is, per `strategy`: rejected (400 `context_length_exceeded` with the
counts), or shortened by dropping whole turns (a user message and the replies and tool results
that follow it, so roles still alternate), oldest first (`drop_oldest`) or from the middle out
(`middle_out`). System messages and the last user turn are always kept. A binary search over how
many turns to drop keeps `/tokenize` calls to about log2(turns) + 2. With `clamp_max_tokens`,
max_tokens is lowered first (down to `min_output_tokens`) before any turn is dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import httpx

from engine.client import tokens
from policies.services import Services
from proxy.api.text import chat_bytes, utf8_len
from proxy.core.api import Conversation
from proxy.core.binder import check, non_negative, positive
from proxy.core.config import Config
from proxy.core.errors import ContextLengthExceeded, Overloaded, UpstreamError
from proxy.core.pipeline import Handler, ProxyRequest, ProxyResponse
from proxy.upstream.balance import least_busy
from proxy.upstream.model import ModelRoute, Upstream

log = logging.getLogger("vgate.truncate")
Message = dict[str, Any]
# What the template adds around any conversation, measured once per model.
_EMPTY: list[Message] = [{"role": "user", "content": ""}]


@dataclass(frozen=True, kw_only=True)
class TruncateSettings:
    strategy: Literal["drop_oldest", "middle_out", "reject"] = "drop_oldest"
    margin: int = check(non_negative, 0)  # tokens kept free beyond prompt + max_tokens
    # Output room reserved when the request has no max_tokens; the floor for clamping.
    min_output_tokens: int = check(positive, 16)
    clamp_max_tokens: bool = False
    # A smaller window than the engine's (the smaller of the two applies).
    max_model_len: int | None = check(lambda v: None if v is None else positive(v), None)
    # Template tokens per message beyond its role and text (<|im_start|>, newlines ...).
    per_message_overhead: int = check(non_negative, 8)
    tokenize_timeout: float = check(positive, 5.0)


class _Counter:
    """Exact counts for one request from one upstream (tools and template kwargs included)."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        upstream: Upstream,
        tools: list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.client, self.upstream = client, upstream
        # The key of the engine that counts: each upstream has its own (proxy.runtime).
        self.api_key = upstream.api_key
        self.tools, self.kwargs = tools, kwargs
        self.calls = 0
        self.window: int | None = None

    async def chat(self, messages: Sequence[Message], limit: float) -> int:
        self.calls += 1
        result = await tokens.count_chat(
            self.client,
            self.upstream.base_url,
            self.upstream.served_name,
            messages,
            tools=self.tools,
            chat_template_kwargs=self.kwargs,
            api_key=self.api_key,
            request_timeout=limit,
        )
        self.window = self.window or result.max_model_len
        return result.count

    async def prompt(self, prompt: str, limit: float) -> int:
        self.calls += 1
        result = await tokens.count_prompt(
            self.client,
            self.upstream.base_url,
            self.upstream.served_name,
            prompt,
            api_key=self.api_key,
            request_timeout=limit,
        )
        self.window = self.window or result.max_model_len
        return result.count


class TruncatePolicy:
    settings_class: ClassVar[type[Any]] = TruncateSettings
    model_overrides: ClassVar[frozenset[str] | None] = None

    def __init__(self, settings: TruncateSettings, model: str | None, services: Services) -> None:
        self._s = settings
        self._route: ModelRoute | None = services.routes.get(model) if model else None
        self._client = services.client
        # Tokens of the template around an empty conversation ("chat") or prompt ("prompt"),
        # measured once; a model's upstreams serve the same model and template.
        self._fixed: dict[str, int] = {}
        # The window /tokenize reported, for when the monitors have not learned it (yet).
        self._learned: int | None = None

    @classmethod
    def problems(cls, settings: TruncateSettings, config: Config) -> list[str]:
        return []

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        if self._route is not None:
            try:
                conversation = request.api.conversation(request.body)
                if conversation is not None:
                    await self._fit_chat(request, conversation, self._route)
                else:
                    prompt = request.api.single_prompt(request.body)
                    if prompt is not None:
                        await self._fit_prompt(request, prompt, self._route)
            except ContextLengthExceeded:
                raise
            except (UpstreamError, Overloaded) as exc:
                # Cannot count (the engine failed, or the pool to it is full): the engine
                # decides (its own 400 is better than a guess).
                log.info("request %s not checked for length: %s", request.request_id, exc.message)
                request.outcome.truncate = "not_counted"
        return await call_next(request)

    def _window(self, route: ModelRoute) -> int | None:
        engine = route.window() or self._learned
        mine = self._s.max_model_len
        return min(engine, mine) if engine and mine else engine or mine

    def _learn(self, window: int | None) -> int | None:
        if window is not None:
            self._learned = window
        mine = self._s.max_model_len
        return min(window, mine) if window and mine else window or mine

    def _output(self, request: ProxyRequest) -> tuple[int, int]:
        """(tokens to reserve for the output, the least we may reserve after clamping)."""
        want = request.max_tokens
        need = want if want is not None else self._s.min_output_tokens
        least = min(need, self._s.min_output_tokens) if self._s.clamp_max_tokens else need
        return need, least

    async def _fit_chat(
        self, request: ProxyRequest, conversation: Conversation, route: ModelRoute
    ) -> None:
        s = self._s
        messages = conversation.messages
        need, least = self._output(request)
        window = self._window(route)
        kwargs = request.body.get("chat_template_kwargs")
        kwargs = kwargs if isinstance(kwargs, dict) else None
        fixed = self._fixed.get("chat")
        # The byte bound holds for the messages alone: tools and template switches render
        # text of their own, so those requests are always counted.
        if window is not None and fixed is not None and not conversation.tools and not kwargs:
            size = chat_bytes(messages, s.per_message_overhead)
            if size is not None and size + fixed + need + s.margin <= window:
                return
        upstream = least_busy(route)
        counter = _Counter(self._client, upstream, conversation.tools, kwargs)
        total = await counter.chat(messages, s.tokenize_timeout)
        window = window or self._learn(counter.window)
        if fixed is None:
            bare = _Counter(self._client, upstream)  # the template alone, whatever the request
            self._fixed["chat"] = await bare.chat(_EMPTY, s.tokenize_timeout)
            counter.calls += bare.calls
        if window is None:
            return
        room = window - s.margin
        if total + least > room and s.strategy != "reject":
            total = await self._drop(request, conversation, counter, window, least, total)
        elif total + least > room:
            raise _exceeded(window, total, need, request.api.prompt_field)
        self._finish(request, total, need, room)

    async def _drop(
        self,
        request: ProxyRequest,
        conversation: Conversation,
        counter: _Counter,
        window: int,
        least: int,
        total: int,
    ) -> int:
        """Drop the fewest turns (strategy order) that fit the window; returns the count."""
        budget = window - self._s.margin - least
        messages = conversation.messages
        units = conversation.turns
        if self._s.strategy == "middle_out":
            # Nested middle-out order: dropping k turns always removes a contiguous middle.
            center = (len(units) - 1) / 2
            order = sorted(range(len(units)), key=lambda i: abs(i - center))
            units = [units[i] for i in order]
        counts: dict[int, int] = {}

        def kept(k: int) -> list[int]:
            gone = {i for unit in units[:k] for i in unit}
            return [i for i in range(len(messages)) if i not in gone]

        async def fits(k: int) -> bool:
            subset = [messages[i] for i in kept(k)]
            counts[k] = await counter.chat(subset, self._s.tokenize_timeout)
            return counts[k] <= budget

        if not units or not await fits(len(units)):
            kept_tokens = counts.get(len(units), total)  # nothing droppable: all is the last turn
            raise ContextLengthExceeded(
                f"This model's maximum context length is {window} tokens. However, even after "
                f"dropping every earlier turn you requested {kept_tokens + least} tokens "
                f"({kept_tokens} in the system messages and the last user turn, {least} for "
                "the completion). "
                "Please reduce the length of the last message or the completion.",
                param=request.api.prompt_field,
            )
        lo, hi = 1, len(units)
        while lo < hi:
            mid = (lo + hi) // 2
            if await fits(mid):
                hi = mid
            else:
                lo = mid + 1
        indexes = kept(lo)
        conversation.keep(indexes)
        dropped = len(messages) - len(indexes)
        request.outcome.truncated = dropped
        request.outcome.tokenize_calls = counter.calls
        request.response_headers["x-vgate-truncated"] = str(dropped)
        return counts[lo]

    async def _fit_prompt(
        self, request: ProxyRequest, prompt: str | list[int], route: ModelRoute
    ) -> None:
        """Completions: a prompt cannot be shortened safely, so reject or clamp max_tokens."""
        s = self._s
        need, least = self._output(request)
        window = self._window(route)
        if isinstance(prompt, list):
            total = len(prompt)  # token ids
        else:
            fixed = self._fixed.get("prompt")
            if (
                window is not None
                and fixed is not None
                and utf8_len(prompt) + fixed + s.per_message_overhead + need + s.margin <= window
            ):
                return
            counter = _Counter(self._client, least_busy(route))
            total = await counter.prompt(prompt, s.tokenize_timeout)
            window = window or self._learn(counter.window)
            if fixed is None:
                self._fixed["prompt"] = await counter.prompt("", s.tokenize_timeout)
        if window is None:
            return
        room = window - s.margin
        if total + least > room:
            raise _exceeded(window, total, need, request.api.prompt_field)
        self._finish(request, total, need, room)

    def _finish(self, request: ProxyRequest, total: int, need: int, room: int) -> None:
        request.outcome.prompt_tokens = total
        if total + need > room:
            # Only reachable with clamp_max_tokens: the output gets what is left.
            clamped = room - total
            request.body[request.api.output_field(request.body)] = clamped
            request.outcome.max_tokens_clamped = clamped
            request.response_headers["x-vgate-max-tokens-clamped"] = str(clamped)


def _exceeded(window: int, total: int, need: int, param: str) -> ContextLengthExceeded:
    return ContextLengthExceeded(
        f"This model's maximum context length is {window} tokens. However, you requested "
        f"{total + need} tokens ({total} in the {param}, {need} for the completion). "
        f"Please reduce the length of the {param} or the completion.",
        param=param,
    )
