"""Engine command lines: what `vgate engine args` prints and `vgate engine run` execs."""

from __future__ import annotations

import os
import shlex
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from engine import launch
from proxy.core.binder import ConfigError
from proxy.core.config import EngineConfig
from proxy.runtime.load import from_dict

MODULE = ["-m", "vllm.entrypoints.openai.api_server"]
DEV_TOML = str(Path(__file__).resolve().parents[2] / "engine" / "dev.toml")


def gpu(**fields: Any) -> EngineConfig:
    return replace(EngineConfig(model="/models/llama", python="/opt/vllm/bin/python"), **fields)


def test_minimal_gpu_engine() -> None:
    spec = launch.build("llama", gpu())
    assert spec.argv == [
        "/opt/vllm/bin/python", *MODULE,
        "--model", "/models/llama",
        "--served-model-name", "llama",
        "--host", "127.0.0.1", "--port", "8000",
        "--disable-uvicorn-access-log",
    ]  # fmt: skip
    assert spec.env == {"VLLM_NO_USAGE_STATS": "1"}
    assert spec.runtime_dir is None


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"quantization": "fp8"}, ["--quantization", "fp8"]),
        ({"quantization": "awq"}, ["--quantization", "awq"]),
        ({"tensor_parallel_size": 2}, ["--tensor-parallel-size", "2"]),
        ({"enable_prefix_caching": True}, ["--enable-prefix-caching"]),
        ({"enable_prefix_caching": False}, ["--no-enable-prefix-caching"]),
        ({"swap_space": 4.0}, ["--swap-space", "4"]),
        ({"gpu_memory_utilization": 0.85}, ["--gpu-memory-utilization", "0.85"]),
        ({"max_model_len": 8192}, ["--max-model-len", "8192"]),
        ({"kv_cache_bytes": 1 << 30}, ["--kv-cache-memory-bytes", "1073741824"]),
        ({"dtype": "bfloat16"}, ["--dtype", "bfloat16"]),
        ({"enforce_eager": True}, ["--enforce-eager"]),
        (
            {"tool_call_parser": "llama3_json"},
            ["--enable-auto-tool-choice", "--tool-call-parser", "llama3_json"],
        ),
        (
            {"tool_call_parser": "hermes", "enable_auto_tool_choice": False},
            ["--tool-call-parser", "hermes"],
        ),
        ({"reasoning_parser": "deepseek_r1"}, ["--reasoning-parser", "deepseek_r1"]),
        (
            {"chat_template": "/etc/vgate/llama.jinja"},
            ["--chat-template", "/etc/vgate/llama.jinja"],
        ),
        ({"runner": "pooling", "convert": "embed"}, ["--runner", "pooling", "--convert", "embed"]),
        ({"hf_overrides": {"num_labels": 1}}, ["--hf-overrides", '{"num_labels":1}']),
        ({"max_num_seqs": 64}, ["--max-num-seqs", "64"]),
        ({"max_num_batched_tokens": 8192}, ["--max-num-batched-tokens", "8192"]),
        ({"enable_chunked_prefill": True}, ["--enable-chunked-prefill"]),
        ({"enable_chunked_prefill": False}, ["--no-enable-chunked-prefill"]),
        ({"scheduling_policy": "priority"}, ["--scheduling-policy", "priority"]),
    ],
)
def test_gpu_flags(fields: dict[str, Any], expected: list[str]) -> None:
    argv = launch.build("llama", gpu(**fields)).argv
    start = argv.index(expected[0])
    assert argv[start : start + len(expected)] == expected


def test_gpu_defaults_leave_vllm_defaults_alone() -> None:
    argv = launch.build("llama", gpu()).argv
    for flag in (
        "--enforce-eager",
        "--dtype",
        "--quantization",
        "--tensor-parallel-size",
        "--enable-prefix-caching",
        "--no-enable-prefix-caching",
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "--runner",
        "--max-num-seqs",
        "--enable-chunked-prefill",
        "--scheduling-policy",
        "taskset",
    ):
        assert flag not in argv  # fmt: skip
    assert "VLLM_ENABLE_RESPONSES_API_STORE" not in launch.build("llama", gpu()).env


