"""What `vgate engine args` prints above the command line: every flag and where it came from.

Shell comments, so the whole output still runs as a script (`vgate engine args NAME | sh`).
"""

from __future__ import annotations

import json
from typing import Any

from engine.flags import VLLM_DEFAULT, VLLM_VERSION, Setting, num
from engine.launch import LaunchSpec
from proxy.core.config import EngineConfig

_FLAG_WIDTH = 34
_SOURCE_WIDTH = 26


def describe(name: str, cfg: EngineConfig, spec: LaunchSpec) -> list[str]:
    """One comment line per flag: the flag, its source, its value (vLLM's own when not passed)."""
    preset = f"preset {cfg.preset}" if cfg.preset else "no preset"
    role = "; a headless worker node (no API server flags)" if cfg.headless else ""
    lines = [
        f"# engine {name}: {preset}{role}; vLLM's defaults are vLLM {VLLM_VERSION}'s",
        "#   " + "flag".ljust(_FLAG_WIDTH) + "from".ljust(_SOURCE_WIDTH) + "value",
    ]
    lines += [_line(s.flag.option, s.source, _value(s)) for s in spec.settings]
    if cfg.extra_args:
        lines.append(_line("extra_args", "config", " ".join(cfg.extra_args)))
    return lines


def _line(flag: str, source: str, value: str) -> str:
    return "#   " + flag.ljust(_FLAG_WIDTH) + source.ljust(_SOURCE_WIDTH) + value


def _value(s: Setting) -> str:
    flag = s.flag
    if s.source == VLLM_DEFAULT:
        if flag.legacy:
            return f"(not in vLLM {VLLM_VERSION}; passed only when set)"
        if flag.default is None:
            return f"unset: {flag.note}" if flag.note else "unset"
        return show(flag.default)
    shown = show(s.value)
    return shown if s.args() else f"{shown} (flag not passed)"


def show(value: Any) -> str:
    """A value as a person reads it: switches on/off, tables as JSON, numbers short."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return num(value)
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    if value == "":
        return '""'
    return str(value)
