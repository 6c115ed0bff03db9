"""Request policies: a plain name -> factory registry, built per model from config."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.config import Config
    from proxy.pipeline import Policy
    from proxy.runtime import Services


def build_policies(config: Config, model: str | None, services: Services) -> list[Policy]:
    """The model's pipeline, in the declared order (global policies first; only those when
    `model` is None)."""
    return []
