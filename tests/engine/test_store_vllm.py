"""Real vLLM serves a model from the store: the tree of symlinks is a directory it can load."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from engine import launch, procs
from engine.store.pinned import resolve_model
from engine.store.store import Store
from proxy.core.config import EngineConfig
from tests.engine.store_helpers import add
from tests.vllm_fixtures import free_port, require_engine_python, start_engine, wait_healthy

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_vllm_serves_a_pinned_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    python = require_engine_python()
    store = Store(tmp_path / "store")
    ref = str(add(store, "tiny", tiny_model_dir).ref)
    cfg = EngineConfig(
        model=resolve_model(ref, store.layout.root),
        served_name="pinned",
        port=free_port(),
        build="cpu",
        python=str(python),
        max_model_len=512,
        kv_cache_bytes=64 * 1024 * 1024,
        cpu_cores="0",
        runtime_dir=str(tmp_path / "run"),
    )
    proc = start_engine("pinned", cfg, tmp_path / "vllm.log")
    try:
        url = launch.base_url(cfg)
        wait_healthy(url, proc, tmp_path / "vllm.log")
        body = {"model": "pinned", "prompt": "def", "max_tokens": 4, "temperature": 0}
        answer = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
        assert answer["usage"]["completion_tokens"] == 4
        models = httpx.get(url + "/v1/models", timeout=10).json()["data"]
        assert [m["id"] for m in models] == ["pinned"]
        assert models[0]["root"] == str(store.layout.tree(ref.split("sha256:")[1]))
    finally:
        procs.stop_group(proc.pid, timeout=15.0)
        proc.wait(timeout=10)
