"""What a policy may use, handed to it at construction by the runtime (no global state)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx

from proxy.core.box import Box
from proxy.core.config import Config
from proxy.upstream.model import ModelRoute


@dataclass(frozen=True)
class Services:
    config: Config
    client: httpx.AsyncClient  # the control-plane client (/tokenize)
    routes: dict[str, ModelRoute]
    # Resources every model's policies share (one rate-limit storage), closed by the runtime.
    shared: dict[str, Any] = field(default_factory=dict)
    box: Box | None = None  # the worker processes this one shares the box with, if any
