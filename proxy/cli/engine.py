"""The engine side of the `vgate` command line: `engine args|run`, `dev build-model`, `up`.

`engine run` execs vLLM in place (the unit's main process is the API server), except on a
headless worker node, where vgate stays to watch the node's link to its head (proxy.ops.node).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import replace

from engine import launch, preflight, presets
from engine.explain import describe
from engine.store.manifest import StoreError
from engine.store.pinned import model_path, resolve_model
from proxy.core.binder import ConfigError
from proxy.core.config import Config, EngineConfig
from proxy.core.config.distributed import head_address
from proxy.runtime import load


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the engine subcommands to `vgate`'s subparsers; each sets `func(args) -> int`."""
    engine = sub.add_parser("engine", help="launch a configured vLLM engine")
    engine_sub = engine.add_subparsers(dest="engine_command", required=True)
    for verb, func, help_text in (
        ("args", _engine_args, "print the engine's command line (with its environment)"),
        ("run", _engine_run, "exec the engine (what a systemd unit runs)"),
    ):
        p = engine_sub.add_parser(verb, help=help_text)
        p.add_argument("name", help="engine name ([engines.NAME] in the config)")
        p.add_argument("--config", required=True, help="TOML config file")
        p.set_defaults(func=func)

    dev = sub.add_parser("dev", help="developer tools")
    dev_sub = dev.add_subparsers(dest="dev_command", required=True)
    build = dev_sub.add_parser("build-model", help="build the tiny dev model (no downloads)")
    build.add_argument("dir", help="output directory")
    build.set_defaults(func=_build_model)

    up = sub.add_parser("up", help="start the engines and the proxy in the foreground")
    up.add_argument("--config", required=True, help="TOML config file")
    up.add_argument(
        "--ready-timeout", type=float, default=900.0, help="seconds to wait for /ready (900)"
    )
    shown = up.add_mutually_exclusive_group()
    shown.add_argument("--quiet", action="store_true", help="no line per request once ready")
    shown.add_argument(
        "--verbose", action="store_true", help="every line the engines and the proxy log"
    )
    up.set_defaults(func=_up)


def engine_config(args: argparse.Namespace) -> tuple[Config, str]:
    """The loaded config and the engine `args.name` names in it (ConfigError if none)."""
    cfg = load.load(args.config)
    if args.name not in cfg.engines:
        known = ", ".join(sorted(cfg.engines)) or "none"
        raise ConfigError(args.config, [f"engines.{args.name}: no such engine (known: {known})"])
    return cfg, args.name


def preset_problems(name: str, engine: EngineConfig) -> list[str]:
    """Why the engine's model cannot honour its preset (engine.presets), as `key: problem`."""
    try:
        where = model_path(engine.model, engine.model_store)
    except StoreError:
        return []  # a malformed pinned model: check_model names it
    return presets.model_problems(f"engines.{name}", engine, launch.model_arg(where))


def _engine_args(args: argparse.Namespace) -> int:
    cfg, name = engine_config(args)
    engine = cfg.engines[name]
    # A pinned model is shown at its place in the store, unchecked: printing has no effects.
    engine = replace(engine, model=model_path(engine.model, engine.model_store))
    spec = launch.build(name, engine)
    for line in describe(name, engine, spec):
        print(line)
    print(spec.shell())
    return 0


def _engine_run(args: argparse.Namespace) -> int:
    cfg, name = engine_config(args)
    engine = cfg.engines[name]
    problems = preset_problems(name, engine)
    if problems:
        # Exit 2 like a config error: the unit does not restart on it.
        raise ConfigError(args.config, problems)
    try:
        # Checked before vLLM loads anything: a file that does not match its digest refuses
        # the start (exit 2; the unit does not restart on it).
        model = resolve_model(
            engine.model, engine.model_store, full=engine.model_verify == "full", log=print
        )
    except StoreError as exc:
        print(f"vgate engine {name}: refusing to start: {exc}", file=sys.stderr)
        return 2
    missing = preflight.problems(name, engine, model)
    for problem in missing:
        print(f"vgate engine {name}: refusing to start: {problem}", file=sys.stderr)
    if missing:
        return 2
    sys.stdout.flush()
    spec = launch.build(name, replace(engine, model=model))
    if engine.headless:
        return _run_worker(name, engine, spec)
    launch.exec_engine(spec)
    return 1  # not reached: exec replaced this process


def _run_worker(name: str, engine: EngineConfig, spec: launch.LaunchSpec) -> int:
    # Imported here: only worker nodes supervise their engine instead of exec'ing it.
    from engine.joined import head_ips
    from proxy.ops.node import supervise

    head = head_address(engine)
    assert head is not None  # the config checks (proxy.core.config.distributed) require it
    peers = head_ips(head)
    if not peers:
        # Exit 1, not 2: a name that does not resolve yet may resolve at the next start.
        print(f"vgate engine {name}: the head {head!r} does not resolve", file=sys.stderr)
        return 1
    return supervise(name, spec, head, peers)


def _build_model(args: argparse.Namespace) -> int:
    # Imported here: numpy/tokenizers are only needed by this command.
    from engine import devmodel

    started = time.monotonic()
    out = devmodel.build(args.dir)
    print(f"built {out} in {time.monotonic() - started:.1f} s")
    return 0


def _up(args: argparse.Namespace) -> int:
    from proxy.ops.echo import Echo
    from proxy.ops.up import up

    shown = Echo(quiet=args.quiet, verbose=args.verbose)
    return asyncio.run(up(args.config, ready_timeout=args.ready_timeout, shown=shown))
