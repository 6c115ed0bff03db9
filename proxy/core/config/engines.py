"""How one vLLM engine is launched, as typed config (`[engines.NAME]`).

Relative paths (`python`, `model`, `runtime_dir`) are resolved against the current working
directory at launch time, as a shell would: `make run` runs from the repository root, and a
systemd unit sets `WorkingDirectory=` (or uses absolute paths).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from proxy.core.binder import (
    Check,
    check,
    fraction,
    non_empty,
    non_negative,
    port_number,
    positive,
)

# Engine presets from the decision matrix (engine/presets.py holds their flags): "interactive"
# full precision with prefix caching (time to first token), "batch" FP8 with chunked prefill and
# big steps (throughput), "edge" AWQ 4-bit with CPU offload and a short context (< 24 GB cards).
Preset = Literal["interactive", "batch", "edge"]


def _optional(fn: Check) -> Check:
    def inner(v: Any) -> str | None:
        return None if v is None else fn(v)

    return inner


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    model: str = check(non_empty)  # local path, a model id, or NAME@sha256:HEX (model store)
    # NAME@sha256:HEX models are looked up here (`vgate models add`) and checked before vLLM
    # starts: "quick" hashes only what changed since it was last hashed, "full" every file.
    model_store: str = check(non_empty, "/var/lib/vgate-engine/models")
    model_verify: Literal["quick", "full"] = "quick"
    served_name: str | None = None  # default: the engine's name (the table key)
    host: str = "127.0.0.1"
    port: int = check(port_number, 8000)
    build: Literal["cpu", "cuda"] = "cuda"
    preset: Preset | None = None  # every key set here overrides the preset's value for it
    python: str = "python3"  # the interpreter of the engine's own venv
    max_model_len: int | None = check(_optional(positive), None)
    gpu_memory_utilization: float | None = check(_optional(fraction), None)
    # None leaves vLLM's own default (on in V1 for most models); false turns it off explicitly.
    enable_prefix_caching: bool | None = None
    # "fp8", "awq", ... (passed through; vLLM validates); "none" passes no --quantization even
    # where the preset has one (vLLM then reads the checkpoint's own quantization_config).
    quantization: str | None = check(_optional(non_empty), None)
    kv_cache_bytes: int | None = check(_optional(positive), None)
    swap_space: float | None = None  # GiB; only vLLM versions that still have --swap-space
    cpu_offload_gb: float | None = check(_optional(non_negative), None)  # weights kept in RAM
    # Parallelism; vLLM's own multi-node runtime (proxy.core.config.distributed checks them):
    # nnodes/node_rank/master_* with the "mp" backend, worker nodes `headless` (no API server);
    # or "ray", whose cluster (`ray start` on every node) places the workers itself.
    tensor_parallel_size: int | None = check(_optional(positive), None)
    pipeline_parallel_size: int | None = check(_optional(positive), None)
    data_parallel_size: int | None = check(_optional(positive), None)
    data_parallel_size_local: int | None = check(_optional(positive), None)
    data_parallel_start_rank: int | None = check(_optional(non_negative), None)
    data_parallel_address: str | None = check(_optional(non_empty), None)
    data_parallel_rpc_port: int | None = check(_optional(port_number), None)
    distributed_executor_backend: Literal["mp", "ray", "uni"] | None = None
    nnodes: int | None = check(_optional(positive), None)
    node_rank: int | None = check(_optional(non_negative), None)
    master_addr: str | None = check(_optional(non_empty), None)  # the head (node_rank 0)
    master_port: int | None = check(_optional(port_number), None)
    headless: bool = False  # a worker node: engine processes only, no HTTP port
    node_ip: str | None = check(_optional(non_empty), None)  # VLLM_HOST_IP: this node's address
    # The interface the nodes reach each other on (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME):
    # left alone, gloo binds the address the host name resolves to, often 127.0.0.1.
    node_interface: str | None = check(_optional(non_empty), None)
    # None: on for the CPU build (compiling costs 25-48 s at every start and is never reused).
    enforce_eager: bool | None = None
    dtype: str | None = None  # None: "float32" on the CPU build, vLLM's "auto" on CUDA
    cpu_cores: str | None = None  # taskset list, e.g. "0" or "0-3"; also binds OpenMP threads
    api_key: str | None = None  # handed to vLLM as VLLM_API_KEY, never on the command line
    # TMPDIR, VLLM_CACHE_ROOT and VLLM_RPC_BASE_PATH of the CPU build (vLLM leaves sockets and
    # vllm_dist_* files there); default: <system temp>/vgate-engine-NAME-PORT.
    runtime_dir: str | None = None
    # What the API routes need of the engine (proxy.api): tool calls in chat and Responses (a
    # parser from vLLM's registry, e.g. "hermes", "llama3_json"; with auto_tool_choice the
    # model may call tools unasked, `tool_choice: "auto"`), reasoning output, a template.
    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool = True  # only with tool_call_parser
    reasoning_parser: str | None = None
    chat_template: str | None = None  # a file (relative to the working directory) or inline
    # "pooling" serves /v1/embeddings, /v1/rerank and /v1/score instead of generating; `convert`
    # adapts a generative checkpoint ("embed", "classify", ...), `hf_overrides` its config.
    runner: Literal["auto", "generate", "pooling"] | None = None
    convert: Literal["auto", "none", "embed", "classify"] | None = None
    hf_overrides: dict[str, Any] | None = None
    # Scheduler: how many sequences and tokens one step may hold; "priority" honours a request's
    # `priority` field (lower runs first) where "fcfs" ignores it.
    max_num_seqs: int | None = check(_optional(positive), None)
    max_num_batched_tokens: int | None = check(_optional(positive), None)
    enable_chunked_prefill: bool | None = None
    scheduling_policy: Literal["fcfs", "priority"] | None = None
    # Keep Responses in the engine's memory for GET /v1/responses/{id}, `previous_response_id`
    # and background responses. vLLM never evicts them: memory grows with every stored
    # response until the engine restarts, so it is off unless asked for.
    responses_store: bool = False
    # Ready only after one real short request (engine.client.warmup): `warmup_tokens` generated
    # from `warmup_prompt` (an embedding of it for a pooling engine), within `warmup_timeout`.
    warmup: bool = True
    warmup_prompt: str = check(non_empty, "Hello")
    warmup_tokens: int = check(positive, 8)
    warmup_timeout: float = check(positive, 120.0)
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # last word over every variable we set
