"""Request policies: a plain name -> class registry, validated and built per model from config.

Config shape (see docs): `[policies] order = [...]` is the global pipeline, every model's
`models.NAME.policies` is appended after it; `[policies.NAME]` holds a policy's settings, bound
to its `settings_class`; `[policies.NAME.models.MODEL]` overrides some of them for one model.

Adding a policy: write a module with a class following `PolicyClass`, add one line to REGISTRY.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

from starlette.datastructures import Headers

from policies.auth import AuthPolicy
from policies.ratelimit import RateLimitPolicy
from policies.route import RoutePolicy
from policies.services import Services
from policies.truncate import TruncatePolicy
from proxy.core.binder import Binder, ConfigError
from proxy.core.config import Config
from proxy.core.pipeline import Handler, KeyInfo, Policy, ProxyRequest, ProxyResponse


class PolicyClass(Protocol):
    """What the registry holds: a policy class with a typed settings dataclass."""

    settings_class: ClassVar[type[Any]]
    # Settings that `[policies.NAME.models.MODEL]` may override; None: all of them.
    model_overrides: ClassVar[frozenset[str] | None]

    def __init__(self, settings: Any, model: str | None, services: Services) -> None: ...

    @classmethod
    def problems(cls, settings: Any, config: Config) -> list[str]:
        """Checks across the config (`key: what is wrong`, keys relative to the table)."""
        ...

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse: ...


REGISTRY: dict[str, type[PolicyClass]] = {
    "auth": AuthPolicy,
    "ratelimit": RateLimitPolicy,
    "route": RoutePolicy,
    "truncate": TruncatePolicy,
}


def _names(config: Config, model: str | None) -> list[str]:
    names: list[str] = list(config.policies.get("order", []))
    if model is not None:
        names += config.models[model].policies
    return names


def settings_for(config: Config, name: str, model: str | None, binder: Binder) -> Any:
    """The bound settings of policy `name` for `model` (its overrides merged), or None."""
    table = config.policies.get(name, {})
    data = {k: v for k, v in table.items() if k != "models"}
    key = f"policies.{name}"
    if model is not None and model in table.get("models", {}):
        data.update(table["models"][model])
        key = f"policies.{name}.models.{model}"
    return binder.bind(REGISTRY[name].settings_class, data, key)


def build_policies(
    config: Config,
    model: str | None,
    services: Services,
    only: frozenset[str] | None = None,
) -> list[Policy]:
    """The model's pipeline, in the declared order (global policies first; only those when
    `model` is None), keeping only the policies named in `only` when it is given (those that
    apply to a route family). The config has been validated by `validate`."""
    policies: list[Policy] = []
    for name in _names(config, model):
        if only is not None and name not in only:
            continue
        binder = Binder()
        settings = settings_for(config, name, model, binder)
        if settings is None:
            raise ConfigError(config.source, binder.problems)
        policies.append(REGISTRY[name](settings, model, services))
    return policies


def split_at_route(policies: list[Policy]) -> tuple[list[Policy], list[Policy]] | None:
    """(up to and with `route`, the rest) of a pipeline, or None without `route`: the rest
    is run as the model's that `route` chose (proxy.runtime.runtime)."""
    for i, policy in enumerate(policies):
        if isinstance(policy, RoutePolicy):
            return policies[: i + 1], policies[i + 1 :]
    return None


def authenticator(policies: list[Policy]) -> Callable[[Headers], KeyInfo] | None:
    """The auth check of a pipeline, for endpoints outside it (`GET /v1/models`)."""
    for policy in policies:
        if isinstance(policy, AuthPolicy):
            return policy.authenticate
    return None


async def close_policies(services: Services) -> None:
    """Release what policies shared through `services.shared` (rate-limit storages)."""
    for resource in services.shared.values():
        aclose = getattr(resource, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):  # shutting down: nothing left to tell
                await aclose()
    services.shared.clear()


def validate(config: Config) -> list[str]:
    """Every problem of the `[policies]` tables and `models.*.policies` lists."""
    binder = Binder()
    raw = config.policies
    known = ", ".join(REGISTRY)
    order = raw.get("order", [])
    if not isinstance(order, list) or not all(isinstance(n, str) for n in order):
        binder.problem("policies.order", "must be a list of policy names")
        order = []
    for name in raw:
        if name != "order" and name not in REGISTRY:
            binder.problem(f"policies.{name}", f"unknown policy (known: {known})")
    _check_names(binder, "policies.order", order, set(), known)
    for model, mc in config.models.items():
        _check_names(binder, f"models.{model}.policies", mc.policies, set(order), known)
        if "route" in mc.policies and "route" not in order:
            binder.problem(
                f"models.{model}.policies",
                "'route' goes in [policies] order: the policies after it run for the model "
                "it picks, so every model must have it at the same place",
            )
    if "route" in order and "auth" in order and order.index("auth") > order.index("route"):
        binder.problem(
            "policies.order", "'route' must come after 'auth' (it routes only where the key may go)"
        )
    used = set(order).union(*(mc.policies for mc in config.models.values()))
    for name, cls in REGISTRY.items():
        if name in raw or name in used:
            _check_table(binder, config, name, cls)
    return binder.problems


def _check_names(binder: Binder, key: str, names: list[str], outer: set[str], known: str) -> None:
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name not in REGISTRY:
            binder.problem(f"{key}[{i}]", f"unknown policy {name!r} (known: {known})")
        elif name in seen:
            binder.problem(f"{key}[{i}]", f"{name!r} is listed twice")
        elif name in outer:
            binder.problem(f"{key}[{i}]", f"{name!r} already runs for every model")
        seen.add(name)


def _check_table(binder: Binder, config: Config, name: str, cls: type[PolicyClass]) -> None:
    key = f"policies.{name}"
    table = config.policies.get(name, {})
    if not isinstance(table, dict):
        binder.problem(key, "must be a table")
        return
    overrides = table.get("models", {})
    if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
        binder.problem(f"{key}.models", "must be a table of per-model tables")
        return
    before = len(binder.problems)
    settings = settings_for(config, name, None, binder)
    if settings is None:
        return
    for problem in cls.problems(settings, config):
        binder.problems.append(f"{key}.{problem}")
    if len(binder.problems) > before:
        return
    for model, table_over in overrides.items():
        mkey = f"{key}.models.{model}"
        if model not in config.models:
            binder.problem(mkey, f"model {model!r} is not configured")
            continue
        allowed = cls.model_overrides
        bad = [k for k in table_over if allowed is not None and k not in allowed]
        for k in bad:
            binder.problem(
                f"{mkey}.{k}",
                f"cannot be set per model (per-model keys: {', '.join(sorted(allowed or ()))})",
            )
        if not bad and (settings := settings_for(config, name, model, binder)) is not None:
            for problem in cls.problems(settings, config):
                binder.problems.append(f"{mkey}.{problem}")
