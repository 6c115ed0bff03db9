"""`vgate dev build-model DIR`: a tiny Llama-architecture model, built locally, deterministically.

No downloads and no torch/transformers (it runs in the proxy's venv): a byte-level BPE tokenizer
trained with `tokenizers` on the Python standard library's own sources, and random float32
weights from a fixed seed written with `safetensors.numpy`. The output is byte-identical across
runs on the same Python installation (the corpus is that installation's stdlib). The model talks
nonsense and almost never emits EOS, but vLLM serves it like any real model: same tokenizer
plumbing, chat template, /tokenize, streaming, metrics.
"""

from __future__ import annotations

import json
import os
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SPECIAL_TOKENS = (BOS, EOS, PAD, *ROLE_TOKENS)  # ids 0..6, in this order
VOCAB_SIZE = 4096
CORPUS_BYTES = 3 * 1024 * 1024  # enough for a 4096 vocabulary, trained in a few seconds
SEED = 20240229

HIDDEN = 128
INTERMEDIATE = 256
LAYERS = 2
HEADS = 4  # head_dim 32: one that vLLM's CPU attention supports
MAX_POSITIONS = 4096

# Each turn `<|role|>\n{content}<|end|>\n`; the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] or '' }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build(out_dir: str | os.PathLike[str]) -> Path:
    """Write the model into `out_dir` (created; existing files replaced); returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer()
    vocab = tokenizer.get_vocab_size()
    # The trainer gives the special tokens the first ids, in order.
    ids = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    assert all(tokenizer.token_to_id(tok) == i for tok, i in ids.items())
    eos_ids = [ids[EOS], ids["<|end|>"]]

    _write_text(out / "tokenizer.json", tokenizer.to_str(pretty=True))
    _write_json(out / "tokenizer_config.json", _tokenizer_config())
    _write_text(out / "chat_template.jinja", CHAT_TEMPLATE)
    _write_json(
        out / "special_tokens_map.json",
        {
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "additional_special_tokens": list(ROLE_TOKENS),
        },
    )
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": ids[BOS], "eos_token_id": eos_ids, "pad_token_id": ids[PAD]},
    )
    _write_json(out / "config.json", _model_config(vocab, ids[BOS], eos_ids, ids[PAD]))
    weights = _weights(vocab)
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".model.safetensors.")
    os.close(fd)
    try:
        save_file(weights, tmp, metadata={"format": "pt"})
        os.chmod(tmp, 0o644)
        os.replace(tmp, out / "model.safetensors")
    except BaseException:
        os.unlink(tmp)
        raise
    return out


def _corpus() -> list[str]:
    """The stdlib's .py files in sorted order, capped: local, deterministic, realistic text."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    total = 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        # Tests and site-packages vary between installs of the same Python version.
        if rel[0] in ("site-packages", "test", "idlelib") or "tests" in rel:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        texts.append(text)
        total += len(text)
        if total >= CORPUS_BYTES:
            break
    return texts


def _train_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer


def _tokenizer_config() -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "additional_special_tokens": list(ROLE_TOKENS),
        "model_max_length": MAX_POSITIONS,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def _model_config(vocab: int, bos: int, eos: list[int], pad: int) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "head_dim": HIDDEN // HEADS,
        "max_position_embeddings": MAX_POSITIONS,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def _weights(vocab: int) -> dict[str, Any]:
    rng = np.random.default_rng(SEED)

    def normal(*shape: int) -> Any:
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)).astype(np.float32)

    def ones(n: int) -> Any:
        return np.ones((n,), dtype=np.float32)

    # HF Llama names and [out_features, in_features] layouts, which vLLM's loader maps.
    tensors: dict[str, Any] = {"model.embed_tokens.weight": normal(vocab, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[p + f"self_attn.{proj}.weight"] = normal(HIDDEN, HIDDEN)
        tensors[p + "mlp.gate_proj.weight"] = normal(INTERMEDIATE, HIDDEN)
        tensors[p + "mlp.up_proj.weight"] = normal(INTERMEDIATE, HIDDEN)
        tensors[p + "mlp.down_proj.weight"] = normal(HIDDEN, INTERMEDIATE)
        tensors[p + "input_layernorm.weight"] = ones(HIDDEN)
        tensors[p + "post_attention_layernorm.weight"] = ones(HIDDEN)
    tensors["model.norm.weight"] = ones(HIDDEN)
    tensors["lm_head.weight"] = normal(vocab, HIDDEN)
    return tensors


def _write_json(path: Path, data: dict[str, Any]) -> None:
    _write_text(path, json.dumps(data, indent=2) + "\n")


def _write_text(path: Path, text: str) -> None:
    # Replace atomically: an engine starting concurrently never reads a half-written file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
