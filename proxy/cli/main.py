"""The `vgate` command line. Logic lives in the modules it calls."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from engine.store.pinned import check_model
from proxy.cli import engine, keys, models, status, systemd
from proxy.core.binder import ConfigError
from proxy.runtime import load


def _serve(args: argparse.Namespace) -> int:
    # Imported here: uvicorn and the app are not needed by the other commands.
    from proxy.core.box import Box
    from proxy.ops.server import serve
    from proxy.ops.workers import Supervisor

    config = load.load(args.config)
    if args.worker is not None:
        serve(config, args.config, Box.parse(args.worker))
    elif config.server.worker_count() > 1:
        return Supervisor(config, args.config).run()
    else:
        serve(config, args.config)
    return 0


def _check_config(args: argparse.Namespace) -> int:
    cfg = load.load(args.config)
    # The engines' model store is read only here and by `vgate engine run`, never by the
    # proxy (which may not be allowed to read it): a pinned model the store lacks is named.
    problems = [
        problem
        for name, e in cfg.engines.items()
        for problem in check_model(f"engines.{name}.model", e.model, e.model_store)
    ]
    # So is the model's config.json, for a preset whose quantization the checkpoint must match.
    problems += [p for name, e in cfg.engines.items() for p in engine.preset_problems(name, e)]
    if problems:
        raise ConfigError(args.config, problems)
    print(f"{args.config}: OK ({len(cfg.models)} models, {len(cfg.engines)} engines)")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vgate", description="OpenAI-compatible proxy for vLLM")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the proxy")
    s.add_argument("--config", required=True, help="TOML config file")
    # DIR:INDEX:COUNT: started by the supervisor of `[server] workers`, never by hand.
    s.add_argument("--worker", help=argparse.SUPPRESS)
    s.set_defaults(func=_serve)
    c = sub.add_parser("check-config", help="validate a config file and print every problem")
    c.add_argument("config", help="TOML config file")
    c.set_defaults(func=_check_config)
    for module in (engine, systemd, keys, models, status):
        module.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"vgate: invalid configuration in {exc.source}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
