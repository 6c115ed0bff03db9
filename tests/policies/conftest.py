"""Fixtures for the policy tests: API keys, direct policy construction (the real redis-server
is `redis_url`, from tests.redis_fixtures)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from engine.client.monitor import EngineMonitor
from policies.auth import new_key
from policies.services import Services
from proxy.runtime import load as config_module
from proxy.upstream.breaker import ConsecutiveBreaker
from proxy.upstream.model import ModelRoute, Upstream


@pytest.fixture
def api_key() -> tuple[str, str]:
    """(key, sha256 hex) of a fresh key."""
    return new_key()


def auth_table(*keys: dict[str, Any]) -> dict[str, Any]:
    return {"keys": list(keys)}


def make_services(
    client: httpx.AsyncClient,
    policies: dict[str, Any],
    upstream_url: str,
    max_model_len: int | None,
    others: tuple[str, ...] = (),
) -> Services:
    """Services for building policies directly: one model `tiny` on `upstream_url` (and
    `others` configured on it too, for policies that name a second model)."""
    models = {name: {"upstreams": [upstream_url]} for name in ("tiny", *others)}
    cfg = config_module.from_dict({"models": models, "policies": policies}, "<test>")
    monitor = EngineMonitor(client, upstream_url, "tiny")
    monitor.max_model_len = max_model_len
    route = ModelRoute("tiny")
    route.add(Upstream(upstream_url, upstream_url, "tiny", monitor, ConsecutiveBreaker("tiny")))
    return Services(cfg, client, {"tiny": route})