def test_a_relative_chat_template_resolves_and_an_inline_one_passes() -> None:
    argv = launch.build("llama", gpu(chat_template="templates/t.jinja"), cwd="/srv").argv
    assert argv[argv.index("--chat-template") + 1] == "/srv/templates/t.jinja"
    inline = "{% for m in messages %}{{ m.content }}{% endfor %}"
    argv = launch.build("llama", gpu(chat_template=inline), cwd="/srv").argv
    assert argv[argv.index("--chat-template") + 1] == inline


def test_the_responses_store_is_an_environment_switch() -> None:
    spec = launch.build("llama", gpu(responses_store=True))
    assert spec.env["VLLM_ENABLE_RESPONSES_API_STORE"] == "1"
    assert "VLLM_ENABLE_RESPONSES_API_STORE" in spec.shell()


def test_fp8_tensor_parallel_with_everything() -> None:
    cfg = gpu(
        served_name="llama-70b",
        host="0.0.0.0",
        port=9000,
        quantization="fp8",
        tensor_parallel_size=2,
        enable_prefix_caching=True,
        swap_space=8.0,
        gpu_memory_utilization=0.9,
        max_model_len=32768,
        extra_args=["--max-num-seqs", "256"],
    )
    spec = launch.build("big", cfg)
    assert spec.argv == [
        "/opt/vllm/bin/python", *MODULE,
        "--model", "/models/llama",
        "--served-model-name", "llama-70b",
        "--host", "0.0.0.0", "--port", "9000",
        "--max-model-len", "32768",
        "--gpu-memory-utilization", "0.9",
        "--enable-prefix-caching",
        "--quantization", "fp8",
        "--tensor-parallel-size", "2",
        "--swap-space", "8",
        "--disable-uvicorn-access-log",
        "--max-num-seqs", "256",
    ]  # fmt: skip
    assert launch.base_url(cfg) == "http://127.0.0.1:9000"


def test_cpu_engine(tmp_path: object) -> None:
    cfg = EngineConfig(
        model="build/models/tiny",
        python=".venv-engine/bin/python",
        build="cpu",
        max_model_len=2048,
        kv_cache_bytes=268435456,
        cpu_cores="0",
        runtime_dir="/run/vgate/tiny",
    )
    spec = launch.build("tiny", cfg, cwd="/srv/vgate")
    assert spec.argv == [
        "taskset", "-c", "0",
        "/srv/vgate/.venv-engine/bin/python", *MODULE,
        "--model", "/srv/vgate/build/models/tiny",
        "--served-model-name", "tiny",
        "--host", "127.0.0.1", "--port", "8000",
        "--dtype", "float32",
        "--max-model-len", "2048",
        "--kv-cache-memory-bytes", "268435456",
        "--enforce-eager",
        "--disable-uvicorn-access-log",
    ]  # fmt: skip
    assert spec.env == {
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "0",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "HF_HUB_OFFLINE": "1",
        "TMPDIR": "/run/vgate/tiny",
        "VLLM_CACHE_ROOT": "/run/vgate/tiny/cache",
        "VLLM_RPC_BASE_PATH": "/run/vgate/tiny",
    }


def test_cpu_engine_unpinned_may_compile_and_use_another_dtype() -> None:
    cfg = EngineConfig(model="/m", build="cpu", enforce_eager=False, dtype="bfloat16")
    spec = launch.build("tiny", cfg)
    assert "taskset" not in spec.argv
    assert "--enforce-eager" not in spec.argv
    assert spec.argv[spec.argv.index("--dtype") + 1] == "bfloat16"
    assert spec.env["VLLM_CPU_OMP_THREADS_BIND"] == "auto"
    assert spec.runtime_dir is not None and spec.runtime_dir.endswith("vgate-engine-tiny-8000")


def test_hub_ids_stay_ids_and_bare_programs_stay_on_path() -> None:
    spec = launch.build("q", EngineConfig(model="Qwen/Qwen2.5-0.5B"), cwd="/nowhere")
    assert spec.argv[:5] == ["python3", *MODULE, "--model", "Qwen/Qwen2.5-0.5B"]


