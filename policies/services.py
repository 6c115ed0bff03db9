"""What a policy may use, handed to it at construction by the runtime (no global state)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from proxy.core.box import Box
from proxy.core.config import Config
from proxy.core.pipeline import ProxyRequest
from proxy.upstream.model import ModelRoute


@dataclass(frozen=True)
class Services:
    config: Config
    client: httpx.AsyncClient  # the control-plane client (/tokenize)
    routes: dict[str, ModelRoute]
    # Resources every model's policies share (one rate-limit storage), closed by the runtime.
    shared: dict[str, Any] = field(default_factory=dict)
    box: Box | None = None  # the worker processes this one shares the box with, if any
    # The server's secret (`[server] response_id_secret`, else the process's own): a policy
    # derives a key of its own from it (HMAC with a label), never uses it as it is.
    secret: bytes = b""
    # The models holding the stored response a request continues (`previous_response_id`),
    # None when it continues none or names one this caller was not given (its 404 comes later).
    held_by: Callable[[ProxyRequest], list[str] | None] | None = None
