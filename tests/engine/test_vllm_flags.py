"""engine/flags.py against the installed vLLM: every flag exists (or is marked legacy because it
does not), with the default the table shows, the kind of switch vgate passes, and every value
vgate's config or presets may give it among those vLLM accepts. An upgrade of the engine venv
that renames a flag or changes a default fails here, not in production."""

from __future__ import annotations

import json
import subprocess
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from engine.flags import FLAGS, VLLM_VERSION
from engine.presets import PRESETS
from proxy.core.config import EngineConfig
from tests.vllm_fixtures import require_engine_python

pytestmark = pytest.mark.vllm
PROBE = Path(__file__).resolve().parents[2] / "engine" / "vllm_probe.py"


@pytest.fixture(scope="module")
def installed() -> dict[str, Any]:
    """What the engine venv's `vllm serve` parser says about every flag of the table."""
    python = require_engine_python()
    result = subprocess.run(
        [str(python), str(PROBE), *(flag.option for flag in FLAGS)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_the_table_is_for_the_installed_vllm(installed: dict[str, Any]) -> None:
    assert installed["version"] == VLLM_VERSION


def test_every_flag_exists_unless_marked_legacy(installed: dict[str, Any]) -> None:
    missing = {option for option, info in installed["flags"].items() if info is None}
    assert missing == {flag.option for flag in FLAGS if flag.legacy}


def test_defaults_and_switch_kinds_match(installed: dict[str, Any]) -> None:
    drift = {}
    for flag in FLAGS:
        info = installed["flags"][flag.option]
        if info is None:
            continue
        # JSON both sides: vLLM's 0 and the table's 0 (or 0.0) compare as what they print.
        ours = json.loads(json.dumps(flag.default))
        if info["default"] != ours:
            drift[flag.option] = f"vLLM's default is {info['default']!r}, the table says {ours!r}"
        if flag.kind == "bool" and not info["negatable"]:
            drift[flag.option] = "vgate passes --no-... but vLLM has no negative form"
        if flag.kind == "switch" and not (info["negatable"] or info["store_true"]):
            drift[flag.option] = "vgate passes it alone but vLLM expects a value"
        if flag.kind in ("value", "json") and (info["negatable"] or info["store_true"]):
            drift[flag.option] = "vgate passes a value but vLLM's flag is a switch"
    assert drift == {}


def test_every_value_vgate_may_pass_is_accepted(installed: dict[str, Any]) -> None:
    hints = typing.get_type_hints(EngineConfig)
    by_key = {flag.key: flag for flag in FLAGS}
    refused = {}
    for f in fields(EngineConfig):
        flag = by_key.get(f.name)
        if flag is None:
            continue
        choices = installed["flags"][flag.option] and installed["flags"][flag.option]["choices"]
        literal = [a for arg in typing.get_args(hints[f.name]) for a in _literal(arg)]
        if choices and literal:
            refused.update({f"{f.name}={v}": choices for v in literal if v not in choices})
    for name, preset in PRESETS.items():
        for key, value in preset.items():
            choices = installed["flags"][by_key[key].option]["choices"]
            if choices and value not in choices:
                refused[f"{name}.{key}={value}"] = choices
    assert refused == {}
    # Quantization and executor backends are not argparse choices: vLLM lists them apart.
    methods = installed["quantization_methods"]
    assert {p["quantization"] for p in PRESETS.values()} - {"none"} <= set(methods)
    assert "none" not in methods  # vgate's word for "no --quantization" cannot shadow a method
    backends = typing.get_args(typing.get_args(hints["distributed_executor_backend"])[0])
    assert set(backends) <= set(installed["executor_backends"])


def _literal(tp: Any) -> tuple[Any, ...]:
    return typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else ()