def test_api_key_goes_to_the_environment_never_argv() -> None:
    spec = launch.build("llama", gpu(api_key="sk-secret-123"))
    assert not any("sk-secret-123" in a for a in spec.argv)
    assert "--api-key" not in spec.argv
    assert spec.env[launch.API_KEY_ENV] == "sk-secret-123"
    line = spec.shell()
    assert "sk-secret-123" not in line
    assert 'VLLM_API_KEY="${VLLM_API_KEY:?set VLLM_API_KEY}"' in line


def test_env_table_has_the_last_word() -> None:
    spec = launch.build("t", EngineConfig(model="/m", build="cpu", env={"HF_HUB_OFFLINE": "0"}))
    assert spec.env["HF_HUB_OFFLINE"] == "0"


def test_shell_line_round_trips() -> None:
    cfg = gpu(extra_args=["--chat-template", "/etc/vgate/my template.jinja"])
    spec = launch.build("llama", cfg)
    words = shlex.split(spec.shell())
    assert words[0] == "env"
    assert words[1:] == ["VLLM_NO_USAGE_STATS=1", *spec.argv]


def test_engine_table_from_toml_shape() -> None:
    cfg = from_dict(
        {
            "models": {"tiny": {"upstreams": ["engine:tiny"]}},
            "engines": {"tiny": {"model": "/m", "build": "cpu", "enable_prefix_caching": True}},
        }
    )
    assert cfg.engines["tiny"].enable_prefix_caching is True


def test_engine_table_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(
            {
                "models": {"tiny": {"upstreams": ["engine:tiny"]}},
                "engines": {
                    "tiny": {"model": "/m", "build": "rocm", "kv_cache_bytes": 0, "gpus": 2}
                },
            }
        )
    text = str(info.value)
    assert "engines.tiny.build" in text
    assert "engines.tiny.kv_cache_bytes" in text
    assert "engines.tiny.gpus: unknown key" in text
    with pytest.raises(ConfigError) as info:
        from_dict(
            {
                "models": {"tiny": {"upstreams": ["engine:tiny"]}},
                "engines": {
                    "tiny": {
                        "model": "/m",
                        "runner": "embed",
                        "convert": "embedding",
                        "scheduling_policy": "lifo",
                        "max_num_seqs": 0,
                    }
                },
            }
        )
    text = str(info.value)
    for key in ("runner", "convert", "scheduling_policy", "max_num_seqs"):
        assert f"engines.tiny.{key}" in text


def test_cli_prints_the_dev_engine_command(capsys: pytest.CaptureFixture[str]) -> None:
    from proxy.cli.main import main

    assert main(["engine", "args", "tiny", "--config", DEV_TOML]) == 0
    words = shlex.split(capsys.readouterr().out, comments=True)
    assert words[:2] == ["env", "VLLM_NO_USAGE_STATS=1"]
    cmd = words[words.index("taskset") :]
    assert cmd[:3] == ["taskset", "-c", "0"]
    assert cmd[3].endswith("/.venv-engine/bin/python") and os.path.isabs(cmd[3])
    assert cmd[cmd.index("--model") + 1].endswith("/build/models/tiny")
    assert cmd[cmd.index("--kv-cache-memory-bytes") + 1] == "268435456"
    assert cmd[cmd.index("--tool-call-parser") + 1] == "hermes"
    assert "VLLM_ENABLE_RESPONSES_API_STORE=1" in words
    assert main(["engine", "args", "tiny-embed", "--config", DEV_TOML]) == 0
    words = shlex.split(capsys.readouterr().out, comments=True)
    assert words[words.index("--runner") + 1 :][:3] == ["pooling", "--convert", "embed"]
    assert words[words.index("--port") + 1] == "8001"
    assert words[words.index("taskset") + 2] == "0"  # off the proxy's core too


def test_cli_names_an_unknown_engine(capsys: pytest.CaptureFixture[str]) -> None:
    from proxy.cli.main import main

    assert main(["engine", "args", "nope", "--config", DEV_TOML]) == 2
    assert "engines.nope: no such engine (known: tiny, tiny-embed)" in capsys.readouterr().err
