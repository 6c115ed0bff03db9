"""Engine presets: the flags each one passes, keys that override them, what `vgate engine args`
says about every flag, and checkpoints that cannot honour a preset (check-config, engine run)."""

from __future__ import annotations

import dataclasses
import json
import shlex
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from engine import launch
from engine.flags import BY_KEY, FLAGS
from engine.presets import PRESETS
from proxy.cli.main import main
from proxy.core.binder import ConfigError
from proxy.core.config import EngineConfig
from proxy.runtime.load import from_dict


def gpu(**fields: Any) -> EngineConfig:
    return replace(EngineConfig(model="/models/llama", python="/opt/vllm/bin/python"), **fields)


def flag_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_interactive_is_full_precision_with_prefix_caching() -> None:
    argv = launch.build("chat", gpu(preset="interactive")).argv
    assert flag_value(argv, "--dtype") == "auto"
    assert "--enable-prefix-caching" in argv
    assert "--quantization" not in argv


def test_batch_is_fp8_with_chunked_prefill_and_big_steps() -> None:
    argv = launch.build("bulk", gpu(preset="batch")).argv
    assert flag_value(argv, "--quantization") == "fp8"
    assert "--enable-chunked-prefill" in argv
    assert flag_value(argv, "--max-num-batched-tokens") == "16384"


def test_edge_is_awq_with_cpu_offload_and_a_short_context() -> None:
    argv = launch.build("small", gpu(preset="edge")).argv
    assert flag_value(argv, "--quantization") == "awq"
    assert flag_value(argv, "--cpu-offload-gb") == "4"
    assert flag_value(argv, "--max-model-len") == "8192"
    assert "--swap-space" not in argv  # gone from the installed vLLM


def test_explicit_keys_override_the_preset() -> None:
    argv = launch.build(
        "bulk",
        gpu(preset="batch", quantization="none", enable_chunked_prefill=False, max_model_len=4096),
    ).argv
    assert "--quantization" not in argv
    assert "--no-enable-chunked-prefill" in argv and "--enable-chunked-prefill" not in argv
    assert flag_value(argv, "--max-num-batched-tokens") == "16384"  # still the preset's
    argv = launch.build("small", gpu(preset="edge", max_model_len=4096, cpu_offload_gb=0.0)).argv
    assert flag_value(argv, "--max-model-len") == "4096"
    assert flag_value(argv, "--cpu-offload-gb") == "0"


def test_a_preset_beats_the_cpu_builds_own_dtype() -> None:
    cpu = EngineConfig(model="/m", build="cpu")

    def dtype(**fields: Any) -> str:
        return flag_value(launch.build("t", replace(cpu, **fields)).argv, "--dtype")

    assert dtype() == "float32"
    assert dtype(preset="interactive") == "auto"
    assert dtype(preset="interactive", dtype="float32") == "float32"


def test_presets_only_name_keys_vgate_renders() -> None:
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    for preset in PRESETS.values():
        for key in preset:
            assert key in BY_KEY and key in fields, key


def test_an_unknown_preset_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(
            {
                "models": {"m": {"upstreams": ["engine:e"]}},
                "engines": {"e": {"model": "/m", "preset": "fast"}},
            }
        )
    assert any(p.startswith("engines.e.preset: must be one of") for p in info.value.problems)


# -- vgate engine args -------------------------------------------------------------------------


