"""The dev model: deterministic bytes, a working tokenizer, the shapes vLLM's Llama loader wants."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.numpy import load_file
from tokenizers import Tokenizer

from engine import devmodel

FILES = [
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
]


def test_same_bytes_every_time(tiny_model_dir: Path, tmp_path: Path) -> None:
    again = devmodel.build(tmp_path / "again")
    assert sorted(p.name for p in again.iterdir()) == FILES  # no temp files left behind
    for name in FILES:
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name


def test_tokenizer_and_template(tiny_model_dir: Path) -> None:
    tok = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    assert tok.get_vocab_size() == devmodel.VOCAB_SIZE
    ids = tok.encode("def main():\n    return 0").ids
    assert ids[0] == tok.token_to_id("<s>") == 0
    assert len(ids) < 12  # trained merges, not one token per byte
    assert tok.decode(ids) == "def main():\n    return 0"
    assert tok.encode("<|user|>").ids == [0, tok.token_to_id("<|user|>")]
    cfg = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == (tiny_model_dir / "chat_template.jinja").read_text()
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_weights_match_the_config(tiny_model_dir: Path) -> None:
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    weights = load_file(str(tiny_model_dir / "model.safetensors"))
    vocab, hidden = cfg["vocab_size"], cfg["hidden_size"]
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert hidden // cfg["num_attention_heads"] == cfg["head_dim"] == 32
    assert cfg["eos_token_id"] == [1, 6]
    assert weights["model.embed_tokens.weight"].shape == (vocab, hidden)
    assert weights["lm_head.weight"].shape == (vocab, hidden)
    assert weights["model.layers.1.mlp.down_proj.weight"].shape == (
        hidden,
        cfg["intermediate_size"],
    )
    assert len(weights) == 2 + 1 + cfg["num_hidden_layers"] * 9
    assert all(str(w.dtype) == "float32" for w in weights.values())
    params = sum(w.size for w in weights.values())
    assert 1_000_000 < params < 2_000_000
