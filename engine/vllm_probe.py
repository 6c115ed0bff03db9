"""Print what the installed vLLM's `vllm serve` parser says about flags, as JSON (stdlib only).

Run by the engine's interpreter, not vgate's: `.venv-engine/bin/python engine/vllm_probe.py
--model --dtype ...`. For each flag: null if vLLM has no such flag, else its default, whether
it is a switch pair (`--x` / `--no-x`) or a store-true switch, and its choices. The table in
engine/flags.py is checked against this output (tests/engine/test_vllm_flags.py); it is also
how that table's defaults are regenerated after a vLLM upgrade.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import typing
from typing import Any


def describe(flags: list[str]) -> dict[str, Any]:
    # Imported here: this file is also read by vgate's tools, which have no vLLM.
    parsing = importlib.import_module("vllm.utils.argparse_utils")
    cli_args = importlib.import_module("vllm.entrypoints.launchers.cli_args")
    version = importlib.import_module("vllm").__version__
    parser = cli_args.make_arg_parser(parsing.FlexibleArgumentParser())
    actions: dict[str, argparse.Action] = parser._option_string_actions
    out: dict[str, Any] = {}
    for flag in flags:
        action = actions.get(flag)
        if action is None:
            out[flag] = None
            continue
        out[flag] = {
            "default": action.default,
            "negatable": isinstance(action, argparse.BooleanOptionalAction),
            "store_true": isinstance(action, argparse._StoreTrueAction),
            "choices": sorted(action.choices) if action.choices else None,
        }
    # Two lists the parser does not hold as choices.
    quantization = importlib.import_module("vllm.model_executor.layers.quantization")
    parallel = importlib.import_module("vllm.config.parallel")
    return {
        "version": version,
        "flags": out,
        "quantization_methods": sorted(quantization.QUANTIZATION_METHODS),
        "executor_backends": sorted(typing.get_args(parallel.DistributedExecutorBackend)),
    }


if __name__ == "__main__":
    json.dump(describe(sys.argv[1:]), sys.stdout, default=repr)