def write_config(tmp_path: Path, engine: dict[str, Any]) -> str:
    lines = ["[models.m]", 'upstreams = ["engine:e"]', "", "[engines.e]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in engine.items()]
    path = tmp_path / "vgate.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def table(out: str) -> dict[str, tuple[str, str]]:
    """`vgate engine args` rows: flag -> (from, value)."""
    rows = {}
    for line in out.splitlines()[2:]:
        if not line.startswith("#   "):
            continue
        body = line[4:]
        flag, source, value = body[:34].strip(), body[34:60].strip(), body[60:]
        rows[flag] = (source, value)
    return rows


def test_engine_args_says_where_every_flag_comes_from(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(
        tmp_path, {"model": "/models/llama", "preset": "interactive", "max_model_len": 4096}
    )
    assert main(["engine", "args", "e", "--config", config]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("# engine e: preset interactive;")
    rows = table(out)
    assert set(rows) == {flag.option for flag in FLAGS}  # every flag, once
    assert rows["--dtype"] == ("preset interactive", "auto")
    assert rows["--enable-prefix-caching"] == ("preset interactive", "on")
    assert rows["--quantization"] == ("preset interactive", "none (flag not passed)")
    assert rows["--max-model-len"] == ("config", "4096")
    assert rows["--model"] == ("config", "/models/llama")
    assert rows["--served-model-name"] == ("vgate (the engine's name)", "e")
    assert rows["--host"] == ("vgate", "127.0.0.1")
    assert rows["--gpu-memory-utilization"] == ("vLLM default", "0.92")
    assert rows["--max-num-seqs"] == ("vLLM default", "unset: chosen per device, 256 and up")
    assert rows["--swap-space"][1].startswith("(not in vLLM 0.32.0")
    # The output is still a shell script: comments, then the command line.
    words = shlex.split(out, comments=True)
    assert words[0] == "env" and "--enable-prefix-caching" in words
    assert words[words.index("--dtype") + 1] == "auto"


def test_engine_args_on_the_cpu_build_names_vgates_own_defaults(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, {"model": "/m", "build": "cpu", "enforce_eager": False})
    assert main(["engine", "args", "e", "--config", config]) == 0
    rows = table(capsys.readouterr().out)
    assert rows["--dtype"] == ("vgate (cpu build)", "float32")
    assert rows["--enforce-eager"] == ("config", "off (flag not passed)")
    note = "unset: the checkpoint's quantization_config, if any"
    assert rows["--quantization"] == ("vLLM default", note)


# -- checkpoints that cannot honour a preset ---------------------------------------------------


def checkpoint(tmp_path: Path, quantization: dict[str, Any] | None) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    data: dict[str, Any] = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    if quantization is not None:
        data["quantization_config"] = quantization
    (model / "config.json").write_text(json.dumps(data))
    return model


AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128}


@pytest.mark.parametrize(
    ("preset", "quantization", "problem"),
    [
        (
            "edge",
            None,
            "'edge' serves AWQ 4-bit weights, but {m}/config.json has no quantization_config",
        ),
        ("edge", {"quant_method": "gptq"}, "has quant_method 'gptq'"),
        ("batch", AWQ, "'batch' quantizes the weights to FP8 at load"),
        ("interactive", AWQ, "'interactive' serves full precision"),
    ],
)
def test_check_config_names_the_preset_a_checkpoint_cannot_honour(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    preset: str,
    quantization: dict[str, Any] | None,
    problem: str,
) -> None:
    model = checkpoint(tmp_path, quantization)
    config = write_config(tmp_path, {"model": str(model), "preset": preset})
    assert main(["check-config", config]) == 2
    err = capsys.readouterr().err
    assert "engines.e.preset: " in err and problem.format(m=model) in err
    # `vgate engine run` refuses before vLLM starts, with the config-error exit (no restart).
    assert main(["engine", "run", "e", "--config", config]) == 2
    assert "engines.e.preset" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("preset", "quantization", "engine"),
    [
        ("edge", AWQ, {}),
        ("batch", None, {}),
        ("batch", {"quant_method": "fp8"}, {}),
        ("interactive", None, {}),
        ("edge", None, {"quantization": "none"}),  # the config's own choice: vLLM judges it
    ],
)
def test_checkpoints_that_fit_their_preset_pass(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    preset: str,
    quantization: dict[str, Any] | None,
    engine: dict[str, Any],
) -> None:
    model = checkpoint(tmp_path, quantization)
    config = write_config(tmp_path, {"model": str(model), "preset": preset, **engine})
    assert main(["check-config", config]) == 0, capsys.readouterr().err


def test_batch_is_refused_on_the_cpu_build(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = checkpoint(tmp_path, None)
    config = write_config(tmp_path, {"model": str(model), "build": "cpu", "preset": "batch"})
    assert main(["check-config", config]) == 2
    assert "engines.e.preset: 'batch' quantizes to FP8, which the CPU build cannot run" in (
        capsys.readouterr().err
    )


def test_a_hub_id_is_not_read(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"model": "TheBloke/Llama-2-7B-AWQ", "preset": "edge"})
    assert main(["check-config", config]) == 0
