"""Registries of the attempt-level modules (proxy.upstream.modules), and building them.

A new balancer, breaker, retry policy or fallback order is one module plus one line here. Their
config: `[resilience.breaker]` and `[resilience.retry]` name theirs with `kind` (the rest of the
table is that module's settings, bound to its `settings_class` and checked by check-config,
with the settings' own `problems()` when it has one); `[resilience] balancer` and `fallback`
name modules that take no settings of their own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proxy.core.binder import Binder, ConfigError
from proxy.core.config import Config, fallback_chain
from proxy.upstream.balance import LeastOutstanding
from proxy.upstream.breaker import ConsecutiveBreaker
from proxy.upstream.forward import Modules
from proxy.upstream.model import ModelRoute
from proxy.upstream.modules import Balancer, Breaker, BreakerModule, Fallbacks, RetryModule
from proxy.upstream.retry import BudgetedRetry
from proxy.upstream.slo_breaker import SlowCallBreaker


class OrderedFallbacks:
    """`fallback = "ordered"`: a model's `fallbacks`, depth first, without repeats, at most
    `[resilience] max_fallback_depth` of them."""

    def __init__(self, config: Config) -> None:
        depth = config.resilience.max_fallback_depth
        self._chains = {name: fallback_chain(config, name, depth) for name in config.models}

    def chain(self, model: str) -> list[str]:
        return self._chains[model]


BALANCERS: dict[str, Callable[[], Balancer]] = {"least_outstanding": LeastOutstanding}
BREAKERS: dict[str, type[BreakerModule]] = {
    "consecutive": ConsecutiveBreaker,
    "slow_call": SlowCallBreaker,
}
RETRIES: dict[str, type[RetryModule]] = {"budgeted": BudgetedRetry}
FALLBACKS: dict[str, Callable[[Config], Fallbacks]] = {"ordered": OrderedFallbacks}


def _settings(
    table: dict[str, Any], registry: dict[str, Any], default: str, key: str, binder: Binder
) -> tuple[Any, Any] | None:
    """(the module class `kind` names, its bound settings), or None with problems recorded."""
    kind = table.get("kind", default)
    if kind not in registry:
        binder.problem(f"{key}.kind", f"unknown {kind!r} (known: {', '.join(registry)})")
        return None
    cls = registry[kind]
    data = {k: v for k, v in table.items() if k != "kind"}
    settings = binder.bind(cls.settings_class, data, key)
    if settings is None:
        return None
    # Checks across a module's own keys (`problems()` on its settings, "key: what is wrong").
    across = getattr(settings, "problems", None)
    found = across() if callable(across) else []
    binder.problems += [f"{key}.{p}" for p in found]
    return None if found else (cls, settings)


def problems(config: Config) -> list[str]:
    """Every problem of the `[resilience]` module choices and their settings."""
    binder = Binder()
    res = config.resilience
    _settings(res.breaker, BREAKERS, "consecutive", "resilience.breaker", binder)
    _settings(res.retry, RETRIES, "budgeted", "resilience.retry", binder)
    for key, name, registry in (
        ("resilience.balancer", res.balancer, BALANCERS),
        ("resilience.fallback", res.fallback, FALLBACKS),
    ):
        if name not in registry:
            binder.problem(key, f"unknown {name!r} (known: {', '.join(registry)})")
    return binder.problems


@dataclass(frozen=True)
class Resolved:
    """The configured breaker and retry modules with their bound settings."""

    breaker: type[BreakerModule]
    breaker_settings: Any
    retry: type[RetryModule]
    retry_settings: Any


def resolve(config: Config) -> Resolved:
    """The modules the config names, with settings; the config has been validated."""
    res = config.resilience
    binder = Binder()
    breaker = _settings(res.breaker, BREAKERS, "consecutive", "resilience.breaker", binder)
    retry = _settings(res.retry, RETRIES, "budgeted", "resilience.retry", binder)
    if breaker is None or retry is None:
        raise ConfigError(config.source, binder.problems)
    return Resolved(breaker[0], breaker[1], retry[0], retry[1])


def breaker_factory(config: Config) -> Callable[[str], Breaker]:
    """Makes the configured breaker for one upstream (by its label)."""
    found = resolve(config)
    return lambda name: found.breaker.from_settings(name, found.breaker_settings)


def build(config: Config, routes: dict[str, ModelRoute]) -> Modules:
    """The runtime's balancer, retry policy and fallback chains."""
    res = config.resilience
    found = resolve(config)
    fallbacks = FALLBACKS[res.fallback](config)
    return Modules(
        balancer=BALANCERS[res.balancer](),
        retry=found.retry.from_settings(found.retry_settings),
        chains={name: [routes[m] for m in fallbacks.chain(name)] for name in config.models},
    )
