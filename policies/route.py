"""Precision routing: requests that need full precision go to a full-precision model.

Quantized weights (FP8, AWQ, ...) serve chat well and get tool calls and JSON schemas wrong
first: a malformed argument or an unclosed brace is a failed request, not a slightly worse
answer. So a rule names, for a model clients ask for (the quantized one), the model that serves
its requests that bind their output's form (`tools`, `json`: the family reads its own fields,
`Api.constraints`) or that ask for it (`header`: `x-vgate-precision: full`; `metadata`: a body
`metadata` entry `"vgate_precision": "full"`, removed before the engine sees it).

The policy only rewrites `request.model`. The runtime splits each pipeline after it: the
policies before `route` ran for the model asked for, those after it (and the forwarder, with
its fallbacks) are the model's it chose (proxy.runtime.runtime). A rule moves a request once:
targets are never routed again, and `check-config` refuses chains and cycles.

A key that may not use the target stays on the model it asked for (which it may use): routing
is an operator's choice of engine, never a way round `keys[].models`. A Responses request that
continues a stored response (`previous_response_id`) goes where that response is held, the asked
model or its target, whatever its content: vLLM keeps it only in that engine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from policies.services import Services
from proxy.core.binder import check
from proxy.core.config import Config
from proxy.core.errors import InvalidRequest
from proxy.core.pipeline import Handler, ProxyRequest, ProxyResponse

Trigger = Literal["header", "metadata", "tools", "json"]
# Also the order reasons are reported in: what the client asked for before what it sent.
TRIGGERS: tuple[Trigger, ...] = ("header", "metadata", "tools", "json")
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}")
_VALUES = ("full", "auto")


def _header_ok(v: str) -> str | None:
    return None if _TOKEN.fullmatch(v) else "must be an HTTP header name (1-64 token characters)"


def _key_ok(v: str) -> str | None:
    return None if 0 < len(v) <= 64 else "must be 1-64 characters"


def _when_ok(v: list[str]) -> str | None:
    if not v:
        return f"must name at least one of {', '.join(TRIGGERS)}"
    return "lists a trigger twice" if len(set(v)) < len(v) else None


@dataclass(frozen=True, kw_only=True)
class RouteRule:
    model: str  # the model clients ask for
    to: str  # the model serving its requests that match `when`
    when: list[Trigger] = check(_when_ok, default_factory=lambda: list(TRIGGERS))


@dataclass(frozen=True, kw_only=True)
class RouteSettings:
    rules: list[RouteRule] = field(default_factory=list)
    header: str = check(_header_ok, "x-vgate-precision")
    metadata_key: str = check(_key_ok, "vgate_precision")


class RoutePolicy:
    """Moves a request to its rule's target when one of the rule's triggers matches."""

    settings_class: ClassVar[type[Any]] = RouteSettings
    model_overrides: ClassVar[frozenset[str] | None] = frozenset()

    def __init__(self, settings: RouteSettings, model: str | None, services: Services) -> None:
        self._header = settings.header
        self._tag = settings.metadata_key
        rule = next((r for r in settings.rules if r.model == model), None)
        self._to = rule.to if rule is not None else None
        self._when = frozenset(rule.when) if rule is not None else frozenset()
        self._held_by = services.held_by

    @classmethod
    def problems(cls, settings: RouteSettings, config: Config) -> list[str]:
        out: list[str] = []
        targets: dict[str, str] = {}
        for rule in settings.rules:
            targets.setdefault(rule.model, rule.to)  # a second rule is refused below
        seen: set[str] = set()
        for i, rule in enumerate(settings.rules):
            key = f"rules[{i}]"
            for name in ("model", "to"):
                value = getattr(rule, name)
                if value not in config.models:
                    out.append(f"{key}.{name}: model {value!r} is not configured")
            if rule.to == rule.model:
                out.append(f"{key}.to: is the rule's own model")
            if rule.model in seen:
                out.append(f"{key}.model: {rule.model!r} has another rule")
            seen.add(rule.model)
            if rule.to != rule.model:
                out += _loops(key, rule, targets)
        return out

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        asked = self._asked(request)
        to = self._to
        if to is None:
            return await call_next(request)
        held = self._held_by(request) if self._held_by is not None else None
        if held is not None:
            # A continuation goes where its response is: only that engine has it.
            reason = "previous_response" if to in held and request.model not in held else None
        else:
            reason = self._reason(request, asked)
        if reason is not None:
            key = request.key
            if key is not None and key.allowed_models is not None and to not in key.allowed_models:
                request.outcome.report("route_skipped", "not_allowed")
            else:
                request.model = to
                request.outcome.routed = reason
                request.outcome.routed_to = to
        return await call_next(request)

    def _reason(self, request: ProxyRequest, asked: tuple[Trigger, ...]) -> str | None:
        when = self._when
        for trigger in asked:
            if trigger in when:
                return trigger
        for constraint in request.api.constraints(request.body):
            if constraint in when:
                return constraint
        return None

    def _asked(self, request: ProxyRequest) -> tuple[Trigger, ...]:
        """What the client asked for by header and metadata tag; checked on every model (a
        typo is an error, not a quiet "auto"), and the tag leaves the body."""
        found: tuple[Trigger, ...] = ()
        value = request.headers.get(self._header)
        if value is not None and _full(value, self._header):
            found = ("header",)
        metadata = request.body.get("metadata")
        if isinstance(metadata, dict) and self._tag in metadata:
            tag = metadata[self._tag]
            # A new dict: the client's stays as sent, for a fallback that starts over from it.
            rest = {k: v for k, v in metadata.items() if k != self._tag}
            if rest:
                request.body["metadata"] = rest
            else:
                del request.body["metadata"]
            if _full(tag, f"metadata.{self._tag}"):
                found = (*found, "metadata")
        return found


def _loops(key: str, rule: RouteRule, targets: dict[str, str]) -> list[str]:
    """A target that has a rule of its own: a cycle back to this rule's model, or a chain."""
    path = [rule.model, rule.to]
    while path[-1] in targets and path[-1] not in path[:-1]:
        path.append(targets[path[-1]])
    if path[-1] == rule.model:
        return [f"{key}: cycle: {' -> '.join(path)}"]
    if len(path) > 2:
        return [
            f"{key}.to: {rule.to!r} is routed itself ({' -> '.join(path)}); a request moves "
            f"once: route {rule.model!r} to the model that serves it"
        ]
    return []


def _full(value: Any, param: str) -> bool:
    word = value.strip().lower() if isinstance(value, str) else None
    if word not in _VALUES:
        raise InvalidRequest(f"'{param}' must be 'full' or 'auto'", param=param)
    return word == "full"
