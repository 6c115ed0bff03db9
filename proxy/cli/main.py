"""The `vgate` command line. Logic lives in the modules it calls."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from proxy.core import config as config_module
from proxy.core.binder import ConfigError


def _serve(args: argparse.Namespace) -> int:
    from proxy.ops.server import serve

    serve(config_module.load(args.config), args.config)
    return 0


def _check_config(args: argparse.Namespace) -> int:
    from proxy.ops.server import _has_auth, check_bind

    cfg = config_module.load(args.config)
    check_bind(cfg, authenticated=_has_auth(cfg))
    print(f"{args.config}: OK ({len(cfg.models)} models, {len(cfg.engines)} engines)")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vgate", description="OpenAI-compatible proxy for vLLM")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the proxy")
    s.add_argument("--config", required=True, help="TOML config file")
    s.set_defaults(func=_serve)
    c = sub.add_parser("check-config", help="validate a config file and print every problem")
    c.add_argument("config", help="TOML config file")
    c.set_defaults(func=_check_config)
    from proxy.cli.engine import register as register_engine

    register_engine(sub)
    from proxy.cli.systemd import register as register_systemd

    register_systemd(sub)
    from proxy.cli.keys import register as register_policies

    register_policies(sub)
    from engine.store_cli import register as register_models

    register_models(sub)
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
