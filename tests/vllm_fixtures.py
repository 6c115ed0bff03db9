"""Session fixtures: the tiny dev model, and real vLLM CPU servers launched by our own code: one
generating (tool calls with the hermes parser, the Responses store on, as `make run` serves it)
and, for the pooling routes, one embedding engine started when a test first needs it.

Each server is pinned to core 0 (the machine is shared; vLLM unpinned keeps every core busy), has
its own TMPDIR, a free port, and is stopped as a whole process group at the end of the session.
Without the engine venv the tests that need it are skipped, unless VGATE_REQUIRE_VLLM is set
(CI sets it, so a broken engine install fails the run instead of hiding in skips).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from engine import devmodel, launch, procs
from proxy.core.config import EngineConfig

REPO = Path(__file__).resolve().parent.parent
ENGINE_PYTHON = Path(
    os.environ.get("VGATE_ENGINE_PYTHON", REPO / ".venv-engine" / "bin" / "python")
)
# ~20 s on an idle machine; several minutes when other test sessions share the two cores.
HEALTH_TIMEOUT = float(os.environ.get("VGATE_VLLM_START_TIMEOUT", "420"))
SERVED_NAME = "tiny"
EMBED_NAME = "tiny-embed"
MAX_MODEL_LEN = 2048


@dataclass(frozen=True)
class VllmServer:
    base_url: str  # without /v1
    served_name: str
    model_dir: Path
    pid: int  # also the process group id
    log_path: Path
    started_in: float  # seconds from spawn to a healthy /health
    max_model_len: int = MAX_MODEL_LEN


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def require_engine_python() -> Path:
    """The engine venv's interpreter, or skip (fail under VGATE_REQUIRE_VLLM)."""
    if ENGINE_PYTHON.exists():
        return ENGINE_PYTHON
    reason = f"vLLM CPU engine venv not found at {ENGINE_PYTHON} (make engine-venv)"
    if os.environ.get("VGATE_REQUIRE_VLLM"):
        pytest.fail(f"VGATE_REQUIRE_VLLM is set but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dev model, built once per session."""
    return devmodel.build(tmp_path_factory.mktemp("models") / "tiny")


def engine_config(name: str, model_dir: Path, work: Path, **keys: object) -> EngineConfig:
    """A CPU engine on a free port, pinned to core 0, with its own runtime directory."""
    defaults: dict[str, object] = {
        "model": str(model_dir),
        "served_name": name,
        "port": free_port(),
        "build": "cpu",
        "python": str(require_engine_python()),
        "max_model_len": MAX_MODEL_LEN,
        "kv_cache_bytes": 256 * 1024 * 1024,
        "enforce_eager": True,
        "cpu_cores": "0",
        "runtime_dir": str(work / "run"),
    }
    return EngineConfig(**{**defaults, **keys})  # type: ignore[arg-type]


def serve(name: str, cfg: EngineConfig, model_dir: Path, work: Path) -> Iterator[VllmServer]:
    """Run engine `name` until the generator is closed (a fixture's body)."""
    log_path = work / "vllm.log"
    proc = start_engine(name, cfg, log_path)
    url = launch.base_url(cfg)
    try:
        started_in = wait_healthy(url, proc, log_path)
        yield VllmServer(url, name, model_dir, proc.pid, log_path, started_in)
    finally:
        procs.stop_group(proc.pid, timeout=15.0)
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def vllm_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[VllmServer]:
    """One real vLLM OpenAI server on the tiny model for the whole session."""
    work = tmp_path_factory.mktemp("vllm")
    cfg = engine_config(
        SERVED_NAME, tiny_model_dir, work, tool_call_parser="hermes", responses_store=True
    )
    yield from serve(SERVED_NAME, cfg, tiny_model_dir, work)


@pytest.fixture(scope="session")
def vllm_embed_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[VllmServer]:
    """The tiny model converted to an embedding model (`/v1/embeddings`, `/v1/score`)."""
    work = tmp_path_factory.mktemp("vllm-embed")
    cfg = engine_config(
        EMBED_NAME,
        tiny_model_dir,
        work,
        runner="pooling",
        convert="embed",
        kv_cache_bytes=64 * 1024 * 1024,
    )
    yield from serve(EMBED_NAME, cfg, tiny_model_dir, work)


def start_engine(name: str, cfg: EngineConfig, log_path: Path) -> subprocess.Popen[bytes]:
    """Launch an engine as `vgate engine run` would, in its own session, logging to a file."""
    spec = launch.build(name, cfg)
    launch.prepare(spec)
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            spec.argv,
            env=spec.full_env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # one process group: stop_group reaches vLLM's workers
            preexec_fn=procs.die_with_parent(),
        )


def wait_healthy(base_url: str, proc: subprocess.Popen[bytes], log_path: Path) -> float:
    started = time.monotonic()
    while time.monotonic() - started < HEALTH_TIMEOUT:
        if proc.poll() is not None:
            pytest.fail(f"vLLM exited with {proc.returncode} while starting:\n{_tail(log_path)}")
        try:
            if httpx.get(base_url + "/health", timeout=2.0).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"vLLM not healthy after {HEALTH_TIMEOUT:.0f} s:\n{_tail(log_path)}")


def _tail(log_path: Path, lines: int = 30) -> str:
    text = log_path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])
