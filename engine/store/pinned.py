"""Engines pinned by content: what the launcher and `vgate check-config` call for an engine whose
`model` is `NAME@sha256:HEX`. Any other value (a path, a hub id) passes through untouched.
"""

from __future__ import annotations

from pathlib import Path

from engine.store.manifest import StoreError, is_ref, parse_ref
from engine.store.store import Store
from engine.store.verify import Log

DEFAULT_STORE = "/var/lib/vgate-engine/models"


def resolve_model(
    model: str, store_root: str | Path, *, full: bool = False, log: Log | None = None
) -> str:
    """What to hand vLLM as `--model`; call it before exec, never while printing a command line.

    For `NAME@sha256:HEX`: the model's directory in the store at `store_root`, once every file
    was checked against the digest (`full`: every file hashed, else only those a stamp does not
    vouch for); StoreError naming each bad file otherwise. Any other value: itself.
    """
    if not is_ref(model):
        return model
    return str(Store(store_root).resolve(model, full=full, log=log))


def model_path(model: str, store_root: str | Path) -> str:
    """Where `NAME@sha256:HEX` lives in the store, unchecked (for printing a command line, as
    `vgate engine args` does); any other value: itself. StoreError if the value is malformed."""
    if not is_ref(model):
        return model
    return str(Store(store_root).layout.tree(parse_ref(model).hex))


def check_model(key: str, model: str, store_root: str | Path) -> list[str]:
    """Problems of an engine's `model` value as `key: problem` lines, without hashing anything.

    For `NAME@sha256:HEX`: well formed, the store exists, holds NAME with that digest, and has
    its manifest and directory. Files are only hashed when the engine starts.
    """
    if not is_ref(model):
        return []
    root = Path(store_root)
    try:
        ref = parse_ref(model)
        if not root.is_dir():
            return [f"{key}: the model store {root} does not exist (fill it: vgate models add)"]
        store = Store(root)
        store.locate(ref)
        if not store.layout.tree(ref.hex).is_dir():
            return [f"{key}: {ref}: its directory is missing from {root} (vgate models verify)"]
    except StoreError as exc:
        return [f"{key}: {exc}"]
    except OSError as exc:
        return [f"{key}: cannot read the model store {root}: {exc.strerror}"]
    return []
