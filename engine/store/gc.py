"""Garbage collection of the model store, run under its lock at the end of every add and remove.

What no name holds goes: manifests, trees (renamed into tmp/ first, so a reader sees a whole
tree or none), blobs no live manifest lists, their stamps; and what crashed adds left in tmp/.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from engine.store.io import TMP_PREFIX, locked, remove_tree
from engine.store.layout import Layout
from engine.store.manifest import HEX_RE, Manifest, StoreError

ABANDONED_AFTER_S = 60.0  # a staging directory without its lock file, this old, is a crash's


@dataclass(frozen=True)
class Removed:
    digests: list[str]  # hex of the models deleted from disk
    blobs: int
    bytes: int


def collect(layout: Layout, live: set[str]) -> Removed:
    """Delete every model whose digest is not in `live`, and the content only they used."""
    dead = {p.name[: -len(".json")] for p in layout.manifests.glob("[!.]*.json")} - live
    for entry in layout.trees.iterdir():
        if entry.name not in live:
            dead.add(entry.name)
            entry.chmod(0o755)  # moving a directory needs write access to it (its "..")
            os.rename(entry, layout.tmp / f"rm-{entry.name}-{os.getpid()}")
    for hex_ in dead:
        with contextlib.suppress(FileNotFoundError):
            layout.manifest(hex_).unlink()
    try:
        used = {f.sha256 for h in live for f in _manifest(layout, h).files}
        unused = [b for b in layout.blobs.iterdir() if HEX_RE.fullmatch(b.name)]
    except (OSError, StoreError):
        used, unused = set(), []  # a live manifest is missing or damaged: keep all content
    blobs = freed = 0
    for blob in unused:
        if blob.name not in used:
            freed += blob.lstat().st_size
            blob.unlink()
            blobs += 1
            with contextlib.suppress(FileNotFoundError):
                layout.stamp(blob.name).unlink()
    for d in (layout.names, layout.manifests, layout.stamps):
        # Names and manifests are written under the lock; a stamp being written by a check
        # that loses its temporary file just is not recorded.
        for leftover in d.glob(f"{TMP_PREFIX}*"):
            leftover.unlink(missing_ok=True)
    for entry in layout.tmp.iterdir():
        if entry.name.startswith("rm-") or _abandoned(entry):
            remove_tree(entry)
    return Removed(sorted(dead), blobs, freed)


def _manifest(layout: Layout, hex_: str) -> Manifest:
    return Manifest.parse(layout.manifest(hex_).read_bytes(), hex_)


def _abandoned(stage: Path) -> bool:
    if not stage.name.startswith("add-"):
        return False
    lock = stage / ".lock"
    if not lock.exists():  # between mkdtemp and its lock, or a crash right there
        return time.time() - stage.stat().st_mtime > ABANDONED_AFTER_S
    with locked(lock, wait=False) as free:
        return free
