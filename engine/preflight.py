"""What an engine needs on disk before vLLM starts: checked in a millisecond, not after a minute.

`vgate engine run` (what the unit and `vgate up` start) and `vgate up` (before it starts
anything) refuse with one line naming the key and what to do, instead of a `taskset` error or
a Hugging Face repo-id traceback from deep inside vLLM.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

from proxy.core.config import Config
from proxy.core.config.engines import EngineConfig


def _local(model: str) -> bool:
    """Whether `model` names a directory (a hub id is `name` or `org/name`: hubs are
    unreachable from an appliance anyway, but vLLM's offline cache may hold one)."""
    return model.startswith(("/", ".", "~")) or model.count("/") > 1 or os.path.exists(model)


def problems(name: str, engine: EngineConfig, model: str | None = None) -> list[str]:
    """Every problem of engine `name`'s interpreter and model directory (`model`: the path
    a pinned `NAME@sha256:...` resolved to)."""
    out = []
    python = Path(engine.python)
    if not python.exists():
        out.append(
            f"engines.{name}.python: {python} does not exist: create the engine venv with "
            "`make engine-venv` (`make run` does all set-up)"
        )
    elif not os.access(python, os.X_OK):
        out.append(f"engines.{name}.python: {python} is not executable")
    path = model if model is not None else engine.model
    if _local(path):
        directory = Path(path).expanduser()
        where = f"engines.{name}.model: {directory}"
        if not directory.exists():
            out.append(f"{where}: no such directory (`make dev-model` builds the dev model)")
        elif not directory.is_dir():
            out.append(f"{where}: not a directory")
        elif not os.access(directory, os.R_OK | os.X_OK):
            out.append(f"{where}: not readable by this user (uid {os.getuid()})")
        elif not (directory / "config.json").is_file():
            out.append(f"{where}: no config.json: not a model directory")
        elif not os.access(directory / "config.json", os.R_OK):
            out.append(f"{where}/config.json: not readable by this user (uid {os.getuid()})")
    return out


def busy_ports(cfg: Config) -> list[str]:
    """Fail in a second instead of after a minute of model loading."""
    targets = [
        (f"engine {n} port {e.port}", e.host, e.port)
        for n, e in cfg.engines.items()
        if not e.headless
    ]
    targets.append((f"proxy port {cfg.server.port}", cfg.server.host, cfg.server.port))
    busy = []
    for label, host, port in targets:
        connect_host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
        with contextlib.suppress(OSError), socket.create_connection((connect_host, port), 0.5):
            busy.append(label)
    return busy
