"""The cheap bound truncate uses to skip counting must never be below the real count.

Checked with the dev model's own byte-level BPE tokenizer and chat template on hostile text:
multi-byte scripts, emoji, combining marks, control characters, whitespace runs and strings that
look like the template's special tokens.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer

from engine.devmodel import BOS
from policies.truncate import TruncateSettings
from proxy.api.text import chat_bytes, utf8_len

PIECES = [
    "hello",
    " world",
    "日本語のテキスト",
    "🙂🚀👩‍👩‍👧",
    "e\u0301\u0302",
    "\x00\x01\x1f\x7f",
    "   \n\n\t  ",
    "<|end|>",
    "<|user|>",
    "</s>",
    "ß∂ƒ©",
    "x" * 50,
    "\u200b\ufeff",
]


def render(messages: list[dict[str, Any]]) -> str:
    """The dev model's template (engine.devmodel.CHAT_TEMPLATE), with the generation prompt."""
    out = BOS
    for m in messages:
        out += f"<|{m['role']}|>\n{m['content'] or ''}<|end|>\n"
    return out + "<|assistant|>\n"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 30)))


def count(tokenizer: Tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False).ids)


def test_byte_level_bpe_never_makes_more_tokens_than_bytes(tokenizer: Tokenizer) -> None:
    rng = random.Random(7)
    for _ in range(500):
        text = random_text(rng)
        assert count(tokenizer, text) <= utf8_len(text)


def test_the_chat_bound_holds_for_hostile_conversations(tokenizer: Tokenizer) -> None:
    overhead = TruncateSettings().per_message_overhead
    fixed = count(tokenizer, render([{"role": "user", "content": ""}]))
    rng = random.Random(11)
    tightest = 1.0
    for _ in range(300):
        messages = [
            {
                "role": rng.choice(["system", "user", "assistant", "tool"]),
                "content": random_text(rng),
            }
            for _ in range(rng.randint(1, 12))
        ]
        size = chat_bytes(messages, overhead)
        assert size is not None
        real = count(tokenizer, render(messages))
        assert real <= size + fixed, messages
        tightest = min(tightest, (size + fixed - real) / (size + fixed))
    # The bound is an upper bound, not a wild one: some conversations come close to it.
    assert tightest < 0.5
