"""The interactive preset on the real vLLM CPU engine: it starts with the preset's flags, serves
the checkpoint in bf16 (dtype "auto" turns a float32 checkpoint into vLLM's preferred 16-bit
type), and its prefix cache serves a repeated prompt.

The other presets cannot run here: "batch" asks for FP8 weights and "edge" for AWQ weights (and
an AWQ checkpoint); their command lines are tested in tests/engine/test_presets.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from engine import launch
from tests.vllm_fixtures import engine_config, serve

pytestmark = pytest.mark.vllm


def metric(text: str, name: str) -> float:
    values = re.findall(rf"^{re.escape(name)}{{[^}}]*}} ([0-9.e+]+)$", text, re.MULTILINE)
    assert values, f"{name} not exposed"
    return sum(float(v) for v in values)


def test_an_interactive_engine_starts_and_its_prefix_cache_hits(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    name = "tiny-interactive"
    cfg = engine_config(name, tiny_model_dir, tmp_path, preset="interactive")
    argv = launch.build(name, cfg).argv
    assert argv[argv.index("--dtype") + 1] == "auto"
    assert "--enable-prefix-caching" in argv and "--quantization" not in argv

    server = serve(name, cfg, tiny_model_dir, tmp_path)
    engine = next(server)
    try:
        log = engine.log_path.read_text(errors="replace")
        assert "dtype=torch.bfloat16" in log
        assert "enable_prefix_caching=True" in log
        # Longer than a KV block several times over: the second time it is served from cache.
        prompt = "the quick brown fox jumps over the lazy dog " * 60
        body = {"model": name, "prompt": prompt, "max_tokens": 4}
        with httpx.Client(base_url=engine.base_url, timeout=120.0) as client:
            for _ in range(2):
                answer = client.post("/v1/completions", json=body)
                assert answer.status_code == 200, answer.text
            metrics = client.get("/metrics").text
        assert metric(metrics, "vllm:prefix_cache_hits_total") > 0
    finally:
        server.close()
