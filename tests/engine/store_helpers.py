"""Helpers of the model-store tests: model directories on real files, and ways to damage them."""

from __future__ import annotations

import os
from pathlib import Path

from engine.store import source as store_source
from engine.store.store import Added, Store

WEIGHTS = bytes(range(256)) * 4096  # 1 MiB
FILES = {
    "config.json": b'{"architectures": ["LlamaForCausalLM"]}\n',
    "model.safetensors": WEIGHTS,
    "tokenizer/vocab.txt": b"a\nb\nc\n",
}


def model_dir(path: Path, files: dict[str, bytes] | None = None) -> Path:
    """A model directory holding `files` (default FILES)."""
    for rel, data in (FILES if files is None else files).items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    return path


def add(store: Store, name: str, source: Path, *, follow_symlinks: bool = False) -> Added:
    return store.add(name, store_source.directory(source, follow_symlinks=follow_symlinks))


def flip(path: Path, offset: int = 0) -> None:
    """Flip one bit of the file at `path` in place, as a stray write would (links followed)."""
    os.chmod(path, 0o644)  # blobs are read-only
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ 0x01]))


def writable(path: Path) -> None:
    """Let a test change a tree directory the store made read-only."""
    os.chmod(path, 0o755)


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under `root` with (inode, size, mtime): what an unchanged store keeps.

    tmp/ (each add stages there) and the lock file are left out.
    """
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == str(root):
            dirnames.remove("tmp")
            filenames.remove("lock")
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            out[os.path.relpath(full, root)] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out
