"""`vgate systemd install|uninstall|wait-healthy`: the appliance's systemd side."""

from __future__ import annotations

import argparse
import http.client
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from engine.client.warmup import Warmup, attempts
from engine.client.warmup import problem as problem_of
from proxy.cli.engine import engine_config
from proxy.ops.installer import Installer, InstallError, Layout


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `vgate systemd ...` to `vgate`'s subparsers; each sets `func(args) -> int`."""
    systemd = sub.add_parser("systemd", help="install and run vgate as systemd services")
    verbs = systemd.add_subparsers(dest="systemd_command", required=True)
    defaults = Layout()

    def layout_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--root", default="/", help="staging tree instead of / (packaging)")
        p.add_argument("--prefix", default=defaults.prefix, help="venv location (/opt/vgate)")
        p.add_argument("--config", default=defaults.config, help="config file path")
        p.add_argument("--unit-dir", default=defaults.unit_dir, help=argparse.SUPPRESS)

    inst = verbs.add_parser("install", help="venv, units, default config, users; needs root")
    layout_args(inst)
    inst.add_argument("--source", type=Path, help="vgate source tree (default: this one)")
    inst.add_argument("--python", default="/usr/bin/python3", help="Python for the venv")
    inst.add_argument(
        "--pip-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra pip argument, repeatable (e.g. --pip-arg=--find-links=DIR)",
    )
    inst.set_defaults(func=_install)

    uninst = verbs.add_parser("uninstall", help="stop and remove units and venv; needs root")
    layout_args(uninst)
    uninst.add_argument("--purge", action="store_true", help="also config, state and users")
    uninst.set_defaults(func=_uninstall)

    wait = verbs.add_parser(
        "wait-healthy", help="wait until an engine's /health answers 200, then warm it up"
    )
    wait.add_argument("name", help="engine name ([engines.NAME] in the config)")
    wait.add_argument("--config", required=True, help="TOML config file")
    wait.add_argument("--timeout", type=float, default=1200.0, help="seconds (1200)")
    wait.set_defaults(func=_wait_healthy)


def _layout(args: argparse.Namespace) -> Layout:
    return Layout(Path(args.root), args.prefix, args.config, args.unit_dir)


def _install(args: argparse.Namespace) -> int:
    installer = Installer(_layout(args), args.source, args.python, args.pip_arg)
    try:
        installer.install()
    except InstallError as exc:
        print(f"vgate systemd install: {exc}", file=sys.stderr)
        return 1
    return 0


def _uninstall(args: argparse.Namespace) -> int:
    try:
        Installer(_layout(args)).uninstall(purge=args.purge)
    except InstallError as exc:
        print(f"vgate systemd uninstall: {exc}", file=sys.stderr)
        return 1
    return 0


def _wait_healthy(args: argparse.Namespace) -> int:
    from engine import launch

    cfg, name = engine_config(args)
    engine = cfg.engines[name]
    if engine.headless:
        # A headless worker node serves no HTTP: there is no /health to wait for.
        print(f"engine {name} is a headless worker node: it has no /health", file=sys.stderr)
        return 2
    url = launch.base_url(engine) + "/health"
    deadline = time.monotonic() + args.timeout
    if not wait_healthy(url, args.timeout):
        print(f"engine {name}: {url} not healthy within {args.timeout:g} s", file=sys.stderr)
        return 1
    warmup = launch.warmup_of(engine)
    if warmup is None:
        return 0
    # Ready means warm: the unit turns active only once a real request was answered.
    started = time.monotonic()
    problem = warm_up(url, warmup, launch.served_name(name, engine), engine.api_key, deadline)
    if problem is not None:
        print(f"engine {name}: warm-up failed: {problem}", file=sys.stderr)
        return 1
    print(f"engine {name}: warmed up in {time.monotonic() - started:.2f} s")
    return 0


def warm_up(
    health_url: str, warmup: Warmup, served: str, api_key: str | None, deadline: float
) -> str | None:
    """Send the warm-up requests (engine.client.warmup) until one is answered; the problem of
    the last one, or None."""
    parts = urlsplit(health_url)
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    problem: str | None = "no warm-up request"
    for path, body in attempts(warmup, served):
        timeout = max(1.0, min(warmup.timeout, deadline - time.monotonic()))
        conn = http.client.HTTPConnection(
            parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout
        )
        try:
            conn.request("POST", path, body=body, headers=headers)
            answer = conn.getresponse()
            status, content = answer.status, answer.read()
        except (OSError, http.client.HTTPException) as exc:
            return f"{path}: {exc}"
        finally:
            conn.close()
        problem = problem_of(warmup, path, status, content)
        if status != 404:
            break
    return problem


def wait_healthy(url: str, timeout: float, interval: float = 0.5) -> bool:
    """Poll `url` until it answers 200; False after `timeout` seconds."""
    parts = urlsplit(url)
    deadline = time.monotonic() + timeout
    while True:
        if _probe(parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"):
            return True
        if time.monotonic() + interval > deadline:
            return False
        time.sleep(interval)


def _probe(host: str, port: int, path: str) -> bool:
    conn = http.client.HTTPConnection(host, port, timeout=2.0)
    try:
        conn.request("GET", path)
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()
