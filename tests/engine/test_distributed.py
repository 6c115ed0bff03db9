"""Engines that span machines: the config checks (what vLLM's multi-node runtime requires, found
in the file), the head's and the worker's command lines, and what the other commands do with a
headless worker node (no upstream, no /health, no port for `vgate up` to probe)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest

from engine import launch
from proxy.cli.main import main
from proxy.core.binder import ConfigError
from proxy.core.config import Config
from proxy.ops.up import children_for
from proxy.runtime.load import from_dict

MODEL = "/models/llama-70b"
RENDEZVOUS = {"nnodes": 2, "master_addr": "10.0.0.1", "master_port": 29501}
HEAD = {"model": MODEL, "tensor_parallel_size": 8, "pipeline_parallel_size": 2, **RENDEZVOUS}
WORKER = {**HEAD, "node_rank": 1, "headless": True}


def config(engines: dict[str, dict[str, Any]], upstream: str = "engine:big") -> Config:
    return from_dict({"models": {"big": {"upstreams": [upstream]}}, "engines": engines})


def problems(engines: dict[str, dict[str, Any]], upstream: str = "engine:big") -> list[str]:
    with pytest.raises(ConfigError) as info:
        config(engines, upstream)
    return info.value.problems


def test_a_head_and_its_worker_in_one_file() -> None:
    cfg = config({"big": {**HEAD, "node_rank": 0}, "big-1": WORKER})
    head = launch.build("big", cfg.engines["big"]).argv
    i = head.index("--tensor-parallel-size")
    assert head[i:] == [
        "--tensor-parallel-size", "8",
        "--pipeline-parallel-size", "2",
        "--nnodes", "2",
        "--node-rank", "0",
        "--master-addr", "10.0.0.1",
        "--master-port", "29501",
        "--disable-uvicorn-access-log",
    ]  # fmt: skip
    assert head[1:3] == ["-m", launch.SERVER_MODULE]


def test_a_worker_runs_vllm_serve_headless_without_api_server_flags() -> None:
    cfg = config(
        {
            "big": HEAD,
            "big-1": {
                **WORKER,
                "tool_call_parser": "hermes",
                "chat_template": "t.jinja",
                "node_ip": "10.0.0.2",
                "node_interface": "ens5",
            },
        }
    )
    spec = launch.build("big-1", cfg.engines["big-1"])
    assert spec.argv[:5] == ["python3", "-m", launch.CLI_MODULE, "serve", "--model"]
    assert "--headless" in spec.argv
    assert spec.argv[spec.argv.index("--node-rank") + 1] == "1"
    for frontend in ("--host", "--port", "--tool-call-parser", "--chat-template"):
        assert frontend not in spec.argv
    assert "--disable-uvicorn-access-log" not in spec.argv
    assert spec.env["VLLM_HOST_IP"] == "10.0.0.2"
    assert spec.env["GLOO_SOCKET_IFNAME"] == spec.env["NCCL_SOCKET_IFNAME"] == "ens5"
    assert "--host" not in {s.flag.option for s in spec.settings}


def test_a_cpu_worker_runs_the_same_cli_through_the_version_shim() -> None:
    cfg = config({"big": {**HEAD, "build": "cpu"}, "big-1": {**WORKER, "build": "cpu"}})
    argv = launch.build("big-1", cfg.engines["big-1"]).argv
    assert argv[1:4] == ["-c", launch.CPU_CLI, "serve"]
    # The printed line is one the shell gives back word for word.
    words = shlex.split(launch.build("big-1", cfg.engines["big-1"]).shell())
    assert words[words.index("-c") + 1] == launch.CPU_CLI


def test_ray_runs_on_the_head_only() -> None:
    ray = {"model": MODEL, "tensor_parallel_size": 16, "distributed_executor_backend": "ray"}
    cfg = config({"big": ray})
    argv = launch.build("big", cfg.engines["big"]).argv
    assert argv[argv.index("--distributed-executor-backend") + 1] == "ray"


def test_data_parallel_across_machines() -> None:
    dp = {"model": MODEL, "data_parallel_size": 4, "data_parallel_size_local": 2}
    dp_net = {"data_parallel_address": "10.0.0.1", "data_parallel_rpc_port": 13345}
    cfg = config(
        {
            "big": {**dp, **dp_net},
            "big-dp2": {**dp, **dp_net, "data_parallel_start_rank": 2, "headless": True},
        }
    )
    argv = launch.build("big-dp2", cfg.engines["big-dp2"]).argv
    i = argv.index("--data-parallel-size")
    assert argv[i : i + 10] == [
        "--data-parallel-size", "4",
        "--data-parallel-size-local", "2",
        "--data-parallel-start-rank", "2",
        "--data-parallel-address", "10.0.0.1",
        "--data-parallel-rpc-port", "13345",
    ]  # fmt: skip
    assert "--headless" in argv


@pytest.mark.parametrize(
    ("engine", "expected"),
    [
        ({**HEAD, "node_rank": 2}, "engines.big.node_rank: 2 must be less than nnodes (2)"),
        ({**HEAD, "nnodes": 3}, "engines.big.nnodes: 3 nodes must evenly divide the world size 16"),
        ({**HEAD, "master_addr": None}, "engines.big.master_addr: is required with nnodes > 1"),
        ({**HEAD, "node_rank": 1}, "engines.big.headless: must be true on node_rank 1"),
        ({**HEAD, "headless": True}, "engines.big.headless: is a worker node of a head elsewhere"),
        ({"model": MODEL, "headless": True}, "engines.big.headless: is a worker node"),
        (
            {**HEAD, "distributed_executor_backend": "ray"},
            'engines.big.distributed_executor_backend: "ray" places workers',
        ),
        (
            {"model": MODEL, "distributed_executor_backend": "ray", "headless": True},
            'engines.big.headless: a "ray" engine has no headless nodes',
        ),
        ({"model": MODEL, "master_addr": "10.0.0.1"}, "engines.big.master_addr: is only used"),
        (
            {"model": MODEL, "data_parallel_start_rank": 2},
            "engines.big.data_parallel_start_rank: applies to data-parallel engines only",
        ),
        (
            {"model": MODEL, "data_parallel_size": 2, "data_parallel_size_local": 4},
            "engines.big.data_parallel_size_local: 4 is more than data_parallel_size (2)",
        ),
        (
            {
                "model": MODEL,
                "data_parallel_size": 4,
                "data_parallel_start_rank": 3,
                "data_parallel_size_local": 2,
            },
            "engines.big.data_parallel_start_rank: ranks 3..4 do not fit",
        ),
        (
            {
                "model": MODEL,
                "data_parallel_size": 4,
                "data_parallel_start_rank": 2,
                "headless": True,
            },
            "engines.big.data_parallel_address: is required on a headless node",
        ),
        (
            {"model": MODEL, "distributed_executor_backend": "torchrun"},
            "engines.big.distributed_executor_backend: must be one of",
        ),
        ({"model": MODEL, "node_rank": -1}, "engines.big.node_rank: must be 0 or more"),
        ({"model": MODEL, "master_port": 0}, "engines.big.master_port: must be a port number"),
    ],
)
def test_combinations_vllm_refuses_name_the_key(engine: dict[str, Any], expected: str) -> None:
    engine = {k: v for k, v in engine.items() if v is not None}
    found = problems({"big": engine}, upstream="http://10.0.0.1:8000")
    assert any(p.startswith(expected) for p in found), found


def test_a_headless_node_is_no_upstream() -> None:
    found = problems({"big": HEAD, "big-1": WORKER}, upstream="engine:big-1")
    assert "models.big.upstreams[0]: names engine 'big-1', a headless worker node" in found[0]


def test_nodes_of_one_group_must_agree() -> None:
    found = problems(
        {
            "big": HEAD,
            "big-1": {**WORKER, "tensor_parallel_size": 4, "model": "/models/other"},
            "big-1b": WORKER,
        }
    )
    model = "engines.big-1.model: '/models/other' differs from engines.big.model"
    assert any(p.startswith(model) for p in found)
    assert any(p.startswith("engines.big-1.tensor_parallel_size: 4 differs") for p in found)
    rank = "engines.big-1b.node_rank: 1 is also engines.big-1's node rank in 10.0.0.1:29501"
    assert rank in found


def test_up_does_not_probe_a_headless_node(tmp_path: Path) -> None:
    cfg = config({"big": HEAD, "big-1": WORKER})
    children = {c.name: c for c in children_for(cfg, "vgate.toml")}
    assert children["engine big"].health_url == "http://127.0.0.1:8000/health"
    assert children["engine big-1"].health_url is None


def test_wait_healthy_refuses_a_headless_node(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "vgate.toml"
    path.write_text(
        '[models.big]\nupstreams = ["engine:big"]\n\n'
        '[engines.big]\nmodel = "/m"\nnnodes = 2\nmaster_addr = "10.0.0.1"\n'
        "tensor_parallel_size = 2\n\n"
        '[engines.big-1]\nmodel = "/m"\nnnodes = 2\nmaster_addr = "10.0.0.1"\n'
        "tensor_parallel_size = 2\n"
        "node_rank = 1\nheadless = true\n"
    )
    assert main(["check-config", str(path)]) == 0
    assert main(["systemd", "wait-healthy", "big-1", "--config", str(path)]) == 2
    assert "headless worker node: it has no /health" in capsys.readouterr().err
