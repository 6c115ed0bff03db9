"""POST /v1/completions: a prompt string, a batch of them, or token ids."""

from __future__ import annotations

from typing import Any, ClassVar

from proxy.api.fields import (
    bounded_int,
    bounded_list,
    is_int,
    model_of,
    optional_list,
    positive_int,
    stream_of,
)
from proxy.api.openai import OpenAICompletion
from proxy.api.text import estimate_tokens
from proxy.core.api import Bounds
from proxy.core.errors import InvalidRequest


class Completions(OpenAICompletion):
    name: ClassVar[str] = "completions"
    upstream_path: ClassVar[str] = "/v1/completions"
    prompt_field: ClassVar[str] = "prompt"

    def read(self, body: dict[str, Any], bounds: Bounds) -> tuple[str, bool]:
        model = model_of(body)
        prompts = _prompt_count(body.get("prompt"), bounds)
        stream = stream_of(body)
        positive_int(body, "max_tokens")
        n = bounded_int(body, "n", bounds.max_n) or 1
        best_of = bounded_int(body, "best_of", bounds.max_n) or 1
        # A batch multiplies every sequence the engine must run: the product is bounded too.
        sequences = prompts * max(n, best_of)
        if sequences > bounds.max_sequences:
            raise InvalidRequest(
                f"{prompts} prompts x n={max(n, best_of)} ask for {sequences} sequences; "
                f"this server allows at most {bounds.max_sequences}",
                param="prompt",
            )
        optional_list(body, "stop", bounds.max_items)
        return model, stream

    def prompt_estimate(self, body: dict[str, Any]) -> int:
        return estimate_tokens(body)

    def single_prompt(self, body: dict[str, Any]) -> str | list[int] | None:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt):
            return prompt
        return None  # a batch: the engine checks each prompt


def _prompt_count(prompt: Any, bounds: Bounds) -> int:
    """How many prompts `prompt` holds: a string or token ids is one, a list of them a batch."""
    if isinstance(prompt, str):
        return 1
    if not isinstance(prompt, list) or not prompt:
        raise InvalidRequest("'prompt' must be a string or a non-empty array", param="prompt")
    if all(is_int(t) for t in prompt):
        return 1  # token ids of one prompt: bounded by the body size and the engine's window
    bounded_list(prompt, "prompt", bounds.max_prompts)
    for i, item in enumerate(prompt):
        if isinstance(item, str):
            continue
        if not isinstance(item, list) or not item or not all(is_int(t) for t in item):
            raise InvalidRequest(
                f"prompt[{i}] must be a string or an array of token ids", param=f"prompt.[{i}]"
            )
    return len(prompt)
