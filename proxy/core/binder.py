"""Typed configuration from plain data: dataclasses in, readable errors out.

A tiny, strict binder: every field of a dataclass is typed; a TOML table is checked against it
(unknown keys, wrong types, failed checks) and every problem is reported with its dotted key, so
`vgate check-config` can print them all at once instead of one per run.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

T = TypeVar("T")
Check = Callable[[Any], "str | None"]


class ConfigError(Exception):
    """Invalid configuration; `problems` are `key: what is wrong` lines."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


def check(fn: Check, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A dataclass field whose value must also pass `fn` (which returns a problem or None)."""
    if default is not dataclasses.MISSING:
        kw["default"] = default
    return dataclasses.field(metadata={"check": fn}, **kw)


def positive(v: Any) -> str | None:
    return None if v > 0 else "must be greater than 0"


def non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be 0 or more"


def fraction(v: Any) -> str | None:
    return None if 0 < v <= 1 else "must be in (0, 1]"


def port_number(v: Any) -> str | None:
    return None if 0 < v < 65536 else "must be a port number (1-65535)"


def non_empty(v: Any) -> str | None:
    return None if len(v) > 0 else "must not be empty"


class Binder:
    """Binds data to dataclasses, collecting problems instead of stopping at the first."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{key or '<top level>'}: {message}")

    def bind(self, cls: type[T], data: Any, key: str = "") -> T | None:
        if not isinstance(data, dict):
            self.problem(key, f"must be a table, got {_describe(data)}")
            return None
        hints = get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
        values: dict[str, Any] = {}
        ok = True
        for name in data:
            if name not in fields:
                known = ", ".join(sorted(fields)) or "none"
                self.problem(_join(key, name), f"unknown key (known keys: {known})")
                ok = False
        for name, f in fields.items():
            sub = _join(key, name)
            if name not in data:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    self.problem(sub, "is required")
                    ok = False
                continue
            before = len(self.problems)
            value = self.value(hints[name], data[name], sub)
            if len(self.problems) > before:
                ok = False
                continue
            fn = f.metadata.get("check")
            if fn is not None:
                msg = fn(value)
                if msg:
                    self.problem(sub, msg)
                    ok = False
                    continue
            values[name] = value
        if not ok:
            return None
        return cls(**values)

    def value(self, tp: Any, v: Any, key: str) -> Any:
        origin = get_origin(tp)
        if origin in (Union, types.UnionType):
            options = get_args(tp)
            if v is None and type(None) in options:
                return None
            rest = [o for o in options if o is not type(None)]
            if len(rest) == 1:
                return self.value(rest[0], v, key)
            if isinstance(v, dict):
                # A table can only be the table option: its own problems are the precise ones.
                tables = [o for o in rest if dataclasses.is_dataclass(o)]
                if len(tables) == 1:
                    return self.value(tables[0], v, key)
            for o in rest:
                trial = Binder()
                out = trial.value(o, v, key)
                if not trial.problems:
                    return out
            self.problem(key, f"must be one of {', '.join(_name(o) for o in rest)}")
            return None
        if origin is Literal:
            allowed = get_args(tp)
            if v not in allowed:
                self.problem(
                    key, f"must be one of {', '.join(repr(a) for a in allowed)}, got {v!r}"
                )
            return v
        if origin in (list, tuple):
            if not isinstance(v, list):
                self.problem(key, f"must be a list, got {_describe(v)}")
                return None
            (item,) = get_args(tp)[:1]
            out_list = [self.value(item, x, f"{key}[{i}]") for i, x in enumerate(v)]
            return tuple(out_list) if origin is tuple else out_list
        if origin is dict:
            if not isinstance(v, dict):
                self.problem(key, f"must be a table, got {_describe(v)}")
                return None
            _, item = get_args(tp)
            return {k: self.value(item, x, _join(key, k)) for k, x in v.items()}
        if dataclasses.is_dataclass(tp):
            return self.bind(typing.cast(type, tp), v, key)
        if tp is Any:
            return v
        if tp is float:
            if isinstance(v, bool) or not isinstance(v, int | float):
                self.problem(key, f"must be a number, got {_describe(v)}")
            return float(v) if isinstance(v, int | float) else v
        if tp is int:
            if isinstance(v, bool) or not isinstance(v, int):
                self.problem(key, f"must be an integer, got {_describe(v)}")
            return v
        if tp in (str, bool) and not isinstance(v, tp):
            self.problem(key, f"must be a {_name(tp)}, got {_describe(v)}")
        return v


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return ", ".join(repr(a) for a in get_args(tp))
    return {str: "string", bool: "boolean", int: "integer", float: "number"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _describe(v: Any) -> str:
    return f"{_name(type(v))} {v!r}" if not isinstance(v, dict | list) else _name(type(v))
