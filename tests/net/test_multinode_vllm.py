"""One model across two hosts on vLLM's own multi-node runtime: the real vLLM CPU engine with
tensor parallelism 2, one rank on each of two network namespaces (tests/net/netns.py), launched
the way the units launch them (`vgate engine run`, `vgate systemd wait-healthy`).

The worker node is started first and waits for its head; the head is ready only once a real
generation went through both nodes (the warm-up); when the head stops, the worker, which vLLM
alone would leave running in a group that is gone, exits 1 within its grace period so that its
unit restarts it into the head's next group. About two minutes of both cores.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import httpx
import pytest

from engine.procs import group_members
from proxy.cli.main import main
from tests.net.netns import Host, Network
from tests.vllm_fixtures import HEALTH_TIMEOUT, require_engine_python

pytestmark = [pytest.mark.net, pytest.mark.vllm, pytest.mark.slow]
VGATE = [sys.executable, "-m", "proxy.cli"]


def cluster_config(tmp_path: Path, model: Path, head: Host, worker: Host) -> Path:
    common = f"""build = "cpu"
python = "{require_engine_python()}"
model = "{model}"
max_model_len = 2048
kv_cache_bytes = 67108864
tensor_parallel_size = 2
nnodes = 2
master_addr = "{head.address}"
master_port = 29501
node_interface = "eth0"
env = {{ PYTHONDONTWRITEBYTECODE = "" }}
"""
    path = tmp_path / "cluster.toml"
    path.write_text(
        f"""[models.big]
upstreams = ["engine:big"]

[engines.big]
{common}host = "{head.address}"
node_rank = 0
node_ip = "{head.address}"
cpu_cores = "0"
runtime_dir = "{tmp_path}/run-head"

[engines.big-1]
{common}node_rank = 1
headless = true
node_ip = "{worker.address}"
cpu_cores = "1"
runtime_dir = "{tmp_path}/run-node1"
"""
    )
    return path


def wait_for_line(log: Path, text: str, within: float) -> None:
    deadline = time.monotonic() + within
    while text not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"{text!r} not in {log}:\n{tail(log)}"
        time.sleep(0.5)


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def test_one_model_across_two_hosts(network: Network, tiny_model_dir: Path, tmp_path: Path) -> None:
    head, node1 = network.add("head", 1), network.add("node1", 2)
    config = cluster_config(tmp_path, tiny_model_dir, head, node1)
    assert main(["check-config", str(config)]) == 0
    args = ["--config", str(config)]

    worker_log = tmp_path / "node1.log"
    worker = node1.spawn([*VGATE, "engine", "run", "big-1", *args], worker_log)
    wait_for_line(worker_log, f"waiting for the head at {head.address}", 60)

    head_log, ready_log = tmp_path / "head.log", tmp_path / "ready.log"
    server = head.spawn([*VGATE, "engine", "run", "big", *args], head_log)
    # The head unit's ExecStartPost: /health, then a real generation, which needs both ranks.
    ready = head.spawn(
        [*VGATE, "systemd", "wait-healthy", "big", *args, "--timeout", str(HEALTH_TIMEOUT)],
        ready_log,
    )
    code = ready.wait(HEALTH_TIMEOUT + 60)
    assert code == 0, (
        f"{tail(ready_log)}\n--- head\n{tail(head_log)}\n--- node1\n{tail(worker_log)}"
    )
    assert "engine big: warmed up in" in ready_log.read_text()
    assert f"engine big-1: joined the head at {head.address} in" in worker_log.read_text()

    answer = head.call(
        lambda: httpx.post(
            f"http://{head.address}:8000/v1/completions",
            json={"model": "big", "prompt": "Hello", "max_tokens": 8, "ignore_eos": True},
            timeout=120.0,
        ),
        timeout=130.0,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 8

    # The head goes; the worker follows (15 s without a connection to it), its vLLM with it.
    head.stop(server)
    stopped = time.monotonic()
    assert worker.wait(90) == 1, tail(worker_log)
    assert time.monotonic() - stopped < 60
    assert f"no connection to the head at {head.address} for 15 s" in worker_log.read_text()
    vllm = re.search(r"headless worker \(pid (\d+)\)", worker_log.read_text())
    assert vllm is not None
    assert group_members(int(vllm.group(1))) == []
